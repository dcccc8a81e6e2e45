"""Gossip rounds, retransmit limits, packet size budget, gossip to the recently dead, reaping."""

from __future__ import annotations

from peerd.core.events import EventKind, OpenStream, SendPacket, SetTags, TimerKind
from peerd.core.swim import formulas
from peerd.core.swim.base import FIRST_GOSSIP_DELAY_S
from peerd.wire.messages import Ack, Dead, Died, Left, Ping, Status, Suspect

from .util import Rig, addr, alive, armed_at, cfg, events, first_gossip_at, nid, of, sends


def started(*peers: int, **kw: object) -> Rig:
    r = Rig.make(**kw)  # type: ignore[arg-type]
    r.start()
    r.join(*peers, now=0.0)
    r.drain()
    return r


def test_gossip_round_sends_to_fanout_peers_until_the_retransmit_limit() -> None:
    r = started(2, 3, 4, 5, 6)
    r.join(9, now=1.0)  # one update queued; 7 live nodes
    assert formulas.retransmit_limit(4, 7) == 4

    outs = r.fire(TimerKind.GOSSIP, now=1.2)
    got = sends(outs)
    assert len(got) == 3 and len({dst for dst, _ in got}) == 3  # fanout 3, distinct peers
    assert all(msgs == [alive(9)] for _, msgs in got)
    assert addr(1) not in {dst for dst, _ in got}
    assert armed_at(outs) == [(TimerKind.GOSSIP, 1.4)]  # still queued: gossip again

    outs = r.fire(TimerKind.GOSSIP)
    assert [msgs for _, msgs in sends(outs)] == [[alive(9)]]  # the 4th and last send
    assert armed_at(outs) == []  # nothing left: the gossip timer rests
    assert r.node.queued_broadcasts() == 0


def test_piggybacked_sends_count_towards_the_limit() -> None:
    r = started(2)
    r.join(9, now=1.0)  # 3 live nodes: limit 4
    carried = 0
    for _ in range(5):
        ((dst, msgs),) = sends(r.fire(TimerKind.PROBE))
        carried += msgs.count(alive(9))
        r.recv(dst, Ack(msgs[0].seq))  # type: ignore[union-attr]
    assert carried == 4
    assert r.node.queued_broadcasts() == 0


def test_packets_stay_within_max_packet_bytes() -> None:
    budget = 300
    r = Rig.make(config=cfg(max_packet_bytes=budget))
    r.start()
    r.join(*range(2, 120), now=0.0)
    outs = r.fire(TimerKind.PROBE)
    (ping_pkt,) = of(outs, SendPacket)
    assert len(ping_pkt.data) <= budget
    ((dst, msgs),) = sends(outs)
    assert isinstance(msgs[0], Ping) and len(msgs) > 2  # the probe, plus as much news as fits
    outs = r.fire(TimerKind.GOSSIP)
    assert len(of(outs, SendPacket)) == 3
    assert all(len(p.data) <= budget for p in of(outs, SendPacket))


def test_recently_dead_nodes_hear_gossip_for_a_while() -> None:
    r = started(2, 3, config=cfg(gossip_to_dead_s=5.0))
    r.recv(3, Dead(nid(2), 0, nid(3)), now=1.0)
    to_dead = []
    for k in range(60):  # one tags change (hence one update) per 0.2 s tick
        now = 1.1 + 0.2 * k
        r.handle(SetTags((("tick", str(k)),)), now=now)
        outs = r.fire(TimerKind.GOSSIP, now=now + 0.1)
        to_dead += [r.now for dst, _ in sends(outs) if dst == addr(2)]
    assert to_dead, "a node declared dead never heard that it was"
    assert max(to_dead) <= 1.0 + 5.0 + 0.2


def test_reap_forgets_long_dead_and_left_members() -> None:
    r = started(2, 3, 4, config=cfg(dead_reclaim_s=30.0))
    r.recv(3, Dead(nid(2), 0, nid(3)), now=1.0)
    r.recv(4, Left(nid(4), 1), now=40.0)
    outs = r.fire(TimerKind.REAP)  # at 60: n2 is 59 s dead, n4 left 20 s ago
    assert r.now == 60.0
    assert events(outs) == [(EventKind.REAPED, nid(2))]
    assert armed_at(outs) == [(TimerKind.REAP, 120.0)]
    assert r.node.member(nid(2)) is None
    assert r.status(4) is Status.LEFT
    outs = r.fire(TimerKind.REAP)
    assert events(outs) == [(EventKind.REAPED, nid(4))]
    assert r.status(3) is Status.ALIVE
    assert {m.node for m in r.node.members()} == {nid(1), nid(3)}
    # A reaped node is a stranger again; no reconnects to it.
    assert of(r.fire(TimerKind.RECONNECT, now=121.0), OpenStream) == []


def test_lone_node_gossip_timer_rests_until_there_is_someone_to_tell() -> None:
    r = Rig.make()
    r.start()
    assert r.armed(TimerKind.GOSSIP) == []
    assert r.node.queued_broadcasts() == 1  # our own Alive, kept for later
    # Time passes alone (probes, syncs, tags changes): still no GOSSIP timer.
    for _ in range(5):
        r.fire(TimerKind.PROBE)
    r.handle(SetTags((("k", "v"),)), now=r.now)
    assert r.armed(TimerKind.GOSSIP) == []
    assert r.node.queued_broadcasts() == 1  # the new Alive replaced the old one
    # A peer appears: the news (ours included) goes out.
    outs = r.join(2, now=10.0)
    assert armed_at(outs) == [(TimerKind.GOSSIP, first_gossip_at(10.0))]
    outs = r.fire(TimerKind.GOSSIP)
    assert sends(outs) == [(addr(2), [alive(2), alive(1, inc=1, tags=(("k", "v"),))])]


def test_gossip_timer_rests_when_the_last_peer_is_gone_for_good() -> None:
    r = started(2, config=cfg(gossip_to_dead_s=1.0))
    outs = r.recv(3, Dead(nid(2), 0, nid(3)), now=1.0)
    # Alone now, but n2 is recently dead: it may still hear the news.
    assert armed_at(outs) == [(TimerKind.GOSSIP, first_gossip_at(1.0))]
    to = []
    while r.armed(TimerKind.GOSSIP):
        outs = r.fire(TimerKind.GOSSIP)
        to += [dst for dst, _ in sends(outs)]
        # Later rounds, while news is left, come every gossip interval.
        assert armed_at(outs) in ([], [(TimerKind.GOSSIP, r.now + r.node.config.gossip_interval_s)])
    assert set(to) == {addr(2)} and r.node.queued_broadcasts() == 0
    # Past gossip_to_dead_s: one more round finds nobody and the timer rests.
    outs = r.handle(SetTags((("k", "v"),)), now=2.5)
    assert armed_at(outs) == [(TimerKind.GOSSIP, first_gossip_at(2.5))]
    outs = r.fire(TimerKind.GOSSIP)
    assert sends(outs) == [] and armed_at(outs) == []
    outs = r.handle(SetTags((("k", "w"),)), now=5.0)
    assert armed_at(outs) == []
    assert r.node.queued_broadcasts() == 1


def test_fresh_news_after_a_quiet_spell_goes_out_within_the_first_gossip_delay() -> None:
    r = started(2, 3, 4, 5)
    assert r.node.queued_broadcasts() == 0 and r.armed(TimerKind.GOSSIP) == []  # quiet
    outs = r.handle(SetTags((("k", "v"),)), now=10.0)
    assert r.node.config.gossip_interval_s > FIRST_GOSSIP_DELAY_S
    assert armed_at(outs) == [(TimerKind.GOSSIP, 10.0 + FIRST_GOSSIP_DELAY_S)]
    outs = r.fire(TimerKind.GOSSIP)
    assert r.now == 10.0 + FIRST_GOSSIP_DELAY_S
    got = sends(outs)
    assert len(got) == 3 and all(msgs == [alive(1, inc=1, tags=(("k", "v"),))] for _, msgs in got)
    # Not all sends done yet (limit 4 with 5 live nodes): the next round
    # comes a whole gossip interval later.
    assert armed_at(outs) == [(TimerKind.GOSSIP, r.now + r.node.config.gossip_interval_s)]


def test_copies_and_news_of_membership_updates_are_counted() -> None:
    # The two counters behind the simulator's membership.copies_per_update.
    r = started(2)
    base_copies, base_news = r.counter("update_copies_in"), r.counter("update_news_in")

    def seen() -> tuple[int, int]:
        return r.counter("update_copies_in") - base_copies, r.counter("update_news_in") - base_news

    r.recv(2, alive(3), now=1.0)  # a join: news
    assert seen() == (1, 1)
    r.recv(2, alive(3), now=1.1)  # the same update again: a copy, no news
    assert seen() == (2, 1)
    r.recv(2, alive(3, 1, tags=(("k", "v"),)), now=1.2)  # a tag change: news
    assert seen() == (3, 2)
    r.recv(2, alive(1), now=1.3)  # about us: not a copy of anything we need
    assert seen() == (3, 2)
    r.recv(2, Died(nid(3), 1), now=1.4)  # a death: news
    assert r.status(3) is Status.DEAD
    r.recv(2, Dead(nid(3), 1, nid(2)), now=1.5)  # heard again
    r.recv(2, Died(nid(3), 0), now=1.6)  # stale (older incarnation)
    assert seen() == (6, 3)
    r.recv(2, Left(nid(9), 0), now=1.7)  # about a node we never knew
    assert seen() == (7, 3)
    r.recv(2, Suspect(nid(2), 0, nid(1)), now=1.8)  # suspicions are not counted
    assert seen() == (7, 3)
