"""The registry inside a node: API commands, dissemination, anti-entropy.

:mod:`peerd.core.registry.state` is the replicated data type; this module is
the protocol around it, driven by the membership node (its *host*):

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
"""

from __future__ import annotations

import math
from collections.abc import Callable as _Callable
from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field
from typing import Any as _Any
from typing import Protocol

from peerd.core.digest import FINE_BITS, bucket_of
from peerd.core.events import (
    CommandResult,
    ConnClosed,
    Output,
    RegEventKind,
    Register,
    RegistryEvent,
    Unregister,
    UpdateMeta,
)
from peerd.core.registry.state import Applied, Registry, RegistryTables
from peerd.core.timers import MembershipTimer, RegSettleTimeout, RegSyncTick
from peerd.wire import codec
from peerd.wire.messages import (
    Channel,
    Message,
    NodeId,
    RegAck,
    RegChange,
    RegDelta,
    RegDigestRow,
    RegEntry,
    RegKind,
    RegSnapshot,
    RegSync,
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
# Limits on what one connection, and one daemon, may hold.
MAX_ENTRIES_PER_CONN = 10_000
MAX_LOCAL_ENTRIES = 200_000
MAX_META_BYTES = 1024
# Anti-entropy of its own: every node compares its registry with one random
# live peer this often (besides the sync that follows each membership
# push-pull, which is minutes apart in large clusters), so a delta the
# epidemic missed is repaired within about one round.
SYNC_INTERVAL_S = 10.0
# Up to this many origins a sync sends the whole digest; above, it sends
# bucket hashes of the digest (about this many origins per bucket) and only
# the rows of buckets that differ follow.
FULL_DIGEST_MAX = 8
# After a partition heals, the first extra sync waits this long (revivals
# arrive in bursts).
HEAL_SYNC_DELAY_S = 0.2
ORIGINS_PER_BUCKET = 64


def sync_bits(origins: int) -> int:
    """Bucket bits of a hashed sync over ``origins`` origins."""
    if origins <= ORIGINS_PER_BUCKET:
        return 0
    return min(FINE_BITS, math.ceil(math.log2(origins / ORIGINS_PER_BUCKET)))


class Host(Protocol):
    """What the registry needs from the node that drives it."""

    @property
    def node_id(self) -> NodeId: ...

    def reg_emit(self, out: Output) -> None: ...

    def reg_broadcast(self, key: Hashable, msg: Message, data: bytes | None = None) -> None:
        """Queue ``msg`` (encoded: ``data``, when given) for gossip, replacing a
        queued item with ``key`` (it goes at the next gossip round; call
        :meth:`reg_flush_soon` for one within milliseconds)."""

    def reg_queued(self, key: Hashable) -> bytes | None:
        """The encoded message queued under ``key``, if any."""

    def reg_flush_soon(self) -> None:
        """Call :meth:`RegistryService.flush` shortly (before the next gossip),
        or, while there is nobody to send to, once there is."""

    def reg_send(self, node: NodeId, msg: Message) -> None:
        """Send ``msg`` in a datagram to a live member."""

    def reg_pull(self, node: NodeId, msg: RegSync) -> None:
        """Open a stream to a live member with ``msg``; its reply comes back
        through :meth:`RegistryService.on_sync_reply`."""

    def reg_live(self) -> list[tuple[NodeId, int]]:
        """(node id, generation) of every live member other than us."""

    def reg_live_count(self) -> int:
        """How many live members other than us."""

    def reg_known(self, node: NodeId) -> bool:
        """Whether ``node`` is a live member (or us): only their partitions
        are kept, so made-up or long-gone origins cannot grow our state."""

    def reg_arm(
        self, make: _Callable[..., MembershipTimer], delay: float, *context: _Any
    ) -> int: ...

    def reg_random_peer(self) -> NodeId | None:
        """A live member other than us, at random (None when alone)."""

    def reg_cast(self, payload: bytes) -> None:
        """Broadcast ``payload`` over the partial mesh (see ``via_mesh``)."""


@dataclass(slots=True)
class Settle:
    ref: int
    eid: int
    version: int
    acked: set[NodeId] = field(default_factory=set)


def meta_problem(meta: tuple[tuple[str, str], ...]) -> str | None:
    if len({k for k, _ in meta}) != len(meta):
        return "duplicate metadata key"
    if len(meta) > codec.MAX_TAGS:
        return f"at most {codec.MAX_TAGS} metadata keys"
    size = sum(len(k.encode()) + len(v.encode()) for k, v in meta)
    if size > MAX_META_BYTES:
        return f"metadata takes {size} bytes, at most {MAX_META_BYTES}"
    for k, v in meta:
        if not k or len(k.encode()) > codec.MAX_TAG_KEY_BYTES:
            return f"metadata keys are 1 to {codec.MAX_TAG_KEY_BYTES} bytes"
        if len(v.encode()) > codec.MAX_TAG_VALUE_BYTES:
            return f"metadata values are at most {codec.MAX_TAG_VALUE_BYTES} bytes"
    return None


def name_problem(scope: str, name: str) -> str | None:
    if not name:
        return "empty name"
    if len(name.encode()) > codec.MAX_REG_NAME_BYTES:
        return f"names are at most {codec.MAX_REG_NAME_BYTES} bytes"
    if not scope or len(scope.encode()) > codec.MAX_SCOPE_BYTES:
        return f"scopes are 1 to {codec.MAX_SCOPE_BYTES} bytes"
    return None


class RegistryService:
    def __init__(self, host: Host, generation: int) -> None:
        self.host = host
        self.state = Registry(host.node_id, generation)
        # conn -> {(kind, scope, name): eid}
        self._owned: dict[int, dict[tuple[RegKind, str, str], int]] = {}
        self._owner_of: dict[int, int] = {}  # eid -> conn
        self._settles: dict[int, Settle] = {}  # ref -> wait
        # Origins we know we are behind on: origin -> (generation, version,
        # who told us, pulls tried). One pull is in flight at a time; when it
        # ends, what is still missing is pulled again (a bounded number of times).
        self._wants: dict[NodeId, tuple[int, int, NodeId | None, int]] = {}
        # The peer the pull in flight went to, until it answers or fails:
        # only its answer ends the pull, not the reply of an ordinary round.
        self._pull_from: NodeId | None = None
        self._notified: set[tuple[int, NodeId, int]] = set()  # (loser eid, winner)
        # origin -> delta waiting for the flush (see _queue_delta), and the
        # last message queued per origin with its encoding (saves a decode)
        self._staged: dict[NodeId, _Staged] = {}
        self._queued: dict[NodeId, tuple[bytes, RegDelta | RegAck]] = {}
        self._sync_armed = False
        # Deltas travel as mesh broadcasts (the driver runs a partial mesh)
        # instead of gossip: set by the node on its MeshConnected input.
        self.via_mesh = False
        self._heal_peer: NodeId | None = None
        # node -> generation declared dead (until seen alive again or reaped)
        self._was_down: dict[NodeId, int] = {}

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
        """The node started: a registry that starts with data (preloaded)
        starts its rounds."""
        if self.state.origins() > 1 or self.state.local.entries:
            self.arm_sync()

    # --- API commands -------------------------------------------------------------

    def command(self, cmd: Register | Unregister | UpdateMeta | ConnClosed) -> None:
        match cmd:
            case Register():
                self._register(cmd)
            case Unregister():
                self._unregister(cmd)
            case UpdateMeta():
                self._update(cmd)
            case ConnClosed(conn):
                self.drop_conn(conn)

    def _fail(self, ref: int, code: str, message: str) -> None:
        self.host.reg_emit(CommandResult(ref, error=(code, message)))

    def _register(self, cmd: Register) -> None:
        problem = name_problem(cmd.scope, cmd.name) or meta_problem(cmd.meta)
        if problem:
            self._fail(cmd.ref, "bad_args", problem)
            return
        owned = self._owned.setdefault(cmd.conn, {})
        key = (cmd.kind, cmd.scope, cmd.name)
        if key in owned:
            what = "name" if cmd.kind is RegKind.NAME else "group membership"
            self._fail(
                cmd.ref,
                "conflict",
                f"this connection already holds the {what} {cmd.scope}/{cmd.name}",
            )
            return
        if cmd.kind is RegKind.NAME:
            holder = self.state.lookup(cmd.scope, cmd.name)
            if holder is not None:
                self._fail(
                    cmd.ref,
                    "conflict",
                    f"{cmd.scope}/{cmd.name} is held by pid "
                    f"{holder.entry.pid} on node "
                    f"{holder.origin.hex()[:12]}",
                )
                return
        if len(owned) >= MAX_ENTRIES_PER_CONN or len(self._owner_of) >= MAX_LOCAL_ENTRIES:
            self._fail(cmd.ref, "unavailable", "too many registrations")
            return
        entry, delta = self.state.register(
            cmd.kind,
            cmd.scope,
            cmd.name,
            claimed_ms=cmd.claimed_ms,
            pid=cmd.pid,
            uid=cmd.uid,
            meta=cmd.meta,
        )
        owned[key] = entry.eid
        self._owner_of[entry.eid] = cmd.conn
        settle = cmd.settle_s is not None and bool(self.host.reg_live())
        self._spread(delta, ack=settle)
        result = entry_to_dict(self.host.node_id, entry)
        if settle:
            assert cmd.settle_s is not None
            self._settles[cmd.ref] = Settle(cmd.ref, entry.eid, delta.top)
            self.host.reg_arm(RegSettleTimeout, cmd.settle_s, cmd.ref)
            return
        if cmd.settle_s is not None:
            result.update(settled=True, won=self._won(entry))
        self.host.reg_emit(CommandResult(cmd.ref, value=result))

    def _unregister(self, cmd: Unregister) -> None:
        eid = self._owned.get(cmd.conn, {}).get((cmd.kind, cmd.scope, cmd.name))
        if eid is None:
            what = "name" if cmd.kind is RegKind.NAME else "group membership"
            self._fail(
                cmd.ref, "not_found", f"this connection holds no {what} {cmd.scope}/{cmd.name}"
            )
            return
        self._remove_local(cmd.conn, eid)
        self.host.reg_emit(CommandResult(cmd.ref, value={}))

    def _update(self, cmd: UpdateMeta) -> None:
        problem = meta_problem(cmd.meta)
        if problem:
            self._fail(cmd.ref, "bad_args", problem)
            return
        eid = self._owned.get(cmd.conn, {}).get((cmd.kind, cmd.scope, cmd.name))
        if eid is None:
            self._fail(cmd.ref, "not_found", f"this connection holds no {cmd.scope}/{cmd.name}")
            return
        res = self.state.update_meta(eid, cmd.meta)
        assert res is not None
        self._spread(res[1])
        self.host.reg_emit(CommandResult(cmd.ref, value=entry_to_dict(self.host.node_id, res[0])))

    def drop_conn(self, conn: int) -> None:
        for eid in list(self._owned.get(conn, {}).values()):
            self._remove_local(conn, eid)
        self._owned.pop(conn, None)

    def _remove_local(self, conn: int, eid: int) -> None:
        entry = self.state.local.entries.get(eid)
        if entry is not None:
            self._owned.get(conn, {}).pop((entry.kind, entry.scope, entry.name), None)
        self._owner_of.pop(eid, None)
        self._notified = {mark for mark in self._notified if mark[0] != eid}
        delta = self.state.unregister(eid)
        if delta is not None:
            self._spread(delta)
        self._emit_changes()

    # --- reads for the host ------------------------------------------------------

    def owner_conn(self, eid: int) -> int | None:
        """The API connection that holds our entry ``eid`` (None if none)."""
        return self._owner_of.get(eid)

    def held_by_conn(self, conn: int) -> list[tuple[RegKind, str, str]]:
        """(kind, scope, name) of what connection ``conn`` holds here, oldest first."""
        return list(self._owned.get(conn, {}))

    def eid_of(self, conn: int, kind: RegKind, scope: str, name: str) -> int | None:
        """The id of the entry ``conn`` holds as (kind, scope, name), if any."""
        return self._owned.get(conn, {}).get((kind, scope, name))

    def _won(self, entry: RegEntry) -> bool:
        if entry.kind is not RegKind.NAME:
            return True
        w = self.state.lookup(entry.scope, entry.name)
        return w is not None and w.origin == self.host.node_id and w.entry.eid == entry.eid

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

    def _want(
        self,
        src_node: NodeId | None,
        origin: NodeId,
        generation: int,
        version: int,
        pull: bool = True,
    ) -> None:
        gen, have = self.state.version_of(origin)
        if (generation, version) <= (gen, have):
            return
        old = self._wants.get(origin)
        if old is None or (generation, version) > old[:2]:
            self._wants[origin] = (generation, version, src_node, 0)
        if pull:
            self._pull_next()

    def _pull_next(self) -> None:
        # Pull from the origin (or whoever told us) what we know we lack.
        if self._pull_from is not None or not self._wants:
            return
        me = self.host.node_id
        known = self.host.reg_known
        for origin, (gen, version, src, tries) in list(self._wants.items()):
            if (gen, version) <= self.state.version_of(origin) or tries >= 3:
                del self._wants[origin]
                continue
            # Whoever told us holds it; else its origin, the one writer.
            target = (
                src
                if src is not None and src != me and known(src)
                else (origin if known(origin) else None)
            )
            if target is None:
                del self._wants[origin]
                continue
            self._wants[origin] = (gen, version, src, tries + 1)
            self._pull_from = target
            ask = sorted({origin, *(o for o, w in self._wants.items() if w[2] == target)})
            self.host.reg_pull(target, self.sync_request(ask))
            return

    # --- anti-entropy -------------------------------------------------------------

    def sync_request(self, origins: list[NodeId] | None = None) -> RegSync:
        """Open an exchange: our whole digest while it is small; else its
        bucket hashes, or, to pull what we lack of ``origins``, our digest
        of just their buckets."""
        n = self.state.origins()
        if n <= FULL_DIGEST_MAX:
            return RegSync(_rows(self.state.digest()), ())
        bits = sync_bits(n)
        if origins is None:
            return RegSync((), (), bits, (), self.state.bucket_hashes().hashes(bits))
        buckets = tuple(sorted({bucket_of(o, bits) for o in origins}))
        return RegSync(_rows(self.state.digest_in(bits, buckets)), (), bits, buckets)

    def sync_tick(self, peer: NodeId | None = None) -> None:
        """The periodic round (``peer`` None): compare with one random live
        peer. With ``peer``: the one-off round after a partition healed."""
        if peer is not None:
            self._heal_peer = None
            if self.host.reg_known(peer):
                self.host.reg_pull(peer, self.sync_request())
            return
        self._sync_armed = False
        self.arm_sync()
        if self.state.origins() == 1 and not self.state.local.entries:
            return  # nothing to offer: peers holding entries will call on us
        if self._pull_from is not None:
            return  # a pull is repairing already; the next round will check
        peer = self.host.reg_random_peer()
        if peer is not None:
            self.host.reg_pull(peer, self.sync_request())

    def sync_soon(self) -> None:
        """One extra round shortly, with a random peer (we just joined the
        mesh: broadcasts sent before that did not reach us)."""
        peer = self.host.reg_random_peer()
        if peer is not None:
            self._one_round_soon(peer)

    def _one_round_soon(self, peer: NodeId) -> None:
        """One extra round with ``peer`` shortly (at most one pending, and
        only once rounds run: an empty registry has nothing to compare)."""
        if self._heal_peer is None and self._sync_armed:
            self._heal_peer = peer
            self.host.reg_arm(RegSyncTick, HEAL_SYNC_DELAY_S, peer)

    def arm_sync(self) -> None:
        """Start the periodic rounds, once this node holds or heard of any
        registry data (an empty registry has nothing to compare: peers that
        hold entries call on it)."""
        if not self._sync_armed:
            self._sync_armed = True
            self.host.reg_arm(RegSyncTick, SYNC_INTERVAL_S, None)

    def missing_for(
        self,
        digest: tuple[RegDigestRow, ...],
        peer: NodeId | None = None,
        ours: dict[NodeId, tuple[int, int]] | None = None,
    ) -> tuple[RegDelta | RegSnapshot, ...]:
        """What a peer with ``digest`` lacks of what we hold (of ``ours``: our
        digest, or the part of it that ``digest`` covers). Never the
        peer's own partition (``peer``): it is the one writer of it, and its
        digest only looks behind ours because it was taken earlier."""
        theirs = {r.origin: (r.generation, r.version) for r in digest}
        items: list[RegDelta | RegSnapshot] = []
        if ours is None:
            ours = self.state.digest()
        for origin, (gen, version) in ours.items():
            if origin == peer:
                continue
            have = theirs.get(origin)
            if have is not None and have >= (gen, version):
                continue
            if origin == self.host.node_id and have is not None and have[0] == gen:
                items.append(self.state.delta_since(have[1]))
            elif version > 0 or origin != self.host.node_id:
                items.append(self.state.snapshot(origin))
        return tuple(items)

    def on_sync_request(self, src_node: NodeId | None, req: RegSync) -> RegSync:
        """Answer a peer's sync: apply what it pushed, reply with our digest
        (of the buckets that differ, or that it covered) and what it lacks."""
        self._apply_items(req.items)
        if req.hashes:
            differ = tuple(self.state.bucket_hashes().differing(req.bits, req.hashes))
            mine = self.state.digest_in(req.bits, differ) if differ else {}
            return RegSync(_rows(mine), (), req.bits, differ)
        if src_node is not None:
            self._acks_from_digest(src_node, req.digest)
        if req.bits >= 0:
            mine = self.state.digest_in(req.bits, req.buckets)
            return RegSync(
                _rows(mine), self.missing_for(req.digest, src_node, mine), req.bits, req.buckets
            )
        return RegSync(_rows(self.state.digest()), self.missing_for(req.digest, src_node))

    def on_sync_reply(self, src_node: NodeId | None, reply: RegSync) -> RegSync | None:
        """Apply a sync reply; returns a push of what the peer lacks, if any.
        What the peer holds newer and did not send (a reply to bucket
        hashes carries rows only) is pulled next."""
        self._apply_items(reply.items)
        self._pull_done(src_node)
        if src_node is not None:
            self._acks_from_digest(src_node, reply.digest)
        ours = None
        if reply.bits >= 0:
            ours = self.state.digest_in(reply.bits, reply.buckets)
            for row in reply.digest:
                if row.origin != self.host.node_id and self.host.reg_known(row.origin):
                    self._want(src_node, row.origin, row.generation, row.version, pull=False)
        self._pull_next()  # once: what one peer has newer goes in one request
        missing = self.missing_for(reply.digest, src_node, ours)
        return RegSync((), missing) if missing else None

    def sync_failed(self, peer: NodeId | None) -> None:
        """A sync exchange with ``peer`` failed."""
        self._pull_done(peer)
        self._pull_next()

    def _pull_done(self, peer: NodeId | None) -> None:
        """An exchange with ``peer`` ended: if our pull went there, or to a
        node no longer known (nobody will answer it), the pull is over."""
        pulled = self._pull_from
        if pulled is not None and (peer == pulled or not self.host.reg_known(pulled)):
            self._pull_from = None

    def _apply_items(self, items: tuple[RegDelta | RegSnapshot, ...]) -> None:
        if items:
            self.arm_sync()
        advanced: set[NodeId] = set()
        for item in items:
            if not self.host.reg_known(item.origin):
                continue
            if isinstance(item, RegSnapshot):
                res = self.state.apply_snapshot(item)
            else:
                res = self.state.apply_delta(item)
            if res is Applied.APPLIED:
                advanced.add(item.origin)
        if not advanced:
            return
        self._emit_changes()
        if self.via_mesh:
            return  # the mesh carried it to the others (or their rounds will)
        # Keep the epidemic going: what we just pulled, others may lack too.
        for origin in sorted(advanced):
            gen, version = self.state.version_of(origin)
            self.host.reg_broadcast(("r", origin), RegAck(origin, gen, version))
        self.host.reg_flush_soon()

    def _acks_from_digest(self, node: NodeId, digest: tuple[RegDigestRow, ...]) -> None:
        for row in digest:
            if row.origin == self.host.node_id and row.generation == self.state.generation:
                self._acked(node, row.version)

    # --- settled waits ------------------------------------------------------------

    def _acked(self, node: NodeId, version: int) -> None:
        if not self._settles:
            return
        for settle in list(self._settles.values()):
            if version >= settle.version:
                settle.acked.add(node)
        self.check_settled()

    def check_settled(self) -> None:
        """Answer waits that every live member has acknowledged (also called
        when membership changes: a member that died no longer counts)."""
        if not self._settles:
            return
        live = {n for n, _ in self.host.reg_live()}
        for ref, settle in list(self._settles.items()):
            if live <= settle.acked:
                self._finish_settle(ref, settled=True)

    def settle_timeout(self, ref: int) -> None:
        if ref in self._settles:
            self._finish_settle(ref, settled=False)

    def _finish_settle(self, ref: int, settled: bool) -> None:
        settle = self._settles.pop(ref)
        entry = self.state.local.entries.get(settle.eid)
        if entry is None:
            self._fail(ref, "conflict", "the entry was removed before it settled")
            return
        value = entry_to_dict(self.host.node_id, entry)
        value.update(settled=settled, won=self._won(entry))
        self.host.reg_emit(CommandResult(ref, value=value))

    # --- membership -----------------------------------------------------------------

    def node_down(self, node: NodeId, generation: int) -> bool:
        """Drop a dead or departed node's entries; True if it had any (the
        host then spreads the news of its death at once)."""
        self._was_down[node] = generation
        removed = self.state.node_down(node, generation)
        self._emit_changes()
        self.check_settled()
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

    # --- events ---------------------------------------------------------------------

    def _emit_changes(self) -> None:
        changes = self.state.drain_changes()
        if not changes:
            return
        names: set[tuple[str, str]] = set()
        for kind, claim in changes:
            self.host.reg_emit(RegistryEvent(kind, claim.origin, claim.entry))
            if claim.entry.kind is RegKind.NAME:
                names.add((claim.entry.scope, claim.entry.name))
        for scope, name in sorted(names):
            self._resolve_conflicts(scope, name)

    def _resolve_conflicts(self, scope: str, name: str) -> None:
        for conflict in self.state.conflicts_for_local(scope, name):
            loser = conflict.loser
            conn = self._owner_of.get(loser.eid)
            mark = (loser.eid, conflict.winner.origin, conflict.winner.entry.eid)
            if mark in self._notified:
                continue
            self._notified.add(mark)
            self.host.reg_emit(
                RegistryEvent(
                    RegEventKind.CONFLICT,
                    self.host.node_id,
                    loser,
                    conn,
                    (conflict.winner.origin, conflict.winner.entry),
                )
            )
            # The loser's entry goes, so no duplicate outlives the merge; its
            # process was told and can hand over.
            if conn is not None:
                self._remove_local(conn, loser.eid)


@dataclass(slots=True)
class _Staged:
    """A delta being built from consecutive deltas of one origin (newest
    change per entry wins), cheap to extend; encoded only at the flush."""

    origin: NodeId
    generation: int
    base: int
    top: int
    changes: dict[int, RegChange]
    ack: bool

    @classmethod
    def of(cls, delta: RegDelta, ack: bool) -> _Staged:
        return cls(
            delta.origin,
            delta.generation,
            delta.base,
            delta.top,
            {c.eid: c for c in delta.changes},
            ack or delta.ack,
        )

    def extend(self, delta: RegDelta, ack: bool) -> bool:
        if delta.generation != self.generation or delta.base != self.top:
            return False
        changes = self.changes
        for change in delta.changes:
            changes.pop(change.eid, None)  # re-insert: dict order stays by version
            changes[change.eid] = change
        self.top = delta.top
        self.ack = self.ack or ack or delta.ack
        return True

    def delta(self) -> RegDelta:
        return RegDelta(
            self.origin,
            self.generation,
            self.base,
            self.top,
            tuple(sorted(self.changes.values(), key=_version)),
            self.ack,
        )


def _version(change: RegChange) -> int:
    return change.version


def _change_size(change: RegChange) -> int:
    """About the encoded size of ``change`` (an underestimate is caught:
    the caller checks the encoded chunks)."""
    e = change.entry
    if e is None:
        return 16
    return (
        48
        + len(e.scope.encode())
        + len(e.name.encode())
        + sum(len(k.encode()) + len(v.encode()) + 4 for k, v in e.meta)
    )


def merge_deltas(old: RegDelta, new: RegDelta) -> RegDelta:
    """One delta covering both (``old.top == new.base``): the newest change
    per entry wins."""
    latest: dict[int, RegChange] = {}
    for change in (*old.changes, *new.changes):
        latest[change.eid] = change
    changes = tuple(sorted(latest.values(), key=lambda c: c.version))
    return RegDelta(old.origin, old.generation, old.base, new.top, changes, old.ack or new.ack)


def _rows(digest: dict[NodeId, tuple[int, int]]) -> tuple[RegDigestRow, ...]:
    return tuple(RegDigestRow(o, g, v) for o, (g, v) in digest.items())


def entry_to_dict(origin: NodeId, entry: RegEntry) -> dict[str, object]:
    return {
        "kind": "name" if entry.kind is RegKind.NAME else "group",
        "scope": entry.scope,
        "name": entry.name,
        "node": origin.hex(),
        "pid": entry.pid,
        "uid": entry.uid,
        "meta": dict(entry.meta),
        "claimed_ms": entry.claimed_ms,
    }
