"""Small scenarios built in code for the simulator's tests."""

from __future__ import annotations

from typing import Any

from peerd.sim.measure import Record
from peerd.sim.report import summarize
from peerd.sim.scenario import Scenario, loads
from peerd.sim.world import World


def scenario(
    body: str = "", *, nodes: int = 30, duration: float = 30, seed: int = 1, extra_top: str = ""
) -> Scenario:
    text = (
        f'name = "t"\nnodes = {nodes}\nseed = {seed}\nduration_s = {duration}\n'
        f'preset = "lan"\n{extra_top}\n[network]\nlatency_ms = {{ min = 1, max = 5 }}\n'
        f"{body}"
    )
    return loads(text, "test.toml")


def run(sc: Scenario) -> tuple[World, Record, dict[str, Any]]:
    w = World(sc)
    rec = w.run()
    return w, rec, summarize(sc, rec, 0.0)
