"""The membership node: SWIM failure detection with the Lifeguard refinements.

Theory of operation (SWIM: Das, Gupta, Motivala 2002; Lifeguard: Dadgar,
Phillips, Currey 2018):

* **Probing** (SWIM 4.3). Every protocol period a node pings the next member in
  a shuffled round-robin order, so every member is probed within a bounded
  time. No ack within ``probe_timeout`` starts an indirect probe: ``k`` random
  helpers ping the target for us and forward its ack. No ack by the end of the
  period makes the target *suspect*.
* **Suspicion** (SWIM 4.2). A suspect is declared dead only after a timeout,
  which gives it time to hear the suspicion and *refute* it by gossiping an
  ``Alive`` with a higher incarnation number. Only the node itself ever raises
  its incarnation, so a refutation always beats the suspicion it answers.
* **Dissemination** (SWIM 4.1). Updates are piggybacked on pings and acks and
  gossiped to a few random peers every gossip interval, each a bounded number
  of times (see :mod:`peerd.core.broadcast`). Final news (a death, a leave)
  also goes once to the next two ring successors by id (RingCast), so every
  live node hears it from a predecessor; that lets its random gossip stop
  early, counting copies heard again from peers as transmissions (Demers'
  counter variant). A closed-port suspicion is not gossiped at all: only the
  suspect hears of it, and the cluster only of the death.
* **Lifeguard** (2018). *Local health*: a node that misses acks, misses nacks
  from its helpers, or has to refute suspicions about itself raises a health
  score that stretches its own probe interval and timeouts, because the likely
  culprit is its own slowness (IV-A). *Dogpile*: a suspicion timer starts long
  and shrinks with every independent confirmation (IV-B). *Buddy*: a ping to a
  suspect carries the suspicion, so a live suspect refutes at once (IV-C).
* **Anti-entropy**. Push-pull full-state exchanges over a stream, on join and
  periodically with a random member, repair whatever gossip missed.
* **Partition healing**. Dead members and the configured seeds are retried with
  a push-pull every ``reconnect_interval``: after a split, each side has the
  other as dead; when the link returns, one exchange makes each side learn it
  was declared dead, refute, and the halves merge.
* **Closed-port hints**. When the OS reports that a datagram to a member hit a
  closed port, the member is suspected with a short timer and pinged with the
  suspicion attached: a live node refutes within a round trip, a crashed
  daemon is declared dead quickly. A hint alone never kills: it only starts a
  suspicion the node can answer.

Identity is the node id; the name and address are attributes. A node seen at a
new address with a higher incarnation has moved. Two live nodes claiming one
name are both kept and the clash is reported (``NAME_CONFLICT``).
"""

from __future__ import annotations

import collections
import functools
import ipaddress
import itertools
import random
from collections.abc import Callable, Hashable, MutableMapping
from dataclasses import dataclass, field

from peerd.core import digest as digestmod
from peerd.core.broadcast import BroadcastQueue
from peerd.core.config import SwimConfig
from peerd.core.digest import Digest
from peerd.core.events import (
    ConnClosed,
    EventKind,
    IncarnationChanged,
    Input,
    Join,
    JoinDone,
    Leave,
    LeaveDone,
    LinkClosed,
    Log,
    LogLevel,
    MemberEvent,
    MemberInfo,
    MeshCast,
    MeshConnected,
    MeshDelivered,
    OpenStream,
    Output,
    PacketIn,
    Register,
    SendPacket,
    SetTags,
    SetTimer,
    Start,
    StreamFailed,
    StreamReply,
    StreamRequest,
    StreamResponse,
    Timer,
    TimerFired,
    TimerKind,
    Unreachable,
    Unregister,
    UpdateMeta,
    WatchLinks,
)
from peerd.core.registry.service import DIRECT_MAX, MESH_CHANNEL, RegistryService
from peerd.core.swim import formulas
from peerd.core.swim.members import (
    AMBIGUOUS,
    IdRing,
    LiveIds,
    Member,
    ProbeOrder,
    StoreFactory,
    Suspicion,
    local_tables,
)
from peerd.wire import codec
from peerd.wire.codec import (
    MAX_TAG_KEY_BYTES,
    MAX_TAG_VALUE_BYTES,
    MAX_TAGS,
    MAX_U64,
    DecodeError,
)
from peerd.wire.messages import (
    NODE_PREFIX_BYTES,
    Ack,
    Addr,
    Alive,
    Dead,
    Died,
    DiedRef,
    KeyReply,
    KeyRequest,
    Left,
    MemberState,
    Message,
    Nack,
    NodeId,
    Ping,
    PingReq,
    PushPull,
    RegAck,
    RegDelta,
    RegSnapshot,
    RegSync,
    Status,
    Suspect,
    SyncDigest,
    SyncRows,
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
    purpose: str  # "join" | "sync" | "reg" (registry sync) | "reg_push"
    batch: int = 0
    peer: NodeId | None = None  # reg: the member we sync with
    peer_addr: Addr | None = None  # join/sync: where the push-pull went
    digest_bits: int | None = None  # sync: a digest sync with this many bucket bits
    rows: bool = False  # digest sync: the second step (rows of differing buckets)


@dataclass(slots=True)
class JoinBatch:
    pending: int
    ok: int = 0
    failed: int = 0


@dataclass(slots=True)
class _Timers:
    next_token: int = 0
    live: dict[int, tuple[TimerKind, Hashable]] = field(default_factory=dict)


class Node:
    """One peerd node's membership state machine. See the module docs."""

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
        self._alone_rounds = 0
        self._out: list[Output] = []
        self._now = 0.0
        self._reg_flush_armed = False
        self.registry = RegistryService(self, generation)

    # --- public read side ----------------------------------------------------

    @property
    def node_id(self) -> NodeId:
        return self._me.node

    @property
    def incarnation(self) -> int:
        return self._me.incarnation

    @property
    def health_score(self) -> int:
        return self._health

    def local_member(self) -> MemberInfo:
        return self._me.info()

    def members(self) -> list[MemberInfo]:
        return [m.info() for m in self._members.values()]

    def member(self, node: NodeId) -> MemberInfo | None:
        m = self._members.get(node)
        return m.info() if m else None

    def live_count(self) -> int:
        """Live members including this node (the N of the formulas)."""
        return len(self._live) + 1

    def peer_addrs(self) -> list[Addr]:
        return [self._peek(n).addr for n in self._live]

    def queued_broadcasts(self) -> int:
        return len(self._queue)

    def preload(self, states: list[MemberState]) -> None:
        """Know these members before :class:`Start`, silently: no events, no
        gossip. For simulations that begin from a converged cluster (a real
        daemon learns its peers by joining)."""
        order = [self._probe_order[i] for i in range(len(self._probe_order))]
        for st in states:
            if st.node == self._me.node or st.node in self._members:
                continue
            m = Member(
                st.node,
                st.name,
                st.addr,
                st.incarnation,
                st.generation,
                st.tags,
                st.status,
                self._now,
            )
            self._members[m.node] = m
            self._dig(m)
            self._index_prefix(m.node)
            self._by_addr[m.addr] = m.node
            self._by_name.setdefault(m.name, m.node)
            if st.status in LIVE:
                self._set_live(m.node, True)
                order.append(m.node)
            elif st.status is Status.DEAD:
                self._dead[m.node] = None
        self.rng.shuffle(order)
        self._probe_order = order
        self._preloaded = True

    # --- the one entry point -------------------------------------------------

    def handle(self, now: float, inp: Input) -> list[Output]:
        """Feed one input; returns what to do. Bad input is counted, never raised."""
        self._now = now
        out: list[Output] = []
        self._out = out
        match inp:
            case PacketIn(src, data):
                self._on_packet(src, data)
            case TimerFired(timer):
                self._on_timer(timer)
            case Unreachable(addr):
                self._on_unreachable(addr)
            case LinkClosed(addr):
                self.counters["link_closed_hints"] += 1
                self._on_unreachable(addr)
            case StreamRequest(stream, src, data):
                self._on_stream_request(stream, src, data)
            case StreamResponse(stream, data):
                self._on_stream_response(stream, data)
            case StreamFailed(stream, reason):
                self._on_stream_failed(stream, reason)
            case Start(seeds):
                self._on_start(seeds)
                self.registry.on_start()
            case Join(addrs):
                self._start_join(addrs)
            case SetTags(tags):
                self._on_set_tags(tags)
            case Leave():
                self._on_leave()
            case Register() | Unregister() | UpdateMeta() | ConnClosed():
                self.registry.command(inp)
            case MeshDelivered():
                self._on_mesh_delivered(inp)
            case MeshConnected(connected):
                self._on_mesh_connected(connected)
        if self._ring_dirty:
            self._update_watch()
        self._out = []
        return out

    def _set_live(self, node: NodeId, live: bool) -> None:
        if live:
            if node not in self._live:
                self._live.add(node)
                self._ring.add(node)
                self._ring_dirty = True
                self._arm_gossip()
                if self.registry.staged:
                    self.reg_flush_soon()
        elif node in self._live:
            self._live.discard(node)
            self._ring.remove(node)
            self._ring_dirty = True

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

    # --- plumbing ------------------------------------------------------------

    def _log(self, level: LogLevel, message: str) -> None:
        self._out.append(Log(level, message))

    def _drop(self, reason: str, detail: str = "") -> None:
        self.counters[f"drop.{reason}"] += 1
        self._log(LogLevel.DEBUG, f"drop reason={reason} {detail}".rstrip())

    def _arm(self, kind: TimerKind, delay: float, ctx: Hashable = None) -> int:
        self._timers.next_token += 1
        token = self._timers.next_token
        self._timers.live[token] = (kind, ctx)
        self._out.append(SetTimer(self._now + delay, Timer(kind, token)))
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

    def _broadcast(self, key: NodeId, msg: Message, ident: Hashable = None) -> None:
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
        self._arm(TimerKind.GOSSIP, min(FIRST_GOSSIP_DELAY_S, self.config.gossip_interval_s))

    def _alive_msg(self) -> Alive:
        me = self._me
        return Alive(me.node, me.name, me.addr, me.incarnation, me.generation, me.tags)

    # --- start, join, leave, tags ------------------------------------------

    def _on_start(self, seeds: tuple[Addr, ...]) -> None:
        if self._started:
            return
        self._started = True
        self._seeds = tuple(s for s in seeds if s != self._me.addr)
        self._out.append(IncarnationChanged(self._me.incarnation))
        cfg = self.config
        if not self._preloaded:
            self._broadcast(self._me.node, self._alive_msg())
        # Spread first probes of a fleet started together over one interval.
        self._arm(TimerKind.PROBE, self.rng.uniform(0, cfg.probe_interval_s))
        if cfg.push_pull_interval_s > 0 and self._preloaded:
            # Preloaded (a simulation starting converged): as if running for
            # long already, each node at a random phase of the interval.
            interval = formulas.push_pull_scale(cfg.push_pull_interval_s, self.live_count())
            self._arm(TimerKind.PUSH_PULL, self.rng.uniform(0.0, 1.0) * interval)
        elif cfg.push_pull_interval_s > 0:
            # An early first sync repairs what a join's gossip missed (nodes
            # that joined at the same moment), then the regular interval.
            first = min(cfg.push_pull_interval_s, 5 * cfg.probe_interval_s)
            self._arm(TimerKind.PUSH_PULL, self.rng.uniform(0.5, 1.0) * first)
        self._arm(TimerKind.RECONNECT, min(cfg.probe_interval_s, cfg.reconnect_interval_s))
        self._arm(TimerKind.REAP, REAP_INTERVAL_S)
        self._start_join(self._seeds)

    def _start_join(self, addrs: tuple[Addr, ...]) -> None:
        targets = [a for a in dict.fromkeys(addrs) if a != self._me.addr]
        if not targets:
            self._out.append(JoinDone(0, 0))
            return
        batch = len(self._batches) + 1
        while batch in self._batches:
            batch += 1
        self._batches[batch] = JoinBatch(pending=len(targets))
        for addr in targets:
            self._open_push_pull(addr, StreamCtx("join", batch), join=True)

    def _on_set_tags(self, tags: Tags) -> None:
        problem = tags_problem(self.config, tags)
        if problem:
            self._drop("bad_tags", problem)
            return
        tags = tuple(sorted(tags))  # canonical, as it comes back from the wire
        if tags == self._me.tags or self._leaving:
            return
        if self._me.incarnation >= MAX_U64:
            self._drop("incarnation_exhausted")
            return
        self._me.tags = tags
        self._bump_incarnation(self._me.incarnation + 1)
        self._broadcast(self._me.node, self._alive_msg())
        self._event(EventKind.UPDATED, self._me)

    def _on_leave(self) -> None:
        if self._leaving:
            return
        self._leaving = True
        self._bump_incarnation(min(self._me.incarnation + 1, MAX_U64))
        self._set_status(self._me, Status.LEFT)
        msg = Left(self._me.node, self._me.incarnation)
        self._broadcast(self._me.node, msg)
        self._event(EventKind.LEFT, self._me)
        self._ring_dirty = True
        # Don't wait for the next gossip tick: a leave is usually followed by
        # the process exiting, and the sooner peers hear it the better.
        self._gossip_round()
        self._arm(TimerKind.LEAVE, self.config.leave_propagate_s)

    def _bump_incarnation(self, value: int) -> None:
        self._dig(self._me)
        self._me.incarnation = value
        self._dig(self._me)
        self._out.append(IncarnationChanged(value))

    # --- timers ----------------------------------------------------------------

    def _on_timer(self, timer: Timer) -> None:
        armed = self._timers.live.get(timer.token)
        if armed is None or armed[0] is not timer.kind:
            return  # superseded (or not ours)
        del self._timers.live[timer.token]
        ctx = armed[1]
        match timer.kind:
            case TimerKind.PROBE:
                self._probe_tick()
            case TimerKind.PROBE_TIMEOUT:
                self._probe_timeout(ctx)
            case TimerKind.INDIRECT_TIMEOUT:
                self._relay_timeout(ctx)
            case TimerKind.SUSPICION:
                self._suspicion_expired(ctx)
            case TimerKind.CONFIRM_TIMEOUT:
                self._check_timeout(ctx)
            case TimerKind.GOSSIP if ctx == _RING_FLUSH:
                self._ring_flush()
            case TimerKind.GOSSIP:
                self._gossip_armed = False
                self._send_direct(self.registry.flush())
                self._gossip_round()
                if len(self._queue) and (len(self._live) or self._recently_dead):
                    self._gossip_armed = True
                    self._arm(TimerKind.GOSSIP, self.config.gossip_interval_s)
            case TimerKind.PUSH_PULL:
                self._push_pull_tick()
            case TimerKind.RECONNECT:
                self._reconnect_tick()
            case TimerKind.REAP:
                self._reap()
                self._arm(TimerKind.REAP, REAP_INTERVAL_S)
            case TimerKind.LEAVE:
                self._out.append(LeaveDone())
            case TimerKind.REG_FLUSH:
                own = self.registry.flush()  # still armed: queueing does not re-arm
                self._reg_flush_armed = False
                # Direct first: a gossip packet announcing a long burst must
                # not reach a peer before the burst itself (it would pull).
                self._send_direct(own)
                self._gossip_round()
            case TimerKind.REG_SETTLE:
                assert isinstance(ctx, int)
                self.registry.settle_timeout(ctx)
            case TimerKind.REG_SYNC:
                if not self._leaving:
                    self.registry.sync_tick(ctx)  # type: ignore[arg-type]

    # --- probing -------------------------------------------------------------

    def _adjust_health(self, delta: int) -> None:
        self._health = max(0, min(self.config.awareness_max - 1, self._health + delta))

    def _finish_probe(self) -> None:
        probe = self._probe
        self._probe = None
        if probe is None or probe.acked:
            return
        m = self._members.get(probe.target)
        if m is None or m.status not in LIVE:
            return  # declared down by others meanwhile: not our fault
        # Lifeguard IV-A: missing nacks mean *our* messages or processing are
        # the problem, so they count against our own health.
        if probe.expected_nacks:
            # never below zero: duplicate or stray nacks must not make a
            # failed probe improve our health
            self._adjust_health(max(0, probe.expected_nacks - probe.nacks))
        else:
            self._adjust_health(1)
        self.counters["probe_failures"] += 1
        self._log(LogLevel.INFO, f"probe failed name={m.name} addr={_fmt(m.addr)}")
        self._suspect(m, m.incarnation, self._me.node)

    def _next_target(self) -> Member | None:
        for _ in range(2):
            while self._probe_index < len(self._probe_order):
                node = self._probe_order[self._probe_index]
                self._probe_index += 1
                if node in self._live:
                    return self._peek(node)
            # End of a round: reshuffle (SWIM 4.3 round-robin with random order
            # bounds the time until any member is probed).
            self._probe_order = list(self._live)
            self.rng.shuffle(self._probe_order)
            self._probe_index = 0
        return None

    def _probe_tick(self) -> None:
        self._finish_probe()
        cfg = self.config
        self._arm(TimerKind.PROBE, formulas.scaled(cfg.probe_interval_s, self._health))
        if self._leaving:
            return
        target = self._next_target()
        if target is None:
            return
        self.counters["probes"] += 1
        probe = Probe(self._next_seq(), target.node)
        self._probe = probe
        self._send_ping(target, probe.seq)
        self._arm(
            TimerKind.PROBE_TIMEOUT, formulas.scaled(cfg.probe_timeout_s, self._health), probe.seq
        )

    def _send_ping(self, target: Member, seq: int) -> None:
        before: tuple[bytes, ...] = ()
        if target.status is Status.SUSPECT:
            # Lifeguard buddy system: the suspect hears of it now, not after
            # gossip happens to reach it, and can refute at once. The
            # suspicion goes before the ping so that the refutation it causes
            # is queued in time to ride on the ack.
            before = (codec.encode(Suspect(target.node, target.incarnation, self._me.node)),)
        self._send(target.addr, Ping(seq, target.node), before)

    def _probe_timeout(self, seq: object) -> None:
        probe = self._probe
        if probe is None or probe.seq != seq or probe.acked:
            return
        target = self._members.get(probe.target)
        if target is None or target.status not in LIVE:
            return
        helpers = self._live.sample(self.rng, self.config.indirect_checks, (probe.target,))
        probe.expected_nacks = len(helpers)
        for h in helpers:
            self.counters["indirect_probes"] += 1
            self._send(self._peek(h).addr, PingReq(probe.seq, target.node, target.addr, True))

    def _on_ack(self, src: Addr, seq: int) -> None:
        probe = self._probe
        if probe is not None and probe.seq == seq:
            if not probe.acked:
                probe.acked = True
                self._adjust_health(-1)
            return
        relay = self._relays.pop(seq, None)
        if relay is not None:
            self._send(relay.requester, Ack(relay.seq))
            return
        if self._checks.pop(seq, None) is not None:
            return
        self.counters["drop.stale_ack"] += 1

    def _on_nack(self, seq: int) -> None:
        probe = self._probe
        if probe is not None and probe.seq == seq:
            probe.nacks += 1

    def _on_ping(self, src: Addr, msg: Ping) -> None:
        if msg.target != self._me.node:
            # The address now belongs to someone else (or the sender is
            # confused): acking would vouch for the wrong node.
            self._drop("misdirected_ping", _fmt(src))
            return
        before: tuple[bytes, ...] = ()
        sender = self._peek(self._by_addr.get(src, b""))  # may be None: unknown sender
        if sender is not None and sender.status is Status.DEAD:
            # A node we hold dead is talking to us (a healed partition): tell
            # it, so it refutes and its refutation spreads on both sides.
            before = (codec.encode(Died(sender.node, sender.incarnation)),)
        self._send(src, Ack(msg.seq), before)

    def _on_ping_req(self, src: Addr, msg: PingReq) -> None:
        if msg.target == self._me.node:
            self._send(src, Ack(msg.seq))
            return
        if addr_problem(msg.target_addr):
            self._drop("bad_addr", "ping-req target")
            return
        seq = self._next_seq()
        self._relays[seq] = Relay(src, msg.seq, msg.nack)
        target = self._members.get(msg.target)
        if target is not None and target.status is Status.SUSPECT:
            self._send_ping(target, seq)
        else:
            self._send(msg.target_addr, Ping(seq, msg.target))
        # Our nack must reach the requester before its probe period ends (it
        # sent the ping-req one probe timeout into the period), or Lifeguard
        # would count our answer as missing and blame the requester's health.
        cfg = self.config
        self._arm(
            TimerKind.INDIRECT_TIMEOUT,
            formulas.nack_delay(cfg.probe_timeout_s, cfg.probe_interval_s, NACK_AFTER),
            seq,
        )

    def _relay_timeout(self, seq: object) -> None:
        assert isinstance(seq, int)
        relay = self._relays.pop(seq, None)
        if relay is not None and relay.nack:
            self._send(relay.requester, Nack(relay.seq))

    def _on_unreachable(self, addr: Addr) -> None:
        node = self._by_addr.get(addr)
        if node is None or node == self._me.node:
            return
        m = self._members[node]
        if m.status not in LIVE:
            # No process there to tell that it was declared dead: stop
            # spending gossip packets on it (a restart on this address makes
            # it talk to us, and we tell it then: see _on_ping).
            self._recently_dead.pop(node, None)
            return
        self.counters["unreachable_hints"] += 1
        cap = self.config.refused_suspicion_timeout_s
        if m.status is Status.ALIVE:
            self._log(LogLevel.INFO, f"closed port name={m.name} addr={_fmt(addr)}: suspecting")
            # Not gossiped: the one node that must hear of this suspicion is
            # the suspect, and we ask it directly, carrying the suspicion. If
            # it is alive after all (restarted on the same port) it refutes in
            # one round trip; if not, we declare it dead when the short timer
            # expires, and only that is spread. A burst of crashes then costs
            # the cluster one rumour per death, not two.
            self._suspect(m, m.incarnation, self._me.node, cap=cap, gossip=False)
            self._start_check(m)
        elif m.suspicion is not None and m.suspicion.cap is None:
            m.suspicion.verified = True  # the hint is our own evidence
            m.suspicion.cap = cap
            self._rearm_suspicion(m)

    # --- gossip ----------------------------------------------------------------

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
            self._arm(
                TimerKind.GOSSIP,
                min(FIRST_GOSSIP_DELAY_S, self.config.gossip_interval_s),
                _RING_FLUSH,
            )

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

    def _send_direct(self, own: list[bytes]) -> None:
        """Our own registry changes, straight to every other live peer (in a
        cluster of at most DIRECT_MAX peers; see peerd.core.registry.service).
        The gossip targets too: their packet may have had no room left for
        our item (fresher items, or ones sent fewer times, go first)."""
        if not own or len(self._live) > DIRECT_MAX:
            return
        packets: list[bytes] = []
        batch: list[bytes] = []
        room = self.config.max_packet_bytes - 3
        for part in own:
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
                self.counters["reg_direct_out"] += 1
                self._out.append(SendPacket(addr, data))

    # --- membership updates --------------------------------------------------

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
            self._add_member(msg)
            return
        if msg.incarnation <= m.incarnation:
            return
        old_status, old_addr, old_tags, old_name = m.status, m.addr, m.tags, m.name
        old_gen = m.generation
        if msg.addr != m.addr:
            if self._by_addr.get(m.addr) == m.node:
                del self._by_addr[m.addr]
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
        self.registry.node_up(m.node, m.generation)
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
        self._by_addr[m.addr] = m.node
        self._insert_probe_order(m.node)
        self._index_name(m)
        self.counters["joins"] += 1
        self._event(EventKind.JOINED, m)
        self.registry.node_up(m.node, m.generation)
        self._broadcast(m.node, msg)

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

    def _alive_about_me(self, msg: Alive) -> None:
        me = self._me
        if msg.incarnation < me.incarnation:
            return
        if msg.incarnation == me.incarnation and msg == self._alive_msg():
            return
        if self._leaving:
            return
        # Someone spreads a view of us that is as new as ours but wrong (an
        # old address or tags from before a restart): outbid it.
        self._refute(msg.incarnation)

    def _refute(self, accused_incarnation: int) -> None:
        if max(self._me.incarnation, accused_incarnation) >= MAX_U64:
            # Nobody can outbid this accusation (only a broken or hostile peer
            # gets here): keep our incarnation rather than overflow the wire.
            self._drop("incarnation_exhausted")
            return
        self.counters["refutations"] += 1
        self._adjust_health(1)
        self._bump_incarnation(max(self._me.incarnation, accused_incarnation) + 1)
        self._log(LogLevel.INFO, f"refuting incarnation={self._me.incarnation}")
        self._broadcast(self._me.node, self._alive_msg())

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

    def _suspect(
        self,
        m: Member,
        incarnation: int,
        sender: NodeId,
        cap: float | None = None,
        gossip: bool = True,
    ) -> None:
        """Start (or confirm) a suspicion of ``m`` at ``incarnation``;
        ``gossip=False`` keeps a new suspicion to ourselves."""
        if m.suspicion is not None:
            self._confirm(m, sender)
            return
        cfg = self.config
        n = self.live_count()
        low, high = formulas.suspicion_bounds(
            cfg.suspicion_mult, cfg.suspicion_max_timeout_mult, n, cfg.probe_interval_s
        )
        k = formulas.expected_confirmations(cfg.suspicion_mult, n)
        self.counters["suspicions"] += 1
        self._set_status(m, Status.SUSPECT)
        self._set_incarnation(m, incarnation)
        susp = Suspicion(
            incarnation,
            sender,
            self._now,
            low,
            high,
            k,
            set(),
            0,
            0.0,
            cap,
            verified=sender == self._me.node,
        )
        m.suspicion = susp
        self._rearm_suspicion(m)
        self._event(EventKind.SUSPECT, m)
        if gossip:
            self._broadcast(m.node, Suspect(m.node, incarnation, sender))

    def _confirm(self, m: Member, sender: NodeId) -> None:
        susp = m.suspicion
        assert susp is not None
        if sender == self._me.node:
            susp.verified = True
        if sender == susp.origin or sender in susp.confirmers:
            return
        if len(susp.confirmers) >= susp.k:
            return
        susp.confirmers.add(sender)
        self.counters["confirmations"] += 1
        self._rearm_suspicion(m)
        # Pass the confirmation on: others' timers shrink too (dogpile).
        self._broadcast(m.node, Suspect(m.node, susp.incarnation, sender))

    def _rearm_suspicion(self, m: Member) -> None:
        susp = m.suspicion
        assert susp is not None
        timeout = formulas.suspicion_timeout(susp.low, susp.high, susp.k, len(susp.confirmers))
        deadline = susp.started + timeout
        if susp.cap is not None:
            deadline = min(deadline, self._now + susp.cap)
        if susp.token and deadline >= susp.deadline:
            return
        if susp.token:
            self._disarm(susp.token)
        susp.deadline = deadline
        susp.token = self._arm(
            TimerKind.SUSPICION, max(0.0, deadline - self._now), (m.node, susp.incarnation)
        )

    def _clear_suspicion(self, m: Member) -> None:
        if m.suspicion is not None:
            self._disarm(m.suspicion.token)
            m.suspicion = None

    def _suspicion_expired(self, ctx: object) -> None:
        assert isinstance(ctx, tuple)
        node, incarnation = ctx
        m = self._members.get(node)
        if m is None or m.status is not Status.SUSPECT or m.incarnation != incarnation:
            return
        susp = m.suspicion
        if (
            susp is not None
            and not susp.verified
            and not self._leaving
            and self.live_count() >= LAST_CHECK_MIN_NODES
        ):
            # Heard of, never seen: ask the suspect once (the ping carries the
            # suspicion, so a live one refutes), then decide.
            susp.verified = True
            self.counters["suspicion_last_checks"] += 1
            self._start_check(m)
            wait = formulas.scaled(self.config.probe_timeout_s, self._health)
            susp.deadline = self._now + wait
            susp.token = self._arm(TimerKind.SUSPICION, wait, (m.node, susp.incarnation))
            return
        m.suspicion = None
        self._log(LogLevel.INFO, f"suspicion expired name={m.name}: declaring dead")
        had_entries = self._mark_down(m, Status.DEAD, incarnation)
        self._broadcast_death(m.node, incarnation)
        if had_entries and len(self._live) <= DIRECT_MAX:
            # Its registry entries must vanish everywhere at once, not when
            # the epidemic has reached the last node: tell every peer now.
            data = codec.pack([codec.encode(Died(m.node, incarnation))])
            for node in self._live:
                self.counters["packets_out"] += 1
                self.counters["bytes_out"] += len(data)
                self._out.append(SendPacket(self._peek(node).addr, data))

    def _mark_down(self, m: Member, status: Status, incarnation: int) -> bool:
        """Returns whether the node held registry entries (now dropped)."""
        self._clear_suspicion(m)
        self._set_incarnation(m, incarnation)
        self._set_status(m, status)
        self._set_live(m.node, False)
        had_entries = self.registry.node_down(m.node, m.generation)
        if had_entries:
            # Applications wait on this: spread the death at once (the
            # broadcast is queued right after), not at the next gossip tick.
            self.reg_flush_soon()
        self._recently_dead[m.node] = self._now
        if status is Status.DEAD:
            self._dead[m.node] = None
        else:
            self._dead.pop(m.node, None)
        self.counters["dead" if status is Status.DEAD else "left"] += 1
        self._event(EventKind.DEAD if status is Status.DEAD else EventKind.LEFT, m)
        return had_entries

    def _stale_accusation(self, m: Member, src: Addr | None = None) -> None:
        # Someone still holds an older view of us (they missed our
        # refutation, e.g. across a healed partition): spread our current
        # Alive again, without a bump, unless it is queued already.
        if m is self._me:
            if not self._leaving and not self._queue.has(("m", m.node)):
                self.counters["stale_accusations"] += 1
                self._broadcast(m.node, self._alive_msg())
            return
        if src is not None and m.status is Status.ALIVE and not self._queue.has(("m", m.node)):
            # A peer still relays an accusation that was refuted: some nodes
            # missed the refutation (gossip reaches everyone only with high
            # probability), and their own suspicion timers would declare a
            # live node dead. Queue the refutation once more, without arming
            # gossip: it rides on the probe traffic we send anyway (no extra
            # packet), and whoever learns from it gossips it on. This stops by
            # itself: the stale rumour runs out of retransmissions.
            self.counters["stale_rebroadcasts"] += 1
            self._queue.enqueue(
                ("m", m.node),
                codec.encode(Alive(m.node, m.name, m.addr, m.incarnation, m.generation, m.tags)),
            )

    def _on_suspect(self, msg: Suspect, src: Addr | None = None) -> None:
        m = self._members.get(msg.node)
        if m is None:
            return
        if msg.incarnation < m.incarnation:
            self._stale_accusation(m, src)
            return
        if m.status not in LIVE:
            return
        if m is self._me:
            if not self._leaving:
                self._refute(msg.incarnation)
            return
        if m.suspicion is not None and msg.incarnation > m.suspicion.incarnation:
            # A suspicion of a newer life supersedes ours: start over at its
            # incarnation (a refutation of the old one must not clear it).
            self._clear_suspicion(m)
            m.status = Status.ALIVE
        fresh = m.suspicion is None
        self._suspect(m, msg.incarnation, msg.sender)
        if fresh:
            self._maybe_check(m)

    def _maybe_check(self, m: Member) -> None:
        """Check a freshly suspected member ourselves, with a probability that
        gives about 2K checkers cluster-wide whatever N is: their failed pings
        are the independent confirmations that shrink everyone's suspicion
        timer (dogpile) without waiting for round-robin probing to get there,
        and the load on the suspect stays O(1) per suspicion."""
        susp = m.suspicion
        if susp is None or susp.k < 1 or self._leaving:
            return
        if self.rng.random() >= min(1.0, 2 * susp.k / self.live_count()):
            return
        self.counters["confirm_checks"] += 1
        self._start_check(m)

    def _start_check(self, m: Member) -> None:
        seq = self._next_seq()
        self._checks[seq] = m.node
        self._send_ping(m, seq)
        self._arm(
            TimerKind.CONFIRM_TIMEOUT,
            formulas.scaled(self.config.probe_timeout_s, self._health),
            seq,
        )

    def _check_timeout(self, seq: object) -> None:
        assert isinstance(seq, int)
        node = self._checks.pop(seq, None)
        m = self._members.get(node) if node is not None else None
        if m is None or m.suspicion is None or m.status is not Status.SUSPECT:
            return
        self._suspect(m, m.incarnation, self._me.node)

    def _on_dead(self, node: NodeId, incarnation: int, src: Addr | None = None) -> None:
        m = self._members.get(node)
        if m is None:
            return
        if incarnation < m.incarnation:
            self._stale_accusation(m, src)
            return
        if m is self._me:
            if not self._leaving:
                self._refute(incarnation)
            return
        if m.status not in LIVE:
            if m.status is Status.DEAD and incarnation == m.incarnation:
                self._heard_again(m.node, (Status.DEAD, incarnation))
            return
        self._mark_down(m, Status.DEAD, incarnation)
        self._broadcast_death(m.node, incarnation, src)

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

    def _on_left(self, msg: Left, src: Addr | None = None) -> None:
        m = self._members.get(msg.node)
        if m is None or msg.incarnation < m.incarnation:
            return
        if m is self._me:
            # Only we announce our own leave; a stale one (from before a
            # restart) is outbid.
            if not self._leaving:
                self._refute(msg.incarnation)
            return
        if m.status is Status.LEFT:
            if msg.incarnation == m.incarnation:
                self._heard_again(m.node, (Status.LEFT, msg.incarnation))
            return
        self._mark_down(m, Status.LEFT, msg.incarnation)
        self._broadcast(m.node, msg, ident=(Status.LEFT, msg.incarnation))
        self._owe_ring(m.node, src)

    # --- packets -------------------------------------------------------------

    def _on_packet(self, src: Addr, data: bytes) -> None:
        self.counters["packets_in"] += 1
        self.counters["bytes_in"] += len(data)
        try:
            msgs, errors = codec.decode_packet(data)
        except DecodeError as err:
            self._drop(err.reason, f"from={_fmt(src)}")
            return
        for bad in errors:
            self._drop(bad.reason, f"from={_fmt(src)}")
        for msg in msgs:
            self._dispatch(src, msg)

    def _dispatch(self, src: Addr, msg: Message) -> None:
        self.counters[f"msg_in.{type(msg).__name__.lower()}"] += 1
        match msg:
            case Ping():
                self._on_ping(src, msg)
            case Ack(seq):
                self._on_ack(src, seq)
            case Nack(seq):
                self._on_nack(seq)
            case PingReq():
                self._on_ping_req(src, msg)
            case Alive():
                self._on_alive(msg)
            case Suspect():
                self._on_suspect(msg, src)
            case Dead():
                self._on_dead(msg.node, msg.incarnation, src)
            case Died():
                self._on_dead(msg.node, msg.incarnation, src)
            case DiedRef():
                node = self._by_prefix.get(msg.prefix)
                if node == AMBIGUOUS:
                    self._drop("died_ref_ambiguous", f"from={_fmt(src)}")
                elif node is not None:
                    self._on_dead(node, msg.incarnation, src)
            case Left():
                self._on_left(msg, src)
            case PushPull():
                self._drop("push_pull_in_datagram")
            case RegDelta() | RegSnapshot() | RegAck():
                self.registry.on_message(self._live_node_at(src), msg)
            case RegSync():
                self._drop("reg_sync_in_datagram")
            case KeyRequest() | KeyReply():
                self._drop("key_op_in_datagram")

    # --- push-pull (anti-entropy) -------------------------------------------

    def _state(self, join: bool) -> bytes:
        # Encoding every member is the cost of a push-pull (and of every
        # reconnect attempt, refused or not). Reuse the last encoding while
        # no member changed: within one incarnation a member's name, address
        # and tags cannot change, so (node, incarnation, status) of every
        # member identifies the encoded rows.
        members = list(self._members.values())
        key = (join, hash(tuple((m.node, m.incarnation, m.status) for m in members)), len(members))
        cached = self._state_cache
        if cached is not None and cached[0] == key:
            self.counters["push_pull_state_reused"] += 1
            return cached[1]
        data = codec.encode(PushPull(join, tuple(m.state() for m in members)))
        # Bounded: a simulation holds thousands of nodes' caches at once.
        self._state_cache = (key, data) if len(data) <= STATE_CACHE_MAX_BYTES else None
        return data

    def _open_push_pull(self, addr: Addr, ctx: StreamCtx, join: bool) -> None:
        ctx.peer_addr = addr
        self._open_stream(addr, ctx, self._state(join))
        self.counters["push_pull_out"] += 1

    def _open_stream(self, addr: Addr, ctx: StreamCtx, data: bytes) -> None:
        self._next_stream += 1
        self._streams[self._next_stream] = ctx
        self._out.append(OpenStream(self._next_stream, addr, data))

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

    # --- registry host (see peerd.core.registry.service.Host) ------------------

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
            self._arm(TimerKind.REG_FLUSH, self.config.registry_flush_s)

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

    def reg_arm(self, kind: TimerKind, delay: float, ctx: Hashable) -> int:
        return self._arm(kind, delay, ctx)

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

    def _push_pull_tick(self) -> None:
        cfg = self.config
        n = self.live_count()
        self._arm(TimerKind.PUSH_PULL, formulas.push_pull_scale(cfg.push_pull_interval_s, n))
        if self._leaving:
            return
        syncs = sum(1 for c in self._streams.values() if c.purpose == "sync")
        if syncs >= cfg.max_concurrent_syncs:
            self.counters["push_pull_skipped"] += 1
            return
        picks = self._live.sample(self.rng, 1)
        if picks:
            self._open_sync(self._peek(picks[0]).addr)

    def _reconnect_tick(self) -> None:
        cfg = self.config
        if self._live:
            self._alone_rounds = 0
            self._arm(TimerKind.RECONNECT, cfg.reconnect_interval_s)
        else:
            # Alone (every seed was down when we started, or we were cut
            # off): retry soon, backing off to the normal interval.
            delay = min(cfg.reconnect_interval_s, cfg.probe_interval_s * 2**self._alone_rounds)
            self._alone_rounds = min(self._alone_rounds + 1, 16)
            self._arm(TimerKind.RECONNECT, delay)
        if self._leaving:
            return
        # One of the dead members or the seeds not live, uniformly; without
        # listing the dead (thousands after a mass failure, every tick).
        dead = self._dead
        seeds = [s for s in self._seeds if self._by_addr.get(s) not in self._live]
        n = len(dead) + len(seeds)
        if not n:
            return
        syncs = sum(1 for c in self._streams.values() if c.purpose == "sync")
        if syncs >= self.config.max_concurrent_syncs:
            return
        self.counters["reconnects"] += 1
        k = self.rng.randrange(n)  # the draw rng.choice makes
        if k < len(dead):
            self._open_sync(self._peek(next(itertools.islice(dead, k, None))).addr)
        else:
            self._open_sync(seeds[k - len(dead)])

    def _open_sync(self, addr: Addr) -> None:
        """Anti-entropy with ``addr``: a full push-pull while the membership
        is small, a digest sync once the full state would be the bigger cost
        (see :mod:`peerd.core.digest`)."""
        if len(self._members) < DIGEST_SYNC_MIN_MEMBERS:
            self._open_push_pull(addr, StreamCtx("sync"), join=False)
            return
        bits = digestmod.bits_for(len(self._members))
        self.counters["digest_sync_out"] += 1
        self._open_stream(
            addr,
            StreamCtx("sync", peer_addr=addr, digest_bits=bits),
            codec.encode(SyncDigest(bits, self._digest.hashes(bits))),
        )

    def _rows(self, bits: int, buckets: tuple[int, ...]) -> tuple[MemberState, ...]:
        want = set(buckets)
        shift = 16 - bits
        return tuple(
            m.state()
            for m in self._members.values()
            if int.from_bytes(m.node[:2], "big") >> shift in want
        )

    def _on_digest_reply(self, ctx: StreamCtx, data: bytes) -> None:
        try:
            msg = codec.decode(data)
        except DecodeError as err:
            self._drop(err.reason, "digest sync reply")
            return
        if not isinstance(msg, SyncRows) or msg.bits != ctx.digest_bits:
            self._drop("unexpected_stream_message", type(msg).__name__)
            return
        if ctx.rows:
            self._merge(PushPull(False, msg.members))
        elif msg.buckets:
            # Second step: our rows of the buckets that differ; the peer merges
            # them and answers with its own (after any refutation they caused).
            self.counters["digest_sync_rows_out"] += 1
            assert ctx.peer_addr is not None
            self._open_stream(
                ctx.peer_addr,
                StreamCtx("sync", peer_addr=ctx.peer_addr, digest_bits=msg.bits, rows=True),
                codec.encode(SyncRows(msg.bits, msg.buckets, self._rows(msg.bits, msg.buckets))),
            )
            return
        # Done: the registry's anti-entropy follows membership's, as after a push-pull.
        self._follow_with_reg_sync(ctx)

    def _on_stream_request(self, stream: int, src: Addr, data: bytes) -> None:
        try:
            msg = codec.decode(data)
        except DecodeError as err:
            self._drop(err.reason, f"stream from={_fmt(src)}")
            self._out.append(StreamReply(stream, None))
            return
        if isinstance(msg, RegSync):
            self.counters["reg_sync_in"] += 1
            reply = self.registry.on_sync_request(self._live_node_at(src), msg)
            self._out.append(StreamReply(stream, codec.encode(reply)))
            return
        if isinstance(msg, SyncDigest):
            self.counters["digest_sync_in"] += 1
            differ = self._digest.differing(msg.bits, msg.hashes)
            self._out.append(
                StreamReply(stream, codec.encode(SyncRows(msg.bits, tuple(differ), ())))
            )
            return
        if isinstance(msg, SyncRows):
            self.counters["digest_sync_rows_in"] += 1
            # Merge first, then reply (as for push-pull).
            self._merge(PushPull(False, msg.members))
            rows = SyncRows(msg.bits, msg.buckets, self._rows(msg.bits, msg.buckets))
            self._out.append(StreamReply(stream, codec.encode(rows)))
            return
        if not isinstance(msg, PushPull):
            self._drop("unexpected_stream_message", type(msg).__name__)
            self._out.append(StreamReply(stream, None))
            return
        self.counters["push_pull_in"] += 1
        # Merge first, then reply: the reply then carries our refutation if
        # the peer held us dead (a healed partition), so both sides learn in
        # one exchange that both ends are alive.
        self._merge(msg)
        self._out.append(StreamReply(stream, self._state(False)))

    def _on_stream_response(self, stream: int, data: bytes) -> None:
        ctx = self._streams.pop(stream, None)
        if ctx is None:
            return
        if ctx.purpose in ("reg", "reg_push"):
            self._on_reg_reply(ctx, data)
            return
        if ctx.digest_bits is not None:
            self._on_digest_reply(ctx, data)
            return
        try:
            msg = codec.decode(data)
        except DecodeError as err:
            self._drop(err.reason, "stream reply")
            self._stream_done(ctx, ok=False)
            return
        if not isinstance(msg, PushPull):
            self._drop("unexpected_stream_message", type(msg).__name__)
            self._stream_done(ctx, ok=False)
            return
        self._merge(msg)
        self._stream_done(ctx, ok=True)
        self._follow_with_reg_sync(ctx)

    def _follow_with_reg_sync(self, ctx: StreamCtx) -> None:
        """The registry's anti-entropy follows membership's, with the same peer."""
        peer = self._by_addr.get(ctx.peer_addr) if ctx.peer_addr else None
        if peer is not None and peer in self._live:
            self._open_stream(
                self._peek(peer).addr,
                StreamCtx("reg", peer=peer),
                codec.encode(self.registry.sync_request()),
            )

    def _on_stream_failed(self, stream: int, reason: str) -> None:
        ctx = self._streams.pop(stream, None)
        if ctx is None:
            return
        if ctx.purpose in ("reg", "reg_push"):
            self.counters["reg_sync_failed"] += 1
            self.registry.sync_failed(ctx.peer)
            return
        self.counters["push_pull_failed"] += 1
        level = LogLevel.WARNING if ctx.purpose == "join" else LogLevel.DEBUG
        hint = ""
        if reason == "eof":
            # The listener closes without a reply when it cannot open our
            # frame (peerd/shell/tcp.py): with a daemon listening, that is
            # almost always a key mismatch.
            hint = (
                " hint=the peer closed the stream without answering, as it does when it "
                "cannot open our frame: most often our keys differ (compare `peerd keys "
                "list`), else its log says why (tcp stream rejected reason=...)"
            )
        elif reason.startswith("seal_"):
            hint = " hint=we cannot open the peer's reply: our keys differ"
        self._log(level, f"push-pull failed purpose={ctx.purpose} reason={reason}{hint}")
        self._stream_done(ctx, ok=False)

    def _stream_done(self, ctx: StreamCtx, ok: bool) -> None:
        if ctx.purpose != "join":
            return
        batch = self._batches.get(ctx.batch)
        if batch is None:
            return
        batch.pending -= 1
        if ok:
            batch.ok += 1
        else:
            batch.failed += 1
        if batch.pending == 0:
            del self._batches[ctx.batch]
            self._out.append(JoinDone(batch.ok, batch.failed))

    def _merge(self, msg: PushPull) -> None:
        """Merge a peer's full state. Their "dead" is only a suspicion to us:
        a stale view must not kill a node our own probes can still reach."""
        for st in msg.members:
            alive = Alive(st.node, st.name, st.addr, st.incarnation, st.generation, st.tags)
            m = self._members.get(st.node)
            if m is None and st.status in (Status.DEAD, Status.LEFT):
                if st.node != self._me.node and not addr_problem(st.addr):
                    self._add_down(st)
                continue
            match st.status:
                case Status.ALIVE:
                    self._on_alive(alive)
                case Status.SUSPECT | Status.DEAD:
                    self._on_alive(alive)
                    self._on_suspect(Suspect(st.node, st.incarnation, self._me.node))
                case Status.LEFT:
                    self._on_left(Left(st.node, st.incarnation))

    def _index_prefix(self, node: NodeId) -> None:
        p = node[:NODE_PREFIX_BYTES]
        have = self._by_prefix.get(p, node)
        self._by_prefix[p] = node if have == node else AMBIGUOUS

    def _add_down(self, st: MemberState) -> None:
        # Remember nodes we only know as dead/left: partition healing retries
        # them, and a stale "alive" about them cannot resurrect them.
        m = Member(
            st.node, st.name, st.addr, st.incarnation, st.generation, st.tags, st.status, self._now
        )
        self._members[m.node] = m
        self._dig(m)
        self._index_prefix(m.node)
        self._by_addr.setdefault(m.addr, m.node)
        if st.status is Status.DEAD:
            self._dead[m.node] = None

    def _reap(self) -> None:
        horizon = self._now - self.config.dead_reclaim_s
        for m in list(self._members.values()):
            if m.status in LIVE or m.changed_at > horizon or m is self._me:
                continue
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
            self.registry.forget(m.node)
            self._event(EventKind.REAPED, m)


def _fmt(addr: Addr) -> str:
    host, port = addr
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
