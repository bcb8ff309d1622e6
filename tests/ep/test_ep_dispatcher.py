"""The Dispatcher protocol: moekit.Buffer and NaiveBuffer take every argument that moekit.MoE and the
overlapping pipeline stage pass them, and the old import paths of the output types still work."""

import inspect

import pytest

from moekit.ep import Buffer, CombineOutput, Dispatcher, DispatchOutput, NaiveBuffer, WeightedCombineOutput
from moekit.ep import buffer as buffer_mod
from moekit.ep import dispatcher as dispatcher_mod


def _accepts(impl, proto) -> list[str]:
    """The protocol's parameters that ``impl`` does not take (by name, or through ``**kwargs``)."""
    got = inspect.signature(impl).parameters
    if any(p.kind == p.VAR_KEYWORD for p in got.values()):
        got = {n: p for n, p in got.items() if p.kind != p.VAR_KEYWORD}
        return [n for n, p in inspect.signature(proto).parameters.items()
                if n != "self" and p.kind != p.KEYWORD_ONLY and n not in got]
    return [n for n in inspect.signature(proto).parameters if n != "self" and n not in got]


@pytest.mark.parametrize("cls", [Buffer, NaiveBuffer])
def test_buffers_satisfy_the_dispatcher_protocol(cls):
    buf = cls()  # one rank, no torch.distributed
    assert isinstance(buf, Dispatcher)
    for name in ("dispatch", "combine"):
        assert _accepts(getattr(cls, name), getattr(Dispatcher, name)) == [], (cls.__name__, name)


def test_output_types_live_in_the_dispatcher_module():
    for t in (DispatchOutput, CombineOutput, WeightedCombineOutput):
        assert t.__module__ == dispatcher_mod.__name__
        assert getattr(buffer_mod, t.__name__) is t  # (moekit.ep.buffer's old names)
    assert not isinstance(object(), Dispatcher)
