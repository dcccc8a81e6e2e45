"""Membership news over the mesh's broadcast tree.

Theory of operation. SWIM spreads an update by infection (4.1): every node
that learns it gossips it ``retransmit_mult * log10(N)`` times, so each node
receives each update 12 to 16 times at 10,000 nodes, and a mass join or a
mass crash costs every node that many copies of every update. A node that
runs the partial mesh already has a spanning tree to every other node
(Plumtree, Leitão et al. 2007: eager push on the tree, IHAVE announcements
on the other links, a graft where the tree broke), which delivers each
broadcast about once. While the node has mesh neighbours (the Peer's
``MeshConnected``), final and identity news (``Alive`` for a join, a tag
change or a revival; ``Died``/``Dead``; ``Left``) goes there instead of into
the gossip queue:

* **Who broadcasts.** The subject its own ``Alive`` (and, when it joined
  before its mesh was up, once its mesh connects) and its ``Left`` (just
  before the Peer leaves the mesh). A death goes to the *desk*: the live
  member with the lowest id that the node does not suspect (every node's
  ring agrees on it but for the news in flight). The suspicion's origin
  hands the death it declares to the desk and to the next member up, the
  stand-in, in a datagram each, and waits for the tree to bring it as for
  news heard off it (below); the desk hands its own to the stand-in. The
  desk broadcasts the hand-offs (only those) it collects once no
  death came for ``tree_batch_s``, at most ``tree_desk_hold_s`` after the
  first; the stand-in broadcasts what the desk's batches did not bring
  after a hold and half ``tree_relay_after_s`` (the desk may be among the
  dead). Why: a mass crash
  makes hundreds of detectors declare within a few ms of each other (each
  crashed process's watch link closes at once, and its watcher's short
  "refused" suspicion ends 0.5 s later); each its own broadcast cost
  every node a copy and made Plumtree graft and re-graft the tree the
  crash had just cut hundreds of times over
  (mesh-10k at 1,000 nodes: 477 broadcasts, 28,600 grafts, 79,000
  re-grafts, 2.7x the CPU of gossip); by the desk they are a handful. Every
  other node whose own timer declares the same death (it heard the
  suspicion) waits for the tree as for news heard off it: in a 100-node
  run 16 nodes declared one death within 40 ms, and each would have cost
  every node a copy. News that reaches a node *by the tree* is
  applied and not sent on (Plumtree forwards it). News a connected node
  hears *off* the tree (a datagram, a push-pull) came from a node the tree
  may not serve (a joiner before its mesh is up, a node cut off the mesh,
  the other side of a healed partition): it waits a random
  ``[1, 3] x tree_relay_after_s`` for the tree to bring it, and only if it
  does not come is it broadcast by this node. The randomness spreads the
  few nodes that heard it off the tree in time, so the first one's
  broadcast reaches the others before their own wait ends (Plumtree ids
  are per broadcast, so every extra broadcast of one update costs every
  node a copy). What a node's first join taught it (the contact's view,
  which the cluster has) is spread neither way.
* **Ids and duplicates.** A tree broadcast is a batch with Plumtree's own
  id; a receiver applies each update by the SWIM rules (incarnation order),
  so an update that comes twice (two broadcasters, or gossip and the tree)
  is simply old news the second time.
* **Batching.** News is held ``tree_batch_s`` (a few ms) and goes as one
  broadcast of up to ``tree_batch_bytes``: a burst of joins or deaths costs
  a few tree messages, not one per update. The payload is a datagram's
  payload (the sequence of encoded membership messages, ``codec.pack``), so
  the batch needs no wire type of its own; it travels on the mesh's
  MEMBERSHIP channel.
* **What gossip still carries.** Suspicions (``Suspect``) and their
  confirmations: they must travel near their subject, which refutes them,
  and are short-lived. A node's own ``Alive`` goes both ways: it is the
  refutation of a suspicion, which must also reach the suspecters by
  gossip. Everything while the node has no mesh neighbours (no mesh, not
  joined yet, cut off): news goes into the gossip queue exactly as
  without a mesh, and what was batched or waiting when the node lost its
  last neighbour goes there too. Push-pull anti-entropy repairs what both
  missed, unchanged.

A news item that went on the tree is not gossiped (nor passed to the ring
successors): the tree is the one path, with anti-entropy behind it.

**The sweep.** Gossip also probes: its packets go to random members, and a
packet to a crashed process's closed port comes back "unreachable", which
starts a short suspicion (peerd.core.swim.probe). After a mass crash the
gossip of the deaths thus found most of the remaining dead within half a
second; with the deaths on the tree those packets are gone, and a dead
node nobody's probe happened to pick waited for round-robin probing (in
mesh-10k at 300 nodes the last death was first suspected 1.0 s after the
crash instead of 0.5 s). So a node that learns a burst of deaths
(``REPAIR_BURST`` since its last exchange) pings ``gossip_fanout`` random
live members at once and then every ``gossip_interval_s`` until ``SWEEP_S`` after the last
death it learnt, as confirmation checks (an ack ends one, a closed port
suspects its member at once; a silent host is left to probing): about the
probes gossip made, without the copies.
"""

from __future__ import annotations

from collections.abc import Hashable

from peerd.core.events import MeshCast, MeshDelivered
from peerd.core.swim.base import FIRST_GOSSIP_DELAY_S, JOIN, OWN, PACKET, TREE, NodeBase
from peerd.core.swim.members import AMBIGUOUS
from peerd.core.timers import TreeFlush, TreeRelay, TreeSweep
from peerd.wire import codec
from peerd.wire.codec import DecodeError
from peerd.wire.messages import (
    Alive,
    Channel,
    Dead,
    Died,
    DiedRef,
    Left,
    Message,
    NodeId,
    Status,
)

TREE_CHANNEL = int(Channel.MEMBERSHIP)
# The news the tree carries, and its rank at one incarnation.
_RANK: dict[type, int] = {Alive: 0, Died: 1, DiedRef: 1, Dead: 1, Left: 1}


def _state_of(msg: Message) -> tuple[int, int]:
    inc: int = getattr(msg, "incarnation", 0)
    return (inc, _RANK[msg.__class__])


class TreeCast(NodeBase):
    """Membership news over the broadcast tree. See the module docs."""

    def _tree_takes(self, key: NodeId, msg: Message, ident: Hashable) -> bool:
        """From _broadcast while the tree is on: True if the tree takes
        ``msg`` (news about ``key``), False to gossip it as well."""
        c = msg.__class__
        t = self._tc
        if c not in _RANK:
            return False  # suspicions: gossip only
        if key == self._me.node:
            if t.on:
                self._tree_add(key, msg, ident)  # a join, tags, a refutation: both
                if self._leaving:
                    self._tree_flush(force=True)  # now: the Peer leaves the mesh next
            return False
        t.pending.pop(key, None)  # superseded by this
        # Newer news replaces what the gossip queue held about the node (as
        # enqueue would), so that the ring does not pass the older one on.
        self._queue.invalidate(("m", key))
        if t.ctx == TREE:
            return True  # Plumtree forwards it
        if t.ctx == JOIN and not t.on:
            # What our first join taught us is the contact's view, which the
            # cluster knows. (A join while connected, an operator healing a
            # partition, may teach our side news: that waits for the tree.)
            return True
        if c in _DEATH and t.on and self.config.tree_desk_hold_s > 0:
            self._tree_death(key, msg, ident)
            return True
        if t.ctx != OWN:  # a datagram, a sync, our verdict on another's suspicion
            self._tree_defer(key, msg, ident)
        else:
            self._tree_add(key, msg, ident)
        return True

    def _tree_add(self, key: NodeId, msg: Message, ident: Hashable) -> None:
        if msg.__class__ is DiedRef:
            # Each node hears it about once: the full id costs little and
            # needs no prefix index at the receiver.
            msg = Died(key, msg.incarnation)
        t = self._tc
        data = codec.encode(msg)
        old = t.batch.pop(key, None)
        if old is not None:
            t.batch_bytes -= len(old[0])
        t.batch[key] = (data, ident)
        t.batch_bytes += len(data)
        if t.batch_bytes >= self.config.tree_batch_bytes:
            self._tree_flush(force=True)
        elif not t.flush_armed:
            t.flush_armed = True
            self._arm(TreeFlush, self.config.tree_batch_s)

    def _tree_flush(self, force: bool = False) -> None:
        t = self._tc
        t.flush_armed = False
        if not t.batch:
            return
        wait = min(t.desk_due, t.desk_quiet) - self._now
        if not force and wait > 1e-9:  # a desk's hold: flush when it ends
            t.flush_armed = True
            self._arm(TreeFlush, wait)
            return
        t.desk_due = 0.0
        limit = self.config.tree_batch_bytes
        chunk: list[bytes] = []
        size = 0
        for data, _ident in t.batch.values():
            if chunk and size + len(data) > limit:
                self._tree_cast(chunk)
                chunk, size = [], 0
            chunk.append(data)
            size += len(data)
        self._tree_cast(chunk)
        t.batch.clear()
        t.batch_bytes = 0

    def _tree_cast(self, chunk: list[bytes]) -> None:
        self.counters["tree_casts"] += 1
        self.counters["tree_cast_items"] += len(chunk)
        self._out.append(MeshCast(TREE_CHANNEL, codec.pack(chunk)))

    def _tree_desks(self) -> list[NodeId]:
        """The first two live members by id that we do not suspect (us
        included): the desk that broadcasts a mass crash's deaths, and its
        stand-in. Every node's ring agrees on them but for the news in
        flight."""
        ring = self._ring
        me = self._me.node
        desks: list[NodeId] = []
        for j in range(min(len(ring), DESK_SCAN)):
            node = ring[j]
            if node != me:
                m = self._members.get(node)
                if m is None or m.status is not Status.ALIVE:
                    continue
            desks.append(node)
            if len(desks) == 2:
                break
        return desks

    def _tree_death(self, key: NodeId, msg: Message, ident: Hashable) -> None:
        """A death, ours or heard off the tree: the desk broadcasts the
        deaths of many detectors together (see the module docs)."""
        desks = self._tree_desks()
        me = self._me.node
        hold = self.config.tree_desk_hold_s
        t = self._tc
        if desks and desks[0] == me and t.ctx in (PACKET, OWN):
            if t.ctx == OWN and len(desks) > 1:
                # Our own verdict: in our batch, and to the stand-in, which
                # broadcasts it if our batch does not come (we may crash).
                self.counters["tree_desk_sends"] += 1
                self._send(self._peek(desks[1]).addr, Died(key, getattr(msg, "incarnation", 0)))
            self.counters["tree_desk_items"] += 1
            # Flushed once no death came for tree_batch_s, or tree_desk_hold_s
            # after the first: a mass crash's detectors declare within a few
            # ms of each other, their datagrams arrive over a few more.
            now = self._now
            if t.desk_due <= now:
                t.desk_due = now + hold
            t.desk_quiet = now + self.config.tree_batch_s
            self._tree_add(key, msg, ident)  # its flush timer waits for the above
        elif me in desks and t.ctx == PACKET:
            # The stand-in: broadcasts what the desk's batches did not bring.
            self._tree_defer(key, msg, ident, hold + self.config.tree_relay_after_s / 2)
        elif t.ctx == OWN:
            inc: int = getattr(msg, "incarnation", 0)
            died = Died(key, inc)
            for node in desks:
                if node == me:
                    continue
                self.counters["tree_desk_sends"] += 1
                self._send(self._peek(node).addr, died)
            # Ours to broadcast only if neither desk's batch brings it.
            self._tree_defer(
                key, msg, ident, self.config.tree_relay_after_s * self.rng.uniform(2.0, 4.0)
            )
        else:
            self._tree_defer(key, msg, ident)

    def _tree_defer(
        self, key: NodeId, msg: Message, ident: Hashable, wait: float | None = None
    ) -> None:
        t = self._tc
        if wait is None:
            wait = self.config.tree_relay_after_s * self.rng.uniform(1.0, 3.0)
        t.pending[key] = (msg, ident, self._now + wait)
        if not t.relay_armed:
            # One timer for all: a wait shorter than the armed one's is held
            # to it. (Re-arming sooner made the stand-in relay deaths the
            # cut tree was still bringing: mesh-10k at 1,000 nodes, copies
            # per update 1.01 -> 1.11, detection no faster.)
            t.relay_armed = True
            self._arm(TreeRelay, wait)

    def _tree_relay(self) -> None:
        """News heard off the tree has waited: what the tree did not bring
        (and is still what we hold) is ours to broadcast."""
        t = self._tc
        t.relay_armed = False
        now = self._now
        due = [k for k, (_m, _i, at) in t.pending.items() if at <= now]
        for key in due:
            msg, ident, _at = t.pending.pop(key)
            m = self._members.get(key)
            if m is None or (m.incarnation, 0 if m.status in _LIVE_STATUS else 1) != _state_of(msg):
                continue  # newer news came meanwhile
            if t.on:
                self.counters["tree_relays"] += 1
                self._tree_add(key, msg, ident)
            else:
                self._queue_news(key, msg, ident)
        if t.pending:
            t.relay_armed = True
            self._arm(TreeRelay, max(0.0, min(at for _m, _i, at in t.pending.values()) - now))

    def _tree_sweep_soon(self) -> None:
        """A death in a burst: sweep until SWEEP_S from now (see the module docs)."""
        t = self._tc
        if t.sweep_until <= self._now:  # the first at once (a burst is news)
            self._arm(TreeSweep, min(FIRST_GOSSIP_DELAY_S, self.config.gossip_interval_s))
        t.sweep_until = self._now + SWEEP_S

    def _tree_sweep(self) -> None:
        t = self._tc
        if self._now >= t.sweep_until or not t.on or self._leaving:
            t.sweep_until = 0.0
            return
        for node in self._live.sample(self.rng, self.config.gossip_fanout):
            self.counters["sweep_checks"] += 1
            self._start_check(self._peek(node))
        self._arm(TreeSweep, self.config.gossip_interval_s)

    def _queue_news(self, key: NodeId, data_or_msg: Message | bytes, ident: Hashable) -> None:
        """Into the gossip queue, as without a tree."""
        data = data_or_msg if isinstance(data_or_msg, bytes) else codec.encode(data_or_msg)
        self._queue.enqueue(("m", key), data, ident)
        self._arm_gossip()

    def use_tree(self) -> None:
        """The Peer runs a mesh next to this node (see the module docs)."""
        self._tc.mesh = self.config.tree_dissemination

    def _tree_connected(self, connected: bool) -> None:
        """The mesh gained its first neighbour or lost its last."""
        t = self._tc
        on = connected and self.config.tree_dissemination and not self._leaving
        if on == t.on:
            return
        t.on = on
        if on:
            if self._queue.has(("m", self._me.node)):
                # We announced ourselves (a join) before the mesh was up.
                self._tree_add(self._me.node, self._alive_msg(), None)
            return
        # Cut off the tree: what waited for it goes by gossip.
        for key, (data, ident) in t.batch.items():
            self._queue_news(key, data, ident)
        t.batch.clear()
        t.batch_bytes = 0
        for key, (msg, ident, _at) in t.pending.items():
            self._queue_news(key, msg, ident)
        t.pending.clear()

    def _on_tree_delivered(self, inp: MeshDelivered) -> None:
        """A batch of news came by the tree: apply each by the SWIM rules."""
        self.counters["msg_in.tree"] += 1
        try:
            msgs, errors = codec.decode_packet(inp.payload)
        except DecodeError as err:
            self._drop(err.reason, "membership tree payload")
            return
        for bad in errors:
            self._drop(bad.reason, "membership tree payload")
        t = self._tc
        t.ctx = TREE
        counters = self.counters
        for msg in msgs:
            c = msg.__class__
            counters["msg_in.tree_items"] += 1
            # each item is a copy of an update, counted like a datagram's
            # (membership.copies_per_update: Node._copy_in, _copy_done)
            if c is Alive:
                assert isinstance(msg, Alive)
                node = msg.node
                before = self._copy_in(node)
                self._on_alive(msg)
            elif c is Died or c is Dead:
                assert isinstance(msg, Died | Dead)
                node = msg.node
                before = self._copy_in(node)
                self._on_dead(node, msg.incarnation)
            elif c is Left:
                assert isinstance(msg, Left)
                node = msg.node
                before = self._copy_in(node)
                self._on_left(msg)
            elif c is DiedRef:
                assert isinstance(msg, DiedRef)
                ref = self._by_prefix.get(msg.prefix)
                if ref is None or ref == AMBIGUOUS:
                    counters["update_copies_in"] += 1
                    counters[
                        "drop.died_ref_unknown" if ref is None else "drop.died_ref_ambiguous"
                    ] += 1
                    continue
                node = ref
                before = self._copy_in(node)
                self._on_dead(node, msg.incarnation)
            else:
                self._drop("unexpected_tree_message", c.__name__)
                continue
            self._copy_done(node, before)
            waiting = t.pending.get(node)
            if waiting is not None and _state_of(msg) >= _state_of(waiting[0]):
                del t.pending[node]  # the tree brought it: nothing to relay


_LIVE_STATUS = (Status.ALIVE, Status.SUSPECT)
_DEATH = (Died, DiedRef, Dead)
# A sweep goes on this long after the last death of a burst (see the module docs).
SWEEP_S = 1.0

# The desks are looked for among this many members at the bottom of the ring.
DESK_SCAN = 8
