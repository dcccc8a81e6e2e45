"""Direct and indirect probing, the helper's side, Lifeguard health and buddy pings."""

from __future__ import annotations

import pytest

from peerd.core.events import EventKind, SendPacket, SetTimer, TimerKind
from peerd.core.timers import membership_timer
from peerd.wire.messages import Ack, Dead, Died, Left, Nack, Ping, PingReq, Status, Suspect

from .util import (
    Rig,
    addr,
    alive,
    cfg,
    events,
    nack_at,
    nid,
    nologs,
    of,
    sends,
    sent_msgs,
    timers,
)


def started(*peers: int, **kw: object) -> Rig:
    """Node 1, started with no seeds at t=0, knowing ``peers``, gossip queue empty."""
    r = Rig.make(**kw)  # type: ignore[arg-type]
    r.start()
    r.join(*peers, now=0.0)
    r.drain()
    return r


def probe_target(outs: list) -> int:
    ((ping_dst, ping),) = sent_msgs(outs, Ping)
    target = int.from_bytes(ping.target, "big")
    assert ping_dst == addr(target)
    return target


# --- direct probe ------------------------------------------------------------------


def test_probe_pings_the_target_with_piggybacked_gossip() -> None:
    r = Rig.make()
    r.start()
    r.join(2, now=0.0)  # queues n2's Alive; our own is queued since Start
    t = r.timer(TimerKind.PROBE).at

    outs = r.fire(TimerKind.PROBE)

    assert sends(outs) == [(addr(2), [Ping(1, nid(2)), alive(2), alive(1)])]
    assert [(s.timer.kind, s.at) for s in timers(outs)] == [
        (TimerKind.PROBE, t + 1.0),
        (TimerKind.PROBE_TIMEOUT, t + 0.5),
    ]
    assert r.counter("probes") == 1


def test_no_probe_when_alone() -> None:
    r = Rig.make()
    r.start()
    t = r.timer(TimerKind.PROBE).at
    outs = r.fire(TimerKind.PROBE)
    # Tokens 1-4 were armed by Start (no GOSSIP timer: nobody to tell).
    assert of(outs, SetTimer) == [SetTimer(t + 1.0, membership_timer(TimerKind.PROBE, 5))]
    assert len(outs) == 1


def test_ack_means_no_suspicion_at_next_probe() -> None:
    r = started(2)
    t = r.timer(TimerKind.PROBE).at
    r.fire(TimerKind.PROBE)
    assert r.recv(2, Ack(1), now=t + 0.1) == []
    assert r.fire(TimerKind.PROBE_TIMEOUT) == []  # acked: nothing to do

    outs = r.fire(TimerKind.PROBE)
    assert events(outs) == []
    assert sends(outs) == [(addr(2), [Ping(2, nid(2))])]
    assert r.status(2) is Status.ALIVE
    assert r.counter("probe_failures") == 0
    assert r.node.health_score == 0


def test_unanswered_probe_without_helpers_suspects_at_next_probe() -> None:
    r = started(2)
    t = r.timer(TimerKind.PROBE).at
    r.fire(TimerKind.PROBE)
    assert r.fire(TimerKind.PROBE_TIMEOUT) == []  # nobody to ask

    outs = r.fire(TimerKind.PROBE, now=t + 1.0)

    assert events(outs) == [(EventKind.SUSPECT, nid(2))]
    assert r.status(2) is Status.SUSPECT
    assert r.node.health_score == 1  # no helper to blame: our own health suffers
    assert r.counter("probe_failures") == 1
    # Two live nodes: K = 0, so the suspicion runs at the minimum, 3 * 1 * 1 s.
    assert (TimerKind.SUSPICION, t + 1.0 + 3.0) in [(s.timer.kind, s.at) for s in timers(outs)]
    # The next period is stretched by health (1 + 1) and the new ping carries the
    # suspicion to its subject (buddy system).
    assert r.timer(TimerKind.PROBE).at == t + 1.0 + 2.0
    assert r.timer(TimerKind.PROBE_TIMEOUT).at == t + 1.0 + 1.0
    ((dst, msgs),) = sends(outs)
    assert dst == addr(2)
    # Suspicion first, then the ping. The queued broadcast of the same
    # suspicion is not repeated as piggyback: it counts as sent.
    assert msgs == [Suspect(nid(2), 0, nid(1)), Ping(2, nid(2))]


def test_ack_lowers_health_but_not_below_zero() -> None:
    r = started(2)
    r.fire(TimerKind.PROBE)
    r.fire(TimerKind.PROBE_TIMEOUT)
    r.fire(TimerKind.PROBE)  # probe 1 failed: health 1
    assert r.node.health_score == 1
    r.recv(2, Ack(2))
    assert r.node.health_score == 0
    r.recv(2, Ack(2))  # duplicate ack: counted once
    assert r.node.health_score == 0
    r.fire(TimerKind.PROBE)
    r.recv(2, Ack(3))
    assert r.node.health_score == 0
    assert r.counter("drop.stale_ack") == 0


def test_stale_ack_is_counted() -> None:
    r = started(2)
    assert r.recv(2, Ack(42), now=0.5) == []
    assert r.counter("drop.stale_ack") == 1


# --- indirect probe ----------------------------------------------------------------


def test_probe_timeout_asks_every_other_member_when_k_covers_them() -> None:
    r = started(2, 3, 4, 5)
    outs = r.fire(TimerKind.PROBE)
    target = probe_target(outs)
    t = r.now

    outs = r.fire(TimerKind.PROBE_TIMEOUT)

    assert r.now == t + 0.5
    helpers = sorted(dst for dst, _ in sends(outs))
    assert helpers == sorted(addr(i) for i in (2, 3, 4, 5) if i != target)
    for _, msgs in sends(outs):
        assert msgs == [PingReq(1, nid(target), addr(target), True)]
    assert of(outs, SetTimer) == []
    assert r.counter("indirect_probes") == 3


def test_probe_timeout_asks_exactly_indirect_checks_helpers() -> None:
    r = started(2, 3, 4, 5, 6, 7, config=cfg(indirect_checks=2))
    target = probe_target(r.fire(TimerKind.PROBE))
    outs = r.fire(TimerKind.PROBE_TIMEOUT)
    got = sends(outs)
    assert len(got) == 2
    dsts = {dst for dst, _ in got}
    assert len(dsts) == 2 and addr(target) not in dsts and addr(1) not in dsts
    assert all(msgs == [PingReq(1, nid(target), addr(target), True)] for _, msgs in got)


def test_ack_forwarded_by_a_helper_counts() -> None:
    r = started(2, 3, 4, 5)
    target = probe_target(r.fire(TimerKind.PROBE))
    helper = next(i for i in (2, 3, 4, 5) if i != target)
    r.fire(TimerKind.PROBE_TIMEOUT)
    assert r.recv(helper, Ack(1), now=r.now + 0.05) == []

    outs = r.fire(TimerKind.PROBE)
    assert events(outs) == []
    assert r.status(target) is Status.ALIVE
    assert r.node.health_score == 0
    assert r.counter("probe_failures") == 0


def test_missed_nacks_raise_health_and_stretch_the_next_period() -> None:
    r = started(2, 3, 4, 5)
    target = probe_target(r.fire(TimerKind.PROBE))
    helpers = [i for i in (2, 3, 4, 5) if i != target]
    r.fire(TimerKind.PROBE_TIMEOUT)
    r.recv(helpers[0], Nack(1), now=r.now + 0.1)  # 1 of 3 nacks
    t = r.timer(TimerKind.PROBE).at

    outs = r.fire(TimerKind.PROBE)

    assert r.node.health_score == 2  # 3 expected - 1 received
    assert events(outs) == [(EventKind.SUSPECT, nid(target))]
    assert r.timer(TimerKind.PROBE).at == t + 1.0 * 3
    assert r.timer(TimerKind.PROBE_TIMEOUT).at == t + 0.5 * 3


def test_all_nacks_received_keeps_health() -> None:
    r = started(2, 3, 4, 5)
    target = probe_target(r.fire(TimerKind.PROBE))
    r.fire(TimerKind.PROBE_TIMEOUT)
    for h in (i for i in (2, 3, 4, 5) if i != target):
        r.recv(h, Nack(1))
    t = r.timer(TimerKind.PROBE).at
    outs = r.fire(TimerKind.PROBE)
    assert r.node.health_score == 0  # helpers answered: the target is the problem
    assert events(outs) == [(EventKind.SUSPECT, nid(target))]
    assert r.timer(TimerKind.PROBE).at == t + 1.0


def test_health_is_capped_below_awareness_max() -> None:
    r = started(2, config=cfg(awareness_max=3))
    scores = []
    for _ in range(4):
        r.fire(TimerKind.PROBE)
        r.fire(TimerKind.PROBE_TIMEOUT)
        scores.append(r.node.health_score)
    assert scores == [0, 1, 2, 2]
    t = r.timer(TimerKind.PROBE)
    outs = r.fire(t)
    assert r.node.health_score == 2
    assert r.timer(TimerKind.PROBE).at == t.at + 3.0
    assert timers(outs, TimerKind.PROBE_TIMEOUT)[0].at == t.at + 1.5


@pytest.mark.parametrize("down", ["dead", "left"])
def test_target_declared_down_by_others_during_our_probe_is_not_our_fault(down: str) -> None:
    # Helpers were asked and none nacked, but the target was meanwhile
    # declared dead (or left): the failed probe says nothing about our own
    # health, and there is no suspicion to start.
    r = started(2, 3, 4, 5)
    target = probe_target(r.fire(TimerKind.PROBE))
    helper = next(i for i in (2, 3, 4, 5) if i != target)
    r.fire(TimerKind.PROBE_TIMEOUT)
    news = Dead(nid(target), 0, nid(helper)) if down == "dead" else Left(nid(target), 1)
    r.recv(helper, news, now=r.now + 0.1)
    r.drain()

    outs = r.fire(TimerKind.PROBE)

    assert r.node.health_score == 0
    assert r.counter("probe_failures") == 0
    assert events(outs) == []
    assert r.timer(TimerKind.PROBE).at == r.now + 1.0  # not stretched
    assert r.status(target) is (Status.DEAD if down == "dead" else Status.LEFT)


def test_target_declared_dead_before_the_probe_timeout_without_helpers() -> None:
    r = started(2)
    r.fire(TimerKind.PROBE)
    r.recv(3, Dead(nid(2), 0, nid(3)), now=r.now + 0.1)
    assert nologs(r.fire(TimerKind.PROBE_TIMEOUT)) == []
    outs = r.fire(TimerKind.PROBE)
    assert nologs(outs) == [SetTimer(r.now + 1.0, r.timer(TimerKind.PROBE).timer)]
    assert r.node.health_score == 0
    assert r.counter("probe_failures") == 0


# --- as the helper -----------------------------------------------------------------


def test_ping_req_is_relayed_with_our_own_seq_and_the_ack_forwarded() -> None:
    r = started(2, 3)
    outs = r.recv(2, PingReq(77, nid(3), addr(3), True), now=5.0)
    assert sends(outs) == [(addr(3), [Ping(1, nid(3))])]
    assert [(s.timer.kind, s.at) for s in timers(outs)] == [
        (TimerKind.INDIRECT_TIMEOUT, nack_at(5.0))
    ]

    outs = r.recv(3, Ack(1), now=5.01)
    assert sends(outs) == [(addr(2), [Ack(77)])]
    assert r.fire(TimerKind.INDIRECT_TIMEOUT) == []  # answered: no nack
    assert r.counter("drop.stale_ack") == 0


def test_ping_req_without_answer_sends_nack() -> None:
    r = started(2, 3)
    r.recv(2, PingReq(77, nid(3), addr(3), True), now=5.0)
    outs = r.fire(TimerKind.INDIRECT_TIMEOUT)
    assert r.now == nack_at(5.0) < 5.0 + r.node.config.probe_timeout_s
    assert sends(outs) == [(addr(2), [Nack(77)])]
    # An ack after the nack went out is stale.
    assert r.recv(3, Ack(1), now=5.6) == []
    assert r.counter("drop.stale_ack") == 1


def test_ping_req_without_nack_flag_stays_silent_on_timeout() -> None:
    r = started(2, 3)
    r.recv(2, PingReq(77, nid(3), addr(3), False), now=5.0)
    assert r.fire(TimerKind.INDIRECT_TIMEOUT) == []


def test_ping_req_can_target_a_node_we_do_not_know() -> None:
    r = started(2)
    outs = r.recv(2, PingReq(9, nid(8), addr(8), True), now=1.0)
    assert sends(outs) == [(addr(8), [Ping(1, nid(8))])]


def test_ping_req_about_ourselves_is_acked_directly() -> None:
    r = started(2)
    outs = r.recv(2, PingReq(5, nid(1), addr(1), True), now=1.0)
    assert sends(outs) == [(addr(2), [Ack(5)])]
    assert timers(outs) == []


def test_ping_req_with_unusable_target_address_is_dropped() -> None:
    r = started(2)
    assert nologs(r.recv(2, PingReq(5, nid(3), ("0.0.0.0", 7946), True), now=1.0)) == []
    assert r.counter("drop.bad_addr") == 1


def test_ping_is_acked_to_its_source() -> None:
    r = started(2)
    outs = r.recv(("192.0.2.9", 4000), Ping(31, nid(1)), now=1.0)
    assert sends(outs) == [(("192.0.2.9", 4000), [Ack(31)])]


def test_ping_from_a_member_we_hold_dead_tells_it_so() -> None:
    # A healed partition: n2, which we declared dead (at its incarnation 2),
    # probes us. The ack comes after the news, so n2 refutes at once.
    r = started(3)
    r.join(2, inc=2, now=0.5)
    r.recv(3, Dead(nid(2), 2, nid(3)), now=1.0)
    r.drain()
    outs = r.recv(2, Ping(31, nid(1)), now=2.0)
    assert nologs(outs) == of(outs, SendPacket)
    assert sends(outs) == [(addr(2), [Died(nid(2), 2), Ack(31)])]
    assert r.status(2) is Status.DEAD  # only its refutation brings it back
    # Its refutation, when it comes, does.
    outs = r.recv(2, alive(2, inc=3), now=2.01)
    assert events(outs) == [(EventKind.ALIVE, nid(2))]
    assert sends(r.recv(2, Ping(32, nid(1)), now=3.0)) == [(addr(2), [Ack(32), alive(2, inc=3)])]


def test_ping_from_a_member_that_left_or_is_alive_is_just_acked() -> None:
    r = started(2, 3)
    r.recv(3, Left(nid(3), 1), now=1.0)
    r.drain()
    assert sends(r.recv(3, Ping(5, nid(1)), now=2.0)) == [(addr(3), [Ack(5)])]
    assert sends(r.recv(2, Ping(6, nid(1)), now=2.1)) == [(addr(2), [Ack(6)])]


# --- buddy system ------------------------------------------------------------------


def test_ping_to_a_suspect_carries_the_suspicion() -> None:
    r = started(2)
    outs = r.recv(3, Suspect(nid(2), 0, nid(3)), now=0.1)  # someone else suspects n2
    assert events(outs) == [(EventKind.SUSPECT, nid(2))]
    r.drain()

    outs = r.fire(TimerKind.PROBE)

    # One datagram: the suspicion, then our probe, so a live n2 reads the
    # suspicion first and its refutation rides on the ack.
    ((dst, msgs),) = sends(outs)
    assert dst == addr(2)
    assert msgs == [Suspect(nid(2), 0, nid(1)), Ping(1, nid(2))]


def test_relayed_ping_to_a_suspect_carries_the_suspicion() -> None:
    r = started(2, 3, config=cfg(suspicion_mult=2.0))  # K = 0: no confirmation ping of our own
    r.recv(4, Suspect(nid(3), 0, nid(4)), now=0.1)
    r.drain()
    outs = r.recv(2, PingReq(50, nid(3), addr(3), True), now=0.2)
    ((dst, msgs),) = sends(outs)
    assert dst == addr(3)
    assert msgs == [Suspect(nid(3), 0, nid(1)), Ping(1, nid(3))]
