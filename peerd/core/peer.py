"""One peer: where the subsystems of the core meet (docs/DESIGN.md, "One Peer").

Theory of operation: a daemon and a simulated node are the same pure object,
driven only through :meth:`Peer.handle` (an input and the time it happened,
returning what to do), and read through the few methods the shells show over
the API (members, the local member, the registry, counters, local health).
The shells construct a :class:`Peer` and never reach past it, so what the
simulator measures at 10,000 nodes is what the daemon runs.

A Peer composes; each protocol lives in its subsystem with its own state and
rules: membership (:mod:`peerd.core.swim`), the registry
(:mod:`peerd.core.registry`), the partial mesh (:mod:`peerd.core.mesh`:
HyParView links and Plumtree trees) and messages to names
(:mod:`peerd.core.names`). What joins them is decided here, once, for both
runtimes:

* the registry is membership's sibling, and neither calls the other: the
  registry's deltas ride membership's gossip queue, datagrams and streams,
  so membership reports the news the registry follows (a member up or down,
  a registry message it received, a gossip round about to go) as outputs,
  which the peer hands to the registry at once, and the registry returns
  what membership should carry for it (an item to gossip, a datagram, a
  stream), which the peer hands to membership in order; news that pauses
  membership is followed by Resume (peerd.core.events, "membership and the
  registry"). The peer keeps which streams are the registry's and routes
  their replies, and the registry's timers, to it;

* membership feeds the mesh: every member that joins, comes back or changes
  is a hint for HyParView's passive view, every one that dies, leaves or is
  forgotten is dropped from it, and a dead node's links are closed (its
  daemon answers nothing; a frozen one keeps its links open) and whatever
  messages to names waited on them fail;
* the mesh enters the overlay after each join of the membership (the start's
  or the API's), through a few random alive members, whose passive view a
  few more seed; a leave leaves the mesh right after membership announced
  it (on the tree, see below);
* the registry's deltas go over the mesh (Plumtree on the registry channel)
  while the mesh has neighbours, and by gossip before the first and after
  the last; what the mesh delivers on that channel goes back to the registry;
  so do membership's own news (joins, deaths, leaves: the membership
  channel, :mod:`peerd.core.swim.treecast`);
* peer links carry the mesh's messages and messages to names; the Peer
  routes each by its type, and a lost link is news for both;
* every timer is a typed value: the Peer hands it back to the subsystem whose
  type it is.

Without a mesh, names and a registry (``mesh=None``, ``names=None``,
``registry=None``) the Peer is exactly the membership node: ``handle`` is
bound to its entry point, at no extra cost per input (its registry stays
empty, and nothing feeds it). The simulator's membership-only scenarios run
a registry all the same, as every daemon does: an empty registry still
follows each push-pull with a sync of its own, which is traffic they measure.
"""

from __future__ import annotations

import collections
import random
from collections.abc import Callable, Mapping
from typing import Any, cast

from peerd.core import events as nev
from peerd.core.config import SwimConfig
from peerd.core.events import (
    Broadcast,
    BroadcastResult,
    CloseLink,
    ConnClosed,
    Deliver,
    EventKind,
    Input,
    JoinDone,
    JoinMesh,
    Leave,
    LeaveMesh,
    LinkDown,
    MemberEvent,
    MemberInfo,
    MembershipHint,
    MeshCast,
    MeshConnected,
    MeshDelivered,
    MeshInput,
    MeshTimer,
    MeshTimerFired,
    MessageIn,
    NeighborDown,
    NeighborUp,
    Output,
    PeerInput,
    PeerOutput,
    Register,
    SetMeshTimer,
    SetTimer,
    TimerFired,
)
from peerd.core.mesh.config import MeshConfig
from peerd.core.mesh.mesh import Mesh
from peerd.core.names.core import Names, NamesConfig
from peerd.core.names.replica import PeerView
from peerd.core.registry.config import RegistryConfig
from peerd.core.registry.service import RegistryService
from peerd.core.registry.state import RegistryTables
from peerd.core.swim.members import StoreFactory
from peerd.core.swim.membership import Node
from peerd.core.timers import RegFlush, RegSettleTimeout, RegSyncTick
from peerd.wire.messages import Addr, Channel, MeshPeer, NameMsg, NameReply, NodeId, Tags

# SWIM members handed to the mesh as join contacts, and more to seed its
# passive view (HyParView's join needs one live contact; a few more cover a
# contact that died since membership last heard of it).
MESH_JOIN_CONTACTS = 3
MESH_JOIN_HINTS = 8
_HINT_ALIVE = frozenset({EventKind.JOINED, EventKind.ALIVE, EventKind.UPDATED})
_HINT_DEAD = frozenset({EventKind.DEAD, EventKind.LEFT, EventKind.REAPED})
# The registry's part (one block: its wiring). Membership's news for it, the
# news among them after which membership waits for Resume, what it asks
# membership to carry, and its timers.
_REG_NEWS = frozenset(
    {
        nev.NodeStarted,
        nev.NodeUp,
        nev.PeerLive,
        nev.NodeDown,
        nev.DeathDeclared,
        nev.NodeForgotten,
        nev.SyncedWith,
        nev.GossipDue,
        nev.Carried,
    }
)
_CARRY = frozenset({nev.QueueGossip, nev.SendTo, nev.StreamTo, nev.SendDirect, nev.GossipRound})
_REG_TIMERS = frozenset({RegFlush, RegSettleTimeout, RegSyncTick})
_RESUME = nev.Resume()
_DEFAULT_REGISTRY = RegistryConfig()
# Membership outputs that are news for another subsystem.
_NEWS = frozenset({MeshCast, MemberEvent, JoinDone, *_REG_NEWS})
# Inputs that only the names core takes.
_NAMES_INPUTS = (
    nev.SendToName,
    nev.ReplyToSender,
    nev.LinkSendDone,
    nev.Offered,
    nev.MailboxTaken,
    nev.MarkQuiet,
)


class Peer:
    """The core of one peerd node. See the module docs."""

    __slots__ = (
        "membership",
        "registry",
        "mesh",
        "names",
        "counters",
        "handle",
        "_view",
        "_mesh_rng",
        "_mesh_joined",
        "_neighbours",
        "_connected",
        "_leaving",
        "_routes",
        "_reg_streams",
    )

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
        mesh: MeshConfig | None = None,
        names: NamesConfig | None = None,
        mesh_rng: random.Random | None = None,
        names_rng: random.Random | None = None,
        registry: RegistryConfig | None = _DEFAULT_REGISTRY,
    ) -> None:
        self.membership = Node(
            node_id=node_id,
            name=name,
            addr=addr,
            config=config,
            rng=rng,
            incarnation=incarnation,
            generation=generation,
            tags=tags,
            store=store,
        )
        # Drop and message counters of the whole peer (the shells show them).
        self.counters: collections.Counter[str] = self.membership.counters
        # The registry beside membership: it reads membership through its
        # view, draws from membership's generator (one sequence of draws, as
        # when membership hosted it) and counts in the peer's counters.
        self.registry = RegistryService(
            self.membership, registry or RegistryConfig(), generation, rng, self.counters
        )
        self.membership.news = registry is not None
        self._reg_streams: dict[int, tuple[str, NodeId]] = {}  # stream -> (purpose, peer)
        # Randomness of its own for each subsystem (seeded from the node id
        # unless given): turning the mesh on does not change membership's draws.
        self._mesh_rng = mesh_rng or random.Random(b"peerd-mesh:" + node_id)
        self.mesh = (
            Mesh(MeshPeer(node_id, addr), mesh, self._mesh_rng) if mesh is not None else None
        )
        if self.mesh is not None:
            self.membership.use_tree()  # its news over the tree (swim.treecast)
        self._view = PeerView(self.membership, self.registry)
        self.names = (
            Names(
                self._view,
                names,
                rng=names_rng or random.Random(b"peerd-names:" + node_id),
                counters=self.counters,
            )
            if names is not None
            else None
        )
        self._mesh_joined = False
        self._neighbours = 0  # the mesh's active view, from NeighborUp/Down
        self._connected = False  # told to the registry: deltas go over the mesh
        self._leaving = False
        # The one way in: feed one input that happened at ``now``; returns what
        # to do. A membership-only peer binds it to the membership's own entry
        # point, so the simulator pays no extra call per input.
        self.handle: Callable[[float, PeerInput], list[PeerOutput]]
        if self.mesh is None and self.names is None and registry is None:
            self.handle = cast(
                Callable[[float, PeerInput], list[PeerOutput]], self.membership.handle
            )
        else:
            self.handle = self._handle
        self._routes = self._routes_table()

    # --- routing -------------------------------------------------------------------

    def _handle(self, now: float, inp: PeerInput) -> list[PeerOutput]:
        route = self._routes.get(inp.__class__)
        if route is None:
            # Membership's and the registry's own inputs (datagrams, streams,
            # their timers, commands): most inputs. Their outputs go out as
            # they are unless one is news for another subsystem.
            outs = self.membership.handle(now, cast(Input, inp))
            for o in outs:
                if o.__class__ in _NEWS:
                    out: list[PeerOutput] = []
                    self._after_membership(now, outs, out)
                    return out
            return outs  # type: ignore[return-value]
        out = []
        route(now, inp, out)
        return out

    def _routes_table(self) -> dict[type, Callable[[float, Any, list[PeerOutput]], None]]:
        return {
            **dict.fromkeys(_NAMES_INPUTS, self._to_names),
            TimerFired: self._on_timer,
            MessageIn: self._on_link_message,
            LinkDown: self._on_link_down,
            Broadcast: self._on_broadcast,
            JoinMesh: self._to_mesh,
            Leave: self._on_leave,
            ConnClosed: self._on_conn_closed,
            nev.SendToName: self._on_send,
            nev.ReplyToSender: self._on_send,
            Register: self._on_register,
            nev.Unregister: self._to_registry,
            nev.UpdateMeta: self._to_registry,
            nev.StreamResponse: self._on_stream_end,
            nev.StreamFailed: self._on_stream_end,
            MeshConnected: self._on_mesh_connected,
            MeshDelivered: self._on_mesh_delivered,
        }

    def _on_timer(self, now: float, inp: TimerFired, out: list[PeerOutput]) -> None:
        timer = inp.timer
        if isinstance(timer, MeshTimer):
            self._to_mesh(now, MeshTimerFired(timer), out)
        elif timer.__class__ is nev.SendDeadline:
            self._to_names(now, nev.DeadlineFired(timer), out)
        elif timer.__class__ in _REG_TIMERS:
            self._to_registry(now, inp, out)
        else:
            self._to_membership(now, inp, out)

    def _on_link_message(self, now: float, inp: MessageIn, out: list[PeerOutput]) -> None:
        msg = inp.msg
        c = msg.__class__
        if c is NameMsg or c is NameReply:
            self._to_names(now, inp, out)
        elif self.mesh is not None:
            self._to_mesh(now, inp, out)
        else:
            self.counters["link_drop_unexpected"] += 1

    def _on_link_down(self, now: float, inp: LinkDown, out: list[PeerOutput]) -> None:
        if inp.mesh and self.mesh is not None:
            self._to_mesh(now, LinkDown(inp.node), out)
        self._to_names(now, nev.LinkLost(inp.node, inp.link), out)

    def _on_broadcast(self, now: float, inp: Broadcast, out: list[PeerOutput]) -> None:
        if self.mesh is None or self._leaving:
            out.append(BroadcastResult(inp.ref, error=("unavailable", "no mesh")))
        else:
            self._to_mesh(now, inp, out)

    def _on_leave(self, now: float, inp: Leave, out: list[PeerOutput]) -> None:
        self._leaving = True
        self._view.is_leaving = True
        tree = self.membership.config.tree_dissemination
        if tree:
            self._to_membership(now, inp, out)  # first: its Left goes on the tree
        if self.mesh is not None:
            self._to_mesh(now, LeaveMesh(), out)
        if not tree:
            self._to_membership(now, inp, out)

    def _on_conn_closed(self, now: float, inp: ConnClosed, out: list[PeerOutput]) -> None:
        self._to_registry(now, inp, out)
        self._view.conns.discard(inp.conn)
        self._to_names(now, inp, out)

    def _on_send(
        self, now: float, inp: nev.SendToName | nev.ReplyToSender, out: list[PeerOutput]
    ) -> None:
        if inp.conn > 0:
            self._view.conns.add(inp.conn)
        self._to_names(now, inp, out)

    def _on_register(self, now: float, inp: Register, out: list[PeerOutput]) -> None:
        self._view.conns.add(inp.conn)
        self._to_registry(now, inp, out)

    def _to_membership(self, now: float, inp: Input, out: list[PeerOutput]) -> None:
        self._after_membership(now, self.membership.handle(now, inp), out)

    def _after_membership(self, now: float, outs: list[Output], out: list[PeerOutput]) -> None:
        for o in outs:
            c = o.__class__
            if c in _REG_NEWS:
                self._to_registry(now, o, out)
                if c is nev.GossipDue or (c is nev.Carried and o.stream is None):  # type: ignore[union-attr]
                    # it paused membership: the registry had its turn, go on
                    self._after_membership(now, self.membership.handle(now, _RESUME), out)
                continue
            if c is MeshCast:
                assert isinstance(o, MeshCast)
                self._cast(now, o, out)
                continue
            out.append(o)
            if c is MemberEvent:
                assert isinstance(o, MemberEvent)
                self._member_event(now, o, out)
            elif c is JoinDone:
                self._join_mesh(now, out)

    def _member_event(self, now: float, ev: MemberEvent, out: list[PeerOutput]) -> None:
        m = ev.member
        if ev.kind in _HINT_ALIVE:
            if self.mesh is not None:
                peer = (MeshPeer(m.node, m.addr),)
                hint = MembershipHint(revived=peer) if ev.revived else MembershipHint(alive=peer)
                self._to_mesh(now, hint, out)
        elif ev.kind in _HINT_DEAD:
            if self.mesh is not None:
                self._to_mesh(now, MembershipHint(dead=(m.node,)), out)
            if ev.kind is not EventKind.REAPED and (
                self.mesh is not None or self.names is not None
            ):
                # A dead node's daemon answers nothing (a frozen one keeps its
                # links open): close what is left, fail what waits on it.
                # (Without a mesh and names there are no peer links.)
                out.append(CloseLink(m.node, mesh=False))
                self._to_names(now, nev.LinkLost(m.node, None), out)

    def _join_mesh(self, now: float, out: list[PeerOutput]) -> None:
        """After a join (the start's or the API's): enter the overlay through a
        few alive members; with none, start alone (others join us, and the
        members' hints fill the passive view meanwhile)."""
        if self.mesh is None or self._leaving:
            return
        picks = self.membership.sample_alive(self._mesh_rng, MESH_JOIN_CONTACTS + MESH_JOIN_HINTS)
        if self._mesh_joined and not picks:
            return
        peers = tuple(MeshPeer(m.node, m.addr) for m in picks)
        if peers[MESH_JOIN_CONTACTS:]:
            self._to_mesh(now, MembershipHint(alive=peers[MESH_JOIN_CONTACTS:]), out)
        self._mesh_joined = True
        self._to_mesh(now, JoinMesh(peers[:MESH_JOIN_CONTACTS]), out)

    # --- the registry (see the module docs) ----------------------------------------

    def _to_registry(self, now: float, inp: Any, out: list[PeerOutput]) -> None:
        self._after_registry(now, self.registry.handle(now, inp), out)

    def _after_registry(self, now: float, outs: list[Output], out: list[PeerOutput]) -> None:
        membership = self.membership
        for o in outs:
            c = o.__class__
            if c in _CARRY:
                done = membership.handle(now, cast(Input, o))
                if c is nev.StreamTo:
                    assert isinstance(o, nev.StreamTo)
                    for d in done:
                        if isinstance(d, nev.OpenStream):
                            self._reg_streams[d.stream] = (o.purpose, o.node)
                self._after_membership(now, done, out)
            elif c is MeshCast:
                assert isinstance(o, MeshCast)
                self._cast(now, o, out)
            else:
                out.append(o)

    def _on_stream_end(
        self, now: float, inp: nev.StreamResponse | nev.StreamFailed, out: list[PeerOutput]
    ) -> None:
        ours = self._reg_streams.pop(inp.stream, None)
        if ours is None:
            self._to_membership(now, inp, out)
        elif isinstance(inp, nev.StreamResponse):
            self._after_registry(
                now, self.registry.stream_reply(now, ours[0], ours[1], inp.data), out
            )
        else:
            self._after_registry(now, self.registry.stream_failed(now, ours[1]), out)

    def _cast(self, now: float, cast: MeshCast, out: list[PeerOutput]) -> None:
        """The registry's own broadcast (its deltas) into the mesh (ref 0: ours)."""
        if self.mesh is None:
            self.counters["mesh_cast_dropped"] += 1
            return
        self._to_mesh(now, Broadcast(0, Channel(cast.channel), cast.payload), out)

    def _to_mesh(self, now: float, inp: MeshInput, out: list[PeerOutput]) -> None:
        mesh = self.mesh
        if mesh is None:
            return
        changed = False
        for o in mesh.handle(now, inp):
            c = o.__class__
            if c is SetMeshTimer:
                assert isinstance(o, SetMeshTimer)
                out.append(SetTimer(o.at, o.timer))
            elif c is Deliver:
                assert isinstance(o, Deliver)
                if o.channel is Channel.REGISTRY or o.channel is Channel.MEMBERSHIP:
                    self._on_mesh_delivered(
                        now, MeshDelivered(int(o.channel), o.origin, o.payload), out
                    )
                elif o.channel is Channel.USER:
                    out.append(o)
            elif c is BroadcastResult:
                assert isinstance(o, BroadcastResult)
                if o.ref:
                    out.append(o)
                elif o.error is not None:
                    self.counters["mesh_cast_refused"] += 1
            elif c is NeighborUp or c is NeighborDown:
                self._neighbours = max(0, self._neighbours + (1 if c is NeighborUp else -1))
                changed = True
                out.append(o)
            else:
                out.append(o)
        if changed and (self._neighbours > 0) != self._connected:
            self._connected = self._neighbours > 0
            self._on_mesh_connected(now, MeshConnected(self._connected), out)

    def _on_mesh_connected(self, now: float, inp: MeshConnected, out: list[PeerOutput]) -> None:
        """The mesh has neighbours, or lost them all: the registry's deltas and
        membership's news (peerd.core.swim.treecast) go by the tree or not."""
        self._to_registry(now, inp, out)
        self._to_membership(now, inp, out)

    def _on_mesh_delivered(self, now: float, inp: MeshDelivered, out: list[PeerOutput]) -> None:
        if inp.channel == Channel.MEMBERSHIP:
            self._to_membership(now, inp, out)
        else:
            self._to_registry(now, inp, out)

    def _to_names(self, now: float, inp: nev.NamesInput, out: list[PeerOutput]) -> None:
        names = self.names
        if names is None:
            if isinstance(inp, nev.SendToName | nev.ReplyToSender):
                failure = nev.Failure(
                    self.membership.node_id, nev.SendError.UNAVAILABLE, nev.Why.NO_REGISTRY
                )
                out.append(nev.SendResult(inp.call, 0, (failure,), failure, at_once=True))
            return
        for o in names.handle(now, inp):
            if o.__class__ is nev.SendDeadline:
                assert isinstance(o, nev.SendDeadline)
                out.append(SetTimer(o.at, o))
            else:
                out.append(o)

    # --- the simulator's converged start ------------------------------------------

    def preload_registry(self, tables: RegistryTables, owners: Mapping[int, int]) -> None:
        """Simulator only: start from a converged registry (see
        :meth:`RegistryService.preload`); the connections holding our own
        entries (``owners``: eid -> conn) are open API connections."""
        self.registry.preload(tables, owners)
        self._view.conns.update(owners.values())

    # --- the read side the shells use ------------------------------------------

    @property
    def node_id(self) -> NodeId:
        return self.membership.node_id

    @property
    def incarnation(self) -> int:
        return self.membership.incarnation

    @property
    def health_score(self) -> int:
        """Lifeguard local health (0 is healthy)."""
        return self.membership.health_score

    @property
    def leaving(self) -> bool:
        return self._leaving

    @property
    def mesh_neighbours(self) -> int:
        return self._neighbours

    def live_count(self) -> int:
        """Live members, this node included."""
        return self.membership.live_count()

    def local_member(self) -> MemberInfo:
        return self.membership.local_member()

    def members(self) -> list[MemberInfo]:
        return self.membership.members()

    def member(self, node: NodeId) -> MemberInfo | None:
        return self.membership.member(node)

    def peer_addrs(self) -> list[Addr]:
        return self.membership.peer_addrs()

    def queued_broadcasts(self) -> int:
        return self.membership.queued_broadcasts()
