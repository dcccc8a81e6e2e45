"""Same scenario and seed: the same summary, byte for byte (but wall time and
memory), even across processes with different hash seeds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[2]


def _run(hashseed: str, seed: int = 1) -> dict[str, object]:
    env = dict(os.environ, PYTHONHASHSEED=hashseed)
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "peerd",
            "sim",
            str(ROOT / "scenarios" / "crash-10pct.toml"),
            "--nodes",
            "60",
            "--duration",
            "40",
            "--seed",
            str(seed),
            "--json",
        ],
        capture_output=True,
        text=True,
        env=env,
        check=False,
        cwd=ROOT,
    )
    assert out.returncode in (0, 1), out.stderr
    summary: dict[str, object] = json.loads(out.stdout)
    return summary


def _strip(s: dict[str, object]) -> str:
    s = dict(s)
    s.pop("wall_s")
    s.pop("peak_rss_mib")
    return json.dumps(s, sort_keys=True)


def test_same_seed_same_summary_across_processes() -> None:
    a, b = _run("1"), _run("2")
    assert _strip(a) == _strip(b)
    assert a["membership"]["crashed"] == 6  # type: ignore[index]


def test_another_seed_gives_another_run() -> None:
    assert _strip(_run("1", seed=1)) != _strip(_run("1", seed=2))
