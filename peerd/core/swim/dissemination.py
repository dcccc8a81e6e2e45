"""Dissemination: piggybacked gossip, gossip rounds and RingCast to successors.

Theory of operation (SWIM 4.1): updates are piggybacked on pings and acks and
gossiped to a few random peers every gossip interval, each a bounded number
of times (:mod:`peerd.core.broadcast`); the gossip round stops when there is
nothing to send and starts again, after a short delay, with the next news.
Members that died recently stay gossip targets for a while, so a member
wrongly declared dead hears of it and refutes.

Final news (a death, a leave) also goes once to the next two ring successors
by id (RingCast), so every live node hears it from a predecessor even if
random gossip misses it; that lets random gossip stop early, counting copies
heard again from peers as transmissions (Demers' counter variant). A new
successor (the old one died) gets the final news of the last
``RING_RECENT_S``, which it may have missed meanwhile. The ring successors
are also the members the shell keeps watch links to (a TCP connection whose
loss is an early hint of a crash).
"""

from __future__ import annotations

from collections.abc import Hashable

from peerd.core.events import (
    SendPacket,
    WatchLinks,
)
from peerd.core.swim import formulas
from peerd.core.swim.base import (
    FIRST_GOSSIP_DELAY_S,
    JOIN,
    MAX_QUEUED_BROADCASTS,
    PACKET,
    RING_RECENT_MAX,
    RING_RECENT_S,
    RING_SUCCESSORS,
    TREE,
    NodeBase,
)
from peerd.core.swim.members import (
    Member,
)
from peerd.core.timers import GossipTick, RingFlush
from peerd.wire import codec
from peerd.wire.messages import (
    NODE_PREFIX_BYTES,
    Addr,
    Alive,
    Died,
    DiedRef,
    Message,
    NodeId,
    Status,
    Suspect,
)


class Dissemination(NodeBase):
    """Gossip, piggyback and RingCast. See the module docs."""

    def _update_watch(self) -> None:
        self._ring_dirty = False
        ring = self._ring
        n = len(ring)
        want = min(self.config.watch_links, n - 1)
        if self._leaving:
            want = 0
        # Successors (by id) of this node: watch links to the first ones,
        # final news to the first RING_SUCCESSORS (see _ring_flush). Walking
        # up from us is cheap in every ring representation; walking down is
        # not in the shared one (peerd.sim.store.Ring).
        succ: list[NodeId] = []
        if n > 1:
            i = ring.index(self._me.node)
            for step in range(1, min(n - 1, max(want, RING_SUCCESSORS)) + 1):
                succ.append(ring[(i + step) % n])
        addrs = [self._peek(node).addr for node in succ[:want]]
        watching = tuple(addrs)
        if watching != self._watching:
            self._watching = watching
            self._out.append(WatchLinks(watching))
        self._set_successors(tuple(succ[:RING_SUCCESSORS]))

    def _broadcast(self, key: NodeId, msg: Message, ident: Hashable = None) -> None:
        tc = self._tc
        if (tc.ctx == PACKET or tc.ctx == TREE) and msg.__class__ is not Suspect:
            self.counters["msg_in.news"] += 1  # news from a peer (copies per update)
        if (tc.on or tc.ctx == JOIN) and self._tree_takes(key, msg, ident):
            return
        self._queue.enqueue(("m", key), codec.encode(msg), ident)
        self._queue.prune(MAX_QUEUED_BROADCASTS)
        self._arm_gossip()

    def _arm_gossip(self) -> None:
        # Rest while there is nothing to say or nobody to say it to (a lone
        # node); the next broadcast or the first peer re-arms it.
        if (
            self._gossip_armed
            or not self._started
            or not len(self._queue)
            or not (len(self._live) or self._recently_dead)
        ):
            return
        self._gossip_armed = True
        # Fresh news after a quiet spell goes out almost at once (a short
        # delay batches a burst into one packet); then every gossip interval
        # while anything is left to send. Waiting a whole interval per hop
        # would add ~interval x log(N) to every spread.
        self._arm(GossipTick, min(FIRST_GOSSIP_DELAY_S, self.config.gossip_interval_s))

    def _alive_msg(self) -> Alive:
        me = self._me
        return Alive(me.node, me.name, me.addr, me.incarnation, me.generation, me.tags)

    def _gossip_targets(self) -> list[Member]:
        cfg = self.config
        picks = [self._peek(n) for n in self._live.sample(self.rng, cfg.gossip_fanout)]
        if self._recently_dead:
            horizon = self._now - cfg.gossip_to_dead_s
            for node, since in list(self._recently_dead.items()):
                if since < horizon or node not in self._members:
                    del self._recently_dead[node]
            if self._recently_dead and self.rng.random() < 0.5:
                # Occasionally tell a recently dead node, so that a node that
                # was wrongly declared dead learns it and refutes.
                node = self.rng.choice(list(self._recently_dead))
                picks.append(self._peek(node))
        return picks

    def _set_successors(self, succ: tuple[NodeId, ...]) -> None:
        if succ == self._successors:
            return
        # A successor that is new to us (the old one died, or a node joined
        # between) missed what we passed on before: it gets the recent news
        # again. Without this a crashed successor would cut the ring for
        # every death we learnt before we knew it was dead.
        new = [x for x in succ if x not in self._successors]
        self._successors = succ
        self._ring_new.intersection_update(succ)
        if new and self._ring_recent:
            self._ring_new.update(new)
            self._arm_ring_flush()

    def _arm_ring_flush(self) -> None:
        if not self._ring_armed and self._started:
            self._ring_armed = True
            self._arm(RingFlush, min(FIRST_GOSSIP_DELAY_S, self.config.gossip_interval_s))

    def _ring_flush(self) -> None:
        """Final news (a death, a leave) goes to our next RING_SUCCESSORS
        nodes by id once, a few milliseconds after we first learn it (except
        to the one it came from): a ring broadcast (RingCast, Voulgaris and
        van Steen 2007) next to the random gossip. Random gossip spreads
        news in O(log N) rounds but reaches every node only with high
        probability; along the ring every live node hears it from a
        predecessor, so random gossip can stop early (see _heard_again), and
        the ring's fast hops fill the gaps between the places random gossip
        reached. The packets carry queued gossip too."""
        self._ring_armed = False
        if self._ring_dirty:
            self._update_watch()
        horizon = self._now - RING_RECENT_S
        recent = self._ring_recent
        while recent and recent[0][0] < horizon:
            recent.popleft()
        owed = self._ring_owed
        room = self.config.max_packet_bytes - 3
        for node in self._successors:
            m = self._peek(node)
            if node in self._ring_new:
                # everything recent, in datagram-sized packets
                self._ring_new.discard(node)
                items = [data for _, data in recent]
            else:
                items = [data for data, source in owed if source != node]
            while items:
                batch: list[bytes] = []
                left = room
                while items and (not batch or len(items[0]) <= left):
                    left -= len(items[0])
                    batch.append(items.pop(0))
                self.counters["ring_packets"] += 1
                self._send(m.addr, before=tuple(batch))
        owed.clear()

    def _gossip_round(self) -> None:
        if not len(self._queue):
            return
        for m in self._gossip_targets():
            if not len(self._queue):
                break
            self._send(m.addr)

    def _send_direct(self, parts: tuple[bytes, ...], counter: str | None) -> None:
        """Encoded messages straight to every other live peer, packed (the
        registry's own changes in a small cluster, or the death of a node
        that held entries: see peerd.core.registry). The gossip targets too:
        their packet may have had no room left for the item (fresher items,
        or ones sent fewer times, go first)."""
        if not parts:
            return
        packets: list[bytes] = []
        batch: list[bytes] = []
        room = self.config.max_packet_bytes - 3
        for part in parts:
            if batch and sum(len(p) for p in batch) + len(part) > room:
                packets.append(codec.pack(batch))
                batch = []
            batch.append(part)
        packets.append(codec.pack(batch))
        for node in self._live:
            addr = self._peek(node).addr
            for data in packets:
                self.counters["packets_out"] += 1
                self.counters["bytes_out"] += len(data)
                if counter is not None:
                    self.counters[counter] += 1
                self._out.append(SendPacket(addr, data))

    def _broadcast_death(self, node: NodeId, incarnation: int, src: Addr | None = None) -> None:
        # Every node hears each death several times: name it by its id's
        # prefix (12 bytes, not 20) unless another member we know shares it.
        p = node[:NODE_PREFIX_BYTES]
        msg: Died | DiedRef = (
            DiedRef(p, incarnation) if self._by_prefix.get(p) == node else Died(node, incarnation)
        )
        self._broadcast(node, msg, ident=(Status.DEAD, incarnation))
        self._owe_ring(node, src)

    def _owe_ring(self, node: NodeId, src: Addr | None) -> None:
        data = self._queue.get(("m", node))
        if data is None or not self._started or len(self._ring) < 2:
            return  # nobody to tell
        self._ring_owed.append((data, None if src is None else self._by_addr.get(src)))
        self._ring_recent.append((self._now, data))
        if len(self._ring_recent) > RING_RECENT_MAX:
            self._ring_recent.popleft()
        self._arm_ring_flush()

    def _heard_again(self, node: NodeId, ident: Hashable) -> None:
        """A peer told us news about ``node`` we have already: counter-style
        rumour mongering (see :mod:`peerd.core.broadcast`). Only for final
        news (dead, left): a refutation or a suspicion is never cut short,
        since a node that misses one may wrongly kill a live node."""
        limit = formulas.retransmit_limit(self.config.retransmit_mult, self.live_count())
        if self._queue.heard(("m", node), ident, limit):
            self.counters["rumours_heard_again"] += 1
