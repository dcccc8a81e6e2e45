"""Closed-port hints (ICMP unreachable, watch link closed) and watch links."""

from __future__ import annotations

import pytest

from peerd.core.events import EventKind, LinkClosed, TimerKind, Unreachable, WatchLinks
from peerd.wire.messages import Ack, Dead, Ping, Status, Suspect

from .util import Rig, addr, alive, armed_at, cfg, events, first_gossip_at, nid, nologs, of, sends

HINTS = [Unreachable, LinkClosed]


def started(*peers: int, i: int = 1, **kw: object) -> Rig:
    r = Rig.make(i, **kw)  # type: ignore[arg-type]
    r.start()
    r.join(*peers, now=0.0)
    r.drain()
    return r


@pytest.mark.parametrize("hint", HINTS)
def test_hint_suspects_with_the_short_timer_and_pings(hint: type) -> None:
    r = started(2, 3, 4, 5, config=cfg(refused_suspicion_timeout_s=0.25))
    outs = r.handle(hint(addr(2)), now=10.0)

    assert events(outs) == [(EventKind.SUSPECT, nid(2))]
    # The ping is tracked like a confirmation check: it has its own timeout.
    # Nothing is gossiped: the suspicion stays between us and the suspect.
    assert armed_at(outs) == [(TimerKind.SUSPICION, 10.25), (TimerKind.CONFIRM_TIMEOUT, 10.5)]
    # A buddy ping: if n2 is in fact alive it refutes within a round trip.
    assert sends(outs) == [(addr(2), [Suspect(nid(2), 0, nid(1)), Ping(1, nid(2))])]
    assert r.node.queued_broadcasts() == 0
    assert r.counter("unreachable_hints") == 1
    assert r.counter("link_closed_hints") == (1 if hint is LinkClosed else 0)
    assert r.counter("confirm_checks") == 0  # a hint's ping is not a dogpile check

    outs = r.fire(TimerKind.SUSPICION)
    assert r.now == 10.25
    assert events(outs) == [(EventKind.DEAD, nid(2))]
    # Only the death is spread: gossip, and the ring neighbours a moment later.
    assert armed_at(outs) == [
        (TimerKind.GOSSIP, first_gossip_at(10.25)),
        (TimerKind.GOSSIP, first_gossip_at(10.25)),
    ]
    assert r.node.queued_broadcasts() == 1
    # The check's timeout then finds nothing left to do.
    assert nologs(r.fire(TimerKind.CONFIRM_TIMEOUT)) == []
    assert r.status(2) is Status.DEAD


@pytest.mark.parametrize("hint", HINTS)
def test_hint_suspicion_is_not_gossiped_but_a_refutation_is(hint: type) -> None:
    r = started(2, 3, 4, 5)
    r.handle(hint(addr(2)), now=10.0)
    assert r.drain() == []  # nothing queued, nothing gossiped
    outs = r.recv(2, Ack(1), alive(2, inc=1), now=10.002)
    assert events(outs) == [(EventKind.ALIVE, nid(2))]
    # Whoever heard of the suspicion some other way learns of the refutation.
    assert [m for _, msgs in sends(r.drain()) for m in msgs][:1] == [alive(2, inc=1)]


@pytest.mark.parametrize("hint", HINTS)
def test_hint_for_a_live_node_that_refutes_does_not_kill_it(hint: type) -> None:
    r = started(2, 3, 4, 5)
    r.handle(hint(addr(2)), now=10.0)
    r.drain()
    # n2 restarted on the same port: it answers the buddy ping with a refutation.
    outs = r.recv(2, Ack(1), alive(2, inc=1), now=10.002)
    assert events(outs) == [(EventKind.ALIVE, nid(2))]
    assert r.counter("drop.stale_ack") == 0  # the hint's ping was expected
    assert nologs(r.fire(TimerKind.SUSPICION)) == []
    assert nologs(r.fire(TimerKind.CONFIRM_TIMEOUT)) == []
    assert r.status(2) is Status.ALIVE


@pytest.mark.parametrize("hint", HINTS)
def test_unanswered_hint_ping_is_our_own_failed_check(hint: type) -> None:
    # With the default cap (0.5 s) the check times out with the suspicion
    # still running: like a failed confirmation check of our own, it is no
    # new confirmation (we are the suspicion's origin) and kills nothing early.
    r = started(2, 3, 4, 5)
    outs = r.handle(hint(addr(2)), now=10.0)
    assert [k for k, _ in armed_at(outs)] == [TimerKind.SUSPICION, TimerKind.CONFIRM_TIMEOUT]
    assert r.timer(TimerKind.SUSPICION).at == 10.5
    assert r.timer(TimerKind.CONFIRM_TIMEOUT).at == 10.5
    r.drain()
    outs = r.fire(TimerKind.CONFIRM_TIMEOUT)
    assert nologs(outs) == []
    assert r.status(2) is Status.SUSPECT
    assert r.counter("confirmations") == 0
    outs = r.fire(TimerKind.SUSPICION)
    assert events(outs) == [(EventKind.DEAD, nid(2))]
    # A late ack to the hint's ping is stale by now.
    r.recv(2, Ack(1), now=10.6)
    assert r.counter("drop.stale_ack") == 1


def test_hint_caps_a_running_suspicion_once() -> None:
    r = started(2, 3, 4, 5)
    r.recv(3, Suspect(nid(2), 0, nid(3)), now=10.0)
    assert r.timer(TimerKind.SUSPICION).at == 10.0 + 18.0  # K = 1 of 5: the maximum
    r.drain()

    outs = r.handle(Unreachable(addr(2)), now=12.0)
    assert armed_at(outs) == [(TimerKind.SUSPICION, 12.5)]
    assert events(outs) == [] and sends(outs) == []
    assert nologs(r.handle(LinkClosed(addr(2)), now=12.1)) == []  # already capped
    assert r.counter("unreachable_hints") == 2
    outs = r.fire(TimerKind.SUSPICION)
    assert events(outs) == [(EventKind.DEAD, nid(2))]


@pytest.mark.parametrize("where", [addr(9), addr(1), ("10.0.0.2", 1234)])
def test_hint_for_an_address_that_is_no_live_member_is_ignored(where: tuple) -> None:
    r = started(2)
    assert r.handle(Unreachable(where), now=1.0) == []
    assert r.counter("unreachable_hints") == 0


def test_hint_for_a_dead_member_is_ignored() -> None:
    r = started(2, 3)
    r.recv(3, Dead(nid(2), 0, nid(3)), now=1.0)
    assert r.handle(Unreachable(addr(2)), now=2.0) == []


# --- watch links ---------------------------------------------------------------


def test_watch_link_follows_the_ring_successor() -> None:
    r = Rig.make(1)
    assert of(r.start(), WatchLinks) == []  # alone: nothing to watch
    assert of(r.join(3, now=0.1), WatchLinks) == [WatchLinks((addr(3),))]
    assert of(r.join(2, now=0.2), WatchLinks) == [WatchLinks((addr(2),))]
    assert of(r.join(5, now=0.3), WatchLinks) == []  # successor unchanged
    outs = r.recv(3, Dead(nid(2), 0, nid(3)), now=1.0)
    assert of(outs, WatchLinks) == [WatchLinks((addr(3),))]
    outs = r.recv(3, Suspect(nid(3), 0, nid(5)), now=2.0)
    assert of(outs, WatchLinks) == []  # a suspect is still live
    outs = r.handle(LinkClosed(addr(3)), now=3.0)
    assert of(outs, WatchLinks) == []
    outs = r.fire(TimerKind.SUSPICION)
    assert events(outs) == [(EventKind.DEAD, nid(3))]
    assert of(outs, WatchLinks) == [WatchLinks((addr(5),))]


def test_watch_link_wraps_around_the_ring() -> None:
    r = started(2, 3, i=5)
    assert of(r.history, WatchLinks)[-1] == WatchLinks((addr(2),))


def test_watch_link_follows_a_moving_successor() -> None:
    r = started(2)
    new = ("10.0.1.2", 7946)
    outs = r.recv(new, alive(2, inc=1, at=new), now=1.0)
    assert of(outs, WatchLinks) == [WatchLinks((new,))]


def test_several_watch_links() -> None:
    r = started(2, 3, 4, i=3, config=cfg(watch_links=2))
    assert of(r.history, WatchLinks)[-1] == WatchLinks((addr(4), addr(2)))


def test_watch_links_disabled() -> None:
    r = started(2, 3, config=cfg(watch_links=0))
    assert of(r.history, WatchLinks) == []


def test_last_peer_gone_closes_the_watch_link() -> None:
    r = started(2)
    outs = r.recv(2, Dead(nid(2), 0, nid(9)), now=1.0)
    assert of(outs, WatchLinks) == [WatchLinks(())]
