"""``num_sms`` → NCCL communicators with ``max_ctas = num_sms``: the option plumbing, checked on the CPU with a
stand-in for ``ProcessGroupNCCL.Options`` (this CPU torch has no NCCL); never applied on gloo."""

from __future__ import annotations

import types

import pytest
import torch.distributed as dist

from moekit.ep import Buffer
from moekit.ep.transport import nccl


class _FakeOptions:
    """Shaped like torch's ``ProcessGroupNCCL.Options``: a ``config`` with NCCL's CTA fields."""

    def __init__(self, min_ctas=-2147483648):  # NCCL_CONFIG_UNDEF_INT: "let NCCL choose"
        self.config = types.SimpleNamespace(max_ctas=-2147483648, min_ctas=min_ctas, cga_cluster_size=4)


def test_cta_limited_options():
    opts = nccl.cta_limited_options(20, _FakeOptions)
    assert opts.config.max_ctas == 20
    assert opts.config.min_ctas == -2147483648 and opts.config.cga_cluster_size == 4  # untouched
    assert nccl.cta_limited_options(8, lambda: _FakeOptions(min_ctas=16)).config.min_ctas == 8  # min <= max
    assert nccl.cta_limited_options(8, lambda: _FakeOptions(min_ctas=4)).config.min_ctas == 4
    # A torch whose options have no NCCL config (NCCL < 2.17): nothing to set.
    assert nccl.cta_limited_options(8, lambda: types.SimpleNamespace(config=types.SimpleNamespace())) is None
    assert nccl.cta_limited_options(8, lambda: types.SimpleNamespace()) is None
    for bad in (0, -3, True, 2.5, "20"):
        with pytest.raises(ValueError, match="num_sms must be a positive int"):
            nccl.cta_limited_options(bad, _FakeOptions)


def test_buffer_pg_options_only_for_nccl():
    assert nccl.buffer_pg_options("nccl", 24, _FakeOptions).config.max_ctas == 24
    assert nccl.buffer_pg_options("gloo", 24, _FakeOptions) is None  # no CTAs on the CPU
    assert nccl.buffer_pg_options("nccl", None, _FakeOptions) is None  # num_sms not given: the caller's group
    # This torch: the options class exists exactly when NCCL does.
    assert (nccl.nccl_options_class() is None) == (not dist.is_nccl_available())
    if nccl.nccl_options_class() is not None:
        opts = nccl.cta_limited_options(16)
        assert opts is None or opts.config.max_ctas == 16


def test_buffer_num_sms_argument():
    buf = Buffer(num_sms=12)  # no process group: recorded, nothing created
    assert buf.num_sms == 12 and buf._pg_options is None and buf._engine.comm.group is None
    assert Buffer().num_sms == Buffer.num_sms
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="num_sms must be a positive int or None"):
            Buffer(num_sms=bad)
