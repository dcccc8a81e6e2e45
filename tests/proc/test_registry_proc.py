"""The registry through real daemons (issue 4): five ``peerd agent`` processes
on loopback, real client processes (their pid is what SO_PEERCRED reports),
``peerd exec``, ``kill -9`` of a client and of a daemon, and a restart.

Uses the membership tests' harness (``harness.py``, ``conftest.py``): own
addresses, state directories and sockets per test, bounded polling, every
process stopped by pid.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any

import pytest

from peerd.api.protocol import ApiError

from .harness import Cluster, Daemon, hold_for, kill_and_reap, wait_until

pytestmark = pytest.mark.proc

VISIBLE_S = 10.0  # generous for a loaded 2-core box; the benchmark measures the real figure
GONE_AFTER_KILL_S = 15.0  # detection (about 1 s under local) plus the spread, with margin

# A client process: registers names and group memberships through one
# connection, prints "ready", then holds them until stdin closes or it is killed.
CLIENT = """
import sys
from peerd.api.client import BlockingClient
sock, names, groups = sys.argv[1], sys.argv[2], sys.argv[3]
c = BlockingClient(sock, timeout=10)
for n in filter(None, names.split(",")):
    c.register(n, {"who": "client"})
for g in filter(None, groups.split(",")):
    c.join_group(g)
print("ready", flush=True)
sys.stdin.read()
"""


class Procs:
    """Client processes started by a test, stopped by pid at the end."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[str]] = []

    def client(
        self, d: Daemon, names: Sequence[str] = (), groups: Sequence[str] = ()
    ) -> subprocess.Popen[str]:
        p = subprocess.Popen(
            [sys.executable, "-c", CLIENT, str(d.sock), ",".join(names), ",".join(groups)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.procs.append(p)
        assert p.stdout is not None
        line = p.stdout.readline()  # bounded: the client's own calls time out
        assert line.strip() == "ready", p.stderr.read() if p.stderr else ""
        return p

    def exec(self, d: Daemon, *args: str) -> subprocess.Popen[str]:
        p = subprocess.Popen(
            [sys.executable, "-m", "peerd", "exec", "--api-socket", str(d.sock), *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.procs.append(p)
        return p

    def stop_all(self) -> None:
        for p in self.procs:
            kill_and_reap(p)


@pytest.fixture
def procs() -> Iterator[Procs]:
    p = Procs()
    yield p
    p.stop_all()


def lookup(d: Daemon, name: str) -> dict[str, Any] | None:
    try:
        result: dict[str, Any] = d.api("lookup", name=name)
    except ApiError as e:
        if e.code == "not_found":
            return None
        raise
    return result


def names(d: Daemon) -> set[str]:
    return {e["name"] for e in d.api("list", limit=10_000)["entries"]}


def group_pids(d: Daemon, group: str) -> list[int]:
    return [e["pid"] for e in d.api("group.members", group=group)["entries"]]


def held_everywhere(daemons: Sequence[Daemon], name: str, pid: int, node: str) -> bool:
    for d in daemons:
        e = lookup(d, name)
        if e is None or e["pid"] != pid or e["node_name"] != node:
            return False
    return True


def gone_everywhere(daemons: Sequence[Daemon], gone: set[str]) -> bool:
    return all(not (names(d) & gone) for d in daemons)


def test_a_name_is_visible_everywhere_and_goes_with_its_process(
    cluster: Cluster, procs: Procs
) -> None:
    daemons = cluster.start_cluster([f"r{i}" for i in range(5)])
    owner = procs.client(daemons[0], names=["svc"], groups=["workers"])
    # Through the registering daemon at once, through the others within the bound.
    e = lookup(daemons[0], "svc")
    assert e is not None and e["pid"] == owner.pid and e["meta"] == {"who": "client"}
    wait_until(
        lambda: held_everywhere(daemons, "svc", owner.pid, "r0"),
        VISIBLE_S,
        "svc held by the client process everywhere",
    )
    wait_until(
        lambda: all(group_pids(d, "workers") == [owner.pid] for d in daemons),
        VISIBLE_S,
        "the client in group workers everywhere",
    )
    # Another process cannot take it, through any daemon.
    with pytest.raises(ApiError) as info:
        daemons[3].api("register", name="svc")
    assert info.value.code == "conflict"

    os.kill(owner.pid, signal.SIGKILL)  # the process dies: its connection closes
    owner.wait(10)
    wait_until(lambda: gone_everywhere(daemons, {"svc"}), VISIBLE_S, "svc gone everywhere")
    wait_until(
        lambda: all(group_pids(d, "workers") == [] for d in daemons),
        VISIBLE_S,
        "the group empty everywhere",
    )

    # peerd exec holds a name exactly as long as its child runs; the child's
    # status is its own.
    job = procs.exec(
        daemons[1],
        "--name",
        "job",
        "--meta",
        "k=v",
        "--",
        sys.executable,
        "-c",
        "import sys; sys.stdin.read(); sys.exit(5)",
    )
    wait_until(
        lambda: held_everywhere(daemons, "job", job.pid, "r1"),
        VISIBLE_S,
        "job held by peerd exec everywhere",
    )
    # Taken: a second exec fails at once and does not run its command.
    taken = procs.exec(daemons[2], "--name", "job", "--", sys.executable, "-c", "print('ran')")
    out, err = taken.communicate(timeout=20)
    assert taken.returncode == 1 and out == "" and "cannot register 'job'" in err
    assert job.stdin is not None
    job.stdin.close()  # the child ends
    assert job.wait(20) == 5
    wait_until(lambda: gone_everywhere(daemons, {"job"}), VISIBLE_S, "job gone everywhere")

    # SIGTERM to peerd exec reaches the child; the name goes with them.
    term = procs.exec(
        daemons[4], "--name", "term", "--", sys.executable, "-c", "import sys; sys.stdin.read()"
    )
    wait_until(
        lambda: held_everywhere(daemons, "term", term.pid, "r4"), VISIBLE_S, "term held everywhere"
    )
    term.send_signal(signal.SIGTERM)
    assert term.wait(20) == 128 + signal.SIGTERM
    wait_until(lambda: gone_everywhere(daemons, {"term"}), VISIBLE_S, "term gone everywhere")


def test_a_killed_daemon_takes_its_entries_and_a_restart_brings_none_back(
    cluster: Cluster, procs: Procs
) -> None:
    daemons = cluster.start_cluster([f"k{i}" for i in range(5)])
    victim, others = daemons[4], daemons[:4]
    doomed = {f"doomed-{i}" for i in range(10)}
    holder = procs.client(victim, names=sorted(doomed), groups=["pool"])
    keeper = procs.client(daemons[0], names=["keep"], groups=["pool"])
    wait_until(
        lambda: all(doomed | {"keep"} <= names(d) for d in daemons),
        VISIBLE_S,
        "every name everywhere",
    )
    wait_until(
        lambda: all(len(group_pids(d, "pool")) == 2 for d in daemons),
        VISIBLE_S,
        "both pool members everywhere",
    )

    killed_at = time.monotonic()
    victim.kill9()
    wait_until(
        lambda: gone_everywhere(others, doomed),
        GONE_AFTER_KILL_S,
        "the killed daemon's names gone from every other daemon",
    )
    took = time.monotonic() - killed_at
    assert all(group_pids(d, "pool") == [keeper.pid] for d in others)
    assert all(lookup(d, "keep") is not None for d in others)
    holder.kill()  # its daemon is gone; it would hold nothing anyway
    holder.wait(10)

    # Same state directory (same node id), new generation: none of the old
    # entries come back, here or anywhere, and the new life works.
    cluster.start(victim, join=[daemons[0].addr])
    victim.wait_ready()
    assert not (names(victim) & doomed)
    wait_until(
        lambda: lookup(victim, "keep") is not None,
        VISIBLE_S,
        "the restarted daemon syncs the others' entries",
    )
    hold_for(
        lambda: all(not (names(d) & doomed) for d in daemons),
        1.0,
        "no old entry anywhere after the restart",
    )
    assert group_pids(victim, "pool") == [keeper.pid]
    fresh = procs.client(victim, names=["fresh"])
    wait_until(
        lambda: held_everywhere(daemons, "fresh", fresh.pid, "k4"),
        VISIBLE_S,
        "a registration through the restarted daemon everywhere",
    )
    print(f"entries of a kill -9'd daemon gone everywhere {took:.2f} s after the kill")
