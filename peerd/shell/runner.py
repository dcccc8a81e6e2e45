"""The runner: the one task that owns the core, and the API backend on top.

Every receiver (UDP, TCP, API calls, signals) puts items into one bounded trio
memory channel; only the runner task calls ``node.handle(now, input)``, so the
core needs no locks and sees one totally ordered input history, as in the
simulator. Outputs are carried out without awaiting: datagrams are sent (or
dropped) at once, streams and watch links are handed to TCP tasks, timers go
on one deadline heap that the loop itself waits on (``trio.move_on_at(next
deadline)``). A slow peer or API client therefore never stalls the core.

An exception out of ``node.handle`` is a bug, not a network condition (the
core turns bad input into counted drops): the runner logs it once with its
traceback and the daemon exits non-zero (70), so systemd restarts a clean
process instead of keeping a half-dead node answering probes.

Keys changed over the API (keys.install/use/remove) apply at once (the sealer
and opener share the keyring) and are written to ``<state-dir>/keyring``;
at the next start that file, when present, is the keyring and ``--key-file``
is only used while it does not exist (like Serf's keyring file). With
``cluster: true`` they act on every live member: peers' KeyRequests arrive
as stream requests that the runner answers itself (peerd.shell.keys), so
the core never sees them.

The API ``leave`` answers once the leave had time to spread; the daemon then
exits 0, as after SIGTERM.

Registry ops (``register``, ``group.join``...) become core inputs
(:class:`Register`, :class:`Unregister`, :class:`UpdateMeta`) carrying a
fresh ``ref``, the API connection's id and its peer credentials (pid, uid
from SO_PEERCRED) and, for the conflict rule, this host's wall clock in ms
(the shell reads clocks; the core does not). The call waits for the
:class:`CommandResult` with its ref: at once, or, for ``wait: "settled"``,
when every live member acknowledged the entry or the core's timer expired.
Reads (``lookup``, ``list``, ``groups``, ``group.members``) read the local
replica in the runner task. When a connection closes, :class:`ConnClosed`
drops its entries cluster-wide. :class:`RegistryEvent` outputs go to watches
of the ``registry`` topic; a ``conflict`` also goes to the connection that
owned the losing entry, as a connection event (stream 0) that needs no watch.

A :class:`Lifecycle` (systemd's, in :mod:`peerd.shell.systemd`) hears when
the first join finished (ready), when members change (status) and when the
leave begins (stopping), and gets a ``tick`` at the deadline it asks for.
The ticks come from this loop, between core calls, so the watchdog pings they
send stop when the core or the loop stops turning. SIGHUP awaits the
``on_reload`` given to :func:`serve`.
"""

from __future__ import annotations

import collections
import contextlib
import heapq
import itertools
import math
import random
import signal
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import trio

from peerd.api.protocol import (
    CONNECTION_STREAM,
    PAGE_BUDGET_BYTES,
    STREAM_END,
    ApiError,
    ErrorCode,
    EventArgs,
    ListArgs,
    Op,
    RegisterArgs,
    RegTarget,
    SendArgs,
    TagUpdate,
    Topic,
    decode_user_event,
    encode_user_event,
    entry_wire_size,
    format_addr,
    member_event_to_wire,
    member_to_wire,
    parse_event_args,
    parse_join_args,
    parse_key_args,
    parse_key_flags,
    parse_keys_list_args,
    parse_limit_arg,
    parse_list_args,
    parse_register_args,
    parse_send_args,
    parse_set_tags_args,
    parse_target_args,
    parse_update_args,
    reg_entry_to_wire,
    registry_event_to_wire,
    snapshot_end_to_wire,
    snapshot_entry_to_wire,
    snapshot_member_to_wire,
    status_to_wire,
    user_event_to_wire,
    with_topic,
)
from peerd.core.config import SwimConfig
from peerd.core.events import (
    CommandResult,
    ConnClosed,
    EventKind,
    IncarnationChanged,
    Input,
    Join,
    JoinDone,
    Leave,
    LeaveDone,
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
    RegEventKind,
    Register,
    RegistryEvent,
    SendPacket,
    SetTags,
    SetTimer,
    Start,
    StreamReply,
    StreamRequest,
    StreamResponse,
    Timer,
    TimerFired,
    Unregister,
    UpdateMeta,
    WatchLinks,
)
from peerd.core.mesh.events import (
    Broadcast,
    BroadcastResult,
    CloseLink,
    Connect,
    Deliver,
    JoinMesh,
    LeaveMesh,
    LinkDown,
    MembershipHint,
    MeshInput,
    MeshOutput,
    MeshTimer,
    MeshTimerFired,
    MessageIn,
    NeighborDown,
    NeighborUp,
    Send,
    SetMeshTimer,
)
from peerd.core.node import tags_problem
from peerd.shell.keys import KeyManager as KeyManager
from peerd.shell.keys import Target, cluster_op
from peerd.shell.links import LinkLost, LinkMessages
from peerd.shell.logs import LimitedLog, Logger, RateLimiter
from peerd.shell.messaging import SEND_TIMEOUT_S, Messenger, Pending
from peerd.shell.settings import DEFAULT_PORT
from peerd.shell.state import StateDir, StateError
from peerd.shell.tags import NodeTags
from peerd.wire import codec
from peerd.wire.codec import DecodeError
from peerd.wire.messages import (
    Addr,
    Channel,
    KeyOp,
    KeyRequest,
    MeshPeer,
    Message,
    NameMsg,
    NameReply,
    NodeId,
    RegKind,
    Status,
    tags_from_mapping,
)
from peerd.wire.seal import key_id

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_BUG = 70  # EX_SOFTWARE: internal error; systemd restarts us


class NodeLike(Protocol):
    """What the runner needs from :class:`peerd.core.node.Node` (fakes in tests)."""

    counters: collections.Counter[str]

    def handle(self, now: float, inp: Input) -> list[Output]: ...
    def members(self) -> list[MemberInfo]: ...
    def local_member(self) -> MemberInfo: ...
    @property
    def health_score(self) -> int: ...
    def peer_addrs(self) -> list[Addr]: ...


class PacketPort(Protocol):
    def send(self, dst: Addr, payload: bytes) -> None: ...


class StreamPort(Protocol):
    def open_stream(self, stream: int, dst: Addr, data: bytes) -> None: ...
    def reply(self, stream: int, data: bytes | None) -> None: ...
    def set_watch_links(self, addrs: tuple[Addr, ...]) -> None: ...


class MeshLike(Protocol):
    """What the runner needs from :class:`peerd.core.mesh.mesh.Mesh`."""

    def handle(self, now: float, inp: MeshInput) -> list[MeshOutput]: ...


class LinkPort(Protocol):
    """The link manager (:class:`peerd.shell.links.LinkManager`)."""

    def has(self, peer: NodeId) -> bool: ...
    def link_id(self, peer: NodeId) -> int | None: ...
    def connect(self, peer: NodeId, addr: Addr, *, mesh: bool = True) -> None: ...
    def send(
        self, peer: NodeId, msg: Message, priority: int = 0, *, mesh: bool | None = None
    ) -> bool: ...
    def close(self, peer: NodeId, *, mesh: bool = True) -> None: ...
    def close_all(self) -> None: ...
    def mesh_lost(self, peer: NodeId, link: int | None) -> None: ...


class Lifecycle(Protocol):
    """A service manager's view of the daemon (systemd: :mod:`peerd.shell.systemd`).

    Called from the runner task only, so implementations may read the core.
    ``deadline`` (runner clock) is when :meth:`tick` is next due; the loop
    waits for it alongside the core's timers, so a core stuck in a call
    stops the ticks (that is what makes a watchdog ping meaningful).
    """

    @property
    def deadline(self) -> float: ...
    def started(self, now: float, ok: int, failed: int) -> None: ...
    def members_changed(self, now: float) -> None: ...
    def leaving(self, reason: str) -> None: ...
    def tick(self, now: float) -> None: ...


class TrafficObserver(Protocol):
    """Counts what goes over the wire by message type (:mod:`peerd.shell.metrics`)."""

    def packet(self, direction: str, payload: bytes) -> None: ...
    def stream(self, direction: str, payload: bytes) -> None: ...


class CoreFailure(Exception):
    """The core raised: a bug. The daemon must exit non-zero."""


# --- items the runner receives besides core inputs -------------------------------


@dataclass(eq=False)
class _Call:
    """Run ``fn`` inside the runner task (the only place the core is touched)."""

    fn: Callable[[], Any]
    done: trio.Event = field(default_factory=trio.Event)
    result: Any = None
    error: Exception | None = None


@dataclass(eq=False)
class _Shutdown:
    reason: str


Item = Input | _Call | _Shutdown | LinkMessages | LinkLost
EventItem = tuple[str, dict[str, Any]]


@dataclass(eq=False)
class _Waiter:
    """An API call (or the start) waiting for a JoinDone / LeaveDone."""

    label: str
    done: trio.Event = field(default_factory=trio.Event)
    result: Any = None


@dataclass(eq=False, slots=True)
class _RegCall:
    """A registry command waiting for its CommandResult."""

    result: CommandResult | None = None
    done: trio.Event | None = None  # made only when the result does not come at once


@dataclass(eq=False)
class _Watch:
    """One API watch: the sending end of its event channel (the server reads the other)."""

    conn: object
    topics: frozenset[str]
    send: trio.MemorySendChannel[EventItem]

    def offer(self, item: EventItem) -> bool:
        """Queue an event; False once the watch is gone (closed or too slow).

        The last free slot is kept for an ``end`` event, so a client that
        fell behind learns why its stream stopped.
        """
        stats = self.send.statistics()
        try:
            if stats.current_buffer_used >= stats.max_buffer_size - 1:
                self.send.send_nowait(
                    (
                        STREAM_END,
                        {
                            "code": str(ErrorCode.UNAVAILABLE),
                            "message": "watcher too slow: events were dropped; watch again",
                        },
                    )
                )
                self.send.close()
                return False
            self.send.send_nowait(item)
        except trio.WouldBlock:
            self.send.close()
            return False
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self.send.close()
            return False
        return True


class _SnapshotThenLive(trio.abc.ReceiveChannel[EventItem]):
    """A watch with a snapshot: the items of the cut first, then the live channel.

    The cut is a list of references to immutable records (member infos,
    registry entries) taken in the same synchronous step as the watch was
    registered, so no event can fall between the two; the records are turned
    into wire maps only as the client reads them. Live events queue behind
    the snapshot in the watch's bounded channel meanwhile (a client that
    reads the snapshot too slowly while many changes happen is dropped like
    any slow watcher)."""

    def __init__(
        self, first: Iterator[EventItem], live: trio.MemoryReceiveChannel[EventItem]
    ) -> None:
        self._first: Iterator[EventItem] | None = first
        self._live = live

    async def receive(self) -> EventItem:
        if self._first is not None:
            item = next(self._first, None)
            if item is not None:
                await trio.lowlevel.checkpoint()
                return item
            self._first = None
        return await self._live.receive()

    async def aclose(self) -> None:
        self._first = None
        await self._live.aclose()


# --- the runner -------------------------------------------------------------------


_EVENT_LEVEL = {
    EventKind.SUSPECT: LogLevel.WARNING,
    EventKind.DEAD: LogLevel.WARNING,
    EventKind.NAME_CONFLICT: LogLevel.WARNING,
}
# Membership changes that make the saved peers file stale.
_PEER_KINDS = frozenset(
    {EventKind.JOINED, EventKind.ALIVE, EventKind.UPDATED, EventKind.DEAD, EventKind.LEFT}
)
PEERS_SAVE_DEBOUNCE_S = 0.2

TOPICS = frozenset({Topic.MEMBERS.value, Topic.REGISTRY.value, Topic.EVENTS.value})
# Member events that make a node a candidate neighbour / forget it.
_HINT_ALIVE = frozenset({EventKind.JOINED, EventKind.ALIVE, EventKind.UPDATED})
_HINT_DEAD = frozenset({EventKind.DEAD, EventKind.LEFT, EventKind.REAPED})
MESH_JOIN_CONTACTS = 3  # SWIM members handed to the mesh as join contacts


class Runner:
    """Owns the core; implements the API server's Backend (call/watch/connection_closed)."""

    def __init__(
        self,
        node: NodeLike,
        *,
        packets: PacketPort,
        streams: StreamPort,
        logger: Logger,
        inputs: tuple[trio.MemorySendChannel[Item], trio.MemoryReceiveChannel[Item]] | None = None,
        state: StateDir | None = None,
        keys: KeyManager | None = None,
        config: SwimConfig | None = None,
        seeds: Iterable[Addr] = (),
        counters: collections.Counter[str] | None = None,
        watcher_buffer: int = 256,
        join_timeout_s: float = 30.0,
        leave_timeout_s: float | None = None,
        max_timers_per_turn: int = 1000,
        lifecycle: Lifecycle | None = None,
        traffic: TrafficObserver | None = None,
        mesh: MeshLike | None = None,
        links: LinkPort | None = None,
        send_timeout_s: float = SEND_TIMEOUT_S,
    ) -> None:
        self.node = node
        # The partial mesh (HyParView + Plumtree), next to the membership core
        # and driven the same way; its links are the link manager's.
        self.mesh = mesh
        self.links = links
        self._mesh_joined = False
        self._mesh_connected = False
        self._mesh_neighbours = 0  # active view size, from NeighborUp/Down
        self._bcast_refs = itertools.count(1)
        self._bcast_results: dict[int, BroadcastResult] = {}
        self._rng = random.Random()
        self.packets = packets
        self.streams = streams
        self.logger = logger
        self.core_log = LimitedLog(logger, RateLimiter(interval_s=10.0, burst=20))
        self.state = state
        self.keys = keys
        self.config = config if config is not None else SwimConfig()
        self.seeds = tuple(seeds)
        # Shell counters (drops by reason etc.), shared with the UDP/TCP endpoints.
        self.counters: collections.Counter[str] = (
            counters if counters is not None else collections.Counter()
        )
        # Extra counter sets shown by `status` under a prefix (e.g. the API server's).
        self.counter_sources: dict[str, collections.Counter[str]] = {}
        if inputs is None:
            inputs = open_inputs()
        self.send_channel, self._receive = inputs
        self.watcher_buffer = max(2, watcher_buffer)
        self.join_timeout_s = join_timeout_s
        self.leave_timeout_s = (
            leave_timeout_s
            if leave_timeout_s is not None
            else 2 * self.config.leave_propagate_s + 5.0
        )
        self.max_timers_per_turn = max_timers_per_turn
        self.lifecycle = lifecycle
        self.traffic = traffic
        # Gauges shown by `status` (and the metrics) besides the built-in ones.
        self.gauge_sources: dict[str, Callable[[], float]] = {}
        self._started_at = 0.0
        self._timers: list[tuple[float, int, Timer | MeshTimer]] = []
        self._seq = itertools.count()
        self._join_waiters: collections.deque[_Waiter] = collections.deque()
        self._join_changed = trio.Event()
        self._join_lock = trio.Lock()
        self._leave_waiters: list[_Waiter] = []
        self._watches: list[_Watch] = []
        self._leave_deadline: float | None = None
        self._left = False
        self._finished = False
        # Set when membership changed: the peers file is rewritten soon after,
        # so a daemon killed early still restarts with join hints.
        self.peers_changed = trio.Event()
        self.exit_reason = ""
        self.in_flight = 0
        # registry commands in flight (ref -> waiter), and the connections that
        # wrote to the registry (id -> connection, for conflict events)
        self._refs = itertools.count(1)
        self._reg_calls: dict[int, _RegCall] = {}
        self._reg_conns: dict[int, Any] = {}
        self._deferred: collections.deque[Input] = collections.deque()
        self._local_brief: tuple[str, str] | None = None
        # Configured tags and run-time changes (the agent sets it): set-tags
        # then keeps its changes in the state directory; None: not kept.
        self.node_tags: NodeTags | None = None
        registry = getattr(node, "registry", None)
        if registry is not None:
            self.gauge_sources["registry_entries"] = registry.state.entry_count
        # Messages to names ride the same links as the mesh.
        self.messenger = (
            Messenger(
                node,
                links,
                self._reg_conns,
                self.counters,
                send_timeout_s=send_timeout_s,
                leaving=lambda: self.leaving,
                clock=trio.current_time,
            )
            if links is not None
            else None
        )

    # --- the loop ---------------------------------------------------------------

    @property
    def leaving(self) -> bool:
        return self._leave_deadline is not None

    @property
    def finished(self) -> bool:
        return self._finished

    @property
    def timers_pending(self) -> int:
        return len(self._timers)

    @property
    def next_deadline(self) -> float:
        deadline = self._timers[0][0] if self._timers else math.inf
        if self._leave_deadline is not None:
            deadline = min(deadline, self._leave_deadline)
        if self.lifecycle is not None:
            deadline = min(deadline, self.lifecycle.deadline)
        return deadline

    async def run(self) -> None:
        """Feed Start, then inputs and due timers, until the node has left.

        Raises :class:`CoreFailure` when the core raises.
        """
        # The core answers Start with a JoinDone (0/0 without seeds): pair it.
        self._started_at = trio.current_time()
        self._join_waiters.append(_Waiter("start"))
        self._handle(Start(self.seeds))
        try:
            while not self._finished:
                if self.lifecycle is not None and (self.lifecycle.deadline <= trio.current_time()):
                    self.lifecycle.tick(trio.current_time())
                self._fire_due_timers()
                while self._deferred and not self._finished:
                    self._handle(self._deferred.popleft())
                if self._finished:
                    break
                if self._leave_deadline is not None and trio.current_time() >= self._leave_deadline:
                    self.logger.warning("leave not confirmed in time; exiting anyway")
                    self._finish("leave timed out")
                    break
                item: Item | None = None
                if self.next_deadline <= trio.current_time():
                    # Timers still due (the per-turn cap was hit): let one queued
                    # input in, so a flood of timers cannot starve the network.
                    with contextlib.suppress(trio.WouldBlock):
                        item = self._receive.receive_nowait()
                    await trio.lowlevel.checkpoint()
                else:
                    with trio.move_on_at(self.next_deadline):
                        item = await self._receive.receive()
                if item is not None:
                    self._dispatch(item)
        finally:
            self._close_watches()

    def _fire_due_timers(self) -> None:
        fired = 0
        while self._timers and self._timers[0][0] <= trio.current_time():
            _at, _seq, timer = heapq.heappop(self._timers)
            if isinstance(timer, MeshTimer):
                self._mesh_handle(MeshTimerFired(timer))
            else:
                self._handle(TimerFired(timer))
            fired += 1
            if fired >= self.max_timers_per_turn:
                # A core re-arming timers in the past must not starve inputs.
                self.counters["timers_deferred"] += 1
                return

    def _dispatch(self, item: Item) -> None:
        match item:
            case _Call():
                try:
                    item.result = item.fn()
                except CoreFailure:
                    raise
                except Exception as e:  # ApiError and friends go back to the caller
                    item.error = e
                item.done.set()
            case _Shutdown():
                self.logger.info("shutting down", reason=item.reason)
                self._begin_leave(item.reason)
            case LinkMessages(src, msgs):
                for msg in msgs:
                    self._link_message(src, msg)
            case StreamRequest(stream, src, data) if codec.peek_type(data) == KeyRequest.TYPE:
                self._on_key_request(stream, src, data)
            case LinkLost(node, mesh, link):
                if mesh:
                    if self.links is not None:
                        # Before LinkDown: what the mesh then asks for stands.
                        self.links.mesh_lost(node, link)
                    self._mesh_handle(LinkDown(node))
                self._link_lost(node, link)
            case _:
                self._handle(item)

    def _handle(self, inp: Input) -> None:
        if self.traffic is not None:
            match inp:
                case PacketIn(_, data):
                    self.traffic.packet("in", data)
                case StreamRequest(_, _, data) | StreamResponse(_, data):
                    self.traffic.stream("in", data)
        try:
            outputs = self.node.handle(trio.current_time(), inp)
        except Exception as e:
            self.logger.exception(
                "core failed: this is a bug; exiting", e, input=type(inp).__name__
            )
            raise CoreFailure(f"core raised on {type(inp).__name__}") from e
        for out in outputs:
            self._carry_out(out)

    def _carry_out(self, out: Output) -> None:
        match out:
            # Registry outputs first: a burst of writes makes two per write.
            case CommandResult(ref):
                call = self._reg_calls.pop(ref, None)
                if call is not None:
                    call.result = out
                    if call.done is not None:
                        call.done.set()
            case RegistryEvent():
                if self._watches or out.kind is RegEventKind.CONFLICT:
                    self._registry_event(out)
            case SendPacket(dst, data):
                if self.traffic is not None:
                    self.traffic.packet("out", data)
                self.packets.send(dst, data)
            case SetTimer(at, timer):
                heapq.heappush(self._timers, (at, next(self._seq), timer))
            case OpenStream(stream, dst, data):
                if self.traffic is not None:
                    self.traffic.stream("out", data)
                self.streams.open_stream(stream, dst, data)
            case StreamReply(stream, data):
                if self.traffic is not None and data is not None:
                    self.traffic.stream("out", data)
                self.streams.reply(stream, data)
            case WatchLinks(addrs):
                self.streams.set_watch_links(addrs)
            case MemberEvent():
                self._member_event(out)
            case JoinDone(ok, failed):
                self._join_done(ok, failed)
            case LeaveDone():
                self._leave_done()
            case IncarnationChanged(incarnation):
                self._save_incarnation(incarnation)
            case MeshCast(channel, payload):
                self._mesh_cast(channel, payload)
            case Log(level, message):
                # Keyed by the first words ("drop reason=bad_tags"): a flood of
                # one kind is summarised, other kinds still get through.
                key = "core:" + " ".join(message.split(" ", 2)[:2])
                self.core_log.log(key, level, message)
            case _:
                self.logger.warning("unknown core output ignored", output=type(out).__name__)

    def _member_event(self, ev: MemberEvent) -> None:
        m = ev.member
        fields: dict[str, object] = {
            "name": m.name,
            "id": m.node.hex(),
            "addr": m.addr,
            "incarnation": m.incarnation,
        }
        if ev.other is not None:
            fields["other_id"] = ev.other.node.hex()
            fields["other_addr"] = ev.other.addr
        self.logger.log(
            _EVENT_LEVEL.get(ev.kind, LogLevel.INFO), f"member {ev.kind.value}", **fields
        )
        if self.lifecycle is not None:
            self.lifecycle.members_changed(trio.current_time())
        if ev.kind in _PEER_KINDS:
            self.peers_changed.set()
        if self.mesh is not None:
            if ev.kind in _HINT_ALIVE:
                peer = (MeshPeer(m.node, m.addr),)
                self._mesh_handle(
                    MembershipHint(revived=peer) if ev.revived else MembershipHint(alive=peer)
                )
            elif ev.kind in _HINT_DEAD:
                self._mesh_handle(MembershipHint(dead=(m.node,)))
                if self.links is not None and ev.kind is not EventKind.REAPED:
                    # A dead node's daemon answers nothing (a frozen one keeps
                    # its links open): close what is left, fail what waits.
                    self.links.close(m.node, mesh=False)
                    self._link_lost(m.node)
        if self._watches:
            item = member_event_to_wire(ev)
            self._fan_out(Topic.MEMBERS.value, item)

    def _registry_event(self, ev: RegistryEvent) -> None:
        conflict = ev.kind is RegEventKind.CONFLICT
        if not conflict and not self._watches:
            return
        item = registry_event_to_wire(ev, getattr(self.node, "member", None))
        if conflict:
            winner = item[1].get("winner", {})
            self.logger.warning(
                "registry conflict: a local claim lost its name",
                scope=ev.entry.scope,
                name=ev.entry.name,
                pid=ev.entry.pid,
                winner_node=winner.get("node_name") or winner.get("node"),
                winner_pid=winner.get("pid"),
            )
            conn = self._reg_conns.get(ev.conn) if ev.conn is not None else None
            if conn is not None:
                try:
                    delivered = conn.push_nowait(CONNECTION_STREAM, item[0], item[1])
                except (AttributeError, ValueError):
                    delivered = False
                if not delivered:
                    self.counters["registry_conflict_undelivered"] += 1
        if self._watches:
            self._fan_out(Topic.REGISTRY.value, item)

    def _fan_out(self, topic: str, item: EventItem) -> None:
        # Every watch event names its topic ("joined", "left", "updated"
        # exist in two); one copy shared by the watchers of that topic.
        item = with_topic(item, topic)
        keep: list[_Watch] = []
        for w in self._watches:
            if topic not in w.topics or w.offer(item):
                keep.append(w)
            elif w.send.statistics().open_receive_channels:
                # Still read by the server, so it was closed for being too slow.
                self.counters["watch_dropped"] += 1
                self.logger.warning(
                    "API watcher dropped: not reading fast enough", conn=repr(w.conn)
                )
        self._watches = keep

    def _join_done(self, ok: int, failed: int) -> None:
        self._join_mesh()
        if not self._join_waiters:
            self.logger.info("join finished", ok=ok, failed=failed)
            return
        waiter = self._join_waiters.popleft()
        waiter.result = {"ok": ok, "failed": failed}
        waiter.done.set()
        self._join_changed.set()
        self._join_changed = trio.Event()
        if waiter.label == "start" and (ok or failed):
            level = LogLevel.INFO if ok else LogLevel.WARNING
            self.logger.log(
                level, "joined the cluster" if ok else "no seed answered", ok=ok, failed=failed
            )
        if waiter.label == "start" and self.lifecycle is not None:
            self.lifecycle.started(trio.current_time(), ok, failed)

    def _leave_done(self) -> None:
        self._left = True
        for w in self._leave_waiters:
            w.done.set()
        self._leave_waiters.clear()
        self.logger.info("left the cluster")
        self._finish("left")

    def _finish(self, reason: str) -> None:
        self._finished = True
        self.exit_reason = reason
        # Joins and leaves still waiting will never see their JoinDone or
        # LeaveDone (e.g. the leave ran out of time): answer them now.
        while self._join_waiters:
            self._join_waiters.popleft().done.set()
        for w in self._leave_waiters:
            w.done.set()
        self._leave_waiters.clear()

    def _begin_leave(self, reason: str = "leave requested over the API") -> None:
        if self._leave_deadline is not None or self._finished:
            return
        if self.lifecycle is not None:
            self.lifecycle.leaving(reason)
        self._leave_deadline = trio.current_time() + self.leave_timeout_s
        if self.mesh is not None:
            self._mesh_handle(LeaveMesh())
        self._handle(Leave())

    def _save_incarnation(self, incarnation: int) -> None:
        if self.state is None:
            return
        try:
            self.state.save_incarnation(incarnation)
        except StateError as e:
            # Membership must go on (the disk may be full), but say it loudly.
            self.counters["state_write_errors"] += 1
            self.logger.error("incarnation not persisted", incarnation=incarnation, error=str(e))

    def _close_watches(self) -> None:
        for w in self._watches:
            w.send.close()
        self._watches.clear()

    # --- partial mesh ----------------------------------------------------------------

    def _join_mesh(self) -> None:
        """After a join (the start's or the API's): enter the overlay through a
        few live SWIM members; with none, start alone (others join us, and
        membership hints fill the passive view meanwhile)."""
        if self.mesh is None or self.leaving:
            return
        try:
            me = self.node.local_member().node
            alive = [m for m in self.node.members() if m.node != me and m.status is Status.ALIVE]
        except Exception:  # a fake node in tests
            alive = []
        picks = self._rng.sample(alive, min(MESH_JOIN_CONTACTS, len(alive)))
        contacts = tuple(MeshPeer(m.node, m.addr) for m in picks)
        if self._mesh_joined and not contacts:
            return
        self._mesh_joined = True
        self._mesh_handle(JoinMesh(contacts))

    def _mesh_handle(self, inp: MeshInput) -> None:
        if self.mesh is None:
            return
        try:
            outputs = self.mesh.handle(trio.current_time(), inp)
        except Exception as e:
            self.logger.exception(
                "mesh core failed: this is a bug; exiting", e, input=type(inp).__name__
            )
            raise CoreFailure(f"mesh core raised on {type(inp).__name__}") from e
        for out in outputs:
            self._mesh_carry_out(out)

    def _mesh_carry_out(self, out: MeshOutput) -> None:
        links = self.links
        match out:
            case Send(dst, msg, priority):
                if links is not None:
                    links.send(dst, msg, priority, mesh=True)
            case SetMeshTimer(at, timer):
                heapq.heappush(self._timers, (at, next(self._seq), timer))
            case Connect(peer):
                if links is not None:
                    links.connect(peer.node, peer.addr)
            case CloseLink(node):
                if links is not None:
                    links.close(node)
            case Deliver():
                self._deliver(out)
            case BroadcastResult(ref):
                self._bcast_results[ref] = out
            case NeighborUp(peer):
                self._mesh_neighbours_changed(+1)
                self.counters["mesh_neighbor_up"] += 1
                self.logger.debug("mesh neighbour up", peer=peer.node.hex()[:8], addr=peer.addr)
            case NeighborDown(peer):
                self._mesh_neighbours_changed(-1)
                self.counters["mesh_neighbor_down"] += 1
                self.logger.debug("mesh neighbour down", peer=peer.node.hex()[:8])
            case Log(level, message):
                key = "mesh:" + " ".join(message.split(" ", 3)[:3])
                self.core_log.log(key, level, message)
            case _:
                self.logger.warning("unknown mesh output ignored", output=type(out).__name__)

    def _link_message(self, src: NodeId, msg: Message) -> None:
        if 30 <= msg.TYPE <= 38:
            self._mesh_handle(MessageIn(src, msg))  # type: ignore[arg-type]
        else:
            self._direct_message(src, msg)

    def _direct_message(self, src: NodeId, msg: Message) -> None:
        """A non-mesh message over a peer link (messages to names)."""
        match msg:
            case NameMsg() if self.messenger is not None:
                self.messenger.on_message(src, msg)
            case NameReply() if self.messenger is not None:
                self.messenger.on_reply(src, msg)
            case _:
                self.counters["link_drop_unexpected"] += 1

    def _link_lost(self, node: NodeId, link: int | None = None) -> None:
        """A link failed or the peer closed it: sends waiting on it fail
        (``link`` None: on any link to ``node``)."""
        if self.messenger is not None:
            self.messenger.link_lost(node, link)

    def _send_begin(self, conn: object, args: SendArgs) -> Pending:
        if self.messenger is None:
            raise ApiError(ErrorCode.UNAVAILABLE, "this daemon has no peer links")
        if self.leaving:
            raise ApiError(ErrorCode.UNAVAILABLE, "the node is leaving")
        return self.messenger.begin(conn, args)

    def _mesh_neighbours_changed(self, delta: int) -> None:
        """Registry deltas go over the mesh while it has neighbours (a core
        input, handled once the mesh's outputs are carried out)."""
        self._mesh_neighbours = max(0, self._mesh_neighbours + delta)
        if self.mesh is not None:
            connected = self._mesh_neighbours > 0
            if connected != self._mesh_connected:
                self._mesh_connected = connected
                self._deferred.append(MeshConnected(connected))

    def _mesh_cast(self, channel: int, payload: bytes) -> None:
        """The core's own broadcast (registry deltas) into the mesh."""
        if self.mesh is None:
            self.counters["mesh_cast_dropped"] += 1
            return
        result = self.broadcast(Channel(channel), payload)
        if result.error is not None:
            self.counters["mesh_cast_refused"] += 1

    def _deliver(self, d: Deliver) -> None:
        self.counters[f"mesh_delivered_{d.channel.name.lower()}"] += 1
        if d.channel is Channel.REGISTRY:
            self._handle(MeshDelivered(int(d.channel), d.origin, d.payload))
            return
        if d.channel is not Channel.USER:
            return  # membership has no consumer on the mesh
        decoded = decode_user_event(d.payload)
        if decoded is None:
            self.counters["user_event_drop_malformed"] += 1
            return
        self._fan_user_event(d.id, d.origin, decoded[0], decoded[1])

    def _fan_user_event(self, msg_id: bytes, origin: NodeId, name: str, payload: bytes) -> None:
        if not self._watches:
            return
        member = getattr(self.node, "member", None)
        info = member(origin) if member is not None else None
        data = user_event_to_wire(
            msg_id, origin, name, payload, info.name if info is not None else None
        )
        self._fan_out(Topic.EVENTS.value, ("user", data))

    def _user_event(self, ev: EventArgs) -> dict[str, Any]:
        """In the runner task: broadcast a user event (lowest priority channel,
        rate limited by the mesh); local watchers see it too."""
        if self.leaving:
            raise ApiError(ErrorCode.UNAVAILABLE, "the node is leaving")
        result = self.broadcast(Channel.USER, encode_user_event(ev.name, ev.payload))
        if result.error is not None:
            code, message = result.error
            raise ApiError(
                ErrorCode.BAD_ARGS if code == "too_large" else ErrorCode.UNAVAILABLE,
                f"{code}: {message}",
            )
        assert result.id is not None
        self._fan_user_event(result.id, self.node.local_member().node, ev.name, ev.payload)
        return {"id": result.id.hex()}

    def broadcast(self, channel: Channel, payload: bytes) -> BroadcastResult:
        """In the runner task: broadcast ``payload`` on ``channel`` to every node."""
        if self.mesh is None:
            raise ApiError(ErrorCode.UNAVAILABLE, "this daemon has no mesh")
        ref = next(self._bcast_refs)
        self._mesh_handle(Broadcast(ref, channel, payload))
        result = self._bcast_results.pop(ref, None)
        if result is None:  # pragma: no cover - the mesh answers at once
            raise ApiError(ErrorCode.INTERNAL, "the mesh did not answer the broadcast")
        return result

    # --- control from other tasks ------------------------------------------------------

    async def call_in_runner(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` in the runner task and return its result (or raise its error)."""
        if self._finished:
            raise ApiError(ErrorCode.UNAVAILABLE, "the daemon is shutting down")
        call = _Call(fn)
        await self.send_channel.send(call)
        await call.done.wait()
        if call.error is not None:
            raise call.error
        return call.result

    async def shutdown(self, reason: str) -> None:
        """Graceful stop: leave, then the loop ends on LeaveDone (or its bound)."""
        await self.send_channel.send(_Shutdown(reason))

    async def save_peers(self) -> None:
        """Remember live peers as join hints for the next start (in the runner
        task: a tiny file, and no thread to race with the loop)."""
        if self.state is None or self._finished:
            return  # the final save happens after the loop
        with contextlib.suppress(ApiError):  # finished meanwhile
            await self.call_in_runner(self.save_peers_now)

    def save_peers_now(self) -> None:
        """Write the peers file now. An empty view (isolated, or the cluster is
        down) keeps the old hints: that is exactly when they will be wanted."""
        if self.state is None:
            return
        try:
            peers = self.node.peer_addrs()
            if peers:
                self.state.save_peers(peers)
        except StateError as e:
            self.counters["state_write_errors"] += 1
            self.logger.warning("peers not saved", error=str(e))

    def all_counters(self) -> dict[str, int]:
        merged: collections.Counter[str] = collections.Counter(self.node.counters)
        merged.update(self.counters)
        for prefix, source in self.counter_sources.items():
            merged.update({f"{prefix}_{k}": v for k, v in source.items()})
        return dict(sorted(merged.items()))

    # --- API backend ---------------------------------------------------------------------

    async def call(self, conn: object, op: str, args: Mapping[str, Any]) -> Any:
        """Answer one API request; ApiError for anything the client got wrong."""
        self.in_flight += 1
        try:
            return await self._call(conn, op, args)
        finally:
            self.in_flight -= 1

    async def _call(self, conn: object, op: str, args: Mapping[str, Any]) -> Any:
        match op:
            case Op.REGISTER:
                return await self._reg_write(conn, parse_register_args(args))
            case Op.GROUP_JOIN:
                return await self._reg_write(conn, parse_register_args(args, RegKind.GROUP))
            case Op.UNREGISTER:
                return await self._reg_write(conn, parse_target_args(args))
            case Op.GROUP_LEAVE:
                return await self._reg_write(conn, parse_target_args(args, RegKind.GROUP))
            case Op.UPDATE:
                return await self._reg_write(conn, parse_update_args(args), update=True)
            case Op.LOOKUP:
                target = parse_target_args(args)
                return await self.call_in_runner(lambda: self._lookup(target))
            case Op.LIST:
                page = parse_list_args(args)
                return await self.call_in_runner(lambda: self._list_names(page))
            case Op.GROUPS:
                page = parse_list_args(args)
                return await self.call_in_runner(lambda: self._list_groups(page))
            case Op.GROUP_MEMBERS:
                target = parse_target_args(args, RegKind.GROUP)
                limit = parse_limit_arg(args)
                return await self.call_in_runner(lambda: self._group_members(target, limit))
            case Op.STATUS:
                return await self.call_in_runner(self._status)
            case Op.MEMBERS:
                return await self.call_in_runner(
                    lambda: [member_to_wire(m) for m in self.node.members()]
                )
            case Op.SET_TAGS:
                update = parse_set_tags_args(args)
                return await self.call_in_runner(lambda: self._set_tags(update))
            case Op.JOIN:
                return await self._join(parse_join_args(args, default_port=DEFAULT_PORT))
            case Op.LEAVE:
                return await self._leave()
            case Op.EVENT:
                ev = parse_event_args(args)
                return await self.call_in_runner(lambda: self._user_event(ev))
            case Op.SEND:
                send = parse_send_args(args)
                pending: Pending = await self.call_in_runner(lambda: self._send_begin(conn, send))
                assert self.messenger is not None
                return await self.messenger.wait(pending)
            case Op.KEYS_LIST:
                return self._keys().list(file_only=parse_keys_list_args(args))
            case Op.KEYS_INSTALL | Op.KEYS_USE | Op.KEYS_REMOVE:
                key = parse_key_args(args)
                force, cluster = parse_key_flags(args)
                if cluster:
                    return await self._keys_cluster(op, key)
                if op == Op.KEYS_INSTALL:
                    return await self.call_in_runner(lambda: self._keys().install(key, force))
                if op == Op.KEYS_USE:
                    return await self.call_in_runner(lambda: self._keys().use(key))
                return await self.call_in_runner(lambda: self._keys().remove(key))
            case _:
                raise ApiError(ErrorCode.UNKNOWN_OP, f"unknown op {op!r}")

    # --- registry ----------------------------------------------------------------------

    def _registry(self) -> Any:
        registry = getattr(self.node, "registry", None)
        if registry is None:
            raise ApiError(ErrorCode.UNAVAILABLE, "this daemon has no registry")
        return registry

    async def _reg_write(
        self, conn: object, cmd: RegisterArgs | RegTarget, update: bool = False
    ) -> dict[str, Any]:
        """Feed one registry command for ``conn`` (a RegTarget is an
        unregister, or with ``update`` a metadata update) and wait for its
        result: at once, or for ``wait: "settled"`` when the core answers."""
        call: _RegCall = await self.call_in_runner(lambda: self._reg_begin(conn, cmd, update))
        if call.result is None:
            call.done = trio.Event()
            await call.done.wait()
        return self._reg_value(call)

    def _reg_begin(
        self, conn: object, cmd: RegisterArgs | RegTarget, update: bool = False
    ) -> _RegCall:
        """In the runner task: feed the command; its result is filled in when
        the core answers (for a plain write, before this returns)."""
        self._registry()
        conn_id = getattr(conn, "id", None)
        if type(conn_id) is not int:
            raise ApiError(ErrorCode.UNAVAILABLE, "registry writes need an API connection")
        # A connection that closed meanwhile (its ConnClosed may already be
        # handled) must not leave entries behind.
        if getattr(conn, "closed", False):
            raise ApiError(ErrorCode.UNAVAILABLE, "the connection closed")
        cred = getattr(conn, "cred", None)
        pid, uid = (cred.pid, cred.uid) if cred is not None else (0, 0)
        ref = next(self._refs)
        inp: Input
        if isinstance(cmd, RegisterArgs):
            if self.leaving:
                raise ApiError(ErrorCode.UNAVAILABLE, "the node is leaving")
            inp = Register(
                ref,
                conn_id,
                cmd.kind,
                cmd.scope,
                cmd.name,
                cmd.meta,
                pid,
                uid,
                time.time_ns() // 1_000_000,
                cmd.settle_s,
            )
        elif update:
            inp = UpdateMeta(ref, conn_id, cmd.kind, cmd.scope, cmd.name, cmd.meta)
        else:
            inp = Unregister(ref, conn_id, cmd.kind, cmd.scope, cmd.name)
        call = self._reg_calls[ref] = _RegCall()
        self._reg_conns[conn_id] = conn
        self._handle(inp)
        if isinstance(cmd, RegisterArgs) and not cmd.messages and self.messenger is not None:
            # Its holder takes no messages: the messenger refuses them (no_receiver).
            eid = self._registry().eid_of(conn_id, cmd.kind, cmd.scope, cmd.name)
            if eid is not None:
                self.messenger.mark_quiet(eid)
        if (
            call.result is not None
            and call.result.error is not None
            and call.result.error[0] == ErrorCode.CONFLICT
            and isinstance(cmd, RegisterArgs)
            and cmd.kind is RegKind.NAME
        ):
            call.result = CommandResult(
                ref,
                error=(
                    ErrorCode.CONFLICT,
                    self._held_by(cmd.scope, cmd.name) or call.result.error[1],
                ),
            )
        return call

    def _held_by(self, scope: str, name: str) -> str | None:
        claim = self._registry().state.lookup(scope, name)
        if claim is None:
            return None
        member = getattr(self.node, "member", None)
        info = member(claim.origin) if member is not None else None
        where = (
            f"node {info.name} ({claim.origin.hex()[:8]})"
            if info is not None
            else f"node {claim.origin.hex()[:8]}"
        )
        return f"{scope}/{name} is held by pid {claim.entry.pid} on {where}"

    def _reg_value(self, call: _RegCall) -> dict[str, Any]:
        result = call.result
        assert result is not None
        if result.error is not None:
            raise ApiError(*result.error)
        value = result.value or {}
        if value:
            if self._local_brief is None:  # a node's name and address are fixed
                local = self.node.local_member()
                self._local_brief = (local.name, format_addr(local.addr))
            value["node_name"], value["node_addr"] = self._local_brief
        return value

    # Quick ops: answered at once in the runner task, many per turn (see
    # call_batch and the API server's batching).
    _QUICK_OPS = frozenset(
        {Op.REGISTER, Op.GROUP_JOIN, Op.UNREGISTER, Op.GROUP_LEAVE, Op.UPDATE, Op.LOOKUP}
    )

    def batchable(self, op: str, args: Mapping[str, Any]) -> bool:
        """Registry writes without ``wait`` and lookups answer at once."""
        if op == Op.SEND:
            # Batched so that a connection's sends go out in order, many per turn.
            return self.messenger is not None
        return (
            op in self._QUICK_OPS
            and args.get("wait") is None
            and getattr(self.node, "registry", None) is not None
        )

    async def call_batch(
        self, conn: object, requests: Sequence[tuple[str, Mapping[str, Any]]]
    ) -> list[Any]:
        """Answer quick requests in order, in one turn of the runner: the
        results, or an ApiError for each that failed."""
        finish = await self.begin_batch(conn, requests)
        return await finish()

    async def begin_batch(
        self, conn: object, requests: Sequence[tuple[str, Mapping[str, Any]]]
    ) -> Callable[[], Awaitable[list[Any]]]:
        """Start quick requests in order, in one turn of the runner, and return
        what waits for their results. The API server starts a connection's
        next batch while this one waits (sends wait for the owner's daemon):
        the order of the sends is the order of the starts."""
        parsed: list[tuple[str, Any] | ApiError] = []
        for op, args in requests:
            try:
                parsed.append(self._parse_quick(op, args))
            except ApiError as e:
                parsed.append(e)

        def run() -> list[Any]:
            out: list[Any] = []
            for item in parsed:
                if isinstance(item, ApiError):
                    out.append(item)
                    continue
                op, cmd = item
                try:
                    if op == Op.SEND:
                        out.append(self._send_begin(conn, cmd))
                    elif op == Op.LOOKUP:
                        out.append(self._lookup(cmd))
                    else:
                        call = self._reg_begin(conn, cmd, update=op == Op.UPDATE)
                        out.append(call if call.result is None else self._reg_value(call))
                except ApiError as e:
                    out.append(e)
            return out

        self.in_flight += 1
        try:
            results: list[Any] = await self.call_in_runner(run)
        except BaseException:
            self.in_flight -= 1
            raise

        async def finish() -> list[Any]:
            try:
                if self.messenger is not None:
                    deadline = trio.current_time() + self.messenger.send_timeout_s
                    for i, r in enumerate(results):
                        if isinstance(r, Pending):
                            try:
                                results[i] = await self.messenger.wait(r, deadline)
                            except ApiError as e:
                                results[i] = e
                for i, r in enumerate(results):
                    if isinstance(r, _RegCall):  # pragma: no cover - quick writes answer at once
                        if r.result is None:
                            r.done = trio.Event()
                            await r.done.wait()
                        try:
                            results[i] = self._reg_value(r)
                        except ApiError as e:
                            results[i] = e
                return results
            finally:
                self.in_flight -= 1

        return finish

    def _parse_quick(self, op: str, args: Mapping[str, Any]) -> tuple[str, Any]:
        match op:
            case Op.SEND:
                return op, parse_send_args(args)
            case Op.REGISTER:
                return op, parse_register_args(args)
            case Op.GROUP_JOIN:
                return op, parse_register_args(args, RegKind.GROUP)
            case Op.UNREGISTER:
                return op, parse_target_args(args)
            case Op.GROUP_LEAVE:
                return op, parse_target_args(args, RegKind.GROUP)
            case Op.UPDATE:
                return op, parse_update_args(args)
            case Op.LOOKUP:
                return op, parse_target_args(args)
        raise ApiError(ErrorCode.UNKNOWN_OP, f"unknown op {op!r}")  # pragma: no cover

    def _member_of(self) -> Callable[[NodeId], MemberInfo | None]:
        members = {m.node: m for m in self.node.members()}
        return members.get

    def _lookup(self, target: RegTarget) -> dict[str, Any]:
        claim = self._registry().state.lookup(target.scope, target.name)
        if claim is None:
            raise ApiError(
                ErrorCode.NOT_FOUND, f"no name {target.name!r} in scope {target.scope!r}"
            )
        member = getattr(self.node, "member", None)
        return reg_entry_to_wire(
            claim.origin, claim.entry, member(claim.origin) if member is not None else None
        )

    def _list_names(self, page: ListArgs) -> dict[str, Any]:
        member_of = self._member_of()
        entries: list[dict[str, Any]] = []
        budget = PAGE_BUDGET_BYTES
        for claim in self._registry().state.names(page.scope, page.prefix):
            key = (claim.entry.scope, claim.entry.name)
            if page.after is not None and key <= page.after:
                continue
            budget -= entry_wire_size(claim.entry)
            if len(entries) >= page.limit or budget < 0:
                return {"entries": entries, "more": True}
            entries.append(reg_entry_to_wire(claim.origin, claim.entry, member_of(claim.origin)))
        return {"entries": entries, "more": False}

    def _list_groups(self, page: ListArgs) -> dict[str, Any]:
        groups: list[dict[str, Any]] = []
        for scope, name, count in self._registry().state.groups(page.scope, page.prefix):
            if page.after is not None and (scope, name) <= page.after:
                continue
            if len(groups) >= page.limit:
                return {"groups": groups, "more": True}
            groups.append({"scope": scope, "group": name, "members": count})
        return {"groups": groups, "more": False}

    def _group_members(self, target: RegTarget, limit: int) -> dict[str, Any]:
        member_of = self._member_of()
        entries: list[dict[str, Any]] = []
        budget = PAGE_BUDGET_BYTES
        for claim in self._registry().state.group_members(target.scope, target.name):
            budget -= entry_wire_size(claim.entry)
            if len(entries) >= limit or budget < 0:
                return {"entries": entries, "more": True}
            entries.append(reg_entry_to_wire(claim.origin, claim.entry, member_of(claim.origin)))
        return {"entries": entries, "more": False}

    async def _keys_cluster(self, op: str, text: str) -> dict[str, Any]:
        """keys.install/use/remove with ``cluster``: see peerd.shell.keys.cluster_op."""
        keys = self._keys()
        request = getattr(self.streams, "request", None)
        if request is None:
            raise ApiError(ErrorCode.UNAVAILABLE, "this daemon cannot reach its peers")
        kop = {"keys.install": KeyOp.INSTALL, "keys.use": KeyOp.USE}.get(op, KeyOp.REMOVE)

        def targets() -> tuple[bytes, Target, list[Target]]:
            if kop is KeyOp.INSTALL:
                key = keys.resolve(text, need_key=True)
            else:
                try:
                    key = key_id(keys.resolve(text))
                except ApiError:
                    # remove/use of a key this node lacks: a full id still names it.
                    if len(text) != 8:
                        raise
                    key = bytes.fromhex(text)
            me = self.node.local_member()
            peers = [
                Target(m.node, m.name, m.addr)
                for m in self.node.members()
                if m.node != me.node and m.status in (Status.ALIVE, Status.SUSPECT)
            ]
            return key, Target(me.node, me.name, me.addr), peers

        key, me, peers = await self.call_in_runner(targets)
        return await cluster_op(
            kop, key, keys, me, peers, request, format_addr, self.call_in_runner
        )

    def _on_key_request(self, stream: int, src: Addr, data: bytes) -> None:
        """A peer's KeyRequest (peerd keys ... --cluster): answered here, in
        the shell that owns the keyring; the core never sees it."""
        try:
            msg = codec.decode(data)
        except DecodeError as e:
            self.counters[f"key_request_drop_{e.reason}"] += 1
            self.streams.reply(stream, None)
            return
        if self.keys is None or not isinstance(msg, KeyRequest):
            self.counters["key_request_drop_unexpected"] += 1
            self.streams.reply(stream, None)
            return
        self.counters["key_requests_in"] += 1
        reply = self.keys.on_request(msg, format_addr(src))
        self.streams.reply(stream, codec.encode(reply))

    def _keys(self) -> KeyManager:
        if self.keys is None:
            raise ApiError(ErrorCode.UNAVAILABLE, "no keyring in this daemon")
        return self.keys

    def _status(self) -> dict[str, Any]:
        out = status_to_wire(self.node.local_member(), self.node.health_score, self.node.members())
        out["counters"] = self.all_counters()
        out["gauges"] = self.gauges()
        out["leaving"] = self.leaving
        return out

    def gauges(self) -> dict[str, float]:
        """Current values (not totals) for `status` and the metrics."""
        out: dict[str, float] = {
            "timers_pending": len(self._timers),
            "api_watchers": len(self._watches),
            "uptime_s": round(max(0.0, trio.current_time() - self._started_at), 3),
        }
        if self.keys is not None:
            out["keys"] = len(self.keys.keyring)
        for name, source in self.gauge_sources.items():
            try:
                out[name] = source()
            except Exception as e:  # a broken gauge must not break `status`
                self.logger.warning("gauge failed", gauge=name, error=str(e))
        return dict(sorted(out.items()))

    def _set_tags(self, update: TagUpdate) -> dict[str, str]:
        if self.leaving:
            raise ApiError(ErrorCode.UNAVAILABLE, "the node is leaving")
        tags = update.apply(dict(self.node.local_member().tags))
        if len(tags) > self.config.max_tags:
            raise ApiError(
                ErrorCode.BAD_ARGS, f"at most {self.config.max_tags} tags (swim.max_tags)"
            )
        size = sum(len(k.encode()) + len(v.encode()) for k, v in tags.items())
        if size > self.config.max_tags_bytes:
            raise ApiError(
                ErrorCode.BAD_ARGS,
                f"tags take {size} bytes, more than {self.config.max_tags_bytes} "
                "(swim.max_tags_bytes)",
            )
        if self.node_tags is not None and self.state is not None:
            # Saved before it applies: a change that cannot be kept is refused.
            kept = self.node_tags.copy()
            kept.set_effective(tags)
            try:
                self.state.save_tags(kept)
            except StateError as e:
                self.counters["state_write_errors"] += 1
                self.logger.error("tags not persisted; not changed", error=str(e))
                raise ApiError(ErrorCode.UNAVAILABLE, f"tags not changed: {e}") from None
            self.node_tags = kept
        self._handle(SetTags(tags_from_mapping(tags)))
        return dict(self.node.local_member().tags)

    def reconfigure_tags(self, configured: Iterable[tuple[str, str]]) -> bool:
        """In the runner task, on reload: take the configured tags (run-time
        changes of keys the configuration changed are dropped, see
        :mod:`peerd.shell.tags`). True when the node's tags changed."""
        if self.node_tags is None:
            return False
        tags = self.node_tags.copy()
        dropped = tags.reconfigure(dict(configured))
        if dropped:
            self.logger.info("configured tags replace tags set at run time", keys=",".join(dropped))
        if tags == self.node_tags:
            return False
        effective = tags.effective()
        problem = tags_problem(self.config, tuple(sorted(effective.items())))
        if problem is not None:
            self.logger.warning(
                "tags set at run time do not fit with the configured ones; dropped",
                problem=problem,
                keys=",".join(sorted(tags.runtime)),
            )
            tags.runtime.clear()
            effective = tags.effective()
        if self.state is not None:
            try:
                self.state.save_tags(tags)
            except StateError as e:
                self.counters["state_write_errors"] += 1
                self.logger.error("tags not persisted", error=str(e))
        self.node_tags = tags
        before = dict(self.node.local_member().tags)
        if effective != before and not self.leaving:
            self._handle(SetTags(tags_from_mapping(effective)))
        return effective != before

    async def _join(self, addrs: tuple[Addr, ...]) -> dict[str, int]:
        """One join at a time, after the start's: JoinDone carries no id, so
        results are paired with requests by order, which is only sound when
        a single join is outstanding."""

        def begin() -> _Waiter:
            if self.leaving:
                raise ApiError(ErrorCode.UNAVAILABLE, "the node is leaving")
            waiter = _Waiter("api")
            self._join_waiters.append(waiter)
            self._handle(Join(addrs))
            return waiter

        with trio.move_on_after(self.join_timeout_s):
            async with self._join_lock:
                while self._join_waiters:
                    await self._join_changed.wait()
                waiter: _Waiter = await self.call_in_runner(begin)
                await waiter.done.wait()
                if waiter.result is None:
                    raise ApiError(ErrorCode.UNAVAILABLE, "the node left before the join ended")
                return dict(waiter.result)
        # A started waiter stays queued, so later JoinDones still pair up in order.
        raise ApiError(ErrorCode.UNAVAILABLE, "join did not finish in time")

    async def _leave(self) -> dict[str, Any]:
        def begin() -> _Waiter:
            waiter = _Waiter("leave")
            if self._left:
                waiter.done.set()
                return waiter
            self._leave_waiters.append(waiter)
            self._begin_leave()
            return waiter

        waiter: _Waiter = await self.call_in_runner(begin)
        await waiter.done.wait()
        return {}

    def watch(
        self, conn: object, topics: Sequence[str], snapshot: bool = False
    ) -> trio.abc.ReceiveChannel[EventItem]:
        """Start a watch; events are queued without waiting (see :class:`_Watch`).

        With ``snapshot``, the stream starts with the current state of each
        topic (in the order given), each topic's closed by a ``snapshot_end``
        event. The state is read and the watch registered in this one
        synchronous step, between two turns of the runner: one consistent
        cut, every later change arrives as an event, none is missed or
        reported twice."""
        unknown = [t for t in topics if t not in TOPICS]
        if unknown:
            raise ApiError(
                ErrorCode.BAD_ARGS,
                f"unknown topic {unknown[0]!r} (known: {', '.join(sorted(TOPICS))})",
            )
        if self._finished:
            raise ApiError(ErrorCode.UNAVAILABLE, "the daemon is shutting down")
        first = self._snapshot(topics) if snapshot else None
        send, receive = trio.open_memory_channel[EventItem](self.watcher_buffer)
        self._watches.append(_Watch(conn, frozenset(topics), send))
        return receive if first is None else _SnapshotThenLive(first, receive)

    def _snapshot(self, topics: Sequence[str]) -> Iterator[EventItem]:
        """The state of ``topics`` now, as references; converted when read."""
        members = list(self.node.members())
        cut: list[tuple[str, list[Any]]] = []
        for topic in topics:
            if topic == Topic.MEMBERS.value:
                cut.append((topic, members))
            elif topic == Topic.REGISTRY.value:
                registry = getattr(self.node, "registry", None)
                claims = list(registry.state.entries()) if registry is not None else []
                cut.append((topic, claims))
            else:  # events: nothing is current; only the end marker
                cut.append((topic, []))
        by_node = {m.node: m for m in members}

        def items() -> Iterator[EventItem]:
            for topic, records in cut:
                for r in records:
                    if topic == Topic.MEMBERS.value:
                        yield snapshot_member_to_wire(r)
                    else:
                        yield snapshot_entry_to_wire(r.origin, r.entry, by_node.get(r.origin))
                yield snapshot_end_to_wire(topic, len(records))

        return items()

    def connection_closed(self, conn: object) -> None:
        keep = []
        for w in self._watches:
            if w.conn is conn:
                w.send.close()
            else:
                keep.append(w)
        self._watches = keep
        conn_id = getattr(conn, "id", None)
        if conn_id is not None and self._reg_conns.pop(conn_id, None) is not None:
            # Its entries go cluster-wide. Must not block: if the input
            # channel is full, the loop takes it at its next turn (a command
            # of this connection still queued sees it closed and is refused).
            try:
                self.send_channel.send_nowait(ConnClosed(conn_id))
            except trio.WouldBlock:
                self.counters["conn_closed_deferred"] += 1
                self._deferred.append(ConnClosed(conn_id))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # the runner is gone; so are the entries


def open_inputs(
    size: int = 1024,
) -> tuple[trio.MemorySendChannel[Item], trio.MemoryReceiveChannel[Item]]:
    """The runner's input channel; receivers get the sending end."""
    send, receive = trio.open_memory_channel[Item](size)
    return send, receive


# --- running it all -------------------------------------------------------------------


class _StartStatus:
    """Wraps a TaskStatus to know whether the service reported ready."""

    def __init__(self, inner: trio.TaskStatus[Any]) -> None:
        self.inner = inner
        self.called = False

    def started(self, value: Any = None) -> None:
        self.called = True
        self.inner.started(value)


Service = Callable[..., Awaitable[None]]
"""An async callable taking ``task_status=`` (like ``trio.serve_listeners``)."""


async def serve(
    runner: Runner,
    services: Sequence[Service] = (),
    *,
    handle_signals: bool = False,
    peers_save_interval_s: float = 60.0,
    flush_timeout_s: float = 1.0,
    on_reload: Callable[[], Awaitable[None]] | None = None,
) -> int:
    """Start ``services`` in order, then the runner; return the exit code.

    0 after the node left (signal or API leave); 1 if a service failed to
    start (its message is logged); 70 if the core or a running service raised,
    which is a bug (logged once, with the traceback).

    With ``handle_signals``, SIGINT and SIGTERM start a graceful leave, and
    SIGHUP awaits ``on_reload`` (one reload at a time; ignored without one).
    """
    exit_code = EXIT_OK

    async def guard(
        fn: Service,
        nursery: trio.Nursery,
        *,
        task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        nonlocal exit_code
        status = _StartStatus(task_status)
        try:
            await fn(task_status=status)
        except Exception as e:
            if not status.called:
                raise  # nursery.start() re-raises it: a start-up failure
            runner.logger.exception("internal error: this is a bug; exiting", e)
            exit_code = EXIT_BUG
            nursery.cancel_scope.cancel()

    async def peers_saver(*, task_status: trio.TaskStatus[Any]) -> None:
        # Save soon after membership changes (debounced), and at least every
        # interval; no wake-ups at all while nothing changes.
        task_status.started()
        while True:
            with trio.move_on_after(peers_save_interval_s):
                await runner.peers_changed.wait()
                await trio.sleep(PEERS_SAVE_DEBOUNCE_S)
            runner.peers_changed = trio.Event()
            await runner.save_peers()

    async def signals(*, task_status: trio.TaskStatus[Any]) -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as received:
            task_status.started()
            count = 0
            async for signum in received:
                if signum == signal.SIGHUP:
                    if on_reload is None:
                        runner.logger.info("SIGHUP ignored: nothing to reload")
                    elif not runner.leaving and not runner.finished:
                        try:
                            await on_reload()
                        except Exception as e:  # a failed reload keeps the running config
                            runner.logger.exception(
                                "reload failed; the running configuration stays", e
                            )
                    continue
                count += 1
                name = signal.Signals(signum).name
                if count == 1:
                    await runner.shutdown(name)
                else:
                    runner.logger.warning("second signal: exiting without waiting", signal=name)
                    nursery.cancel_scope.cancel()

    async with trio.open_nursery() as nursery:
        extra: list[Service] = []
        if handle_signals:
            extra.append(signals)
        if runner.state is not None and peers_save_interval_s > 0:
            extra.append(peers_saver)
        try:
            for fn in [*extra, *services]:
                await nursery.start(guard, fn, nursery)
        except Exception as e:
            runner.logger.error("start-up failed", error=str(e) or type(e).__name__)
            nursery.cancel_scope.cancel()
            return EXIT_FAILURE
        try:
            await runner.run()
        except CoreFailure:
            exit_code = EXIT_BUG  # logged by the runner, with the traceback
        except Exception as e:
            # Carrying out an output failed: a bug in the shell.
            runner.logger.exception("runner failed: this is a bug; exiting", e)
            exit_code = EXIT_BUG
        else:
            # Let API calls that waited for the leave send their answers.
            with trio.move_on_after(flush_timeout_s):
                while runner.in_flight:
                    await trio.sleep(0.01)
                await trio.sleep(0.05)
        nursery.cancel_scope.cancel()
    if exit_code == EXIT_OK:
        runner.save_peers_now()
    return exit_code
