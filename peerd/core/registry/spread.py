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

# Over a partial mesh (the node's MeshConnected input), deltas are Plumtree broadcasts on
# this channel.
MESH_CHANNEL = int(Channel.REGISTRY)
# Over the mesh a flush goes as deltas of at most this many bytes each.
MAX_MESH_DELTA_BYTES = 64 * 1024
MAX_MESH_CHUNKS = 64  # 4 MiB of changes in one flush; more is announced

# A merged delta larger than this (encoded) is announced instead of sent.
MAX_DELTA_BYTES = 900
# Up to this many live peers, a node sends its own registry changes straight
# to every one of them at the flush, besides the epidemic: one hop, so a
# registration is visible everywhere within milliseconds even when the random
# fan-out misses a node (it would then wait for the next gossip tick).
DIRECT_MAX = 32
# A flush's own changes go to every peer in at most this many datagrams;
# a longer burst is announced, and peers pull it over a stream.
MAX_DIRECT_CHUNKS = 64


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
        (the host flushes then); merging per entry keeps that bounded."""
        staged = self._staged.get(delta.origin)
        if staged is not None and not staged.extend(delta, ack):
            self._enqueue(staged.delta(), staged.ack)  # not consecutive: send what we had
            staged = None
        if staged is None:
            self._staged[delta.origin] = _Staged.of(delta, ack)
        self.host.reg_flush_soon()

    @property
    def staged(self) -> bool:
        """Deltas wait for a flush."""
        return bool(self._staged)

    def flush(self) -> list[bytes]:
        """Move staged deltas into the broadcast queue (the host calls this
        before a gossip round). Returns the encoded messages about our own
        partition that were queued: the host may also send those straight
        to every live peer (see DIRECT_MAX)."""
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
                if item.origin == self.host.node_id:
                    own.extend(self._direct_parts(delta, item.ack))
            return own
        for item in staged.values():
            delta = item.delta()
            data = self._enqueue(delta, item.ack)
            if data is not None and item.origin == self.host.node_id:
                own.extend(self._direct_parts(delta, item.ack))
        return own

    def _cast(self, delta: RegDelta) -> None:
        """One Plumtree broadcast reaches every node about once: no relays.
        A long burst goes as consecutive deltas of at most
        MAX_MESH_DELTA_BYTES each (a bare announcement would make every
        node pull from us at once); only a huge one is announced."""
        for data in self._parts_of(delta, delta.ack, MAX_MESH_DELTA_BYTES, MAX_MESH_CHUNKS):
            self.host.reg_cast(data)

    def _direct_parts(self, delta: RegDelta, ack: bool) -> list[bytes]:
        """This flush's own changes for the direct send, as deltas that each
        fit a datagram (the queued item may hold more: it merges flushes
        until it is sent out). A burst longer than MAX_DIRECT_CHUNKS of
        them is announced instead; peers then pull it."""
        if self.host.reg_live_count() > DIRECT_MAX:
            return []
        return self._parts_of(delta, ack, MAX_DELTA_BYTES, MAX_DIRECT_CHUNKS)

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
        queued = self.host.reg_queued(key)
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
        data = b"" if len(delta.changes) * 4 > MAX_DELTA_BYTES else codec.encode(delta)
        if not data or len(data) > MAX_DELTA_BYTES:
            # Too big to gossip: announce the version; peers that are behind pull.
            msg = RegAck(delta.origin, delta.generation, delta.top)
            data = codec.encode(msg)
        self._queued[delta.origin] = (data, msg)
        self.host.reg_broadcast(key, msg, data)
        return data

    def on_message(self, src_node: NodeId | None, msg: RegDelta | RegSnapshot | RegAck) -> None:
        if not self.host.reg_known(msg.origin):
            return  # not a live member's partition: see Host.reg_known
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
            elif self.host.reg_live_count() > DIRECT_MAX:
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
                self.host.reg_send(delta.origin, RegAck(delta.origin, gen, version))
        elif result is Applied.GAP or result is Applied.BUFFERED:
            self._want(src_node, delta.origin, delta.generation, delta.top)

    def _on_ack(self, src_node: NodeId | None, ack: RegAck) -> None:
        if ack.origin == self.host.node_id:
            if src_node is not None and ack.generation == self.state.generation:
                self._acked(src_node, ack.version)
            return
        self._want(src_node, ack.origin, ack.generation, ack.version)
