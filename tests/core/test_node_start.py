"""Start, join and the initial announcement."""

from __future__ import annotations

import random

from peerd.core.events import (
    EventKind,
    IncarnationChanged,
    Join,
    JoinDone,
    OpenStream,
    SetTimer,
    StreamFailed,
    StreamResponse,
    TimerKind,
)
from peerd.core.timers import membership_timer
from peerd.wire import codec
from peerd.wire.messages import MemberState, PushPull, Status

from .util import (
    Rig,
    addr,
    alive,
    cfg,
    events,
    fire,
    first_gossip_at,
    name,
    nid,
    of,
    sends,
    state_of,
)

ME = MemberState(nid(1), name(1), addr(1), 0, 0, (), Status.ALIVE)


def peer_state(i: int, status: Status = Status.ALIVE, inc: int = 0) -> MemberState:
    return MemberState(nid(i), name(i), addr(i), inc, 0, (), status)


def test_start_arms_timers_and_joins_each_seed() -> None:
    r = Rig.make(seed=7)
    mirror = random.Random(7)  # the node draws its first-timer jitter from its rng
    probe_delay = mirror.uniform(0, 1.0)
    sync_delay = mirror.uniform(0.5, 1.0) * 5.0  # min(push_pull 30 s, 5 probe intervals)
    now = 100.0

    outs = r.start(addr(2), addr(3), addr(1), addr(2), now=now)  # own address and dup dropped

    assert outs[0] == IncarnationChanged(0)
    # No GOSSIP timer yet: our Alive is queued but there is nobody to tell.
    # The first RECONNECT comes after one probe interval (min(1 s, 10 s)): a
    # node whose seeds were all down retries soon.
    assert of(outs, SetTimer) == [
        SetTimer(now + probe_delay, membership_timer(TimerKind.PROBE, 1)),
        SetTimer(now + sync_delay, membership_timer(TimerKind.PUSH_PULL, 2)),
        SetTimer(now + 1.0, membership_timer(TimerKind.RECONNECT, 3)),
        SetTimer(now + 60.0, membership_timer(TimerKind.REAP, 4)),
    ]
    opens = of(outs, OpenStream)
    assert [(o.stream, o.dst) for o in opens] == [(1, addr(2)), (2, addr(3))]
    for o in opens:
        assert state_of(o.data) == PushPull(True, (ME,))
    assert not of(outs, JoinDone)
    assert r.node.queued_broadcasts() == 1  # our own Alive
    assert r.counter("push_pull_out") == 2


def test_start_twice_is_ignored() -> None:
    r = Rig.make()
    r.start(addr(2))
    assert r.start(addr(3), now=1.0) == []


def test_start_queues_own_alive_for_gossip() -> None:
    r = Rig.make()
    r.start()
    assert r.node.queued_broadcasts() == 1  # our own Alive, waiting for someone to tell
    # The first live peer arms the GOSSIP timer (token 5, after the 4 armed by Start).
    join_outs = r.join(2, now=0.1)
    assert of(join_outs, SetTimer) == [
        SetTimer(first_gossip_at(0.1), membership_timer(TimerKind.GOSSIP, 5))
    ]
    outs = fire(r.node, join_outs, TimerKind.GOSSIP)
    assert r.node.queued_broadcasts() == 2  # sent once of 4 times (2 live nodes)
    # Newest first: n2's Alive (which we pass on), then ours.
    assert sends(outs) == [(addr(2), [alive(2), alive(1)])]


def test_start_without_seeds_is_joined_at_once() -> None:
    r = Rig.make()
    outs = r.start()
    assert of(outs, JoinDone) == [JoinDone(0, 0)]
    assert not of(outs, OpenStream)


def test_start_with_only_own_address_is_joined_at_once() -> None:
    r = Rig.make()
    assert of(r.start(addr(1)), JoinDone) == [JoinDone(0, 0)]


def test_join_done_counts_answers_and_failures() -> None:
    r = Rig.make()
    r.start(addr(2), addr(3), addr(4))
    reply = codec.encode(PushPull(False, (peer_state(2), peer_state(5))))

    outs = r.handle(StreamResponse(1, reply), now=0.01)
    assert not of(outs, JoinDone)
    assert events(outs) == [(EventKind.JOINED, nid(2)), (EventKind.JOINED, nid(5))]

    outs = r.handle(StreamFailed(2, "refused"), now=0.02)
    assert not of(outs, JoinDone)
    # A reply that is not a push-pull counts as a failure too.
    outs = r.handle(StreamResponse(3, b"\xff\x00garbage"), now=0.03)
    assert of(outs, JoinDone) == [JoinDone(1, 2)]
    assert r.counter("drop.bad_cbor") == 1
    assert r.counter("push_pull_failed") == 1
    assert r.node.live_count() == 3

    # Late or unknown stream ids are ignored.
    assert r.handle(StreamFailed(2, "again"), now=0.04) == []
    assert r.handle(StreamResponse(99, reply), now=0.05) == []


def test_join_all_ok() -> None:
    r = Rig.make()
    r.start(addr(2))
    outs = r.handle(StreamResponse(1, codec.encode(PushPull(False, (peer_state(2),)))), now=0.1)
    assert of(outs, JoinDone) == [JoinDone(1, 0)]
    assert events(outs) == [(EventKind.JOINED, nid(2))]


def test_join_input_opens_a_new_batch() -> None:
    r = Rig.make()
    r.start()
    outs = r.handle(Join((addr(3), addr(4))), now=5.0)
    opens = of(outs, OpenStream)
    assert [(o.stream, o.dst) for o in opens] == [(1, addr(3)), (2, addr(4))]
    assert all(state_of(o.data).join for o in opens)
    r.handle(StreamFailed(1, "refused"), now=5.1)
    outs = r.handle(StreamFailed(2, "timeout"), now=5.2)
    assert of(outs, JoinDone) == [JoinDone(0, 2)]
    assert r.handle(Join(()), now=6.0) == [JoinDone(0, 0)]


def test_start_with_push_pull_disabled_and_persisted_state() -> None:
    # No PUSH_PULL timer when disabled; the join carries the restored incarnation and tags.
    r = Rig.make(config=cfg(push_pull_interval_s=0.0), incarnation=4, tags=(("role", "db"),))
    outs = r.start(addr(2))
    assert [t.timer.kind for t in of(outs, SetTimer)] == [
        TimerKind.PROBE,
        TimerKind.RECONNECT,
        TimerKind.REAP,
    ]
    assert outs[0] == IncarnationChanged(4)
    (o,) = of(outs, OpenStream)
    assert state_of(o.data) == PushPull(
        True, (MemberState(nid(1), name(1), addr(1), 4, 0, (("role", "db"),), Status.ALIVE),)
    )
