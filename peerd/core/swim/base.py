"""The state of a SWIM membership node and the plumbing its concerns share.

Theory of operation: a node is a sans-I/O state machine (docs/DESIGN.md,
"Layers"). Everything it does is an :class:`~peerd.core.events.Output`
appended to one list while it handles one input: datagrams to send, timers to
set (each a token the shell hands back when it fires; a disarmed token is
ignored, so nothing ever has to be cancelled in the shell), events for the
API. The concerns of the protocol (probing, suspicion, dissemination,
anti-entropy, applying news to the members table) are
separate classes in this folder over this one state, composed by
:class:`peerd.core.swim.membership.Node`; :class:`NodeBase` holds the state
they share, built in one place so that the fields and their invariants are
read together, and the few helpers every concern calls.

Identity is the node id; the name and address are attributes. A node seen at a
new address with a higher incarnation has moved. Two live nodes claiming one
name are both kept and the clash is reported (``NAME_CONFLICT``).
"""

from __future__ import annotations

import collections
import functools
import ipaddress
import random
from collections.abc import Callable, Hashable, MutableMapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from peerd.core.broadcast import BroadcastQueue
from peerd.core.config import SwimConfig
from peerd.core.digest import Digest
from peerd.core.events import (
    EventKind,
    Input,
    Log,
    LogLevel,
    MemberEvent,
    MemberInfo,
    MeshDelivered,
    Output,
    SendPacket,
    SetTimer,
)
from peerd.core.swim import formulas
from peerd.core.swim.members import (
    IdRing,
    LiveIds,
    Member,
    ProbeOrder,
    StoreFactory,
    local_tables,
)
from peerd.core.timers import MembershipTimer, Timer
from peerd.wire import codec
from peerd.wire.codec import (
    MAX_TAG_KEY_BYTES,
    MAX_TAG_VALUE_BYTES,
    MAX_TAGS,
)
from peerd.wire.messages import (
    Addr,
    Alive,
    Left,
    MemberState,
    Message,
    NodeId,
    Ping,
    PingReq,
    PushPull,
    Status,
    Suspect,
    Tags,
)

LIVE = (Status.ALIVE, Status.SUSPECT)
# Bound on queued broadcasts: beyond it the most-sent are dropped (push-pull
# repairs what they would have carried).
MAX_QUEUED_BROADCASTS = 20_000
# From this many live nodes on, a suspicion we only heard of is checked by
# us before our own timer declares the suspect dead. A refutation reaches
# every node only with high probability; the chance that one of N nodes
# misses it grows with N, and the one that misses it must not kill a live
# node. (Small clusters: gossip reaches the few nodes many times over.)
LAST_CHECK_MIN_NODES = 32
# Anti-entropy uses digest sync (peerd.core.digest) from this many members
# on: below it a full push-pull is a few KiB and costs no more.
DIGEST_SYNC_MIN_MEMBERS = 128
# Draws for a push-pull partner that we hold alive (see _sync_partner).
SYNC_PARTNER_DRAWS = 3
# A burst of this many deaths or leaves learnt since our last anti-entropy
# exchange brings the next one forward to REPAIR_DELAY_S from then (see
# _repair_soon): the odd crash is left to gossip and the ring, a mass
# failure is repaired within seconds, not after the scaled interval.
REPAIR_BURST = 8
REPAIR_DELAY_S = 3.0
# Largest encoded push-pull state kept for reuse (see Node._state).
STATE_CACHE_MAX_BYTES = 64 * 1024
# A helper's nack goes out at this fraction of the probe timeout (see _on_ping_req).
NACK_AFTER = 0.8
# Delay of the first gossip round after a quiet spell (see _arm_gossip).
FIRST_GOSSIP_DELAY_S = 0.005
# How often dead/left members older than dead_reclaim_s are forgotten.
REAP_INTERVAL_S = 60.0
# Final news goes to this many ring successors (see Node._ring_flush): two,
# so that one crashed successor does not cut the ring while we do not know
# it is dead yet.
RING_SUCCESSORS = 2
# A new ring successor gets the final news we learnt this long ago or less
# (at most RING_RECENT_MAX items): it may have missed them while the old
# successor was dead. The bound must hold a mass failure's deaths: with 512,
# 30% of 2,000 simulated nodes crashing left 91 deaths unknown to some
# survivors 40 s later (the ring's repeat to a new successor lost the oldest
# ones); with 4,096, none. At most 4,096 (time, notice) pairs per node, about
# 0.5 MB of Python objects, and only while a burst is under RING_RECENT_S old.
RING_RECENT_S = 10.0
RING_RECENT_MAX = 4096
# Context of the GOSSIP timer that passes news to the ring successors.
_RING_FLUSH = "ring"


@functools.lru_cache(maxsize=16384)
def addr_problem(addr: Addr) -> str | None:
    """Why ``addr`` cannot be a member's address, or None if it can."""
    try:
        ip = ipaddress.ip_address(addr[0])
    except ValueError:
        return "not an IP address"
    if ip.is_unspecified:
        return "unspecified address"
    if ip.is_multicast:
        return "multicast address"
    if isinstance(ip, ipaddress.IPv4Address) and ip == ipaddress.IPv4Address("255.255.255.255"):
        return "broadcast address"
    if not 0 < addr[1] < 65536:
        return "port out of range"
    return None


def tags_problem(config: SwimConfig, tags: Tags) -> str | None:
    """Why ``tags`` exceed the configured bounds, or None if they fit."""
    limit = min(config.max_tags, MAX_TAGS)
    if len(tags) > limit:
        return f"at most {limit} tags"
    if len({k for k, _ in tags}) != len(tags):
        return "duplicate tag key"
    size = sum(len(k.encode()) + len(v.encode()) for k, v in tags)
    if size > config.max_tags_bytes:
        return f"tags take {size} bytes, at most {config.max_tags_bytes}"
    for k, v in tags:
        if not k:
            return "empty tag key"
        if len(k.encode()) > MAX_TAG_KEY_BYTES:
            return f"tag key longer than {MAX_TAG_KEY_BYTES} bytes"
        if len(v.encode()) > MAX_TAG_VALUE_BYTES:
            return f"tag value longer than {MAX_TAG_VALUE_BYTES} bytes"
    return None


@dataclass(slots=True)
class Probe:
    """The probe of the current protocol period."""

    seq: int
    target: NodeId
    acked: bool = False
    expected_nacks: int = 0
    nacks: int = 0


@dataclass(slots=True)
class Relay:
    """An indirect probe we run for someone else."""

    requester: Addr
    seq: int
    nack: bool


@dataclass(slots=True)
class StreamCtx:
    purpose: str  # "join" | "sync" | "heal" (a reconnect)
    batch: int = 0
    peer_addr: Addr | None = None  # join/sync: where the push-pull went
    digest_bits: int | None = None  # sync: a digest sync with this many bucket bits
    rows: bool = False  # digest sync: the second step (rows of differing buckets)
    retry: bool = False  # sync: the second try of a push-pull tick (see _sync_failed)


@dataclass(slots=True)
class JoinBatch:
    pending: int
    ok: int = 0
    failed: int = 0


# Where the news being handled came from (TreeState.ctx; see
# peerd.core.swim.treecast).
OWN = 0  # our own: a command, a timer (a death we declared on our suspicion)
TREE = 1  # a tree broadcast
PACKET = 2  # a datagram from a peer: off the tree
STREAM = 3  # a push-pull or digest sync with a peer: off the tree
JOIN = 4  # the reply to our own join: the contact's view, news to nobody else
VERDICT = 5  # a death we declared on another's suspicion (its origin tells)


@dataclass(slots=True)
class TreeState:
    """Per node: whether news goes by the tree now, and what waits for it."""

    mesh: bool = False  # the Peer runs a mesh next to us (and it is enabled)
    on: bool = False  # enabled and the mesh has neighbours
    ctx: int = OWN
    batch: dict[NodeId, tuple[bytes, Hashable]] = field(default_factory=dict)
    batch_bytes: int = 0
    flush_armed: bool = False
    # heard off the tree, waiting for the tree: subject -> (message, ident, due)
    pending: dict[NodeId, tuple[Message, Hashable, float]] = field(default_factory=dict)
    relay_armed: bool = False
    desk_due: float = 0.0  # a desk's hold ends (see treecast)
    sweep_until: float = 0.0  # a burst of deaths: sweep pings until then
    desk_quiet: float = 0.0  # ... or no death came to the desk till then


@dataclass(slots=True)
class _Timers:
    next_token: int = 0
    live: dict[int, MembershipTimer] = field(default_factory=dict)


class NodeBase:
    """The state of one membership node and the plumbing every concern uses
    (outputs, timers, sequence numbers). See the module docs."""

    def __init__(
        self,
        *,
        node_id: NodeId,
        name: str,
        addr: Addr,
        config: SwimConfig,
        rng: random.Random,
        incarnation: int = 0,
        generation: int = 0,
        tags: Tags = (),
        store: StoreFactory | None = None,
    ) -> None:
        self.config = config
        self.rng = rng
        self.counters: collections.Counter[str] = collections.Counter()
        self._me = Member(node_id, name, addr, incarnation, generation, tags, Status.ALIVE, 0.0)
        # The members store (see peerd.core.swim.members), bound to our own
        # attributes: the hot paths read them without an indirection.
        tables = (store or local_tables)(self._me, rng)
        self._members: MutableMapping[NodeId, Member] = tables.members
        # Reads that never change the record (an address, a generation): a
        # store that shares records (the simulator's) answers these without a
        # copy-on-write copy. For members known to be there.
        self._peek: Callable[[NodeId], Member] = tables.peek
        # Bucket hashes of the membership (digest sync), kept up to date by
        # toggling a member's hash out before each change and in after it.
        self._digest: Digest = tables.digest
        self._live: LiveIds = tables.live  # live members other than us
        self._ring: IdRing = tables.ring  # live ids, us included
        self._watching: tuple[Addr, ...] = ()
        self._ring_dirty = tables.preloaded
        self._by_addr: MutableMapping[Addr, NodeId] = tables.by_addr
        self._by_name: MutableMapping[str, NodeId] = tables.by_name
        # First NODE_PREFIX_BYTES of each known id -> the id, or AMBIGUOUS when
        # two known ids share them (sticky): resolves DiedRef.
        self._by_prefix: MutableMapping[bytes, NodeId] = tables.by_prefix
        self._recently_dead: dict[NodeId, float] = {}  # gossip-to-dead window
        # DEAD (not left) members, which partition healing retries. A dict, not
        # a set: iteration order must not depend on the hash seed, or the same
        # seed would give different runs.
        self._dead: dict[NodeId, None] = {}
        # Superseded rows waiting to be forgotten (id -> GhostReap token), and
        # forgotten or refused ids (id -> (generation, incarnation), until):
        # see ghosts.py.
        self._ghost_timers: dict[NodeId, int] = {}
        self._tombstones: dict[NodeId, tuple[tuple[int, int], float]] = {}
        self._probe_order: ProbeOrder = tables.probe_order
        self._probe_index = 0
        self._probe: Probe | None = None
        self._relays: dict[int, Relay] = {}
        self._checks: dict[int, NodeId] = {}  # seq -> suspect we ping to confirm
        self._seq = 0
        self._health = 0
        self._queue = BroadcastQueue()
        # Deaths and leaves we learnt and have not yet passed to our ring
        # successors, each with the member it came from (see _ring_flush);
        # the ones of the last RING_RECENT_S, for a new successor; and the
        # successors that are owed those.
        self._ring_owed: list[tuple[bytes, NodeId | None]] = []
        self._ring_recent: collections.deque[tuple[float, bytes]] = collections.deque()
        self._successors: tuple[NodeId, ...] = ()
        self._ring_new: set[NodeId] = set()
        self._ring_armed = False
        self._timers = _Timers()
        self._gossip_armed = False
        self._streams: dict[int, StreamCtx] = {}
        self._next_stream = 0
        self._batches: dict[int, JoinBatch] = {}
        self._seeds: tuple[Addr, ...] = ()
        self._leaving = False
        self._started = False
        # started from preload() or a preloaded store: no join announcement
        self._preloaded = tables.preloaded
        self._state_cache: tuple[Hashable, bytes] | None = None
        # the armed push-pull timer and when it fires; deaths learnt since
        # the last exchange (see AntiEntropy._repair_soon)
        self._push_pull_token = 0
        self._push_pull_at = 0.0
        self._deaths_since_sync = 0
        self._alone_rounds = 0
        self._out: list[Output] = []
        self._now = 0.0
        self._tc = TreeState()  # membership news over the mesh's tree
        # Report the news the registry follows (peerd.core.events, "membership
        # and the registry"): set by a peer that runs a registry beside us.
        self.news = False
        # Where to go on after news that pauses (see Resume), and the flag a
        # concern raises to pause the packet it is in.
        self._resume: Callable[[], None] | None = None
        self._pausing = False

    def _log(self, level: LogLevel, message: str) -> None:
        self._out.append(Log(level, message))

    def _drop(self, reason: str, detail: str = "") -> None:
        self.counters[f"drop.{reason}"] += 1
        self._log(LogLevel.DEBUG, f"drop reason={reason} {detail}".rstrip())

    def _arm(self, make: Callable[..., MembershipTimer], delay: float, *context: Any) -> int:
        """Arm the timer ``make(token, *context)`` (a type of
        :mod:`peerd.core.timers`) to fire in ``delay`` s; returns its token."""
        self._timers.next_token += 1
        token = self._timers.next_token
        timer = make(token, *context)
        self._timers.live[token] = timer
        self._out.append(SetTimer(self._now + delay, timer))
        return token

    def _disarm(self, token: int) -> None:
        self._timers.live.pop(token, None)

    def _event(
        self, kind: EventKind, m: Member, other: Member | None = None, revived: bool = False
    ) -> None:
        self._out.append(MemberEvent(kind, m.info(), other.info() if other else None, revived))

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def _send(
        self, dst: Addr, first: Message | None = None, before: tuple[bytes, ...] = ()
    ) -> None:
        """Send ``before`` then ``first`` (if any) plus piggybacked broadcasts
        in one datagram."""
        parts: list[bytes] = list(before)
        if first is not None:
            parts.append(codec.encode(first))
        used = sum(len(p) for p in parts) + 3
        limit = formulas.retransmit_limit(self.config.retransmit_mult, self.live_count())
        parts.extend(
            self._queue.take(
                self.config.max_packet_bytes - used,
                limit,
                skip=frozenset(before) if before else None,
            )
        )
        if not parts:
            return
        data = codec.pack(parts)
        self.counters["packets_out"] += 1
        self.counters["bytes_out"] += len(data)
        self._out.append(SendPacket(dst, data))

    if TYPE_CHECKING:
        # The methods of the concerns (mixins) that NodeBase composes into
        # peerd.core.swim.membership.Node, declared for the type checker so
        # that each concern can call the others.

        @property
        def node_id(self) -> NodeId: ...

        @property
        def incarnation(self) -> int: ...

        @property
        def health_score(self) -> int: ...

        def local_member(self) -> MemberInfo: ...

        def members(self) -> list[MemberInfo]: ...

        def member(self, node: NodeId) -> MemberInfo | None: ...

        def live_count(self) -> int: ...

        def peer_addrs(self) -> list[Addr]: ...

        def queued_broadcasts(self) -> int: ...

        def preload(self, states: list[MemberState]) -> None: ...

        def handle(self, now: float, inp: Input) -> list[Output]: ...

        def _set_live(self, node: NodeId, live: bool) -> None: ...

        def _update_watch(self) -> None: ...

        def _broadcast(self, key: NodeId, msg: Message, ident: Hashable = None) -> None: ...

        def _arm_gossip(self) -> None: ...

        def _alive_msg(self) -> Alive: ...

        def _on_start(self, seeds: tuple[Addr, ...]) -> None: ...

        def _start_join(self, addrs: tuple[Addr, ...]) -> None: ...

        def _on_set_tags(self, tags: Tags) -> None: ...

        def _on_leave(self) -> None: ...

        def _bump_incarnation(self, value: int) -> None: ...

        def _on_timer(self, timer: Timer) -> None: ...

        def _adjust_health(self, delta: int) -> None: ...

        def _finish_probe(self) -> None: ...

        def _next_target(self) -> Member | None: ...

        def _probe_tick(self) -> None: ...

        def _send_ping(self, target: Member, seq: int) -> None: ...

        def _probe_timeout(self, seq: object) -> None: ...

        def _on_ack(self, src: Addr, seq: int) -> None: ...

        def _on_nack(self, seq: int) -> None: ...

        def _on_ping(self, src: Addr, msg: Ping) -> None: ...

        def _on_ping_req(self, src: Addr, msg: PingReq) -> None: ...

        def _relay_timeout(self, seq: object) -> None: ...

        def _on_unreachable(self, addr: Addr) -> None: ...

        def _gossip_targets(self) -> list[Member]: ...

        def _set_successors(self, succ: tuple[NodeId, ...]) -> None: ...

        def _arm_ring_flush(self) -> None: ...

        def _ring_flush(self) -> None: ...

        def _gossip_round(self) -> None: ...

        def _send_direct(self, parts: tuple[bytes, ...], counter: str | None) -> None: ...

        def _on_alive(self, msg: Alive) -> None: ...

        def _add_member(self, msg: Alive) -> None: ...

        def _index_name(self, m: Member) -> None: ...

        def _insert_probe_order(self, node: NodeId) -> None: ...

        def _alive_about_me(self, msg: Alive) -> None: ...

        def _refute(self, accused_incarnation: int) -> None: ...

        def _set_status(self, m: Member, status: Status) -> None: ...

        def _set_incarnation(self, m: Member, incarnation: int) -> None: ...

        def _dig(self, m: Member) -> None: ...

        def _suspect(
            self,
            m: Member,
            incarnation: int,
            sender: NodeId,
            cap: float | None = None,
            gossip: bool = True,
        ) -> None: ...

        def _confirm(self, m: Member, sender: NodeId) -> None: ...

        def _rearm_suspicion(self, m: Member) -> None: ...

        def _clear_suspicion(self, m: Member) -> None: ...

        def _suspicion_expired(self, ctx: object) -> None: ...

        def _mark_down(self, m: Member, status: Status, incarnation: int) -> None: ...

        def _stale_accusation(self, m: Member, src: Addr | None = None) -> None: ...

        def _on_suspect(self, msg: Suspect, src: Addr | None = None) -> None: ...

        def _maybe_check(self, m: Member) -> None: ...

        def _start_check(self, m: Member) -> None: ...

        def _check_timeout(self, seq: object) -> None: ...

        def _on_dead(self, node: NodeId, incarnation: int, src: Addr | None = None) -> None: ...

        def _broadcast_death(
            self, node: NodeId, incarnation: int, src: Addr | None = None
        ) -> None: ...

        def _owe_ring(self, node: NodeId, src: Addr | None) -> None: ...

        def _heard_again(self, node: NodeId, ident: Hashable) -> None: ...

        def _on_left(self, msg: Left, src: Addr | None = None) -> None: ...

        def _on_packet(self, src: Addr, data: bytes) -> None: ...

        def _dispatch(self, src: Addr, msg: Message) -> None: ...

        def _state(self, join: bool) -> bytes: ...

        def _open_push_pull(self, addr: Addr, ctx: StreamCtx, join: bool) -> None: ...

        def _open_stream(self, addr: Addr, ctx: StreamCtx, data: bytes) -> None: ...

        def _live_node_at(self, addr: Addr) -> NodeId | None: ...

        def _tree_takes(self, key: NodeId, msg: Message, ident: Hashable) -> bool: ...

        def _tree_flush(self, force: bool = False) -> None: ...

        def _tree_relay(self) -> None: ...

        def _tree_sweep_soon(self) -> None: ...

        def _tree_connected(self, connected: bool) -> None: ...

        def _on_tree_delivered(self, inp: MeshDelivered) -> None: ...

        def _copy_in(self, node: NodeId) -> tuple[int, Status] | bool: ...

        def _copy_done(self, node: NodeId, before: tuple[int, Status] | bool) -> None: ...

        def _push_pull_tick(self) -> None: ...

        def _arm_push_pull(self, delay: float) -> None: ...

        def _repair_soon(self) -> None: ...

        def _reconnect_tick(self) -> None: ...

        def _open_sync(self, addr: Addr, purpose: str = "sync", retry: bool = False) -> None: ...

        def _rows(self, bits: int, buckets: tuple[int, ...]) -> tuple[MemberState, ...]: ...

        def _on_digest_reply(self, ctx: StreamCtx, data: bytes) -> None: ...

        def _on_stream_request(self, stream: int, src: Addr, data: bytes) -> None: ...

        def _on_stream_response(self, stream: int, data: bytes) -> None: ...

        def _synced_with(self, ctx: StreamCtx) -> None: ...

        def _on_stream_failed(self, stream: int, reason: str) -> None: ...

        def _stream_done(self, ctx: StreamCtx, ok: bool) -> None: ...

        def _merge(self, msg: PushPull) -> None: ...

        def _index_prefix(self, node: NodeId) -> None: ...

        def _reap(self) -> None: ...

        def _ghost_check(self, m: Member) -> None: ...

        def _forget(self, m: Member) -> None: ...

        def _bury(self, node: NodeId, generation: int, incarnation: int) -> None: ...

        def _buried(self, node: NodeId, generation: int, incarnation: int) -> bool: ...


def _fmt(addr: Addr) -> str:
    host, port = addr
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
