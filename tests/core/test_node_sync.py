"""Push-pull anti-entropy and partition healing (reconnect)."""

from __future__ import annotations

import pytest

from peerd.core.events import (
    EventKind,
    IncarnationChanged,
    MemberEvent,
    MemberInfo,
    OpenStream,
    SetTimer,
    StreamFailed,
    StreamReply,
    StreamRequest,
    StreamResponse,
    TimerKind,
    Unreachable,
    WatchLinks,
)
from peerd.core.swim.base import REPAIR_BURST, REPAIR_DELAY_S
from peerd.core.timers import membership_timer
from peerd.wire import codec
from peerd.wire.messages import (
    Ack,
    Dead,
    Died,
    Left,
    MemberState,
    Ping,
    PushPull,
    Status,
    Suspect,
    Tags,
)

from .util import (
    Rig,
    addr,
    alive,
    armed_at,
    cfg,
    events,
    first_gossip_at,
    name,
    nid,
    nologs,
    of,
    packet,
    sends,
    state_of,
)


def st(i: int, status: Status = Status.ALIVE, inc: int = 0, tags: Tags = ()) -> MemberState:
    return MemberState(nid(i), name(i), addr(i), inc, 0, tags, status)


def started(*peers: int, seeds: tuple = (), **kw: object) -> Rig:
    r = Rig.make(**kw)  # type: ignore[arg-type]
    r.start(*seeds)
    r.join(*peers, now=0.0)
    r.drain()
    return r


def test_stream_request_is_merged_then_answered_with_the_merged_state() -> None:
    r = started(3)
    tags = (("role", "db"),)
    outs = r.stream_in(7, 2, PushPull(False, (st(2, tags=tags), st(3), st(1))), now=1.0)

    # The merge comes first (its event and the GOSSIP timer for the news),
    # then the reply, which already includes what we just learned.
    assert nologs(outs) == [
        MemberEvent(
            EventKind.JOINED, MemberInfo(nid(2), name(2), addr(2), Status.ALIVE, 0, 0, tags)
        ),
        SetTimer(first_gossip_at(1.0), r.timer(TimerKind.GOSSIP).timer),
        StreamReply(7, codec.encode(PushPull(False, (st(1), st(3), st(2, tags=tags))))),
        WatchLinks((addr(2),)),
    ]
    assert r.node.member(nid(2)).tags == tags  # type: ignore[union-attr]
    assert r.counter("push_pull_in") == 1
    # What we learn is gossiped on.
    assert sends(r.drain())[0][1] == [alive(2, tags=tags)]


def test_reply_carries_every_member_with_its_status() -> None:
    r = started(2, 3, 4)
    r.recv(2, alive(3, inc=2), now=0.5)
    r.recv(2, Suspect(nid(2), 0, nid(3)), Dead(nid(3), 2, nid(2)), Left(nid(4), 1), now=0.6)
    outs = r.stream_in(1, 9, PushPull(False, ()), now=1.0)
    assert state_of(outs[0].data) == PushPull(
        False,
        (  # type: ignore[union-attr]
            st(1),
            st(2, Status.SUSPECT),
            st(3, Status.DEAD, 2),
            st(4, Status.LEFT, 1),
        ),
    )


def test_remote_dead_for_a_member_we_see_alive_is_only_a_suspicion() -> None:
    r = started(3)
    outs = r.stream_in(7, 2, PushPull(False, (st(2), st(3, Status.DEAD))), now=1.0)
    assert events(outs) == [(EventKind.JOINED, nid(2)), (EventKind.SUSPECT, nid(3))]
    assert r.status(3) is Status.SUSPECT
    # Our own suspicion (3 live nodes, K = 1): the maximum timeout, 18 s.
    assert (TimerKind.SUSPICION, 19.0) in armed_at(outs)


def test_remote_suspect_and_left() -> None:
    r = started(3, 4)
    outs = r.stream_in(
        7,
        2,
        PushPull(False, (st(3, Status.SUSPECT), st(4, Status.LEFT, 1), st(5, Status.SUSPECT))),
        now=1.0,
    )
    assert events(outs) == [
        (EventKind.SUSPECT, nid(3)),
        (EventKind.LEFT, nid(4)),
        (EventKind.JOINED, nid(5)),
        (EventKind.SUSPECT, nid(5)),
    ]


def test_remote_dead_or_left_for_an_unknown_node_is_remembered_quietly() -> None:
    r = started(3)
    outs = r.stream_in(
        7, 2, PushPull(False, (st(5, Status.DEAD, 4), st(6, Status.LEFT, 1))), now=1.0
    )
    assert events(outs) == []
    # Not listed (a row from a push-pull has no age: see peerd.core.swim.ghosts),
    # only remembered as tombstones, and counted.
    assert r.node.member(nid(5)) is None and r.node.member(nid(6)) is None
    assert r.counter("drop.down_row_of_stranger") == 2
    # A stale Alive cannot resurrect it; a newer one can.
    assert nologs(r.recv(5, alive(5, inc=4), now=2.0)) == []
    assert r.counter("drop.alive_of_forgotten") == 1
    assert events(r.recv(5, alive(5, inc=5), now=3.0)) == [(EventKind.JOINED, nid(5))]


def test_remote_view_of_us_as_dead_is_refuted_in_the_reply() -> None:
    # A healed partition: n2 held us dead. Our reply carries the refutation,
    # so n2 learns we are alive from this one exchange.
    r = started(2)
    outs = r.stream_in(7, 2, PushPull(False, (st(1, Status.DEAD), st(2))), now=1.0)
    assert nologs(outs) == [
        IncarnationChanged(1),
        SetTimer(first_gossip_at(1.0), r.timer(TimerKind.GOSSIP).timer),
        StreamReply(7, codec.encode(PushPull(False, (st(1, inc=1), st(2))))),
    ]
    assert r.node.incarnation == 1
    assert r.counter("refutations") == 1
    assert r.node.local_member().status is Status.ALIVE
    assert sends(r.drain())[0] == (addr(2), [alive(1, inc=1)])  # and gossiped as well


def test_reply_carries_the_merged_view_of_others() -> None:
    # The peer holds n3 dead; to us its "dead" is only a suspicion, and the
    # reply says SUSPECT, not the ALIVE we had before the merge.
    r = started(3)
    outs = r.stream_in(7, 2, PushPull(False, (st(2), st(3, Status.DEAD))), now=1.0)
    assert events(outs) == [(EventKind.JOINED, nid(2)), (EventKind.SUSPECT, nid(3))]
    (reply,) = of(outs, StreamReply)
    assert nologs(outs).index(reply) > nologs(outs).index(of(outs, MemberEvent)[-1])
    assert state_of(reply.data) == PushPull(
        False,
        (  # type: ignore[arg-type]
            st(1),
            st(3, Status.SUSPECT),
            st(2),
        ),
    )


def test_remote_state_with_unusable_address_is_dropped() -> None:
    r = started()
    bad = MemberState(nid(5), "n5", ("0.0.0.0", 7946), 0, 0, (), Status.ALIVE)
    outs = r.stream_in(7, 2, PushPull(False, (bad, st(6))), now=1.0)
    assert events(outs) == [(EventKind.JOINED, nid(6))]
    assert r.counter("drop.bad_addr") == 1


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "bad_cbor"),
        (b"\xff\xfe\xfd", "bad_cbor"),
        (codec.encode(Ping(1, nid(1))), "unexpected_stream_message"),
        (b"\x83\x09\xf4\x81\x80", "bad_field"),  # a push-pull with an empty member row
        (b"\x81\x63abc", "not_message"),
    ],
)
def test_garbage_stream_request_is_answered_with_nothing(data: bytes, reason: str) -> None:
    r = started(3)
    outs = r.handle(StreamRequest(7, addr(2), data), now=1.0)
    assert nologs(outs) == [StreamReply(7, None)]
    assert r.counter(f"drop.{reason}") == 1
    assert r.node.live_count() == 2


def test_push_pull_in_a_datagram_is_dropped() -> None:
    r = started(3)
    outs = r.recv_raw(2, packet(PushPull(False, (st(2),)), Ack(99)), now=1.0)
    assert nologs(outs) == []
    assert r.counter("drop.push_pull_in_datagram") == 1
    assert r.node.member(nid(2)) is None


# --- periodic push-pull ----------------------------------------------------------


def test_push_pull_timer_syncs_with_a_live_member() -> None:
    r = started(2)
    t = r.timer(TimerKind.PUSH_PULL).at
    outs = r.fire(TimerKind.PUSH_PULL)
    assert nologs(outs) == [
        SetTimer(
            t + 30.0, membership_timer(TimerKind.PUSH_PULL, of(outs, SetTimer)[0].timer.token)
        ),
        OpenStream(1, addr(2), codec.encode(PushPull(False, (st(1), st(2))))),
    ]
    # The answer is merged.
    outs = r.handle(StreamResponse(1, codec.encode(PushPull(False, (st(2), st(8))))), now=t + 0.1)
    assert events(outs) == [(EventKind.JOINED, nid(8))]


def test_push_pull_alone_does_nothing_but_rearm() -> None:
    r = started()
    outs = r.fire(TimerKind.PUSH_PULL)
    assert armed_at(outs) == [(TimerKind.PUSH_PULL, r.now + 30.0)] and len(outs) == 1


def test_push_pull_is_bounded_by_max_concurrent_syncs() -> None:
    r = started(2, 3, config=cfg(max_concurrent_syncs=2))
    opened = [of(r.fire(TimerKind.PUSH_PULL), OpenStream) for _ in range(3)]
    assert [len(o) for o in opened] == [1, 1, 0]
    assert r.counter("push_pull_skipped") == 1
    # A failed exchange is tried again at once with another member (once).
    (retry,) = of(r.handle(StreamFailed(opened[0][0].stream, "timeout")), OpenStream)
    assert of(r.handle(StreamFailed(retry.stream, "timeout")), OpenStream) == []
    assert len(of(r.fire(TimerKind.PUSH_PULL), OpenStream)) == 1


def test_push_pull_interval_scales_above_32_nodes() -> None:
    r = started(*range(2, 42))  # 41 live nodes: interval doubles
    outs = r.fire(TimerKind.PUSH_PULL)
    assert armed_at(outs) == [(TimerKind.PUSH_PULL, r.now + 60.0)]


# --- partition healing ---------------------------------------------------------


def test_reconnect_retries_a_seed_that_is_not_alive() -> None:
    r = started(seeds=(addr(2),))
    r.handle(StreamFailed(1, "refused"), now=0.1)
    outs = r.fire(TimerKind.RECONNECT)
    assert r.now == 1.0  # the first retry after one probe interval
    assert armed_at(outs) == [(TimerKind.RECONNECT, 2.0)]
    (o,) = of(outs, OpenStream)
    assert (o.dst, state_of(o.data)) == (addr(2), PushPull(False, (st(1),)))
    assert r.counter("reconnects") == 1


def test_a_lone_node_backs_off_its_reconnects_to_the_interval() -> None:
    r = started(seeds=(addr(2),))
    r.handle(StreamFailed(1, "refused"), now=0.1)
    retries = []
    for _ in range(7):
        outs = r.fire(TimerKind.RECONNECT)
        (o,) = of(outs, OpenStream)
        assert o.dst == addr(2)
        r.handle(StreamFailed(o.stream, "refused"))
        retries.append(r.now)
    # From one probe interval (1 s), doubling, up to reconnect_interval (10 s).
    assert retries == [1.0, 2.0, 4.0, 8.0, 16.0, 26.0, 36.0]
    assert r.counter("reconnects") == 7


def test_reconnect_backoff_restarts_once_the_node_has_had_company() -> None:
    r = started(seeds=(addr(2),))
    r.handle(StreamFailed(1, "refused"), now=0.1)
    for _ in range(3):  # alone at 1, 2 and 4 s: next at 8 s
        for o in of(r.fire(TimerKind.RECONNECT), OpenStream):
            r.handle(StreamFailed(o.stream, "refused"))
    assert r.timer(TimerKind.RECONNECT).at == 8.0
    r.join(2, now=5.0)  # the seed is back
    outs = r.fire(TimerKind.RECONNECT)  # not alone: the normal interval, nothing to retry
    assert armed_at(outs) == [(TimerKind.RECONNECT, 18.0)] and len(outs) == 1
    r.recv(3, Dead(nid(2), 0, nid(3)), now=19.0)  # alone again
    r.drain()
    outs = r.fire(TimerKind.RECONNECT)
    assert r.now == 19.0
    assert armed_at(outs) == [(TimerKind.RECONNECT, 20.0)]  # 1 s again, not 16 s
    assert [o.dst for o in of(outs, OpenStream)] == [addr(2)]


def test_reconnect_retries_a_dead_member() -> None:
    r = started(2, 3)
    r.recv(3, Dead(nid(2), 0, nid(3)), now=1.0)
    outs = r.fire(TimerKind.RECONNECT)
    (o,) = of(outs, OpenStream)
    assert o.dst == addr(2)
    # n2 answers: it was declared dead and refuted meanwhile.
    outs = r.handle(
        StreamResponse(o.stream, codec.encode(PushPull(False, (st(2, inc=1),)))), now=10.1
    )
    assert of(outs, MemberEvent) == [
        MemberEvent(EventKind.ALIVE, r.node.member(nid(2)), revived=True)
    ]  # type: ignore[arg-type]
    assert r.status(2) is Status.ALIVE


def test_reconnect_does_nothing_when_all_seeds_are_alive_and_nobody_is_dead() -> None:
    r = started(2, seeds=(addr(2),))
    outs = r.fire(TimerKind.RECONNECT)
    assert armed_at(outs) == [(TimerKind.RECONNECT, r.now + 10.0)] and len(outs) == 1
    assert r.counter("reconnects") == 0


def test_reconnect_respects_max_concurrent_reconnects() -> None:
    r = started(seeds=(addr(2),), config=cfg(max_concurrent_reconnects=1))
    r.handle(StreamFailed(1, "refused"), now=0.1)
    assert len(of(r.fire(TimerKind.RECONNECT), OpenStream)) == 1
    assert of(r.fire(TimerKind.RECONNECT), OpenStream) == []


def test_reconnects_never_displace_push_pull() -> None:
    # Two dead members being retried fill the healing budget; the push-pull
    # with the live member still goes out, and vice versa.
    r = started(2, 3, 4, config=cfg(max_concurrent_syncs=1, max_concurrent_reconnects=1))
    r.recv(4, Dead(nid(2), 0, nid(4)), Dead(nid(3), 0, nid(4)), now=1.0)
    (heal,) = of(r.fire(TimerKind.RECONNECT), OpenStream)
    assert heal.dst in (addr(2), addr(3))
    assert [o.dst for o in of(r.fire(TimerKind.PUSH_PULL), OpenStream)] == [addr(4)]
    assert of(r.fire(TimerKind.RECONNECT), OpenStream) == []  # its own budget is full
    assert of(r.fire(TimerKind.PUSH_PULL), OpenStream) == []  # and so is push-pull's
    # A failed reconnect is counted apart from the push-pulls.
    r.handle(StreamFailed(heal.stream, "connect_timeout"))
    assert (r.counter("reconnects_failed"), r.counter("push_pull_failed")) == (1, 0)
    assert len(of(r.fire(TimerKind.RECONNECT), OpenStream)) == 1


def test_push_pull_partners_are_members_held_alive() -> None:
    r = started(2, 3)
    r.recv(3, Suspect(nid(2), 0, nid(3)), now=1.0)  # 2 is suspect: likely dead
    dsts = []
    for _ in range(20):
        for o in of(r.fire(TimerKind.PUSH_PULL), OpenStream):
            dsts.append(o.dst)
            r.handle(StreamResponse(o.stream, codec.encode(PushPull(False, (st(3),)))))
    assert dsts and set(dsts) == {addr(3)}


def test_a_refused_push_pull_suspects_the_member_and_tries_another() -> None:
    r = started(2, 3)
    for _ in range(20):  # until the tick draws 2
        (o,) = of(r.fire(TimerKind.PUSH_PULL), OpenStream)
        if o.dst == addr(2):
            break
        r.handle(StreamResponse(o.stream, codec.encode(PushPull(False, (st(3),)))))
    assert o.dst == addr(2)
    outs = r.handle(StreamFailed(o.stream, "refused"))
    # Nothing listens at 2: suspected at once (not gossiped), checked with a
    # ping, and the exchange goes to the other live member instead.
    assert r.status(2) is Status.SUSPECT
    assert [dst for dst, msgs in sends(outs) if any(isinstance(m, Ping) for m in msgs)] == [addr(2)]
    (retry,) = of(outs, OpenStream)
    assert retry.dst == addr(3) and r.counter("push_pull_retries") == 1
    # A failed retry is not retried again.
    outs = r.handle(StreamFailed(retry.stream, "timeout"))
    assert of(outs, OpenStream) == [] and r.counter("push_pull_failed") == 2


# --- repair after a mass failure ---------------------------------------------------


def test_a_burst_of_deaths_brings_the_next_push_pull_forward() -> None:
    peers = range(2, 2 + REPAIR_BURST + 3)
    r = started(*peers)
    for o in of(r.fire(TimerKind.PUSH_PULL), OpenStream):  # the early first exchange
        r.handle(StreamFailed(o.stream, "timeout"), now=r.now)
    regular = r.timer(TimerKind.PUSH_PULL).at
    assert regular > r.now + 10
    t = r.now
    for i in list(peers)[: REPAIR_BURST - 1]:
        r.recv(2 + REPAIR_BURST + 2, Died(nid(i), 0), now=t + 1.0)
    assert r.timer(TimerKind.PUSH_PULL).at == regular  # the odd death: gossip's job
    r.recv(2 + REPAIR_BURST + 2, Died(nid(1 + REPAIR_BURST), 0), now=t + 1.5)
    assert r.timer(TimerKind.PUSH_PULL).at == t + 1.5 + REPAIR_DELAY_S
    assert r.counter("push_pull_brought_forward") == 1
    # The regular timer is disarmed: one exchange, then the regular interval.
    (o,) = of(r.fire(TimerKind.PUSH_PULL), OpenStream)
    assert o.dst in (addr(2 + REPAIR_BURST), addr(2 + REPAIR_BURST + 1), addr(2 + REPAIR_BURST + 2))
    assert of(r.fire(r.armed(TimerKind.PUSH_PULL)[0]), OpenStream) == []  # the stale one
    assert r.timer(TimerKind.PUSH_PULL).at > t + 1.5 + REPAIR_DELAY_S + 10


def test_a_death_learnt_from_a_peer_is_checked_with_a_ping() -> None:
    r = started(2, 3)
    outs = r.stream_in(1, 3, PushPull(False, (st(2, Status.DEAD), st(3))), now=1.0)
    # Only a suspicion (a stale view must not kill), but we ask the member
    # at once, the suspicion riding on the ping.
    # (In a cluster this small the random confirmation check may have asked
    # already: then that ping is the one.)
    assert r.status(2) is Status.SUSPECT
    assert r.counter("merge_death_checks") + r.counter("confirm_checks") == 1
    pings = [msgs for dst, msgs in sends(outs) if dst == addr(2)]
    assert len(pings) == 1
    assert Suspect(nid(2), 0, nid(1)) in pings[0] and any(isinstance(m, Ping) for m in pings[0])
    # Its port is closed: dead within the short closed-port timeout.
    r.handle(Unreachable(addr(2)), now=1.01)
    r.fire(TimerKind.SUSPICION)
    assert r.status(2) is Status.DEAD
