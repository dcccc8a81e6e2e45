"""benchmarks/fleet.py: the helpers the benchmark scripts share."""

from __future__ import annotations

import math
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import fleet


def test_pct_takes_the_rank_the_results_were_recorded_with() -> None:
    # rank round(q/100 * n + 0.5), Python's rounding (half to even)
    values = [float(v) for v in range(1, 101)]
    assert fleet.pct(values, 50) == 50.0
    assert fleet.pct(values, 99) == 100.0
    assert fleet.pct(values, 98) == 98.0
    assert fleet.pct(values, 100) == 100.0
    assert fleet.pct([3.0, 1.0, 2.0], 0) == 1.0
    assert math.isnan(fleet.pct([], 50))


def test_summary_ms_rounds_to_the_digits_asked() -> None:
    s = fleet.summary_ms([0.0012345, 0.0023456])
    assert s == {
        "n": 2,
        "p50_ms": 2.35,
        "p90_ms": 2.35,
        "p99_ms": 2.35,
        "max_ms": 2.35,
        "mean_ms": 1.79,
    }
    assert fleet.summary_ms([0.0012345], digits=3)["p50_ms"] == 1.234
    empty = fleet.summary_ms([])
    assert empty["n"] == 0 and empty["max_ms"] is None and empty["mean_ms"] is None


def test_hosts_are_distinct_loopback_addresses_with_a_free_port() -> None:
    hosts = [fleet.fresh_host() for _ in range(300)]
    assert len(set(hosts)) == len(hosts)
    for h in hosts:
        parts = [int(x) for x in h.split(".")]
        assert parts[0] == 127 and all(0 <= x <= 255 for x in parts)
    port = fleet.free_port(hosts[0])
    with (
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp,
        socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp,
    ):
        udp.bind((hosts[0], port))
        tcp.bind((hosts[0], port))


def test_wait_for_returns_the_value_and_is_bounded() -> None:
    calls = iter([ConnectionRefusedError(), 0, "ready"])

    def pred() -> object:
        v = next(calls)
        if isinstance(v, Exception):
            raise v
        return v

    assert fleet.wait_for(pred, 5, "ready", poll=0.001) == "ready"
    t0 = fleet.now()
    with pytest.raises(RuntimeError, match="waiting for never; last False"):
        fleet.wait_for(lambda: False, 0.1, "never", poll=0.01)
    assert fleet.now() - t0 < 5


def test_pin_source_archives_the_revision(monkeypatch: pytest.MonkeyPatch) -> None:
    if (
        subprocess.run(
            ["git", "-C", str(fleet.REPO), "rev-parse", "HEAD"], capture_output=True, timeout=30
        ).returncode
        != 0
    ):
        pytest.skip("not a git checkout")
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setattr(fleet, "SRC", fleet.SRC)
    info = fleet.pin_source("HEAD", keep=False, prefix="fleet-test-src-")
    assert list(info) == ["rev", "commit", "dirty", "src"]
    assert info["rev"] == "HEAD" and len(info["commit"]) == 40 and info["dirty"] is False
    src = Path(info["src"])
    assert src == fleet.SRC
    assert sys.path[0] == str(src)
    assert (src / "peerd" / "__init__.py").is_file()
    assert fleet.src_env()["PYTHONPATH"] == str(src)


def test_a_daemon_runs_the_pinned_code_from_the_repo_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = tmp_path / "src" / "peerd"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "__main__.py").write_text('print("the pinned copy")\n')
    monkeypatch.setattr(fleet, "SRC", tmp_path / "src")
    monkeypatch.chdir(fleet.REPO)  # where the scripts are run from; it has a peerd/
    d = fleet.Daemon("d00", "127.0.0.1", 1, tmp_path / "d00")
    d.dir.mkdir()
    d.start("local", None)
    assert d.proc is not None
    try:
        d.proc.wait(30)
    finally:
        d.stop()
    assert (d.dir / "stderr").read_text() == "the pinned copy\n"


class _FailingFleet(fleet.Fleet):
    def start(self, timeout: float = 120.0) -> float:
        super().start(timeout)
        raise RuntimeError("start failed after the daemons were up")


@pytest.mark.proc
def test_a_fleet_stops_its_daemons_by_pid(tmp_path: Path) -> None:
    # The work tree's code (SRC is the repo unless pinned).
    with fleet.Fleet(tmp_path / "ok", 1, "local") as f:
        (d,) = f.daemons
        assert d.api("status")["members"]["alive"] == 1
        assert d.proc is not None and d.proc.poll() is None
        assert d.cpu_s() >= 0
    assert d.proc.returncode is not None
    assert d.proc in fleet._PROCS
    failing = _FailingFleet(tmp_path / "failing", 1, "local")
    with pytest.raises(RuntimeError, match="start failed"), failing:
        pass
    (d,) = failing.daemons
    assert d.proc is not None and d.proc.returncode is not None
