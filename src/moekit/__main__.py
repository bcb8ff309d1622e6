"""``python -m moekit ...``: the same entry point as the ``moekit`` command."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
