import os
import random

import numpy as np
import pytest
import torch
from hypothesis import settings

import moekit  # noqa: F401  (chooses Triton's mode before any kernel module)

# Locally hypothesis draws fresh examples every run; CI replays a fixed sequence so that a submission's
# verdict does not depend on the draw (a failure found locally still replays from .hypothesis/).
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


@pytest.fixture(autouse=True)
def seed():
    """Fixed seeds per test, so a failure replays; tests still draw fresh random inputs from them."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


def pytest_report_header(config):
    from moekit import platform

    p = platform.info()
    return f"moekit: backend={p.backend} triton_interpreted={p.triton_interpreted} " \
           f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')}"
