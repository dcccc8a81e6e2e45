"""Ghosts: dead ids a restart with a wiped state dir replaced, and reaped rows
that push-pull must not bring back (peerd.core.swim.ghosts)."""

from __future__ import annotations

import pytest

from peerd.core.events import EventKind, Output, StreamReply
from peerd.wire.messages import Dead, PushPull, Status

from .harness import Cluster
from .test_node_sync import st
from .util import Rig, addr, alive, cfg, events, name, nid, of, state_of

DOWN = (Status.DEAD, Status.LEFT)
# The grace of a replaced row in a cluster of a few nodes (the floor,
# peerd.core.swim.ghosts.GHOST_REAP_MIN_S; not imported, so that these tests
# run, and fail, against the code before it).
GRACE_S = 5.0


def started(*peers: int, **kw: object) -> Rig:
    r = Rig.make(**kw)  # type: ignore[arg-type]
    r.start()
    r.join(*peers, now=0.0)
    r.drain()
    return r


def down_rows(c: Cluster, i: int, nm: str) -> list[bytes]:
    return [m.node for m in c.nodes[i].members() if m.name == nm and m.status in DOWN]


def test_a_node_restarted_twenty_times_with_new_ids_leaves_no_ghosts() -> None:
    c = Cluster(8, seed=3)
    for i in range(8):
        c.start(i)
    c.run_until(10.0)
    assert c.converged()
    worst = 0
    for k in range(1, 21):
        # A wiped state dir: a new id, the same name and address, back after 1 s.
        c.crash(7)
        c.run_until(c.now + 1.0)
        c.restart(7, incarnation=0, generation=0, node_id=(1000 + k).to_bytes(16, "big"))
        for _ in range(25):
            c.run_until(c.now + 1.0)
            worst = max([worst] + [len(down_rows(c, i, "n7")) for i in range(7)])
    # At most the id just replaced and the one before it are listed at any
    # moment (each for its detection plus the grace), never the 20.
    assert worst <= 2, worst
    # The last old id: detected, then forgotten after the grace, everywhere
    # (the restarted node included); one row of n7 left, alive, the new id.
    c.run_until(c.now + 30.0)
    for i in range(8):
        rows = [m for m in c.nodes[i].members() if m.name == "n7"]
        assert [(m.node, m.status) for m in rows] == [(c.nodes[7].node_id, Status.ALIVE)], i
    assert c.converged()


def run_timers(r: Rig, until: float) -> list[Output]:
    """Fire every armed timer due by ``until``, in time order (virtual time)."""
    outs: list[Output] = []
    while True:
        due = sorted((t for t in r.pending if t.at <= until), key=lambda t: t.at)
        if not due:
            r.now = until
            return outs
        outs += r.fire(due[0])


def test_a_replaced_id_is_forgotten_after_the_grace_and_not_revived_by_push_pull() -> None:
    r = started(2, 3)
    r.recv(3, Dead(nid(2), 0, nid(3)), now=1.0)
    # n2 restarted with a wiped state dir: id 9, its name and address.
    r.recv(2, alive(9, nm=name(2), at=addr(2)), now=2.0)
    assert r.status(2) is Status.DEAD
    run_timers(r, 2.0 + GRACE_S - 0.01)
    assert r.status(2) is Status.DEAD  # the grace: its death spreads first
    outs = run_timers(r, 2.0 + GRACE_S)
    assert (EventKind.REAPED, nid(2)) in events(outs)
    assert r.node.member(nid(2)) is None
    # A peer that still lists it, dead or (stale) alive, does not bring it back.
    outs = r.stream_in(7, 3, PushPull(False, (st(2, Status.DEAD), st(3))), now=8.0)
    outs += r.stream_in(8, 3, PushPull(False, (st(2), st(3))), now=9.0)
    assert r.node.member(nid(2)) is None and events(outs) == []
    reply = of(outs, StreamReply)[-1]
    assert reply.data is not None
    assert nid(2) not in [m.node for m in state_of(reply.data).members]
    assert r.status(9) in (Status.ALIVE, Status.SUSPECT)  # nobody acks in a Rig
    assert r.node.counters["drop.alive_of_forgotten"] == 1


def test_a_row_reaped_after_dead_reclaim_s_is_not_revived_by_push_pull() -> None:
    r = started(2, 3, config=cfg(dead_reclaim_s=60.0))
    r.recv(3, Dead(nid(2), 0, nid(3)), now=1.0)
    outs = run_timers(r, 120.0)  # the reap ticks at 60 (59 s dead) and 120
    assert (EventKind.REAPED, nid(2)) in events(outs)
    # n3 missed the reap (it joined later, or its clock started later).
    r.stream_in(7, 3, PushPull(False, (st(2, Status.DEAD), st(3))), now=121.0)
    assert r.node.member(nid(2)) is None
    # Nor does a stale Alive of it (an incarnation it died at).
    r.stream_in(8, 3, PushPull(False, (st(2), st(3))), now=122.0)
    assert r.node.member(nid(2)) is None
    # The node itself, refuting with a higher incarnation, is a member again.
    r.recv(2, alive(2, inc=1), now=123.0)
    assert r.status(2) is Status.ALIVE


def test_dead_then_left_from_a_push_pull_keeps_the_reclaim_clock() -> None:
    r = started(2, 3, config=cfg(dead_reclaim_s=100.0))
    r.recv(3, Dead(nid(2), 0, nid(3)), now=1.0)
    r.stream_in(7, 3, PushPull(False, (st(2, Status.LEFT), st(3))), now=50.0)
    assert r.status(2) is Status.LEFT
    outs = run_timers(r, 120.0)  # 119 s after its death, 70 s after the Left
    assert (EventKind.REAPED, nid(2)) in events(outs)


def test_only_the_same_name_and_address_make_a_ghost() -> None:
    r = started(2, 3, 4)
    # Two live ids with one name: the name conflict, both kept.
    outs = r.recv(2, alive(9, nm=name(2), at=addr(2)), now=1.0)
    assert (EventKind.NAME_CONFLICT, nid(9)) in events(outs)
    # n3 dies; a live node with its name at another address: not a restart here.
    r.recv(4, Dead(nid(3), 0, nid(4)), now=2.0)
    r.recv(8, alive(8, nm=name(3), at=addr(8)), now=3.0)
    # n4 dies; another node takes its address under another name.
    r.recv(2, Dead(nid(4), 0, nid(2)), now=4.0)
    r.recv(4, alive(7, at=addr(4)), now=5.0)
    assert r.status(3) is Status.DEAD and r.status(4) is Status.DEAD
    assert r.node.counters["ghosts_found"] == 0
    assert not [t for t in r.pending if t.timer.kind.value == "ghost_reap"]


def test_tombstones_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    from peerd.core.swim import ghosts

    monkeypatch.setattr(ghosts, "TOMBSTONES_MAX", 4)
    r = started(2)
    rows = tuple(st(i, Status.DEAD) for i in range(10, 20))
    r.stream_in(7, 2, PushPull(False, rows), now=1.0)
    assert len(r.node._tombstones) == 4
    assert r.node.counters["ghosts_tombstones_evicted"] == 6
    assert r.node.counters["drop.down_row_of_stranger"] == 10
    # The newest are kept; the oldest given up first.
    assert list(r.node._tombstones) == [nid(i) for i in range(16, 20)]


def test_a_forgotten_node_restarted_with_its_id_kept_is_a_member_again() -> None:
    # Down longer than dead_reclaim_s, then restarted with its state dir: a
    # new generation, its persisted incarnation. We forgot it, so nobody tells
    # it to refute; its new generation is enough.
    r = started(2, 3, config=cfg(dead_reclaim_s=60.0))
    r.recv(3, Dead(nid(2), 0, nid(3)), now=1.0)
    run_timers(r, 120.0)
    assert r.node.member(nid(2)) is None
    r.recv(2, alive(2, inc=0, gen=0), now=121.0)  # the old life: stale
    assert r.node.member(nid(2)) is None
    r.recv(2, alive(2, inc=0, gen=1), now=122.0)
    assert r.status(2) is Status.ALIVE
