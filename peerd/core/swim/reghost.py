"""The registry hosted by the membership node (to be replaced by peerd.core.peer).

Theory of operation: the registry (:mod:`peerd.core.registry.service`) is a
replicated map whose deltas travel on the membership's gossip queue, directly
to every member in small clusters, or on the mesh's broadcast tree when one
is connected; its anti-entropy rides the membership's streams. Today the node
hosts it through the ``Host`` callbacks below: sending to a member, reading
the live set, arming timers. Each callback only translates between the
registry and the membership's state; no protocol decision is made here.
"""

from __future__ import annotations

from collections.abc import Callable as _Callable
from collections.abc import Hashable
from typing import Any as _Any

from peerd.core.events import (
    MeshCast,
    MeshDelivered,
    Output,
)
from peerd.core.registry.service import MESH_CHANNEL
from peerd.core.swim.base import (
    LIVE,
    NodeBase,
    StreamCtx,
)
from peerd.core.timers import MembershipTimer, RegFlush
from peerd.wire import codec
from peerd.wire.codec import (
    DecodeError,
)
from peerd.wire.messages import (
    Addr,
    Message,
    NodeId,
    RegAck,
    RegDelta,
    RegSnapshot,
    RegSync,
)


class RegistryHost(NodeBase):
    """The registry service's host callbacks. See the module docs."""

    def _on_reg_reply(self, ctx: StreamCtx, data: bytes) -> None:
        if ctx.purpose == "reg_push":
            return  # the push's reply carries nothing we need
        try:
            msg = codec.decode(data)
        except DecodeError as err:
            self._drop(err.reason, "registry sync reply")
            self.registry.sync_failed(ctx.peer)
            return
        if not isinstance(msg, RegSync):
            self._drop("unexpected_stream_message", type(msg).__name__)
            self.registry.sync_failed(ctx.peer)
            return
        peer = ctx.peer if ctx.peer in self._live else None
        push = self.registry.on_sync_reply(peer, msg)
        if push is not None and peer is not None:
            self._open_stream(
                self._peek(peer).addr, StreamCtx("reg_push", peer=peer), codec.encode(push)
            )

    def _live_node_at(self, addr: Addr) -> NodeId | None:
        node = self._by_addr.get(addr)
        return node if node is not None and node in self._live else None

    def reg_emit(self, out: Output) -> None:
        self._out.append(out)

    def reg_broadcast(self, key: Hashable, msg: Message, data: bytes | None = None) -> None:
        self._queue.enqueue(key, codec.encode(msg) if data is None else data)
        self._arm_gossip()

    def reg_queued(self, key: Hashable) -> bytes | None:
        return self._queue.get(key)

    def reg_flush_soon(self) -> None:
        # Registry news goes out within milliseconds, not at the next gossip
        # tick: "visible everywhere" is what applications wait on. Alone (or
        # not started), staged deltas wait: _set_live calls us again.
        if not self._reg_flush_armed and self._started and len(self._live):
            self._reg_flush_armed = True
            self._arm(RegFlush, self.config.registry_flush_s)

    def reg_send(self, node: NodeId, msg: Message) -> None:
        m = self._members.get(node)
        if m is not None and m.status in LIVE and m is not self._me:
            self._send(m.addr, msg)

    def reg_pull(self, node: NodeId, msg: RegSync) -> None:
        m = self._peek(node)
        if m is None or m.status not in LIVE:
            self.registry.sync_failed(node)
            return
        self.counters["reg_pulls"] += 1
        self._open_stream(m.addr, StreamCtx("reg", peer=node), codec.encode(msg))

    def reg_live(self) -> list[tuple[NodeId, int]]:
        return [(n, self._peek(n).generation) for n in self._live]

    def reg_live_count(self) -> int:
        return len(self._live)

    def reg_known(self, node: NodeId) -> bool:
        return node == self._me.node or node in self._live

    def reg_arm(self, make: _Callable[..., MembershipTimer], delay: float, *context: _Any) -> int:
        return self._arm(make, delay, *context)

    def _on_mesh_connected(self, connected: bool) -> None:
        """The driver's partial mesh has neighbours (``connected``) or lost
        them all. While connected, registry deltas go out as
        :class:`MeshCast` (one Plumtree broadcast each) instead of
        piggybacked gossip; they arrive as :class:`MeshDelivered` either
        way. Anti-entropy stays as it is."""
        if connected and not self.registry.via_mesh:
            self.registry.sync_soon()  # broadcasts from before we joined it
        self.registry.via_mesh = connected

    def reg_cast(self, payload: bytes) -> None:
        self._out.append(MeshCast(MESH_CHANNEL, payload))

    def _on_mesh_delivered(self, inp: MeshDelivered) -> None:
        self.counters["mesh_in"] += 1
        if inp.channel != MESH_CHANNEL:
            self._drop("mesh_unknown_channel", str(inp.channel))
            return
        try:
            msg = codec.decode(inp.payload)
        except DecodeError as err:
            self._drop(err.reason, "registry mesh payload")
            return
        if not isinstance(msg, RegDelta | RegSnapshot | RegAck):
            self._drop("unexpected_mesh_message", type(msg).__name__)
            return
        self.registry.on_message(inp.origin if inp.origin in self._live else None, msg)

    def reg_random_peer(self) -> NodeId | None:
        peers = self._live.sample(self.rng, 1)
        return peers[0] if peers else None

    def _follow_with_reg_sync(self, ctx: StreamCtx) -> None:
        """The registry's anti-entropy follows membership's, with the same peer."""
        peer = self._by_addr.get(ctx.peer_addr) if ctx.peer_addr else None
        if peer is not None and peer in self._live:
            self._open_stream(
                self._peek(peer).addr,
                StreamCtx("reg", peer=peer),
                codec.encode(self.registry.sync_request()),
            )
