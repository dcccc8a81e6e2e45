"""Dissemination of registry deltas: an epidemic, or the partial mesh.

Each node is the one writer of its own partition, so a write is a delta
(its changes between two versions) that every node applies in version
order. A write is staged and flushed a few milliseconds later (not at the
next gossip tick), then spreads as an epidemic: queued for gossip to a few
random peers, and every node that learns something new passes it on the
same way at once, so news reaches N nodes in O(log N) hops (Demers et al.,
1987, rumor mongering). A delta too large for a datagram is announced
instead (RegAck: "I hold origin X at version v") and nodes that are behind
pull it (peerd.core.registry.sync).

In clusters of up to DIRECT_MAX peers the origin also sends its own changes
straight to every live peer at the flush, so a registration is visible
everywhere within milliseconds even when the random fan-out misses a node;
a node that got a delta straight from its origin does not relay it.

When the node runs a partial mesh (via_mesh), each flush is one Plumtree
broadcast on MESH_CHANNEL instead: the tree reaches every node about once,
so there are no relays, and a long burst goes as consecutive deltas of at
most MAX_MESH_DELTA_BYTES.
"""

from __future__ import annotations

from peerd.core.events import MeshCast, SendDirect, SendTo
from peerd.core.registry.config import (
    DIRECT_MAX,
    MAX_DELTA_BYTES,
    MAX_DIRECT_CHUNKS,
    MAX_MESH_CHUNKS,
    MAX_MESH_DELTA_BYTES,
)
from peerd.core.registry.staging import _change_size, _Staged, merge_deltas
from peerd.core.registry.state import Applied
from peerd.core.registry.sync import RegistrySync
from peerd.wire import codec
from peerd.wire.messages import (
    Channel,
    NodeId,
    RegAck,
    RegChange,
    RegDelta,
    RegSnapshot,
)

# Over a partial mesh (the peer's MeshConnected input), deltas are Plumtree
# broadcasts on this channel (a protocol constant, not a setting).
MESH_CHANNEL = int(Channel.REGISTRY)

__all__ = [
    "DIRECT_MAX",
    "MAX_DELTA_BYTES",
    "MAX_DIRECT_CHUNKS",
    "MAX_MESH_CHUNKS",
    "MAX_MESH_DELTA_BYTES",
    "MESH_CHANNEL",
    "RegistrySpread",
]


class RegistrySpread(RegistrySync):
    """Staging, flushing and receiving deltas (see the module docstring)."""

    # --- dissemination ------------------------------------------------------------

    def _spread(self, delta: RegDelta, ack: bool = False) -> None:
        """Queue our own delta for gossip, merged with what is still queued."""
        self.arm_sync()
        self._emit_changes()
        self._queue_delta(delta, ack)

    def _queue_delta(self, delta: RegDelta, ack: bool = False) -> None:
        """Stage ``delta`` for the next flush, merged with what is staged.
        With nobody to send to (alone), it stays staged until a peer is live
        (peer_live flushes then); merging per entry keeps that bounded."""
        staged = self._staged.get(delta.origin)
        if staged is not None and not staged.extend(delta, ack):
            self._enqueue(staged.delta(), staged.ack)  # not consecutive: send what we had
            staged = None
        if staged is None:
            self._staged[delta.origin] = _Staged.of(delta, ack)
        self._flush_soon()

    @property
    def staged(self) -> bool:
        """Deltas wait for a flush."""
        return bool(self._staged)

    def flush(self) -> None:
        """Move staged deltas into the broadcast queue (before a gossip
        round). In a small cluster the messages about our own partition
        that were queued also go straight to every live peer (SendDirect,
        last: see direct_max)."""
        own = self._flush()
        if own:
            self._out.append(SendDirect(tuple(own), "reg_direct_out"))

    def _flush(self) -> list[bytes]:
        if not self._staged:
            return []
        staged, self._staged = self._staged, {}
        own: list[bytes] = []
        if self.via_mesh:
            # One Plumtree broadcast each; in a small cluster our own changes
            # also go straight to every peer (one hop: the tree's lazy repair
            # can take a graft timeout, which "visible everywhere" would feel).
            for item in staged.values():
                delta = item.delta()
                self._cast(delta)
                if item.origin == self.node_id:
                    own.extend(self._direct_parts(delta, item.ack))
            return own
        for item in staged.values():
            delta = item.delta()
            data = self._enqueue(delta, item.ack)
            if data is not None and item.origin == self.node_id:
                own.extend(self._direct_parts(delta, item.ack))
        return own

    def _cast(self, delta: RegDelta) -> None:
        """One Plumtree broadcast reaches every node about once: no relays.
        A long burst goes as consecutive deltas of at most
        max_mesh_delta_bytes each (a bare announcement would make every
        node pull from us at once); only a huge one is announced."""
        cfg = self.config
        for data in self._parts_of(delta, delta.ack, cfg.max_mesh_delta_bytes, cfg.max_mesh_chunks):
            self._out.append(MeshCast(MESH_CHANNEL, data))

    def _direct_parts(self, delta: RegDelta, ack: bool) -> list[bytes]:
        """This flush's own changes for the direct send, as deltas that each
        fit a datagram (the queued item may hold more: it merges flushes
        until it is sent out). A burst longer than max_direct_chunks of
        them is announced instead; peers then pull it."""
        cfg = self.config
        if self.members.live_peer_count() > cfg.direct_max:
            return []
        return self._parts_of(delta, ack, cfg.max_delta_bytes, cfg.max_direct_chunks)

    def _parts_of(self, delta: RegDelta, ack: bool, max_bytes: int, max_chunks: int) -> list[bytes]:
        """``delta`` as encoded consecutive deltas of at most ``max_bytes``
        each, or, beyond ``max_chunks`` of them, one announcement (RegAck)."""
        chunks: list[RegDelta] = []
        current: list[RegChange] = []
        size, base = 0, delta.base
        for change in delta.changes:
            est = _change_size(change)
            if current and size + est > max_bytes - 40:
                chunks.append(
                    RegDelta(
                        delta.origin,
                        delta.generation,
                        base,
                        current[-1].version,
                        tuple(current),
                        ack,
                    )
                )
                base, current, size = current[-1].version, [], 0
            current.append(change)
            size += est
        chunks.append(
            RegDelta(delta.origin, delta.generation, base, delta.top, tuple(current), ack)
        )
        if len(chunks) <= max_chunks:
            parts = [codec.encode(c) for c in chunks]
            if all(len(p) <= max_bytes for p in parts):
                return parts
        return [codec.encode(RegAck(delta.origin, delta.generation, delta.top))]

    def _enqueue(self, delta: RegDelta, ack: bool) -> bytes | None:
        key = ("r", delta.origin)
        queued = self._queued_item(key)
        if queued is not None:
            cached = self._queued.get(delta.origin)
            if cached is not None and cached[0] is queued:
                old: object = cached[1]  # what we queued, still there: no decode
            else:
                try:
                    old = codec.decode(queued)
                except codec.DecodeError:  # pragma: no cover - we encoded it
                    old = None
            if (
                isinstance(old, RegDelta)
                and old.generation == delta.generation
                and old.top == delta.base
            ):
                delta = merge_deltas(old, delta)
                ack = ack or old.ack
            elif isinstance(old, RegAck) and old.version >= delta.top:
                return None
        if ack != delta.ack:
            delta = RegDelta(
                delta.origin, delta.generation, delta.base, delta.top, delta.changes, ack
            )
        msg: RegDelta | RegAck = delta
        # At least 4 bytes per change: a long delta is too big without encoding it.
        limit = self.config.max_delta_bytes
        data = b"" if len(delta.changes) * 4 > limit else codec.encode(delta)
        if not data or len(data) > limit:
            # Too big to gossip: announce the version; peers that are behind pull.
            msg = RegAck(delta.origin, delta.generation, delta.top)
            data = codec.encode(msg)
        self._queued[delta.origin] = (data, msg)
        self._gossip(key, data)
        return data

    def on_message(self, src_node: NodeId | None, msg: RegDelta | RegSnapshot | RegAck) -> None:
        if not self._known(msg.origin):
            self.counters["drop.origin_not_live"] += 1  # not a live member's partition: see _known
            return
        self.arm_sync()
        match msg:
            case RegDelta():
                self._on_delta(src_node, msg)
            case RegSnapshot():
                if self.state.apply_snapshot(msg) is Applied.APPLIED:
                    self._emit_changes()
            case RegAck():
                self._on_ack(src_node, msg)

    def _on_delta(self, src_node: NodeId | None, delta: RegDelta) -> None:
        result = self.state.apply_delta(delta)
        if result is Applied.APPLIED:
            self._emit_changes()
            if self.via_mesh:
                pass  # the mesh relays it
            elif self.members.live_peer_count() > self.config.direct_max:
                # Pass it on at once: the epidemic that makes a registration
                # visible everywhere within a few hops.
                self._queue_delta(delta, delta.ack)
            elif src_node != delta.origin:
                # Second-hand news in a small cluster (the origin's own send
                # was missed): pass it on, at the gossip's own pace. Straight
                # from its origin, it needs no relay: the origin sent it to
                # every peer and keeps gossiping it.
                self._enqueue(delta, delta.ack)
        if delta.ack and result in (Applied.APPLIED, Applied.STALE):
            gen, version = self.state.version_of(delta.origin)
            if gen == delta.generation and version >= delta.top:
                self._send_to(delta.origin, RegAck(delta.origin, gen, version))
        elif result is Applied.GAP or result is Applied.BUFFERED:
            self._want(src_node, delta.origin, delta.generation, delta.top)

    def _on_ack(self, src_node: NodeId | None, ack: RegAck) -> None:
        if ack.origin == self.node_id:
            if src_node is not None and ack.generation == self.state.generation:
                self._acked(src_node, ack.version)
            return
        self._want(src_node, ack.origin, ack.generation, ack.version)

    def _send_to(self, node: NodeId, msg: RegAck) -> None:
        """A datagram to ``node``, if it is a live member other than us."""
        if node != self.node_id and self.members.is_live_member(node):
            self._out.append(SendTo(node, msg))
