"""The runner: the one task that owns the core.

The core is one :class:`~peerd.core.peer.Peer` (membership, registry, the
partial mesh and messages to names); every protocol decision is its own, and
the runner only moves bytes and fires timers for it. Every receiver (UDP,
TCP, peer links, API calls, signals) puts items into one bounded trio memory
channel; only the runner task calls ``node.handle(now, input)``, so the core
needs no locks and sees one totally ordered input history, as in the
simulator. Outputs are carried out without awaiting: datagrams are sent (or
dropped) at once, streams, watch links and peer-link messages are handed to
TCP tasks, messages to names are offered to API connections, and every timer,
whatever its type, goes on one deadline heap that the loop itself waits on
(``trio.move_on_at(next deadline)``). A slow peer or API client therefore
never stalls the core. An output that asks for an answer (did the link take
the message, did the API connection) is answered right after the outputs of
the same input are carried out, never from inside them.

An exception out of ``node.handle`` is a bug, not a network condition; it is
contained to the input that hit it (:mod:`peerd.shell.guard`: counted,
logged, that input's outputs discarded, a failed timer fed again later), so
one poison datagram cannot stop every daemon it reaches. Only ``Start``
raising, or a bug of the shell itself, stops the daemon (exit 70).

The runner is also the API server's backend and answers peers' key requests:
those parts live in :mod:`peerd.shell.backend` and :mod:`peerd.shell.keyops`
as mixins of :class:`Runner`, because they touch the core only from inside
this task (through ``call_in_runner``) and so share its state without locks.
Starting the services around the runner and turning its end into an exit code
is :mod:`peerd.shell.serve`.

A :class:`Lifecycle` (systemd's, in :mod:`peerd.shell.systemd`) hears when
the first join finished (ready), when members change (status) and when the
leave begins (stopping), and gets a ``tick`` at the deadline it asks for.
The ticks come from this loop, between core calls, so the watchdog pings they
send stop when the core or the loop stops turning.
"""

from __future__ import annotations

import collections
import contextlib
import heapq
import itertools
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import trio

from peerd.api.protocol import (
    CONNECTION_STREAM,
    ApiError,
    ErrorCode,
    Topic,
    decode_user_event,
    member_event_to_wire,
    registry_event_to_wire,
    user_event_to_wire,
    with_topic,
)
from peerd.core.config import SwimConfig
from peerd.core.events import (
    Broadcast,
    BroadcastResult,
    CloseLink,
    CommandResult,
    Connect,
    Deliver,
    DeliverToConn,
    EventKind,
    IncarnationChanged,
    JoinDone,
    Leave,
    LeaveDone,
    LinkDown,
    LinkSend,
    LinkSendDone,
    Log,
    LogLevel,
    MailboxTaken,
    MemberEvent,
    MeshMessage,
    MessageIn,
    NeighborDown,
    NeighborUp,
    Offered,
    OfferOutcome,
    OpenStream,
    PacketIn,
    PeerInput,
    PeerOutput,
    RegEventKind,
    RegistryEvent,
    Send,
    SendPacket,
    SendResult,
    SetTimer,
    Start,
    StreamReply,
    StreamRequest,
    StreamResponse,
    TimerFired,
    WatchLinks,
)
from peerd.shell.backend import Backend, RegCall
from peerd.shell.guard import CoreGuard
from peerd.shell.keyops import KeyOps
from peerd.shell.keys import KeyManager as KeyManager
from peerd.shell.links import LinkLost, LinkMessages
from peerd.shell.logs import LimitedLog, Logger, RateLimiter
from peerd.shell.messaging import DIRECT_PRIORITY, Sends
from peerd.shell.ports import Call as Call
from peerd.shell.ports import CoreFailure as CoreFailure
from peerd.shell.ports import (
    EventItem,
    Item,
    Lifecycle,
    LinkPort,
    NodeLike,
    PacketPort,
    Shutdown,
    StreamPort,
    TrafficObserver,
    Waiter,
)
from peerd.shell.ports import (
    open_inputs as open_inputs,
)
from peerd.shell.state import StateDir, StateError
from peerd.shell.tags import NodeTags
from peerd.shell.watches import Watch
from peerd.wire import codec
from peerd.wire.messages import (
    Addr,
    Channel,
    KeyRequest,
    Message,
    NameMsg,
    NameReply,
    NodeId,
)

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
# What a peer link may carry into the core (anything else decoded there is
# counted and dropped: it has no input).
_LINK_MESSAGES = MeshMessage | NameMsg | NameReply


class Runner(Backend, KeyOps):
    """Owns the core and runs the loop; the API backend and key glue are its mixins."""

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
        links: LinkPort | None = None,
    ) -> None:
        self.node = node
        # The peer links (the partial mesh's, and direct ones for messages
        # to names): the link manager's.
        self.links = links
        self._bcast_refs = itertools.count(1)
        self._bcast_results: dict[int, BroadcastResult] = {}
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
        self.guard = CoreGuard(logger, self.counters)  # core bugs, one input at a time
        # Extra counter sets shown by `status` under a prefix (e.g. the API server's).
        self.counter_sources: dict[str, Mapping[str, int]] = {}
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
        # One heap for every timer the core sets, whatever its type.
        self._timers: list[tuple[float, int, Any]] = []
        self._seq = itertools.count()
        self._join_waiters: collections.deque[Waiter] = collections.deque()
        self._join_changed = trio.Event()
        self._join_lock = trio.Lock()
        self._leave_waiters: list[Waiter] = []
        self._watches: list[Watch] = []
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
        self._reg_calls: dict[int, RegCall] = {}
        self._reg_conns: dict[int, Any] = {}
        self._deferred: collections.deque[PeerInput] = collections.deque()
        # Answers the core asked for while its outputs were carried out
        # (LinkSendDone, Offered): fed right after, in order.
        self._feedback: collections.deque[PeerInput] = collections.deque()
        # Mailbox messages the API connections' writers took (conn -> count).
        self._taken: dict[int, int] = {}
        self._local_brief: tuple[str, str] | None = None
        # Configured tags and run-time changes (the agent sets it): set-tags
        # then keeps its changes in the state directory; None: not kept.
        self.node_tags: NodeTags | None = None
        registry = getattr(node, "registry", None)
        if registry is not None:
            self.gauge_sources["registry_entries"] = registry.state.entry_count
        # The API side of messages to names (the core's names messaging
        # decides; its links are the mesh's link manager's).
        names = getattr(node, "names", None)
        self.sends = (
            Sends(self._reg_conns, send_timeout_s=names.config.send_timeout_s)
            if names is not None
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

        Raises :class:`CoreFailure` when the core raises on ``Start``.
        """
        # The core answers Start with a JoinDone (0/0 without seeds): pair it.
        self._started_at = trio.current_time()
        self._join_waiters.append(Waiter("start"))
        self._handle(Start(self.seeds))
        try:
            while not self._finished:
                if self.lifecycle is not None and (self.lifecycle.deadline <= trio.current_time()):
                    self.lifecycle.tick(trio.current_time())
                if self._taken:
                    self._feed_taken()
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
            self._handle(TimerFired(timer))
            fired += 1
            if fired >= self.max_timers_per_turn:
                # A core re-arming timers in the past must not starve inputs.
                self.counters["timers_deferred"] += 1
                return

    def _dispatch(self, item: Item) -> None:
        if self._taken:
            self._feed_taken()
        match item:
            case Call():
                try:
                    item.result = self.guard.call(item.fn)
                except CoreFailure:
                    raise
                except Exception as e:  # ApiError and friends go back to the caller
                    item.error = e
                item.done.set()
            case Shutdown():
                self.logger.info("shutting down", reason=item.reason)
                self._begin_leave(item.reason)
            case LinkMessages(src, msgs):
                self._link_messages(src, msgs)
            case StreamRequest(stream, src, data) if codec.peek_type(data) == KeyRequest.TYPE:
                self._on_key_request(stream, src, data)
            case LinkLost(node, mesh, link):
                self._on_link_lost(node, mesh, link)
            case _:
                self._handle(item)

    def _handle(self, inp: PeerInput) -> None:
        """Feed ``inp``, carry out the outputs, then feed the answers they
        asked for (each in turn, with its own outputs), in order."""
        self._feed(inp)
        feedback = self._feedback
        while feedback:
            self._feed(feedback.popleft())

    def _feed(self, inp: PeerInput) -> None:
        if self.traffic is not None:
            match inp:
                case PacketIn(_, data):
                    self.traffic.packet("in", data)
                case StreamRequest(_, _, data) | StreamResponse(_, data):
                    self.traffic.stream("in", data)
        try:
            outputs = self.node.handle(trio.current_time(), inp)
        except Exception as e:  # a core bug: contained to this input (see guard)
            if (retry := self.guard.failed(inp, e, trio.current_time())) is not None:
                heapq.heappush(self._timers, (retry[0], next(self._seq), retry[1]))
            return
        for out in outputs:
            self._carry_out(out)

    def _carry_out(self, out: PeerOutput) -> None:
        c = out.__class__  # messages to names: two or three outputs per message
        if c is LinkSend:
            self._link_send(out)  # type: ignore[arg-type]
            return
        if c is SendResult:
            if self.sends is not None:
                self.sends.complete(out)  # type: ignore[arg-type]
            return
        if c is DeliverToConn:
            self._offer(out)  # type: ignore[arg-type]
            return
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
            # Peer links (the mesh's and direct ones) and messages to names.
            case Send(dst, msg, priority):
                if self.links is not None:
                    self.links.send(dst, msg, priority, mesh=True)
            case Connect(peer):
                if self.links is not None:
                    self.links.connect(peer.node, peer.addr)
            case CloseLink(node, mesh):
                if self.links is not None:
                    self.links.close(node, mesh=mesh)
            case Deliver():
                self._deliver(out)
            case BroadcastResult(ref):
                self._bcast_results[ref] = out
            case NeighborUp(peer):
                self.counters["mesh_neighbor_up"] += 1
                self.logger.debug("mesh neighbour up", peer=peer.node.hex()[:8], addr=peer.addr)
            case NeighborDown(peer):
                self.counters["mesh_neighbor_down"] += 1
                self.logger.debug("mesh neighbour down", peer=peer.node.hex()[:8])
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
        keep: list[Watch] = []
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
        if self.sends is not None:
            # Their deadlines will not fire any more.
            self.sends.abandon(ApiError(ErrorCode.UNAVAILABLE, "the daemon is shutting down"))

    def _begin_leave(self, reason: str = "leave requested over the API") -> None:
        if self._leave_deadline is not None or self._finished:
            return
        if self.lifecycle is not None:
            self.lifecycle.leaving(reason)
        self._leave_deadline = trio.current_time() + self.leave_timeout_s
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

    # --- peer links, broadcasts, messages to names -----------------------------------
    # Carrying out what the Peer decided (see peerd.core.peer for why): the
    # link manager moves its messages, the API server its events.

    def _link_messages(self, src: NodeId, msgs: Iterable[Message]) -> None:
        for msg in msgs:
            if isinstance(msg, _LINK_MESSAGES):
                self._handle(MessageIn(src, msg))
            else:  # a type no link carries: decoded, but no input of the core
                self.counters["link_drop_unexpected"] += 1

    def _on_link_lost(self, node: NodeId, mesh: bool, link: int | None) -> None:
        if mesh and self.links is not None:
            # Before LinkDown: what the mesh then asks for stands.
            self.links.mesh_lost(node, link)
        self._handle(LinkDown(node, link, mesh))

    def _link_send(self, out: LinkSend) -> None:
        """A message to a name (or its answer) over a direct link, opened on
        demand; the core hears if the link manager refused it or it went on
        another link than the core thinks."""
        node, links = out.node, self.links
        ok = False
        if links is not None:
            if out.addr is not None and not links.has(node):
                links.connect(node, out.addr, mesh=False)
            ok = bool(links.send(node, out.msg, DIRECT_PRIORITY, mesh=False))
        if out.seq:
            link = links.link_id(node) if ok and links is not None else None
            if not ok or link != out.link:
                self._feedback.append(LinkSendDone(out.seq, ok, link))

    def _offer(self, d: DeliverToConn) -> None:
        outcome = (
            self.sends.offer(d, self._mail_report)
            if self.sends is not None
            else OfferOutcome.CLOSED
        )
        if d.answer is None:
            self._feedback.append(Offered(d.token, outcome))
        elif outcome is OfferOutcome.OK:
            self._link_send(d.answer)
        else:
            self._feedback.append(Offered(d.token, outcome, d))

    def _mail_report(self, conn: int, taken: int | None) -> None:
        """An API connection's writer took ``taken`` mailbox messages (None:
        the connection closed, which ``connection_closed`` tells the core).
        Called from the server's tasks: summed here, fed at the runner's next
        turn (the core needs them before its next delivery, not sooner)."""
        if taken is None:
            if self.sends is not None:
                self.sends.forget_conn(conn)
            return
        self._taken[conn] = self._taken.get(conn, 0) + taken

    def _feed_taken(self) -> None:
        taken, self._taken = self._taken, {}
        for conn, count in taken.items():
            self._handle(MailboxTaken(conn, count))

    def _deliver(self, d: Deliver) -> None:
        """A user broadcast (the Peer keeps what the daemon itself broadcasts)."""
        self.counters[f"mesh_delivered_{d.channel.name.lower()}"] += 1
        if d.channel is not Channel.USER:
            return
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

    def broadcast(self, channel: Channel, payload: bytes) -> BroadcastResult:
        """In the runner task: broadcast ``payload`` on ``channel`` to every
        node (the Peer answers at once; no mesh: an ``unavailable`` error)."""
        ref = next(self._bcast_refs)
        self._handle(Broadcast(ref, channel, payload))
        result = self._bcast_results.pop(ref, None)
        if result is None:  # a core without a mesh (a Peer answers at once)
            raise ApiError(ErrorCode.UNAVAILABLE, "this daemon has no mesh")
        return result

    # --- control from other tasks ------------------------------------------------------

    async def call_in_runner(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` in the runner task and return its result (or raise its error)."""
        if self._finished:
            raise ApiError(ErrorCode.UNAVAILABLE, "the daemon is shutting down")
        call = Call(fn)
        await self.send_channel.send(call)
        await call.done.wait()
        if call.error is not None:
            raise call.error
        return call.result

    async def shutdown(self, reason: str) -> None:
        """Graceful stop: leave, then the loop ends on LeaveDone (or its bound)."""
        await self.send_channel.send(Shutdown(reason))

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
