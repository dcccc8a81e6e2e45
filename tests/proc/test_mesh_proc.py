"""The partial mesh through real daemons (issue 5): 20 ``peerd agent``
processes on loopback; each holds a bounded number of TCP connections
(counted by the kernel, from /proc), user events reach every daemon once,
and messages to names arrive once, in order.

Uses the harness of the membership tests: own addresses, bounded polling,
every process stopped by pid.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import pytest

from .harness import Cluster, Daemon, Watcher, hold_for, wait_until

pytestmark = pytest.mark.proc

N = 20
_ESTABLISHED = "01"


def tcp_established(pid: int) -> int:
    """Established TCP connections held by the process ``pid``: its socket
    inodes (/proc/<pid>/fd) that the kernel lists as ESTABLISHED in
    /proc/<pid>/net/tcp and tcp6."""
    inodes: set[str] = set()
    fd_dir = Path(f"/proc/{pid}/fd")
    for fd in fd_dir.iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue  # closed meanwhile
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    count = 0
    for table in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if len(f) > 9 and f[3] == _ESTABLISHED and f[9] in inodes:
                count += 1
    return count


def gauges(d: Daemon) -> dict[str, float]:
    return dict(d.status()["gauges"])


def mesh_settled(daemons: Sequence[Daemon], active: int) -> bool:
    """Every daemon has neighbours, and most have a full active view."""
    views = [gauges(d).get("mesh_active", 0) for d in daemons]
    return min(views) >= 2 and sum(v >= active - 1 for v in views) >= len(views) * 3 // 4


def test_twenty_daemons_hold_bounded_links(cluster: Cluster) -> None:
    daemons = cluster.start_cluster([f"m{i}" for i in range(N)])
    wait_until(lambda: mesh_settled(daemons, 5), 30.0, "mesh views filled")
    # Bound from the issue: 2 log2 N links (active view + direct links) per
    # node. SWIM's watch links (one out to the ring successor, one in from
    # the predecessor) are TCP connections too, and are counted apart.
    bound = math.floor(2 * math.log2(N))
    counts: dict[str, int] = {}
    for d in daemons:
        # The smallest of three readings: a push-pull stream (one request and
        # its reply) may be open at the moment of one reading. The daemon
        # says how many of its connections are watch links.
        samples = [tcp_established(d.pid) for _ in range(3)]
        watch = int(gauges(d)["watch_links"])
        assert watch <= 4, (d.name, watch)
        counts[d.name] = min(samples) - watch
    over = {n: c for n, c in counts.items() if c > bound}
    assert not over, f"over the {bound}-link bound: {over} (all: {counts})"
    # And the daemons' own count agrees: links are the active view (plus
    # nothing else: no messages to names were sent).
    for d in daemons:
        g = gauges(d)
        assert g["links_open"] <= 5 + 1, (d.name, g)
    assert sum(counts.values()) > 0
    print("links per daemon (from /proc, watch links excluded):", sorted(counts.values()))


def test_user_event_reaches_every_daemon_once(cluster: Cluster) -> None:
    daemons = cluster.start_cluster([f"e{i}" for i in range(N)])
    wait_until(lambda: mesh_settled(daemons, 5), 30.0, "mesh views filled")
    watchers = [Watcher(d, ("events",)) for d in daemons]
    try:
        origin = daemons[3]
        result = origin.api("event", name="deploy", payload=b"v42")
        msg_id = result["id"]

        def got(w: Watcher) -> list[dict[str, object]]:
            return [
                data for _t, ev, data in list(w.events) if ev == "user" and data.get("id") == msg_id
            ]

        wait_until(
            lambda: all(len(got(w)) >= 1 for w in watchers), 10.0, "the event on every daemon"
        )
        # Once: no copy comes later (Plumtree's duplicates are dropped).
        hold_for(lambda: all(len(got(w)) == 1 for w in watchers), 1.0, "exactly one copy")
        for w in watchers:
            (data,) = got(w)
            assert data["name"] == "deploy" and data["payload"] == b"v42"
            assert data["origin_name"] == origin.name
        # Over the size limit: a clear error, nothing sent.
        from peerd.api.protocol import ApiError

        with pytest.raises(ApiError) as e:
            origin.api("event", name="big", payload=b"x" * 9000)
        assert e.value.code == "bad_args" and "8192-byte limit" in e.value.message
    finally:
        for w in watchers:
            w.close()


def test_messages_to_a_name_arrive_once_in_order(cluster: Cluster) -> None:
    from peerd.api.client import BlockingClient
    from peerd.api.protocol import ApiError

    daemons = cluster.start_cluster([f"s{i}" for i in range(N)])
    wait_until(lambda: mesh_settled(daemons, 5), 30.0, "mesh views filled")
    owner_d, sender_d = daemons[5], daemons[17]
    with (
        BlockingClient(owner_d.sock, timeout=10) as owner,
        BlockingClient(sender_d.sock, timeout=10) as sender,
    ):
        owner.register("inbox")
        sender.register("asker")
        wait_until(lambda: sender.lookup("inbox") is not None, 10.0, "inbox visible")
        count = 300
        for i in range(count):
            assert sender.send("inbox", b"m%d" % i) == {"delivered": 1}
        got = []

        def drain() -> bool:
            while (ev := owner.receive_message(0.05)) is not None:
                got.append(ev)
            return len(got) >= count

        wait_until(drain, 10.0, "every message at the owner")
        assert [ev.data["payload"] for ev in got] == [b"m%d" % i for i in range(count)]
        assert {ev.data["from"] for ev in got} == {"asker"}
        assert got[0].data["from_node"] == gauges_id(sender_d)
        # Once: nothing more comes.
        assert owner.receive_message(0.5) is None
        # Request/reply: the owner answers the sender by its registered name.
        assert owner.send(got[0].data["from"], b"pong") == {"delivered": 1}
        reply = sender.receive_message(10)
        assert reply is not None and reply.data["payload"] == b"pong"
        assert reply.data["from"] == "inbox"
        # A direct link now joins the two daemons (unless they were neighbours).
        # The owner goes away: its name vanishes, and a sender gets an error.
    with pytest.raises(ApiError) as e:
        sender_d.api("send", name="inbox", payload=b"late")
    assert e.value.code == "not_found", e.value.message
    with BlockingClient(sender_d.sock, timeout=10) as s2:
        wait_until(lambda: s2.lookup("inbox") is None, 10.0, "inbox gone at the sender")
        with pytest.raises(ApiError) as e:
            s2.send("inbox", b"later")
        assert e.value.code == "not_found"
        with pytest.raises(ApiError) as e:
            s2.send("nobody-has-this", b"x")
        assert e.value.code == "not_found" and "no name" in e.value.message


def gauges_id(d: Daemon) -> str:
    return str(d.status()["id"])


def test_send_to_a_killed_owners_daemon_is_an_error(cluster: Cluster) -> None:
    import time

    from peerd.api.client import BlockingClient
    from peerd.api.protocol import ApiError

    daemons = cluster.start_cluster([f"k{i}" for i in range(5)])
    owner_d, sender_d = daemons[1], daemons[3]
    with (
        BlockingClient(owner_d.sock, timeout=10) as owner,
        BlockingClient(sender_d.sock, timeout=30) as sender,
    ):
        owner.register("victim")
        wait_until(lambda: sender.lookup("victim") is not None, 10.0, "victim visible")
        assert sender.send("victim", b"1") == {"delivered": 1}  # the direct link is up
        owner_d.kill9()
        # Every send ends with an error (never a hang, never a silent success):
        # the link breaks or the owner's daemon is declared dead (its names go).
        t0 = time.monotonic()
        with pytest.raises(ApiError) as e:
            for _ in range(200):  # bounded: each send takes at most the 10 s send timeout
                sender.send("victim", b"2")
        assert e.value.code in ("unavailable", "not_found"), e.value.message
        assert time.monotonic() - t0 < 15.0
        wait_until(lambda: sender.lookup("victim") is None, 15.0, "victim gone after the death")
        with pytest.raises(ApiError) as e:
            sender.send("victim", b"3")
        assert e.value.code == "not_found"
