"""The registry beside membership: API commands, dissemination, anti-entropy.

:mod:`peerd.core.registry.state` is the replicated data type; this module is
the protocol around it. The registry is a sibling of membership in the peer
(:mod:`peerd.core.peer`): it is fed inputs with :meth:`RegistryService.handle`
(the API's commands, its timers, the mesh's deliveries, and the news
membership reports: who came up or went down, a registry message it
received, a gossip round about to go) and returns outputs, among them what
membership should carry for it (an item for its gossip queue, a datagram, a
stream). It reads membership only through a view
(:mod:`peerd.core.registry.view`) and never calls it:

* **Writes** come from API connections. Each entry belongs to the connection
  that made it; only that connection may change it, and when the connection
  closes (its process exited) its entries are removed cluster-wide.
* **Deltas** are broadcast at once (a flush a few milliseconds after the
  write, not at the next gossip tick) to a few random peers, and every node
  that learns something new passes it on the same way: an epidemic that
  reaches N nodes in O(log N) hops. Consecutive deltas of one origin are
  merged in the broadcast queue, so a burst of writes costs one queue item
  per origin, not one per write; a merged delta that grows too large is sent
  as an announcement (``RegAck``: "I hold origin X at version v"), and a
  node that is behind pulls the difference over a stream. Until the flush,
  deltas are *staged* as objects and merged there: encoding (and merging
  with what is still queued) happens once per origin and flush, not once
  per write, so a burst of writes costs O(1) each.
  In clusters of up to ``DIRECT_MAX`` peers, the origin also sends its
  own changes straight to every live peer at the flush (one datagram each
  per flush, whatever the number of writes batched in it), so the random
  fan-out missing a node costs nothing; a node that got a delta straight
  from its origin then does not relay it (second-hand news it still
  passes on, at the gossip's pace).
* **Anti-entropy**: with every membership push-pull the node also exchanges a
  ``RegSync`` (digest plus what the peer lacks) with the same peer.
* **Membership**: a node declared dead or left loses its entries everywhere;
  a restarted node (new generation) starts with none of its old ones. The
  death of a node that held entries is spread at once (a flush round a few
  milliseconds later, not the next gossip tick), as registry news is.
* **Conflicts**: when a local name claim loses to an older claim elsewhere,
  the owning connection gets a ``conflict`` event naming the winner and the
  losing entry is removed, so no duplicate outlives the merge.
* **wait=settled**: the delta asks for acknowledgements; the command answers
  once every live member holds the entry, or when the wait times out.

The service is one object over one state, written as a chain of mixins, one
concern per module: the shared state, outputs, events, conflicts and settled
waits (base), anti-entropy and pulls (sync), dissemination (spread), API
commands (commands), and here the entry points and the news of membership
that tie the registry to the members table. Its tuning is a
:class:`~peerd.core.registry.config.RegistryConfig`. Import the service and
its limits from this module.
"""

from __future__ import annotations

from collections.abc import Mapping

from peerd.core.events import (
    Carried,
    ConnClosed,
    DeathDeclared,
    GossipDue,
    GossipRound,
    MeshConnected,
    MeshDelivered,
    NodeDown,
    NodeForgotten,
    NodeStarted,
    NodeUp,
    Output,
    PeerLive,
    Register,
    SendDirect,
    StreamReply,
    StreamTo,
    SyncedWith,
    TimerFired,
    Unregister,
    UpdateMeta,
)
from peerd.core.registry.base import Settle, entry_to_dict
from peerd.core.registry.commands import (
    MAX_ENTRIES_PER_CONN,
    MAX_LOCAL_ENTRIES,
    MAX_META_BYTES,
    RegistryCommands,
    meta_problem,
    name_problem,
)
from peerd.core.registry.config import RegistryConfig
from peerd.core.registry.spread import (
    DIRECT_MAX,
    MAX_DELTA_BYTES,
    MAX_DIRECT_CHUNKS,
    MAX_MESH_CHUNKS,
    MAX_MESH_DELTA_BYTES,
    MESH_CHANNEL,
)
from peerd.core.registry.staging import merge_deltas
from peerd.core.registry.state import RegistryTables
from peerd.core.registry.sync import (
    FULL_DIGEST_MAX,
    HEAL_SYNC_DELAY_S,
    ORIGINS_PER_BUCKET,
    SYNC_INTERVAL_S,
    sync_bits,
)
from peerd.core.timers import RegFlush, RegSettleTimeout, RegSyncTick
from peerd.wire import codec
from peerd.wire.codec import DecodeError
from peerd.wire.messages import Died, NodeId, RegAck, RegDelta, RegSnapshot, RegSync

__all__ = [
    "DIRECT_MAX",
    "FULL_DIGEST_MAX",
    "HEAL_SYNC_DELAY_S",
    "MAX_DELTA_BYTES",
    "MAX_DIRECT_CHUNKS",
    "MAX_ENTRIES_PER_CONN",
    "MAX_LOCAL_ENTRIES",
    "MAX_MESH_CHUNKS",
    "MAX_MESH_DELTA_BYTES",
    "MAX_META_BYTES",
    "MESH_CHANNEL",
    "ORIGINS_PER_BUCKET",
    "SYNC_INTERVAL_S",
    "RegistryConfig",
    "RegistryService",
    "Settle",
    "entry_to_dict",
    "merge_deltas",
    "meta_problem",
    "name_problem",
    "sync_bits",
]


class RegistryService(RegistryCommands):
    """The registry beside membership (see the module docstring)."""

    # The one node whose death we last learnt, and whether it held entries
    # (DeathDeclared follows NodeDown of the same handling).
    _last_down: tuple[NodeId, bool] | None = None

    # --- the way in --------------------------------------------------------------

    def handle(self, now: float, inp: object) -> list[Output]:
        """Feed one input that happened at ``now``; returns what to do, in order
        (membership's part of it: :mod:`peerd.core.events`, "carry")."""
        out = self._begin(now)
        match inp:
            case Carried(src, msg, stream):
                if stream is None:
                    assert isinstance(msg, RegDelta | RegSnapshot | RegAck)
                    self.on_message(src, msg)
                else:
                    assert isinstance(msg, RegSync)
                    reply = self.on_sync_request(src, msg)
                    out.append(StreamReply(stream, codec.encode(reply)))
            case GossipDue():
                self.flush()
            case NodeUp(node, generation):
                self.node_up(node, generation)
            case PeerLive():
                if self._staged:
                    self._flush_soon()
            case NodeDown(node, generation):
                self.node_down(node, generation)
            case DeathDeclared(node, incarnation):
                self._death_declared(node, incarnation)
            case NodeForgotten(node):
                self.forget(node)
            case SyncedWith(node):
                # The registry's anti-entropy follows membership's, with the same peer.
                out.append(StreamTo(node, codec.encode(self.sync_request()), "reg"))
            case TimerFired(timer):
                self._on_timer(timer)
            case Register() | Unregister() | UpdateMeta() | ConnClosed():
                self.command(inp)
            case MeshDelivered():
                self._on_mesh_delivered(inp)
            case MeshConnected(connected):
                # While the peer's mesh has neighbours, deltas go out as
                # MeshCast (one Plumtree broadcast each) instead of gossip;
                # they arrive as MeshDelivered either way. Anti-entropy stays.
                if connected and not self.via_mesh:
                    self.sync_soon()  # broadcasts from before we joined it
                self.via_mesh = connected
            case NodeStarted():
                self.on_start()
        return out

    def stream_reply(
        self, now: float, purpose: str, peer: NodeId | None, data: bytes
    ) -> list[Output]:
        """The reply to a stream we asked membership to open (StreamTo)."""
        out = self._begin(now)
        if purpose == "reg_push":
            return out  # the push's reply carries nothing we need
        try:
            msg = codec.decode(data)
        except DecodeError as err:
            self._drop(err.reason, "registry sync reply")
            self.sync_failed(peer)
            return out
        if not isinstance(msg, RegSync):
            self._drop("unexpected_stream_message", type(msg).__name__)
            self.sync_failed(peer)
            return out
        src = peer if peer is not None and self.members.is_live_peer(peer) else None
        push = self.on_sync_reply(src, msg)
        if push is not None and src is not None:
            out.append(StreamTo(src, codec.encode(push), "reg_push"))
        return out

    def stream_failed(self, now: float, peer: NodeId | None) -> list[Output]:
        """A stream we asked membership to open failed."""
        out = self._begin(now)
        self.counters["reg_sync_failed"] += 1
        self.sync_failed(peer)
        return out

    def _on_timer(self, timer: object) -> None:
        if not isinstance(timer, RegFlush | RegSettleTimeout | RegSyncTick):
            return
        if not self._take_timer(timer):
            return  # superseded (or not ours)
        match timer:
            case RegFlush():
                self.flush()  # still armed: queueing does not re-arm
                self._flush_armed = False
                # Direct first (flush's SendDirect): a gossip packet
                # announcing a long burst must not reach a peer before the
                # burst itself (it would pull).
                self._out.append(GossipRound())
            case RegSettleTimeout(ref=ref):
                self.settle_timeout(ref)
            case RegSyncTick(peer=peer):
                if not self.members.leaving:
                    self.sync_tick(peer)

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
        self.on_message(inp.origin if self.members.is_live_peer(inp.origin) else None, msg)

    def _death_declared(self, node: NodeId, incarnation: int) -> None:
        if self._last_down != (node, True):
            return
        if self.members.live_peer_count() <= self.config.direct_max:
            # Its registry entries must vanish everywhere at once, not when
            # the epidemic has reached the last node: tell every peer now.
            self._out.append(SendDirect((codec.encode(Died(node, incarnation)),)))

    def preload(self, tables: RegistryTables, owners: Mapping[int, int]) -> None:
        """Simulator only: start from a converged registry (:meth:`Registry.adopt`);
        ``owners`` maps each of our own entries (eid) to the API connection
        that holds it."""
        self.state.adopt(tables)
        local = self.state.local.entries
        if set(owners) != set(local):
            raise ValueError("every local entry of the snapshot needs an owner, and only those")
        for eid, conn in owners.items():
            entry = local[eid]
            self._owned.setdefault(conn, {})[(entry.kind, entry.scope, entry.name)] = eid
            self._owner_of[eid] = conn

    def on_start(self) -> None:
        """Membership started: a registry that starts with data (preloaded)
        starts its rounds."""
        if self.state.origins() > 1 or self.state.local.entries:
            self.arm_sync()

    # --- membership -----------------------------------------------------------------

    def node_down(self, node: NodeId, generation: int) -> bool:
        """Drop a dead or departed node's entries; True if it had any (the
        news of its death then spreads at once)."""
        self._was_down[node] = generation
        removed = self.state.node_down(node, generation)
        self._emit_changes()
        self.check_settled()
        self._last_down = (node, bool(removed))
        if removed:
            # Applications wait on this: spread the death at once (the
            # broadcast is queued right after), not at the next gossip tick.
            self._flush_soon()
        return bool(removed)

    def node_up(self, node: NodeId, generation: int) -> None:
        revived = self._was_down.pop(node, None) == generation
        self.state.node_up(node, generation)
        self._emit_changes()
        if revived:
            # A node we had given up for dead is back: a partition healed.
            # One sync with it soon brings what its side wrote meanwhile
            # (one per burst of revivals, not one per revived node).
            self._one_round_soon(node)

    def forget(self, node: NodeId) -> None:
        self._was_down.pop(node, None)
        self.state.forget(node)
        self._queued.pop(node, None)
