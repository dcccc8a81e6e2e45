"""Two or three real nodes wired by hand: every datagram is moved explicitly."""

from __future__ import annotations

import pytest

from peerd.core.events import (
    EventKind,
    JoinDone,
    Leave,
    OpenStream,
    SetTags,
    StreamReply,
    StreamRequest,
    StreamResponse,
    TimerKind,
)
from peerd.wire.messages import Ack, Alive, Dead, Died, Left, Nack, Ping, PingReq, Status, Suspect

from .util import Rig, addr, alive, cfg, deliver, events, nack_at, nid, of, sends, sent_msgs


def trio() -> tuple[Rig, Rig, Rig]:
    rigs = Rig.make(1, seed=1), Rig.make(2, seed=2), Rig.make(3, seed=3)
    for r in rigs:
        r.start()
        r.join(*(i for i in (1, 2, 3) if r.node.node_id != nid(i)), now=0.0)
        r.drain()
    return rigs


def test_join_through_a_seed() -> None:
    a, b = Rig.make(1), Rig.make(2)
    b.start()
    (req,) = of(a.start(addr(2), now=1.0), OpenStream)
    outs = b.handle(StreamRequest(40, addr(1), req.data), now=1.001)
    assert events(outs) == [(EventKind.JOINED, nid(1))]
    (reply,) = of(outs, StreamReply)
    assert reply.data is not None
    outs = a.handle(StreamResponse(req.stream, reply.data), now=1.002)
    assert events(outs) == [(EventKind.JOINED, nid(2))]
    assert of(outs, JoinDone) == [JoinDone(1, 0)]
    assert a.node.live_count() == b.node.live_count() == 2


def test_indirect_probe_through_a_real_helper() -> None:
    a, b, c = trio()
    for _ in range(4):  # probe until a targets c; b answers its probes
        outs = a.fire(TimerKind.PROBE)
        ((dst, msgs),) = sends(outs)
        if dst == addr(3):
            break
        deliver(b, deliver(a, outs, [b])[2], [a])
    else:
        pytest.fail("a never probed c")
    seq = msgs[0].seq  # type: ignore[union-attr]
    assert msgs[0] == Ping(seq, nid(3))  # the direct ping is lost: a-c is broken

    outs = a.fire(TimerKind.PROBE_TIMEOUT)
    assert sends(outs) == [(addr(2), [PingReq(seq, nid(3), addr(3), True)])]
    b_outs = deliver(a, outs, [b])[2]
    ((dst, relay),) = sends(b_outs)
    assert dst == addr(3) and isinstance(relay[0], Ping) and relay[0].target == nid(3)
    c_outs = deliver(b, b_outs, [c])[3]
    assert sends(c_outs) == [(addr(2), [Ack(relay[0].seq)])]
    b_outs = deliver(c, c_outs, [b])[2]
    assert sends(b_outs) == [(addr(1), [Ack(seq)])]
    deliver(b, b_outs, [a])

    outs = a.fire(TimerKind.PROBE)
    assert events(outs) == []
    assert a.status(3) is Status.ALIVE
    assert a.node.health_score == 0


def two() -> tuple[Rig, Rig]:
    a, b = Rig.make(1), Rig.make(2)
    for r, other in ((a, 2), (b, 1)):
        r.start()
        r.join(other, now=0.0)
        r.drain()
    return a, b


def suspect_b(a: Rig) -> list:
    """a's first probe of b is lost: a suspects b and buddy-pings it."""
    a.fire(TimerKind.PROBE)
    a.fire(TimerKind.PROBE_TIMEOUT)
    outs = a.fire(TimerKind.PROBE)
    assert events(outs) == [(EventKind.SUSPECT, nid(2))]
    return outs


def test_buddy_ping_makes_a_live_suspect_refute() -> None:
    a, b = two()
    outs = suspect_b(a)
    ((dst, msgs),) = sends(outs)
    assert dst == addr(2) and Suspect(nid(2), 0, nid(1)) in msgs

    b_outs = deliver(a, outs, [b], now=a.now + 0.001)[2]
    assert b.node.incarnation == 1
    ((dst, reply),) = sends(b_outs)
    (ping,) = [m for m in msgs if isinstance(m, Ping)]
    assert (dst, reply[0]) == (addr(1), Ack(ping.seq))
    b_outs += b.drain()  # the refutation spreads (here: to a, b's only peer)
    a_outs = deliver(b, b_outs, [a], now=a.now + 0.2)[1]
    assert events(a_outs) == [(EventKind.ALIVE, nid(2))]
    assert a.fire(TimerKind.SUSPICION) == []


def test_ack_to_a_buddy_ping_carries_the_refutation() -> None:
    a, b = two()
    outs = suspect_b(a)
    # Suspicion first, so that b has refuted (and queued its Alive) by the
    # time it reads the ping and acks.
    ((dst, msgs),) = sends(outs)
    assert (dst, msgs[:2]) == (addr(2), [Suspect(nid(2), 0, nid(1)), Ping(2, nid(2))])
    b_outs = deliver(a, outs, [b], now=a.now + 0.001)[2]
    assert sends(b_outs) == [(addr(1), [Ack(2), alive(2, inc=1)])]
    a_outs = deliver(b, b_outs, [a], now=a.now + 0.002)[1]
    assert events(a_outs) == [(EventKind.ALIVE, nid(2))]
    assert a.status(2) is Status.ALIVE
    assert a.counter("drop.stale_ack") == 0


def test_set_tags_after_leave_does_not_undo_the_leave() -> None:
    a, b = two()
    outs = a.handle(Leave(), now=1.0)
    tag_outs = a.handle(SetTags((("state", "draining"),)), now=1.01)
    assert tag_outs == []  # ignored: no incarnation bump, no event, no broadcast
    assert a.node.local_member().tags == ()
    assert a.node.incarnation == 1
    outs += a.drain()
    b_outs = deliver(a, outs, [b], now=1.02).get(2, [])
    assert b.status(1) is Status.LEFT
    assert events(b_outs) == [(EventKind.LEFT, nid(1))]
    assert not [m for _, msgs in sends(outs) for m in msgs if isinstance(m, Alive)]
    assert Left(nid(1), 1) in [m for _, msgs in sends(outs) for m in msgs]


def test_ping_from_a_node_held_dead_makes_it_refute() -> None:
    # A healed partition, one direction at a time: a declared b dead while b
    # still has a alive. b's next probe of a is answered with the news.
    a, b = two()
    a.recv(3, Dead(nid(2), 0, nid(3)), now=1.0)  # a is alone now: the news stays queued
    assert a.status(2) is Status.DEAD
    outs = b.fire(TimerKind.PROBE)
    ((dst, (ping,)),) = sends(outs)
    assert dst == addr(1) and isinstance(ping, Ping)

    a_outs = deliver(b, outs, [a], now=b.now + 0.001)[1]
    # The news, then the ack; the queued gossip of the same death is not
    # repeated (it counts as sent).
    assert sends(a_outs) == [(addr(2), [Died(nid(2), 0), Ack(ping.seq)])]
    b_outs = deliver(a, a_outs, [b], now=b.now + 0.002)[2]
    assert b.node.incarnation == 1  # refuted
    assert b.counter("refutations") == 1 and b.counter("drop.stale_ack") == 0
    assert b.status(1) is Status.ALIVE
    # The refutation reaches a by gossip (a is b's only peer), and a takes b back.
    b_outs += b.drain()
    a_outs = deliver(b, b_outs, [a], now=b.now + 0.2)[1]
    assert events(a_outs) == [(EventKind.ALIVE, nid(2))]
    assert a.status(2) is Status.ALIVE


def test_helpers_nack_before_the_requesters_probe_period_ends() -> None:
    # The LAN preset: a 1 s period, the ping-req sent 0.5 s into it. Each
    # helper nacks NACK_AFTER x 0.5 s later, so its nack (1 ms in flight)
    # is in before the period ends: the requester blames the target, not
    # its own health.
    config = cfg()
    assert (config.probe_timeout_s, config.probe_interval_s) == (0.5, 1.0)
    rigs = {i: Rig.make(i, seed=i, config=config) for i in range(1, 6)}
    for i, r in rigs.items():
        r.start()
        r.join(*(j for j in rigs if j != i), now=0.0)
        r.drain()
    a = rigs[1]
    outs = a.fire(TimerKind.PROBE)
    t = a.now
    ((target_addr, ping),) = sent_msgs(outs, Ping)  # the target is down: never delivered
    target = int.from_bytes(ping.target, "big")
    period_end = a.timer(TimerKind.PROBE).at
    assert period_end == t + config.probe_interval_s
    helpers = [rigs[i] for i in rigs if i not in (1, target)]

    outs = a.fire(TimerKind.PROBE_TIMEOUT)
    assert a.now == t + config.probe_timeout_s
    assert sorted(dst for dst, _ in sent_msgs(outs, PingReq)) == sorted(
        h.node.local_member().addr for h in helpers
    )
    deliver(a, outs, helpers, now=a.now + 0.001)
    for h in helpers:
        h_outs = h.fire(TimerKind.INDIRECT_TIMEOUT)
        assert h.now == nack_at(t + config.probe_timeout_s + 0.001, config)
        assert sent_msgs(h_outs, Nack) == [(addr(1), Nack(ping.seq))]
        arrival = h.now + 0.001
        assert arrival < period_end
        deliver(h, h_outs, [a], now=arrival)

    outs = a.fire(TimerKind.PROBE)
    assert a.now == period_end
    assert a.node.health_score == 0  # every helper answered: the target is the problem
    assert events(outs) == [(EventKind.SUSPECT, nid(target))]
    assert a.timer(TimerKind.PROBE).at == period_end + config.probe_interval_s  # not stretched
    assert target_addr == addr(target)
