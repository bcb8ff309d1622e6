"""``torchrun -m moekit.demo`` / ``python -m moekit.demo``: the same as ``moekit demo``."""

import sys

from . import main

sys.exit(main())
