"""What importing the planner and the schedule model pulls in: no runtime, and for the schedule model no torch."""

import subprocess
import sys
from pathlib import Path

import moekit

SRC = str(Path(moekit.__file__).resolve().parent)


def _run(code: str) -> None:
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_plan_does_not_import_the_runtime():
    _run("import sys, moekit.plan\n"
         "bad = [m for m in sys.modules if m == 'moekit.moe' or m.startswith('moekit.moe.')\n"
         "       or m in ('moekit.pipeline.engine', 'moekit.pipeline.moe_overlap')]\n"
         "assert not bad, bad")


def test_schedule_package_imports_no_torch():
    # moekit/__init__ imports moekit.platform (torch), so stand in an empty parent package for it: what
    # is checked is that moekit.schedule's own modules import nothing torch.
    _run("import sys, types\n"
         f"pkg = types.ModuleType('moekit'); pkg.__path__ = [{SRC!r}]; sys.modules['moekit'] = pkg\n"
         "import moekit.schedule\n"
         "moekit.schedule.simulate('dualpipe', 4, 8)\n"
         "assert 'torch' not in sys.modules, [m for m in sys.modules if m.startswith('torch')]")


def test_plan_reexports_the_schedule_model():
    import moekit.plan as plan
    import moekit.schedule as schedule

    assert plan.simulate is schedule.simulate and plan.UniformCosts is schedule.UniformCosts
    assert plan.bubble_formula is schedule.bubble_formula and plan.rank_orders is schedule.programs
    assert plan.SimResult is schedule.Simulation and plan.SCHEDULES == schedule.SCHEDULES
