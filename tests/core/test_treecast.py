"""Membership news over the mesh's broadcast tree (peerd.core.swim.treecast):
with mesh neighbours, joins, deaths and tag changes reach every node by the
tree about once and are not gossiped; a partition that cuts the tree heals
with no update lost; without the tree (switched off) nothing goes there."""

from __future__ import annotations

from dataclasses import dataclass

from peerd.core import config as cfgmod
from peerd.core.events import LinkDown, SendPacket, SetTags
from peerd.core.swim import treecast
from peerd.wire.messages import Died, Status

from .peer_harness import PeerCluster

GOSSIPED = ("msg_in.alive", "msg_in.died", "msg_in.diedref", "msg_in.dead", "msg_in.left")


@dataclass
class CutCluster(PeerCluster):
    """Peer links obey the partition too: a link across it breaks (both
    ends hear LinkDown, as after a TCP timeout) and carries nothing."""

    def partition(self, side: set[int]) -> None:
        self.cut = set(side)
        for a, b in sorted(self.links):
            if (a in self.cut) != (b in self.cut):
                self.links.discard((a, b))
                self.feed(a, LinkDown(b.to_bytes(16, "big")), self.latency)
                self.feed(b, LinkDown(a.to_bytes(16, "big")), self.latency)

    def heal(self) -> None:
        self.cut = set()

    def _link(self, i: int, j: int, msg: object) -> None:
        if self.reachable(i, j):
            super()._link(i, j, msg)
        else:
            self.links.discard((min(i, j), max(i, j)))


def started(n: int, config: cfgmod.SwimConfig | None = None, seed: int = 3) -> CutCluster:
    c = CutCluster(n, seed=seed, config=config or cfgmod.lan().replace(tree_dissemination=True))
    for i in range(n):
        c.start(i, seeds=(0,) if i else ())
    c.run_until(10.0)
    assert c.converged()
    return c


def gossiped(c: PeerCluster) -> int:
    return sum(p.counters[k] for p in c.nodes for k in GOSSIPED)


def test_a_death_reaches_every_node_once_by_the_tree() -> None:
    c = started(12)
    assert all(p.mesh_neighbours > 0 for p in c.nodes)  # type: ignore[attr-defined]
    before = [p.counters["msg_in.tree_items"] for p in c.nodes]
    quiet = gossiped(c)
    c.crash(5)
    c.run_until(c.now + 20.0)
    assert c.all_see(5, Status.DEAD)
    live = [i for i in range(12) if i != 5]
    copies = [c.nodes[i].counters["msg_in.tree_items"] - before[i] for i in live]
    # the detector's broadcast (a second detector at most), not a gossip
    # epidemic: every node but the detectors received it from the tree
    assert all(n <= 2 for n in copies), copies
    assert sum(1 for n in copies if n == 0) <= 2, copies
    assert sum(copies) <= 1.5 * len(live)
    # no death notice went by datagram but the detector's to the desks
    handed = sum(p.counters["tree_desk_sends"] for p in c.nodes)
    assert 1 <= handed <= 4
    assert gossiped(c) - quiet == handed


def test_a_mass_crash_goes_by_the_desk_in_a_few_broadcasts() -> None:
    c = started(30)
    before = [p.counters["msg_in.tree_items"] for p in c.nodes]
    casts = [p.counters["tree_casts"] for p in c.nodes]
    dead = (4, 9, 13, 17, 21, 22, 26, 28)
    for i in dead:
        c.crash(i)
    c.run_until(c.now + 20.0)
    assert all(c.all_see(i, Status.DEAD) for i in dead)
    live = [i for i in range(30) if i not in dead]
    # eight detectors, but the desk (the lowest id, node 0) broadcast them,
    # batching those declared within its hold; what the desk declared itself
    # it handed to its stand-in (node 1)
    desk, standin = c.nodes[0].counters, c.nodes[1].counters
    assert desk["tree_desk_items"] + standin["tree_relays"] >= len(dead)
    assert 1 <= desk["tree_casts"] - casts[0] <= len(dead)
    assert all(c.nodes[i].counters["tree_casts"] == casts[i] for i in live if i > 1)
    copies = [c.nodes[i].counters["msg_in.tree_items"] - before[i] for i in live]
    assert sum(copies) <= 1.5 * len(dead) * len(live), copies


def test_a_tag_change_goes_by_the_tree_and_by_gossip() -> None:
    c = started(8)
    c.feed(3, SetTags((("role", "db"),)))
    c.run_until(c.now + 2.0)
    for i, p in enumerate(c.nodes):
        m = p.member((3).to_bytes(16, "big"))
        assert m is not None and m.tags == (("role", "db"),), i
    # by the tree to all 7 others, once each
    assert sum(p.counters["msg_in.tree_items"] for p in c.nodes) >= 7
    assert c.nodes[3].counters["tree_casts"] >= 1


def test_switched_off_nothing_goes_on_the_tree() -> None:
    c = started(8, config=cfgmod.lan().replace(tree_dissemination=False))
    c.crash(2)
    c.run_until(c.now + 20.0)
    assert c.all_see(2, Status.DEAD)
    assert all(p.counters["tree_casts"] == 0 for p in c.nodes)
    assert all(p.counters["msg_in.tree_items"] == 0 for p in c.nodes)
    assert gossiped(c) > 0


def test_a_partition_that_cuts_the_tree_heals_with_no_update_lost() -> None:
    n = 12
    c = started(n)
    side = {0, 1, 2, 3, 4, 5}
    c.partition(side)
    c.run_until(c.now + 1.0)
    # the tree is cut: no link crosses the partition
    assert all((a in side) == (b in side) for a, b in c.links)
    # news on both sides while cut: tag changes (each side hears its own by
    # the tree) and a crash on one side
    c.feed(2, SetTags((("v", "2"),)))
    c.feed(8, SetTags((("v", "8"),)))
    c.run_until(c.now + 1.0)
    c.crash(10)
    c.run_until(c.now + 40.0)
    c.heal()
    c.run_until(c.now + 60.0)
    live = [i for i in range(n) if i not in c.down]
    for i in live:
        for j in live:
            if i == j:
                continue
            m = c.nodes[i].member(j.to_bytes(16, "big"))
            own = c.nodes[j].local_member()
            assert m is not None, (i, j)
            assert m.status is Status.ALIVE, (i, j, m.status)
            assert (m.incarnation, m.tags) == (own.incarnation, own.tags), (i, j)
        dead = c.nodes[i].member((10).to_bytes(16, "big"))
        assert dead is not None and dead.status is Status.DEAD, i
    # and the tree carried news across the healed mesh again
    assert any(p.counters["msg_in.tree_items"] for p in c.nodes)


def test_deaths_reach_everyone_when_the_desk_itself_crashed() -> None:
    c = started(16)
    dead = (0, 6, 11)  # node 0 is the desk (the lowest id)
    for i in dead:
        c.crash(i)
    c.run_until(c.now + 20.0)
    assert all(c.all_see(i, Status.DEAD) for i in dead)


def test_the_desk_batches_its_own_verdict_and_hands_it_to_the_stand_in() -> None:
    c = started(6)
    desk = c.nodes[0].membership
    assert [int.from_bytes(d, "big") for d in desk._tree_desks()] == [0, 1]
    subject = (4).to_bytes(16, "big")
    desk._now = c.now
    desk._out = []
    desk._tc.ctx = treecast.OWN
    desk._tree_death(subject, Died(subject, 0), "x")
    # in the desk's own batch (it used to wait for the stand-in's relay) ...
    assert subject in desk._tc.batch
    assert desk.counters["tree_desk_items"] >= 1
    # ... and to the stand-in in a datagram, in case the desk dies first
    sent = [o for o in desk._out if isinstance(o, SendPacket)]
    assert [o.dst for o in sent] == [c.nodes[1].membership._me.addr]
    assert desk.counters["tree_desk_sends"] == 1
    desk._out = []


def test_a_burst_of_deaths_starts_a_sweep_and_one_death_does_not() -> None:
    c = started(30)
    c.crash(7)
    c.run_until(c.now + 10.0)
    assert c.all_see(7, Status.DEAD)
    assert all(p.counters["sweep_checks"] == 0 for p in c.nodes)
    dead = (4, 9, 13, 17, 21, 22, 26, 28)
    for i in dead:
        c.crash(i)
    c.run_until(c.now + 20.0)
    assert all(c.all_see(i, Status.DEAD) for i in dead)
    live = [i for i in range(30) if i not in dead and i != 7]
    sweeps = [c.nodes[i].counters["sweep_checks"] for i in live]
    # each survivor pinged gossip_fanout members per gossip interval for
    # about SWEEP_S after the burst's last death it learnt: bounded
    fanout = c.nodes[0].membership.config.gossip_fanout
    ticks = treecast.SWEEP_S / c.nodes[0].membership.config.gossip_interval_s
    assert all(s > 0 for s in sweeps), sweeps
    assert max(sweeps) <= fanout * (ticks + 12), sweeps
    # the checks of live members were answered: no false suspicion came of it
    assert all(c.all_see(i, Status.ALIVE) for i in live)
