"""Every shipped scenario passes at its stated size (the large ones only
with PEERD_SIM_LARGE=1: they take minutes, see benchmarks/sim)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from peerd.sim import report
from peerd.sim.scenario import load

SCENARIOS = sorted((Path(__file__).parents[2] / "scenarios").glob("*.toml"))
LARGE = 1000  # nodes from which a scenario is a benchmark, not a CI test
# Shipped scenarios whose expectations do not hold yet, and why (see
# benchmarks/sim/RESULTS.md). They still run: a fix makes them XPASS.
KNOWN_MISSES: dict[str, str] = {}


def _param(path: Path) -> object:
    sc = load(path)
    marks: list[pytest.MarkDecorator] = []
    if path.stem in KNOWN_MISSES:
        marks.append(pytest.mark.xfail(reason=KNOWN_MISSES[path.stem], strict=False))
    if sc.nodes >= LARGE and not os.environ.get("PEERD_SIM_LARGE"):
        marks.append(
            pytest.mark.skip(
                reason=f"{sc.nodes} nodes: a benchmark-size scenario; "
                "set PEERD_SIM_LARGE=1 to run it"
            )
        )
    return pytest.param(path, id=path.stem, marks=marks)


def test_there_are_scenarios() -> None:
    names = {p.stem for p in SCENARIOS}
    for must in (
        "steady",
        "crash-1pct",
        "crash-10pct",
        "partition-heal",
        "loss-20pct",
        "pause-10s",
        "slow-nodes",
        "rolling-restart",
        "flapping-link",
        "mass-join-10k",
        "scale-10k",
    ):
        assert must in names


@pytest.mark.parametrize("path", [_param(p) for p in SCENARIOS])
def test_scenario_passes(path: Path) -> None:
    sc = load(path)
    assert sc.expects, "a scenario without expectations proves nothing"
    summary, _rec = report.run(sc)
    failed = [c for c in summary["checks"] if not c["passed"]]
    assert summary["passed"], failed
