"""The membership node: SWIM failure detection with the Lifeguard refinements.

Theory of operation (SWIM: Das, Gupta, Motivala 2002; Lifeguard: Dadgar,
Phillips, Currey 2018): :class:`Node` composes the concerns of the protocol,
each in its own module of this folder over one shared state
(:mod:`peerd.core.swim.base`):

* probing and Lifeguard's local health (:mod:`peerd.core.swim.probe`);
* suspicion, dogpile, refutation, deaths (:mod:`peerd.core.swim.suspicion`);
* gossip, piggyback and RingCast (:mod:`peerd.core.swim.dissemination`);
* push-pull, digest sync and partition healing (:mod:`peerd.core.swim.sync`);
* news applied to the members table (:mod:`peerd.core.swim.updates`), whose
  records and store are in :mod:`peerd.core.swim.members`;
* news over the mesh's broadcast tree (:mod:`peerd.core.swim.treecast`).

It owns the one entry point, :meth:`Node.handle`: an input (a datagram, a
stream, a timer, a command) is dispatched to the concern it belongs to, and
the outputs the concerns appended are returned. It also owns the life cycle
(start, join, leave, tags) and the read side the shells use.

The registry is not part of it: it is membership's sibling in the peer
(:mod:`peerd.core.peer`). Its deltas still ride membership's gossip queue,
datagrams and streams, so with ``news`` set (by a peer that runs a registry)
membership reports what the registry follows (a member up or down, a
registry message received, a gossip round about to go: peerd.core.events,
"membership and the registry") at the point where it happens, and carries
what the registry returns (an item to gossip, a datagram, a stream). A
registry message in the middle of a packet, and the gossip round, pause the
handling until the peer has given the registry its turn (Resume), so the
registry acts at exactly the point where it acted when it was called from
inside; the read side below is the view the registry reads
(:class:`peerd.core.registry.view.MembersView`).
"""

from __future__ import annotations

import functools
import random
from collections.abc import Hashable

from peerd.core.events import (
    Carried,
    EventKind,
    GossipDue,
    GossipRound,
    IncarnationChanged,
    Input,
    Join,
    JoinDone,
    Leave,
    LeaveDone,
    LinkClosed,
    MemberInfo,
    MeshConnected,
    MeshDelivered,
    NodeStarted,
    OpenStream,
    Output,
    PacketIn,
    QueueGossip,
    Resume,
    SendDirect,
    SendTo,
    SetTags,
    Start,
    StreamFailed,
    StreamRequest,
    StreamResponse,
    StreamTo,
    TimerFired,
    Unreachable,
)
from peerd.core.swim import formulas
from peerd.core.swim.base import (
    JOIN,
    LIVE,
    OWN,
    PACKET,
    REAP_INTERVAL_S,
    STREAM,
    JoinBatch,
    StreamCtx,
    _fmt,
    tags_problem,
)
from peerd.core.swim.dissemination import Dissemination
from peerd.core.swim.ghosts import Ghosts
from peerd.core.swim.members import (
    AMBIGUOUS,
    Member,
)
from peerd.core.swim.probe import Probing
from peerd.core.swim.suspicion import Suspicions
from peerd.core.swim.sync import AntiEntropy
from peerd.core.swim.treecast import TreeCast
from peerd.core.swim.updates import Updates
from peerd.core.timers import (
    ConfirmTimeout,
    GhostReap,
    GossipTick,
    IndirectTimeout,
    LeaveSpread,
    ProbeTick,
    ProbeTimeout,
    PushPullTick,
    ReapTick,
    ReconnectTick,
    RingFlush,
    SuspicionTimeout,
    Timer,
    TreeFlush,
    TreeRelay,
    TreeSweep,
)
from peerd.wire import codec
from peerd.wire.codec import (
    MAX_U64,
    DecodeError,
)
from peerd.wire.messages import (
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
    Tags,
)

# Inputs that bring news from a peer off the tree (the rest are our own, or
# the tree's: see peerd.core.swim.treecast).
_CTX: dict[type, int] = {
    PacketIn: PACKET,
    StreamRequest: STREAM,
    StreamResponse: STREAM,
}


class Node(Probing, Suspicions, Dissemination, AntiEntropy, Updates, Ghosts, TreeCast):
    """One peerd node's membership state machine. See the module docs."""

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

    def member_record(self, node: NodeId) -> Member | None:
        """``node``'s record itself, no copy (read it, never change it): for
        a lookup on every message to a name."""
        return self._members.get(node)

    def sample_alive(self, rng: random.Random, k: int) -> list[MemberInfo]:
        """Up to ``k`` random members other than this node that are alive (not
        suspect): contacts for the mesh. O(k), whatever the cluster size."""
        out = []
        for node in self._live.sample(rng, k):
            m = self._peek(node)
            if m.status is Status.ALIVE:
                out.append(m.info())
        return out

    def live_count(self) -> int:
        """Live members including this node (the N of the formulas)."""
        return len(self._live) + 1

    def peer_addrs(self) -> list[Addr]:
        return [self._peek(n).addr for n in self._live]

    def queued_broadcasts(self) -> int:
        return len(self._queue)

    # --- the registry's view (peerd.core.registry.view.MembersView) ---------------

    @property
    def started(self) -> bool:
        return self._started

    @property
    def leaving(self) -> bool:
        return self._leaving

    def live_peers(self) -> list[tuple[NodeId, int]]:
        return [(n, self._peek(n).generation) for n in self._live]

    def live_peer_count(self) -> int:
        return len(self._live)

    def is_live_peer(self, node: NodeId) -> bool:
        return node in self._live

    def is_live_member(self, node: NodeId) -> bool:
        m: Member | None = self._peek(node)  # a read: no copy of a shared record
        return m is not None and m.status in LIVE

    def sample_live(self, rng: random.Random, k: int) -> list[NodeId]:
        return self._live.sample(rng, k)

    def queued(self, key: Hashable) -> bytes | None:
        return self._queue.get(key)

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

    def handle(self, now: float, inp: Input) -> list[Output]:
        """Feed one input; returns what to do. Bad input is counted, never raised."""
        self._now = now
        out: list[Output] = []
        self._out = out
        self._tc.ctx = _CTX.get(inp.__class__, OWN)
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
                if self._tc.mesh and getattr(self._streams.get(stream), "purpose", "") == "join":
                    self._tc.ctx = JOIN
                self._on_stream_response(stream, data)
            case StreamFailed(stream, reason):
                self._on_stream_failed(stream, reason)
            case Start(seeds):
                self._on_start(seeds)
                if self.news:
                    self._out.append(NodeStarted())
            case Join(addrs):
                self._start_join(addrs)
            case SetTags(tags):
                self._on_set_tags(tags)
            case Leave():
                self._on_leave()
            case MeshDelivered():  # the tree's channel (the peer routes by channel)
                self._on_tree_delivered(inp)
            case MeshConnected(connected):
                self._tree_connected(connected)
            # what the registry asks membership to carry (see the module docs)
            case QueueGossip(key, data):
                self._queue.enqueue(key, data)
                self._arm_gossip()
            case SendTo(node, msg):
                m = self._members.get(node)
                if m is not None and m.status in LIVE and m is not self._me:
                    self._send(m.addr, msg)  # type: ignore[arg-type]
            case StreamTo(node, data):
                self._next_stream += 1
                self._out.append(OpenStream(self._next_stream, self._peek(node).addr, data))
            case SendDirect(parts, counter):
                self._send_direct(parts, counter)
            case GossipRound():
                self._gossip_round()
            case Resume():
                go_on, self._resume = self._resume, None
                if go_on is not None:
                    go_on()
        if self._ring_dirty and self._resume is None:
            self._update_watch()
        self._out = []
        return out

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
        self._arm(ProbeTick, self.rng.uniform(0, cfg.probe_interval_s))
        if cfg.push_pull_interval_s > 0 and self._preloaded:
            # Preloaded (a simulation starting converged): as if running for
            # long already, each node at a random phase of the interval.
            interval = formulas.push_pull_scale(cfg.push_pull_interval_s, self.live_count())
            self._arm_push_pull(self.rng.uniform(0.0, 1.0) * interval)
        elif cfg.push_pull_interval_s > 0:
            # An early first sync repairs what a join's gossip missed (nodes
            # that joined at the same moment), then the regular interval.
            first = min(cfg.push_pull_interval_s, 5 * cfg.probe_interval_s)
            self._arm_push_pull(self.rng.uniform(0.5, 1.0) * first)
        self._arm(ReconnectTick, min(cfg.probe_interval_s, cfg.reconnect_interval_s))
        self._arm(ReapTick, REAP_INTERVAL_S)
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
        self._arm(LeaveSpread, self.config.leave_propagate_s)

    def _on_timer(self, timer: Timer) -> None:
        armed = self._timers.live.get(getattr(timer, "token", 0))
        if armed is None or (armed is not timer and armed != timer):
            return  # superseded (or not ours)
        del self._timers.live[armed.token]
        match armed:
            case ProbeTick():
                self._probe_tick()
            case ProbeTimeout(seq=seq):
                self._probe_timeout(seq)
            case IndirectTimeout(seq=seq):
                self._relay_timeout(seq)
            case SuspicionTimeout(node=node, incarnation=incarnation):
                self._suspicion_expired((node, incarnation))
            case ConfirmTimeout(seq=seq):
                self._check_timeout(seq)
            case RingFlush():
                self._ring_flush()
            case GossipTick():
                self._gossip_armed = False
                if self.news:
                    # The registry flushes what it staged first (into our
                    # queue, or straight to every peer), then we go on.
                    self._out.append(GossipDue())
                    self._resume = self._gossip_tick
                else:
                    self._gossip_tick()
            case PushPullTick():
                self._push_pull_tick()
            case ReconnectTick():
                self._reconnect_tick()
            case ReapTick():
                self._reap()
                self._expire_tombstones()
                self._arm(ReapTick, REAP_INTERVAL_S)
            case GhostReap(node=node):
                self._ghost_reap(node)
            case LeaveSpread():
                self._out.append(LeaveDone())
            case TreeFlush():
                self._tree_flush()
            case TreeRelay():
                self._tree_relay()
            case TreeSweep():
                self._tree_sweep()

    def _gossip_tick(self) -> None:
        self._gossip_round()
        if len(self._queue) and (len(self._live) or self._recently_dead):
            self._gossip_armed = True
            self._arm(GossipTick, self.config.gossip_interval_s)

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
        for i, msg in enumerate(msgs, 1):
            self._dispatch(src, msg)
            if self._pausing:
                # A registry message: the registry takes its turn now, and the
                # rest of the packet comes after it (see the module docs).
                self._pausing = False
                self._resume = functools.partial(self._dispatch_from, src, msgs, i)
                return

    def _dispatch_from(self, src: Addr, msgs: list[Message], start: int) -> None:
        for i in range(start, len(msgs)):
            self._dispatch(src, msgs[i])
            if self._pausing:
                self._pausing = False
                self._resume = functools.partial(self._dispatch_from, src, msgs, i + 1)
                return

    # Copies of membership updates received (peerd/sim's
    # ``membership.copies_per_update`` divides the two counters): every
    # Alive (a join, a refutation, a tag change, a move), death notice and
    # leave about another member that arrives in a datagram is a copy; it is
    # news when it changed our record of that member (added it, or changed
    # its incarnation or status). Suspicions are the failure detector's own
    # traffic and are not counted; neither are push-pull rows (state, not
    # copies of an update). Two counters and one record read per update: no
    # table of who received what.
    def _copy_in(self, node: NodeId) -> tuple[int, Status] | bool:
        if node == self._me.node:
            return False
        self.counters["update_copies_in"] += 1
        if node not in self._members:
            return True
        m = self._peek(node)
        return (m.incarnation, m.status)

    def _copy_done(self, node: NodeId, before: tuple[int, Status] | bool) -> None:
        if before is False or node not in self._members:
            return
        m = self._peek(node)
        if before is True or before != (m.incarnation, m.status):
            self.counters["update_news_in"] += 1

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
                before = self._copy_in(msg.node)
                self._on_alive(msg)
                self._copy_done(msg.node, before)
            case Suspect():
                self._on_suspect(msg, src)
            case Dead() | Died():
                before = self._copy_in(msg.node)
                self._on_dead(msg.node, msg.incarnation, src)
                self._copy_done(msg.node, before)
            case DiedRef():
                node = self._by_prefix.get(msg.prefix)
                if node == AMBIGUOUS:
                    self.counters["update_copies_in"] += 1
                    self._drop("died_ref_ambiguous", f"from={_fmt(src)}")
                elif node is not None:
                    before = self._copy_in(node)
                    self._on_dead(node, msg.incarnation, src)
                    self._copy_done(node, before)
                else:
                    # the death of a node we never knew (or have reaped)
                    self.counters["update_copies_in"] += 1
                    self.counters["drop.died_ref_unknown"] += 1
            case Left():
                before = self._copy_in(msg.node)
                self._on_left(msg, src)
                self._copy_done(msg.node, before)
            case PushPull():
                self._drop("push_pull_in_datagram")
            case RegDelta() | RegSnapshot() | RegAck():
                if self.news:
                    self._out.append(Carried(self._live_node_at(src), msg))
                    self._pausing = True
            case RegSync():
                self._drop("reg_sync_in_datagram")
            case KeyRequest() | KeyReply():
                self._drop("key_op_in_datagram")
