"""Suspicion (Lifeguard dogpile), expiry, and refutation."""

from __future__ import annotations

import math

import pytest

from peerd.core.events import EventKind, IncarnationChanged, TimerKind
from peerd.core.swim import formulas
from peerd.wire.messages import Ack, Alive, Dead, Died, Left, Ping, Status, Suspect

from .util import (
    Rig,
    addr,
    alive,
    armed_at,
    cfg,
    events,
    first_gossip_at,
    nid,
    nologs,
    sends,
    sent_msgs,
)

# suspicion_mult 5 gives K = 3 confirmations once there are 5 live nodes, so the
# dogpile has visible steps: 30 s, 17.5 s, 10.2 s, 5 s.
DOGPILE = cfg(suspicion_mult=5.0)
LOW, HIGH = formulas.suspicion_bounds(5.0, 6.0, 5, 1.0)
K = formulas.expected_confirmations(5.0, 5)


def started(*peers: int, config: object = DOGPILE) -> Rig:
    r = Rig.make(config=config)  # type: ignore[arg-type]
    r.start()
    r.join(*peers, now=0.0)
    r.drain()
    return r


def gossip(r: Rig) -> list:
    """Everything the node gossips next (one datagram's messages)."""
    outs = r.drain()
    return sends(outs)[0][1] if outs else []


def fail_probe(r: Rig) -> tuple[int, float]:
    """Run one probe nobody answers; returns (target, time the suspicion starts)."""
    ((_, ping),) = sent_msgs(r.fire(TimerKind.PROBE), Ping)
    r.fire(TimerKind.PROBE_TIMEOUT)
    return int.from_bytes(ping.target, "big"), r.timer(TimerKind.PROBE).at


def test_constants() -> None:
    assert (LOW, HIGH, K) == (5.0, 30.0, 3)


def test_failed_probe_suspects_at_the_lifeguard_maximum() -> None:
    r = started(2, 3, 4, 5)
    target, t = fail_probe(r)

    outs = r.fire(TimerKind.PROBE)

    assert events(outs) == [(EventKind.SUSPECT, nid(target))]
    assert (TimerKind.SUSPICION, t + HIGH) in armed_at(outs)
    assert r.status(target) is Status.SUSPECT
    assert r.counter("suspicions") == 1
    assert Suspect(nid(target), 0, nid(1)) in gossip(r)


def test_independent_confirmations_shrink_the_timer() -> None:
    r = started(2, 3, 4, 5)
    target, t = fail_probe(r)
    r.fire(TimerKind.PROBE)
    r.drain()
    others = [i for i in (2, 3, 4, 5) if i != target]
    expected = [formulas.suspicion_timeout(LOW, HIGH, K, c) for c in (1, 2, 3)]
    assert expected == pytest.approx([17.5, 30.0 - 25.0 * math.log(3) / math.log(4), 5.0])

    deadlines = []
    for c, sender in enumerate(others, start=1):
        outs = r.recv(sender, Suspect(nid(target), 0, nid(sender)), now=t + 0.1 * c)
        assert [k for k, _ in armed_at(outs)] == [TimerKind.SUSPICION, TimerKind.GOSSIP]
        deadlines.append(armed_at(outs)[0][1])
        assert events(outs) == []
        # The confirmation is passed on, so others' timers shrink too.
        assert gossip(r) == [Suspect(nid(target), 0, nid(sender))]
    assert deadlines == pytest.approx([t + e for e in expected])
    assert r.counter("confirmations") == 3

    # The newest SUSPICION timer (the earliest deadline) declares the death...
    first, *superseded = sorted(r.armed(TimerKind.SUSPICION), key=lambda s: s.at)
    assert first == r.timer(TimerKind.SUSPICION)
    outs = r.fire(first)
    assert r.now == pytest.approx(t + LOW)
    assert events(outs) == [(EventKind.DEAD, nid(target))]
    assert r.status(target) is Status.DEAD
    assert gossip(r) == [Died(nid(target), 0)]
    # ... and the ones it superseded do nothing when they fire.
    assert len(superseded) == 3
    for s in superseded:
        assert r.fire(s) == []
    assert r.counter("dead") == 1


def test_duplicate_and_origin_confirmations_do_not_count() -> None:
    r = started(2, 3, 4, 5)
    # n3 suspects n2 first: n3 is the origin.
    outs = r.recv(3, Suspect(nid(2), 0, nid(3)), now=10.0)
    assert events(outs) == [(EventKind.SUSPECT, nid(2))]
    assert (TimerKind.SUSPICION, 10.0 + HIGH) in armed_at(outs)
    # With K = 3 of 5 live nodes, every node checks a fresh suspicion itself:
    # a buddy ping plus a confirm timer (2K/N >= 1).
    ((dst, msgs),) = sends(outs)
    assert dst == addr(2)
    assert msgs == [Suspect(nid(2), 0, nid(1)), Ping(1, nid(2)), Suspect(nid(2), 0, nid(3))]
    assert (TimerKind.CONFIRM_TIMEOUT, 10.5) in armed_at(outs)
    r.drain()

    assert nologs(r.recv(3, Suspect(nid(2), 0, nid(3)), now=11.0)) == []  # origin again
    assert nologs(r.recv(4, Suspect(nid(2), 0, nid(4)), now=12.0)) != []  # first confirmation
    r.drain()
    assert nologs(r.recv(4, Suspect(nid(2), 0, nid(4)), now=13.0)) == []  # duplicate
    assert r.counter("confirmations") == 1
    assert r.timer(TimerKind.SUSPICION).at == 10.0 + 17.5


def test_own_check_timeout_confirms_the_suspicion() -> None:
    r = started(2, 3, 4, 5)
    r.recv(3, Suspect(nid(2), 0, nid(3)), now=10.0)
    r.drain()
    outs = r.fire(TimerKind.CONFIRM_TIMEOUT)
    assert r.now == 10.5
    assert armed_at(nologs(outs))[0] == (TimerKind.SUSPICION, 10.0 + 17.5)
    assert r.counter("confirmations") == 1


def test_answered_check_does_not_confirm() -> None:
    r = started(2, 3, 4, 5)
    r.recv(3, Suspect(nid(2), 0, nid(3)), now=10.0)
    r.drain()
    assert r.recv(2, Ack(1), now=10.1) == []
    assert r.fire(TimerKind.CONFIRM_TIMEOUT) == []
    assert r.counter("confirmations") == 0
    assert r.status(2) is Status.SUSPECT  # an ack is no refutation: only n2 can refute


def test_stale_suspect_is_ignored() -> None:
    r = started(2)
    r.recv(2, alive(2, inc=3), now=1.0)
    r.drain()
    assert nologs(r.recv(3, Suspect(nid(2), 2, nid(3)), now=2.0)) == []
    assert r.status(2) is Status.ALIVE


def test_suspect_about_unknown_node_is_ignored() -> None:
    r = started(2)
    assert r.recv(3, Suspect(nid(9), 0, nid(3)), now=2.0) == []
    assert r.node.member(nid(9)) is None


def test_refuted_suspicion_timer_is_stale() -> None:
    r = started(2, 3, 4, 5)
    target, t = fail_probe(r)
    r.fire(TimerKind.PROBE)
    r.drain()
    outs = r.recv(target, alive(target, inc=1), now=t + 0.2)
    assert events(outs) == [(EventKind.ALIVE, nid(target))]
    assert r.status(target) is Status.ALIVE
    assert gossip(r) == [alive(target, inc=1)]

    assert nologs(r.fire(TimerKind.SUSPICION)) == []
    assert r.status(target) is Status.ALIVE
    assert r.node.member(nid(target)).incarnation == 1  # type: ignore[union-attr]


def test_alive_at_same_incarnation_does_not_clear_suspicion() -> None:
    r = started(2)
    r.recv(3, Suspect(nid(2), 0, nid(3)), now=1.0)
    r.drain()
    assert nologs(r.recv(2, alive(2, inc=0), now=1.1)) == []
    assert r.status(2) is Status.SUSPECT


def test_suspect_at_higher_incarnation_raises_the_members_incarnation() -> None:
    r = started(2, config=cfg())
    r.recv(3, Suspect(nid(2), 4, nid(3)), now=1.0)
    m = r.node.member(nid(2))
    assert m is not None and (m.status, m.incarnation) == (Status.SUSPECT, 4)
    r.drain()
    # n2's refutation must now beat 4.
    assert nologs(r.recv(2, alive(2, inc=4), now=1.1)) == []
    assert events(r.recv(2, alive(2, inc=5), now=1.2)) == [(EventKind.ALIVE, nid(2))]


# --- refutation ----------------------------------------------------------------


def test_suspect_about_us_is_refuted() -> None:
    r = started(2)
    outs = r.recv(2, Suspect(nid(1), 0, nid(2)), now=3.0)
    assert nologs(outs)[0] == IncarnationChanged(1)
    assert armed_at(outs) == [(TimerKind.GOSSIP, first_gossip_at(3.0))]
    assert len(nologs(outs)) == 2
    assert events(outs) == []
    assert r.node.incarnation == 1
    assert r.node.health_score == 1
    assert r.counter("refutations") == 1
    assert gossip(r) == [alive(1, inc=1)]
    assert r.node.local_member().status is Status.ALIVE


def test_refutation_outbids_the_accused_incarnation() -> None:
    r = started(2)
    r.recv(2, Dead(nid(1), 5, nid(2)), now=3.0)
    assert r.node.incarnation == 6
    assert gossip(r) == [alive(1, inc=6)]
    # A stale accusation about us (below our incarnation) is answered by
    # spreading our current Alive again, without a bump; while it is queued,
    # further stale accusations add nothing.
    r.recv(2, Suspect(nid(1), 5, nid(2)), now=4.0)
    assert r.node.incarnation == 6
    assert r.counter("stale_accusations") == 1
    assert nologs(r.recv(2, Dead(nid(1), 2, nid(2)), now=4.0)) == []
    assert r.counter("stale_accusations") == 1
    assert gossip(r) == [alive(1, inc=6)]
    assert r.node.incarnation == 6
    assert r.counter("refutations") == 1


def test_dead_about_us_is_refuted() -> None:
    r = started(2)
    outs = r.recv(2, Dead(nid(1), 0, nid(2)), now=3.0)
    assert outs[0] == IncarnationChanged(1)
    assert events(outs) == []
    assert r.node.local_member().status is Status.ALIVE
    assert r.node.health_score == 1
    assert gossip(r) == [alive(1, inc=1)]


def test_left_about_us_is_refuted_when_we_are_not_leaving() -> None:
    r = started(2)
    outs = r.recv(2, Left(nid(1), 3), now=3.0)
    assert outs[0] == IncarnationChanged(4)
    assert r.node.local_member().status is Status.ALIVE


def test_alive_about_us_with_other_content_is_outbid() -> None:
    r = started(2)
    # A view of us from an earlier life: same incarnation, old address.
    outs = r.recv(2, alive(1, inc=0, at=("10.9.9.9", 7946)), now=3.0)
    assert outs[0] == IncarnationChanged(1)
    assert gossip(r) == [alive(1, inc=1)]
    # Our own current Alive coming back is not a reason to refute.
    assert nologs(r.recv(2, alive(1, inc=1), now=4.0)) == []
    # A stale one neither.
    assert nologs(r.recv(2, alive(1, inc=0, at=("10.9.9.9", 7946)), now=4.0)) == []
    assert r.counter("refutations") == 1


def test_alive_about_us_at_higher_incarnation_is_outbid() -> None:
    r = started(2)
    r.recv(2, Alive(nid(1), "n1", addr(1), 7, 0, ()), now=3.0)
    assert r.node.incarnation == 8
    assert gossip(r) == [alive(1, inc=8)]


def test_stale_accusation_from_a_peer_that_missed_our_refutation_is_answered() -> None:
    r = started(2)
    r.recv(3, Suspect(nid(1), 0, nid(3)), now=1.0)  # refuted: incarnation 1
    r.drain()
    # n2 never heard the refutation; its buddy ping still says incarnation 0.
    outs = r.recv(2, Suspect(nid(1), 0, nid(2)), Ping(7, nid(1)), now=2.0)
    assert sends(outs) == [(addr(2), [Ack(7), alive(1, inc=1)])]
    assert r.node.incarnation == 1


def test_a_suspicion_of_a_newer_incarnation_restarts_the_suspicion() -> None:
    r = started(2)
    r.recv(2, Suspect(nid(2), 0, nid(2)), now=1.0)
    assert r.node.member(nid(2)).status is Status.SUSPECT  # type: ignore[union-attr]
    r.recv(2, Suspect(nid(2), 3, nid(2)), now=1.5)
    m = r.node.member(nid(2))
    assert m is not None and m.status is Status.SUSPECT and m.incarnation == 3
    # a refutation of the older life does not clear the newer suspicion
    r.recv(2, alive(2, inc=2), now=1.6)
    m = r.node.member(nid(2))
    assert m is not None and m.status is Status.SUSPECT and m.incarnation == 3
