"""Ghosts: dead ids that a restart replaced, and rows that must not come back.

Theory of operation. A node's id is its identity (see
:mod:`peerd.core.swim.members`): a daemon restarted with a wiped state dir
comes back with a new id but the same name and address, and every other node
then lists its earlier id as dead until ``dead_reclaim_s`` (an hour by
default) has passed. Twenty such restarts leave twenty dead rows of one host
on every node. Two rules keep the table to what is true:

*Superseded rows are reaped early.* When a member is down (dead or left) and
a live member with another id holds the same name and the same address (the
node itself included: a restarted daemon that learnt its former id), the old
row is a ghost: nothing will ever answer for it again, since its address
answers with another id. It is forgotten after :meth:`Ghosts._ghost_grace_s`,
twice the time a node retransmits one rumour (``retransmit_mult *
ceil(log10(N + 1))`` gossip rounds; SWIM's infection-style dissemination
reaches every node within that time with high probability), and at least
``GHOST_REAP_MIN_S``: long enough for the death itself to have spread, so the
nodes that still held the old id alive learnt that it died rather than
learning it again from a stale rumour; with the LAN preset, 5 s at 100 nodes
and 8 s at 10,000. Only the conjunction counts: a live member that took only
the name (a name conflict, or a different host) or only the address (another
node there) leaves the row to the normal clock, and a live member with the
same id that moved address is no ghost at all (one row). Two *live* ids with
one name stay the name conflict they are (peerd.core.swim.updates). If the
successor is itself down when the grace ends, the row is kept (normal clock).

*A forgotten row is not learnt again.* Push-pull states carry no age, so a
dead row heard from a peer cannot inherit the peer's remaining reclaim time;
listing it with a fresh clock let a row that one node had reaped come back
from another that still listed it, and travel on from node to node for as
long as new nodes kept joining. So a node lists as down only members it knew
(its own clock then starts when it learnt of the death, once), and keeps for
the others, and for every row it reaps, a *tombstone*: the id and the
generation and incarnation it died at, for ``dead_reclaim_s``, never sent to
anyone. A tombstone refuses what would revive the row: a dead or left row of
it from a push-pull (not listed again), and an ``Alive`` of its generation at
or below its incarnation (stale news: SWIM orders dead above alive at one
incarnation) or of an older generation. A higher incarnation (the node
refuting) or a newer generation (the daemon restarted with its id kept: a
peer that forgot it cannot tell it to refute) is the node itself and is
accepted (the tombstone goes). At most ``TOMBSTONES_MAX`` tombstones are
kept, the oldest given up first (counted), so memory stays bounded whatever
the churn.
"""

from __future__ import annotations

import math

from peerd.core.events import EventKind, LogLevel, NodeForgotten
from peerd.core.swim.base import LIVE, NodeBase, _fmt
from peerd.core.swim.members import Member
from peerd.core.timers import GhostReap
from peerd.wire.messages import NODE_PREFIX_BYTES, NodeId, Status

# Floor of the grace before a superseded row is forgotten (see the module docs).
GHOST_REAP_MIN_S = 5.0
# Bound on tombstones (id -> (generation, incarnation), expiry): about 200 bytes each in
# Python, about 3 MiB at the bound.
TOMBSTONES_MAX = 16_384


class Ghosts(NodeBase):
    """Early reaping of superseded rows, and tombstones. See the module docs."""

    def _ghost_grace_s(self) -> float:
        cfg = self.config
        rounds = cfg.retransmit_mult * math.ceil(math.log10(self.live_count() + 1))
        return max(GHOST_REAP_MIN_S, 2 * rounds * cfg.gossip_interval_s)

    def _successor(self, m: Member) -> Member | None:
        """The live member, with another id, that holds ``m``'s name and
        address while ``m`` is down; None if there is none."""
        if m is self._me or m.status in LIVE:
            return None
        me = self._me
        if m.addr == me.addr and m.name == me.name and me.status is Status.ALIVE:
            return me
        node = self._by_addr.get(m.addr)
        if node is None or node == m.node or node not in self._live:
            return None
        s = self._peek(node)
        return s if s.name == m.name and s.addr == m.addr else None

    def _ghost_check(self, m: Member) -> None:
        """``m`` went down, or a live member took its address: if it is now
        superseded, forget it after the grace."""
        if m.node in self._ghost_timers or self._successor(m) is None:
            return
        grace = self._ghost_grace_s()
        self._ghost_timers[m.node] = self._arm(GhostReap, grace, m.node)
        self.counters["ghosts_found"] += 1
        self._log(
            LogLevel.INFO,
            f"member replaced name={m.name} addr={_fmt(m.addr)} old={m.node.hex()[:12]}: "
            f"forgetting the old id in {grace:g} s",
        )

    def _ghost_reap(self, node: NodeId) -> None:
        self._ghost_timers.pop(node, None)
        m = self._members.get(node)
        if m is None:
            return
        s = self._successor(m)
        if s is None:
            self.counters["ghosts_kept"] += 1  # revived, or its successor is gone too
            return
        self._forget(m)
        # The indexes pointed at the old id (the name stayed with it if the
        # two were live at once: a name conflict): they belong to the successor.
        self._by_addr.setdefault(s.addr, s.node)
        self._by_name.setdefault(s.name, s.node)
        self.counters["ghosts_reaped"] += 1

    def _forget(self, m: Member) -> None:
        """Drop ``m``'s row and remember it as a tombstone."""
        self._dig(m)
        del self._members[m.node]
        if self._by_addr.get(m.addr) == m.node:
            del self._by_addr[m.addr]
        if self._by_name.get(m.name) == m.node:
            del self._by_name[m.name]
        if self._by_prefix.get(m.node[:NODE_PREFIX_BYTES]) == m.node:
            del self._by_prefix[m.node[:NODE_PREFIX_BYTES]]
        self._recently_dead.pop(m.node, None)
        self._dead.pop(m.node, None)
        token = self._ghost_timers.pop(m.node, None)
        if token is not None:
            self._disarm(token)
        self._bury(m.node, m.generation, m.incarnation)
        if self.news:
            self._out.append(NodeForgotten(m.node))
        self._event(EventKind.REAPED, m)

    def _bury(self, node: NodeId, generation: int, incarnation: int) -> None:
        tombs = self._tombstones
        have = tombs.get(node)
        if have is not None:
            if (generation, incarnation) > have[0]:
                tombs[node] = ((generation, incarnation), have[1])
            return
        tombs[node] = ((generation, incarnation), self._now + self.config.dead_reclaim_s)
        while len(tombs) > TOMBSTONES_MAX:
            del tombs[next(iter(tombs))]
            self.counters["ghosts_tombstones_evicted"] += 1

    def _buried(self, node: NodeId, generation: int, incarnation: int) -> bool:
        """Whether news of ``node`` at ``generation``, ``incarnation`` is
        about a row we forgot (or refused) and must not bring back. A newer
        life (a higher incarnation, or a new generation: the daemon
        restarted with its id kept) ends the tombstone."""
        have = self._tombstones.get(node)
        if have is None:
            return False
        if (generation, incarnation) <= have[0] and have[1] > self._now:
            return True
        del self._tombstones[node]
        return False

    def _expire_tombstones(self) -> None:
        tombs = self._tombstones
        while tombs:
            node = next(iter(tombs))
            if tombs[node][1] > self._now:
                return
            del tombs[node]
