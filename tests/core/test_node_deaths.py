"""How deaths (and leaves) spread: gossiped as Died, counted down when heard
again (counter-style rumour mongering), passed once to the next two ring
successors (and again to a new successor)."""

from __future__ import annotations

import random

import pytest

from peerd.core.events import EventKind, TimerKind, Unreachable
from peerd.core.swim import formulas
from peerd.core.swim.base import FIRST_GOSSIP_DELAY_S, RING_RECENT_S
from peerd.core.swim.membership import Node
from peerd.wire import codec
from peerd.wire.messages import Alive, Dead, Died, DiedRef, Left, Status, Suspect

from .util import Rig, addr, alive, cfg, events, name, nid, sends


def started(*peers: int, i: int = 3, **kw: object) -> Rig:
    r = Rig.make(i, **kw)  # type: ignore[arg-type]
    r.start()
    r.join(*peers, now=0.0)
    r.drain()
    return r


def limit_of(r: Rig) -> int:
    return formulas.retransmit_limit(r.node.config.retransmit_mult, r.node.live_count())


def test_died_is_dead_without_the_sender() -> None:
    assert len(codec.encode(Died(nid(2), 0))) == 20
    assert len(codec.encode(Dead(nid(2), 0, nid(3)))) == 37


@pytest.mark.parametrize("news", [Died(nid(9), 0), Dead(nid(9), 0, nid(4))])
def test_a_death_goes_once_to_the_next_two_ring_successors(news: object) -> None:
    # Ring (by id) 1 2 3 4 5 9: n3's successors are n4 and n5.
    r = started(1, 2, 4, 5, 9)
    outs = r.recv(2, news, now=1.0)  # type: ignore[arg-type]
    assert events(outs) == [(EventKind.DEAD, nid(9))]
    due = [t.at for t in r.armed(TimerKind.GOSSIP)]
    assert due == [1.0 + FIRST_GOSSIP_DELAY_S] * 2  # the gossip round, then the ring flush
    outs = r.fire(TimerKind.GOSSIP)  # the newest: the ring flush
    # Gossip carries the compact form, whatever form we heard.
    assert sends(outs) == [(addr(4), [Died(nid(9), 0)]), (addr(5), [Died(nid(9), 0)])]
    assert r.counter("ring_packets") == 2
    # Once only: the next flush has nothing owed.
    r.drain()
    assert r.counter("ring_packets") == 2


def test_a_death_is_not_passed_back_to_the_successor_it_came_from() -> None:
    r = started(1, 2, 4, 5, 9)
    r.recv(4, Died(nid(9), 0), now=1.0)
    outs = r.fire(TimerKind.GOSSIP)
    assert sends(outs) == [(addr(5), [Died(nid(9), 0)])]


def test_a_death_we_declare_goes_to_the_successors_after_it() -> None:
    r = started(1, 2, 4, 5)
    r.handle(Unreachable(addr(4)), now=1.0)
    outs = r.fire(TimerKind.SUSPICION)
    assert events(outs) == [(EventKind.DEAD, nid(4))]
    # n4 is gone from the ring: n3's successors are now n5 and n1 (around).
    outs = r.fire(TimerKind.GOSSIP)  # the ring flush (armed after the gossip round)
    assert sends(outs) == [(addr(5), [Died(nid(4), 0)]), (addr(1), [Died(nid(4), 0)])]


def test_a_new_successor_gets_the_recent_news_again() -> None:
    # n3 passes the death of n9 to n4 and n5, not knowing n4 has crashed too.
    r = started(1, 2, 4, 5, 9)
    r.recv(2, Died(nid(9), 0), now=1.0)
    r.fire(TimerKind.GOSSIP)
    r.drain()
    # When n4's death is known, n1 becomes a successor: it may have missed
    # the news that went to n4 (its own predecessors' copies too), so it
    # gets both deaths. n5 gets only the new one.
    r.recv(2, Died(nid(4), 0), now=2.0)
    outs = r.fire(TimerKind.GOSSIP)
    assert sends(outs) == [
        (addr(5), [Died(nid(4), 0)]),
        (addr(1), [Died(nid(9), 0), Died(nid(4), 0)]),
    ]
    # Past RING_RECENT_S, a new successor gets nothing old.
    r.drain()
    r.recv(2, Died(nid(5), 0), now=2.0 + RING_RECENT_S + 1.0)
    outs = r.fire(TimerKind.GOSSIP)
    assert sends(outs) == [(addr(1), [Died(nid(5), 0)]), (addr(2), [Died(nid(5), 0)])]


def test_a_new_successor_gets_every_death_of_a_mass_failure() -> None:
    # n3 among 700; 600 of them die at once (n10..n609), then its successor
    # n4 does too: the new successor n6 must get all 601 deaths, not the
    # newest RING_RECENT_MAX of them.
    r = Rig.make(3)
    r.start()
    for k in (1, 2, *range(4, 701)):
        at = addr(k) if k < 10 else (f"10.1.{k // 250}.{k % 250 + 1}", 7946)
        r.recv(2, alive(k, at=at), now=0.0)
    r.drain()
    for k in range(10, 610):
        r.recv(2, Died(nid(k), 0), now=1.0)
    r.fire(TimerKind.GOSSIP)
    r.drain()
    r.recv(2, Died(nid(4), 0), now=2.0)
    outs = r.fire(TimerKind.GOSSIP)
    to6 = {
        m.node for dst, msgs in sends(outs) if dst == addr(6) for m in msgs if isinstance(m, Died)
    }
    assert to6 == {nid(k) for k in (4, *range(10, 610))}


def test_the_ring_wraps_around() -> None:
    r = started(2, 3, 4, i=5)
    r.recv(9, Died(nid(3), 0), now=1.0)
    outs = r.fire(TimerKind.GOSSIP)
    # n5's successors: n2 and n4, around the ring.
    assert sends(outs) == [(addr(2), [Died(nid(3), 0)]), (addr(4), [Died(nid(3), 0)])]


def test_a_death_heard_again_counts_as_a_transmission() -> None:
    r = started(1, 2, 4, 5)
    limit = limit_of(r)
    assert limit == 4  # 4 live peers and us: 4 * ceil(log10(6))
    r.recv(4, Died(nid(5), 0), now=1.0)
    assert r.node.queued_broadcasts() == 1
    for k in range(1, limit):
        r.recv(k if k != 3 else 2, Died(nid(5), 0), now=1.0 + k / 100)
        assert r.counter("rumours_heard_again") == k
        assert r.node.queued_broadcasts() == 1
    # The limit-th copy: known widely enough, never sent by us at all.
    r.recv(1, Dead(nid(5), 0, nid(1)), now=1.1)
    assert r.node.queued_broadcasts() == 0
    assert r.counter("rumours_heard_again") == limit


def test_copies_heard_again_and_sent_share_the_limit() -> None:
    r = started(1, 2, 4, 5, config=cfg(gossip_fanout=1))
    r.recv(4, Died(nid(5), 0), now=1.0)
    r.recv(2, Died(nid(5), 0), now=1.0)
    r.recv(1, Died(nid(5), 0), now=1.0)
    outs = r.drain()
    carried = [m for _, msgs in sends(outs) for m in msgs if m == Died(nid(5), 0)]
    # 2 copies heard again: limit - 2 left, of which the ring flush (to n2,
    # the neighbour the news did not come from first) is one.
    assert len(carried) == limit_of(r) - 2


def test_a_left_heard_again_counts_too() -> None:
    r = started(1, 2, 4, 5)
    r.recv(5, Left(nid(5), 1), now=1.0)
    r.recv(4, Left(nid(5), 1), now=1.01)
    assert r.counter("rumours_heard_again") == 1


def test_other_news_heard_again_does_not_count() -> None:
    # A suspicion (or a refutation) is never cut short: a node that misses it
    # may kill a live node.
    r = started(1, 2, 4, 5)
    r.recv(4, Suspect(nid(5), 0, nid(4)), now=1.0)
    r.recv(2, Suspect(nid(5), 0, nid(4)), now=1.01)
    assert r.counter("rumours_heard_again") == 0
    # Nor does a death at another incarnation than the one we queue.
    r.recv(4, Died(nid(2), 3), now=1.1)
    r.recv(1, Died(nid(2), 2), now=1.2)  # older: a stale accusation
    assert r.counter("rumours_heard_again") == 0


def test_a_closed_port_ends_gossip_to_a_dead_member() -> None:
    # Gossip goes now and then to a recently dead node (so a wrongly
    # declared one can refute), but a closed port says no process is there.
    def sent_to_dead(hint: bool) -> int:
        r = started(1, 2, 4, 5, config=cfg(gossip_to_dead_s=60.0, gossip_fanout=1))
        r.recv(4, Died(nid(5), 0), now=1.0)
        if hint:
            assert r.handle(Unreachable(addr(5)), now=1.001) == []
        for k in range(1, 4):  # more news to gossip about
            r.recv(4, Suspect(nid(k if k != 3 else 4), 0, nid(4)), now=1.002)
        return sum(1 for dst, _ in sends(r.drain()) if dst == addr(5))

    assert sent_to_dead(hint=False) > 0
    assert sent_to_dead(hint=True) == 0


# --- deaths named by an id prefix (DiedRef) ------------------------------------
# nid(i) ids all share their first 8 bytes (zeros), so the tests above see the
# full form; these use ids whose prefixes differ, as random ids do.


def uid(i: int) -> bytes:
    return bytes([i]) * 16


def prefixed(*peers: int, i: int = 3) -> Rig:
    r = Rig(Node(node_id=uid(i), name=name(i), addr=addr(i), config=cfg(), rng=random.Random(7)))
    r.start()
    for p in peers:
        r.recv(p, Alive(uid(p), name(p), addr(p), 0, 0, ()), now=0.0)
    r.drain()
    return r


def test_died_ref_is_twelve_bytes() -> None:
    assert len(codec.encode(DiedRef(uid(9)[:8], 0))) == 12


def test_a_death_is_gossiped_by_prefix_when_no_other_member_shares_it() -> None:
    # Ring (by id) 1 2 3 4 5 9: n3's successors are n4 and n5.
    r = prefixed(1, 2, 4, 5, 9)
    outs = r.recv(2, Died(uid(9), 0), now=1.0)
    assert events(outs) == [(EventKind.DEAD, uid(9))]
    outs = r.fire(TimerKind.GOSSIP)  # the ring flush
    short = DiedRef(uid(9)[:8], 0)
    assert sends(outs) == [(addr(4), [short]), (addr(5), [short])]


def test_a_died_ref_kills_the_one_member_with_that_prefix() -> None:
    r = prefixed(1, 2, 4, 5, 9)
    outs = r.recv(2, DiedRef(uid(9)[:8], 0), now=1.0)
    assert events(outs) == [(EventKind.DEAD, uid(9))]
    # heard again: counts as a transmission of our copy, like Died
    r.recv(4, DiedRef(uid(9)[:8], 0), now=1.1)
    assert r.counter("rumours_heard_again") == 1


def test_a_died_ref_for_an_unknown_prefix_changes_nothing() -> None:
    r = prefixed(1, 2, 4)
    outs = r.recv(2, DiedRef(uid(9)[:8], 0), now=1.0)
    assert events(outs) == []
    assert r.node.live_count() == 4
    assert r.counter("drop.died_ref_ambiguous") == 0
    assert r.counter("drop.died_ref_unknown") == 1  # counted, not silent


def test_a_shared_prefix_is_never_resolved_and_deaths_go_in_full() -> None:
    twin = uid(9)[:8] + b"\x00" * 8  # same first 8 bytes as n9, another node
    r = prefixed(1, 2, 4, 5, 9)
    r.recv(6, Alive(twin, "twin", addr(6), 0, 0, ()), now=0.5)
    r.drain()
    outs = r.recv(2, DiedRef(uid(9)[:8], 0), now=1.0)
    assert events(outs) == []
    assert r.counter("drop.died_ref_ambiguous") == 1
    assert r.node.member(uid(9)).status is Status.ALIVE  # type: ignore[union-attr]
    assert r.node.member(twin).status is Status.ALIVE  # type: ignore[union-attr]
    # Our own news of n9's death names it in full.
    outs = r.recv(2, Died(uid(9), 0), now=2.0)
    assert events(outs) == [(EventKind.DEAD, uid(9))]
    outs = r.fire(TimerKind.GOSSIP)
    assert [m for _a, msgs in sends(outs) for m in msgs] == [Died(uid(9), 0)] * 2


def test_a_reaped_member_frees_its_prefix() -> None:
    r = prefixed(1, 2, 4, 5, 9)
    r.recv(2, Died(uid(9), 0), now=1.0)
    r.drain()
    reclaim = r.node.config.dead_reclaim_s
    for t in range(2, int(reclaim) + 60, 5):  # bounded: reap runs on the sync timers
        r.now = float(t)
        for timer in list(r.pending):
            if timer.at <= t:
                r.fire(timer)
        if r.node.member(uid(9)) is None:
            break
    assert r.node.member(uid(9)) is None
    assert uid(9)[:8] not in r.node._by_prefix
