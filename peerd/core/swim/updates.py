"""Applying ``Alive`` news to the members table and its indexes.

Theory of operation (SWIM 4.2): a member's state is ordered by its
incarnation; news with a higher incarnation replaces what we hold, equal or
lower is stale (apart from the rules for suspicion and refutation in
:mod:`peerd.core.swim.suspicion`). An ``Alive`` about an unknown node adds
it; one with a higher incarnation and a new address means the node moved;
one from a new generation means it restarted. Every change keeps the
indexes of the members store (:mod:`peerd.core.swim.members`: by address, by
name, by id prefix, the live set, the id ring, the probe order) and the
digest of the table consistent with the records, in the same step.
"""

from __future__ import annotations

from peerd.core.events import (
    EventKind,
    LogLevel,
    NodeUp,
    PeerLive,
)
from peerd.core.swim.base import (
    LIVE,
    NodeBase,
    _fmt,
    addr_problem,
)
from peerd.core.swim.members import (
    AMBIGUOUS,
    Member,
)
from peerd.wire.messages import (
    NODE_PREFIX_BYTES,
    Alive,
    NodeId,
    Status,
)


class Updates(NodeBase):
    """Alive news, the members table and its indexes. See the module docs."""

    def _set_live(self, node: NodeId, live: bool) -> None:
        if live:
            if node not in self._live:
                self._live.add(node)
                self._ring.add(node)
                self._ring_dirty = True
                self._arm_gossip()
                if self.news and self._started:
                    self._out.append(PeerLive())  # staged registry news can go
        elif node in self._live:
            self._live.discard(node)
            self._ring.remove(node)
            self._ring_dirty = True

    def _on_alive(self, msg: Alive) -> None:
        problem = addr_problem(msg.addr)
        if problem:
            self._drop("bad_addr", f"{problem} for name={msg.name}")
            return
        if msg.node == self._me.node:
            self._alive_about_me(msg)
            return
        m = self._members.get(msg.node)
        if m is None:
            if self._tombstones and self._buried(msg.node, msg.generation, msg.incarnation):
                # Stale news of a node we forgot (see peerd.core.swim.ghosts).
                self._drop("alive_of_forgotten", f"name={msg.name} inc={msg.incarnation}")
                return
            self._add_member(msg)
            return
        if msg.incarnation <= m.incarnation:
            return
        old_status, old_addr, old_tags, old_name = m.status, m.addr, m.tags, m.name
        old_gen = m.generation
        displaced = None
        if msg.addr != m.addr:
            if self._by_addr.get(m.addr) == m.node:
                del self._by_addr[m.addr]
            displaced = self._by_addr.get(msg.addr)
            self._by_addr[msg.addr] = m.node
            self._ring_dirty = True
            self._log(
                LogLevel.INFO,
                f"member moved name={msg.name} from={_fmt(m.addr)} to={_fmt(msg.addr)}",
            )
        self._dig(m)
        m.addr, m.name, m.incarnation, m.generation, m.tags = (
            msg.addr,
            msg.name,
            msg.incarnation,
            msg.generation,
            msg.tags,
        )
        self._dig(m)
        if self.news:
            self._out.append(NodeUp(m.node, m.generation))
        if msg.name != old_name:
            self._index_name(m)
        self._clear_suspicion(m)
        if old_status is not Status.ALIVE:
            self._set_status(m, Status.ALIVE)
            self._set_live(m.node, True)
            self._recently_dead.pop(m.node, None)
            self._dead.pop(m.node, None)
            if old_status is not Status.SUSPECT:
                self._insert_probe_order(m.node)
            self._event(
                EventKind.ALIVE, m, revived=old_status is Status.DEAD and old_gen == m.generation
            )
        elif (old_addr, old_tags, old_name) != (m.addr, m.tags, m.name):
            self._event(EventKind.UPDATED, m)
        self._broadcast(m.node, msg)
        if displaced is not None and displaced != m.node:
            self._displaced(displaced)

    def _add_member(self, msg: Alive) -> None:
        m = Member(
            msg.node,
            msg.name,
            msg.addr,
            msg.incarnation,
            msg.generation,
            msg.tags,
            Status.ALIVE,
            self._now,
        )
        self._members[m.node] = m
        self._dig(m)
        self._index_prefix(m.node)
        self._set_live(m.node, True)
        displaced = self._by_addr.get(m.addr)
        self._by_addr[m.addr] = m.node
        self._insert_probe_order(m.node)
        self._index_name(m)
        self.counters["joins"] += 1
        self._event(EventKind.JOINED, m)
        if self.news:
            self._out.append(NodeUp(m.node, m.generation))
        self._broadcast(m.node, msg)
        if displaced is not None:
            self._displaced(displaced)

    def _displaced(self, node: NodeId) -> None:
        # A live member took the address of ``node``: a restart with a new id
        # if ``node`` is down with the same name (see peerd.core.swim.ghosts).
        old = self._members.get(node)
        if old is not None:
            self._ghost_check(old)

    def _index_name(self, m: Member) -> None:
        holder = self._by_name.get(m.name)
        if holder is not None and holder != m.node:
            other = self._members.get(holder)
            if other is not None and other.status in LIVE and other.name == m.name:
                self.counters["name_conflicts"] += 1
                self._log(
                    LogLevel.WARNING,
                    f"name conflict name={m.name} ids={other.node.hex()[:12]},{m.node.hex()[:12]}",
                )
                self._event(EventKind.NAME_CONFLICT, m, other)
                return
        self._by_name[m.name] = m.node

    def _insert_probe_order(self, node: NodeId) -> None:
        # A random position keeps the round-robin order random without waiting
        # for the next reshuffle (as in memberlist).
        pos = self.rng.randint(self._probe_index, len(self._probe_order))
        self._probe_order.insert(pos, node)

    def _set_status(self, m: Member, status: Status) -> None:
        if m.status is not status:
            self._dig(m)
            m.status = status
            self._dig(m)
        m.changed_at = self._now

    def _set_incarnation(self, m: Member, incarnation: int) -> None:
        if m.incarnation != incarnation:
            self._dig(m)
            m.incarnation = incarnation
            self._dig(m)

    def _dig(self, m: Member) -> None:
        self._digest.toggle(m.node, m.incarnation, m.status)

    def _index_prefix(self, node: NodeId) -> None:
        p = node[:NODE_PREFIX_BYTES]
        have = self._by_prefix.get(p, node)
        self._by_prefix[p] = node if have == node else AMBIGUOUS
