"""Fixtures for the real-process tests: see :mod:`tests.proc.harness`."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Generator, Iterator, Sequence
from pathlib import Path

import pytest

from .harness import Cluster, Daemon, Watcher

# --- fixtures and reporting --------------------------------------------------------


@pytest.fixture
def cluster(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Cluster]:
    # Unix socket paths are limited to 107 bytes: use a short directory if needed.
    short: Path | None = None
    sock_dir = tmp_path
    if len(str(tmp_path)) > 80:
        short = sock_dir = Path(tempfile.mkdtemp(prefix="peerd-proc-"))
    c = Cluster(tmp_path, sock_dir)
    request.node.peerd_cluster = c
    try:
        yield c
    finally:
        try:
            c.stop_all()
            c.check_logs()
        finally:
            if short is not None:
                shutil.rmtree(short, ignore_errors=True)
    if c.problems:
        pytest.fail("daemon trouble: " + "; ".join(c.problems), pytrace=False)


@pytest.fixture
def watchers() -> Iterator[Callable[[Sequence[Daemon]], list[Watcher]]]:
    """``watchers(daemons)`` opens a Watcher on each; all are closed afterwards."""
    opened: list[Watcher] = []

    def open_on(daemons: Sequence[Daemon]) -> list[Watcher]:
        ws = [Watcher(d) for d in daemons]
        opened.extend(ws)
        return ws

    yield open_on
    for w in opened:
        w.close()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """On failure, attach every daemon's stderr (tail) to the report."""
    report = yield
    c: Cluster | None = getattr(item, "peerd_cluster", None)
    if c is not None and report.failed:
        for d in c.daemons:
            report.sections.append((f"peerd {d.name} ({d.addr}) stderr", d.log_tail()))
    return report
