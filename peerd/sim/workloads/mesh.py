"""The partial mesh in a simulated run: one HyParView + Plumtree core per
process next to its membership core, links between them, and the figures.

Every simulated process runs the real :class:`peerd.core.mesh.mesh.Mesh`,
composed with its :class:`peerd.core.node.Node` the way the daemon's runner
composes them: it joins the overlay through running peers when it starts,
SWIM's member events reach it as :class:`MembershipHint` (alive members seed
the passive view, dead ones are dropped), a graceful leave sends
:class:`LeaveMesh`.

Links follow the contract in :mod:`peerd.core.mesh.events` (as the shell's
link manager does over TCP): one link per pair of hosts at a time, messages in
order per direction, a close delivers what the closer sent and then tells the
other end, nobody hears of a close it made itself. A process that dies on a
live host resets its links (the peers hear at once); a host that vanishes or
freezes keeps them open, and what is sent to it is lost until SWIM says it is
dead or the sender's TCP gives up (``stream_timeout_s``), as across a
partition. Messages are the real wire dataclasses; their encoded size is
counted for the traffic figures without re-encoding them (``msg_bytes``).

Workload (``[mesh]``): a broadcast of ``payload_bytes`` from a random running
node every ``broadcast_every_s``. For each broadcast the world records, once
``settle_s`` has passed, which of the nodes that ran throughout got it, how
many payload copies arrived, and the hops (``round``) it took.
"""

from __future__ import annotations

import collections
import math
import random
import statistics
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from peerd.core.events import EventKind, MemberEvent, MeshConnected, MeshDelivered
from peerd.core.mesh.config import PRESETS as MESH_PRESETS
from peerd.core.mesh.events import (
    Broadcast,
    CloseLink,
    Connect,
    Deliver,
    JoinMesh,
    LeaveMesh,
    LinkDown,
    MembershipHint,
    MeshTimerFired,
    MessageIn,
    NeighborDown,
    NeighborUp,
    Send,
    SetMeshTimer,
)
from peerd.core.mesh.mesh import Mesh
from peerd.sim.engine import T_MESH
from peerd.sim.measure import stats3
from peerd.wire.messages import Channel, Gossip, GossipControl, MeshPeer

if TYPE_CHECKING:
    from peerd.sim.engine import Proc
    from peerd.sim.faults import Faults as World
    from peerd.sim.scenario import MeshSpec


# Rough encoded sizes (CBOR, before the seal) of mesh messages, for traffic.
_CONTROL_BYTES = 40
_PEER_BYTES = 32


def msg_bytes(msg: Any) -> int:
    if isinstance(msg, Gossip):
        return 48 + len(msg.payload)
    if isinstance(msg, GossipControl):
        return 8 + 20 * (len(msg.ihave) + len(msg.want))
    peers = getattr(msg, "peers", None)
    if peers is not None:
        return _CONTROL_BYTES + _PEER_BYTES * len(peers)
    return _CONTROL_BYTES


class MeshTarget:
    """Heap target for a process's mesh core (dies with the process)."""

    __slots__ = ("proc", "tkind")

    def __init__(self, proc: Proc) -> None:
        self.proc = proc
        self.tkind = T_MESH

    @property
    def cur(self) -> Proc | None:
        return self.proc.cur


@dataclass(slots=True)
class _Link:
    gen: int
    up: bool
    closed_by: set[int] = field(default_factory=set)  # host indices
    dropped: set[tuple[int, int]] = field(default_factory=set)  # dead directions


@dataclass(slots=True)
class BroadcastRecord:
    id: bytes
    origin: int
    at: float
    eligible: int = 0  # nodes other than the origin that ran throughout
    reached: int = 0
    copies: int = 0  # payload messages received (all nodes)
    delivered: dict[int, int] = field(default_factory=dict)  # host -> round
    last_s: float = 0.0  # the last delivery, after the broadcast
    delays: list[float] = field(default_factory=list)
    # the origin's process ended before any copy reached another process: no
    # protocol could deliver it, so it is not a broadcast to measure
    origin_died: bool = False


class MeshWorld:
    def __init__(self, world: World, spec: MeshSpec) -> None:
        self.w = world
        self.spec = spec
        self.config = MESH_PRESETS.get(world.sc.preset, MESH_PRESETS["lan"])()
        self.rng = random.Random(f"peerd-sim-mesh:{world.sc.seed}")
        # Link latencies from a stream of their own: turning the mesh on or
        # off does not change what happens to the membership's datagrams.
        self.net_rng = random.Random(f"peerd-sim-mesh-net:{world.sc.seed}")
        self.links: dict[tuple[int, int], _Link] = {}
        self.links_of: list[dict[tuple[int, int], None]] = [{} for _ in range(world.n)]
        self.chan_at: dict[tuple[int, int], float] = {}
        self.link_count = [0] * world.n
        self.max_links = 0
        self.max_links_at = 0.0
        self.broadcasts: list[BroadcastRecord] = []
        self.origin_died = 0  # broadcasts not measured: see BroadcastRecord.origin_died
        self.by_id: dict[bytes, BroadcastRecord] = {}
        self._pending: dict[int, BroadcastRecord] = {}  # ref -> record
        self._ref = 0
        self.counts = dict.fromkeys(
            (
                "msgs",
                "bytes",
                "dropped_no_link",
                "link_failures",
                "connects",
                "refused",
                "cast_refused",
            ),
            0,
        )
        # Plumtree counters of the processes that stopped (the running ones
        # are added in the summary)
        self.tree_counters: collections.Counter[str] = collections.Counter()

    # --- processes ----------------------------------------------------------------

    def start(self, proc: Proc, preloaded: bool) -> None:
        w = self.w
        host = proc.host
        me = MeshPeer(host.node_id, host.addr)
        proc.mesh = Mesh(
            me,
            self.config,
            random.Random(f"peerd-sim-mesh-node:{w.sc.seed}:{host.index}:{proc.gen}"),
        )
        proc.mesh_target = MeshTarget(proc)
        t = w.now
        if preloaded:
            # A converged cluster at t=0: node i joins through a random
            # earlier one, the joins spread over the first seconds, and the
            # passive view is seeded from membership (as SWIM's hints would).
            k = w.sc.start_count()
            i = host.index
            others = [j for j in self.rng.sample(range(k), min(k, 9)) if j != i][:8]
            w._push(t, proc.mesh_target, MembershipHint(alive=tuple(self._peer(j) for j in others)))
            contact = () if i == 0 else (self._peer(self.rng.randrange(i)),)
            w._push(t + 2.0 * i / max(1, k), proc.mesh_target, JoinMesh(contact))
        else:
            seeds = [s for s in w.sc.seeds if s != host.index and w.hosts[s].cur is not None]
            w._push(t, proc.mesh_target, JoinMesh(tuple(self._peer(s) for s in seeds)))

    def _peer(self, i: int) -> MeshPeer:
        h = self.w.hosts[i]
        return MeshPeer(h.node_id, h.addr)

    def stop(self, proc: Proc, reset: bool) -> None:
        """The process is gone. ``reset``: its host is up and resets every
        link at once (the peers hear); else the links hang open."""
        if proc.mesh is not None:
            self.tree_counters.update(proc.mesh.plumtree.counters)
        me = proc.host.index
        for a, b in list(self.links_of[me]):
            g = self.links[(a, b)]
            if g.up:
                other = b if a == me else a
                if reset:
                    self._fail(g, a, b, notify=(other,), delay=self._latency())
                else:
                    g.dropped |= {(a, b), (b, a)}  # nothing gets through any more

    def member_event(self, proc: Proc, ev: MemberEvent) -> None:
        target = getattr(proc, "mesh_target", None)
        if target is None:
            return
        m = ev.member
        if m.node == proc.host.node_id:
            return
        if ev.kind in (EventKind.JOINED, EventKind.ALIVE):
            peer = (MeshPeer(m.node, m.addr),)
            hint = MembershipHint(revived=peer) if ev.revived else MembershipHint(alive=peer)
        elif ev.kind in (EventKind.DEAD, EventKind.LEFT, EventKind.REAPED):
            hint = MembershipHint(dead=(m.node,))
        else:
            return
        self.w._push(self.w.now, target, hint)

    def leave(self, proc: Proc) -> None:
        target = getattr(proc, "mesh_target", None)
        if target is not None:
            self.w._push(self.w.now, target, LeaveMesh())

    # --- the workload ---------------------------------------------------------------

    def schedule(self) -> None:
        s = self.spec
        if not s.broadcast_every_s:
            return
        t = s.broadcast_from_s
        end = s.broadcast_until_s if s.broadcast_until_s is not None else self.w.sc.duration_s
        while t <= end - s.settle_s + 1e-9:
            self.w.at(t, self._broadcast)
            t = round(t + s.broadcast_every_s, 9)

    def _broadcast(self) -> None:
        w = self.w
        running = [
            i for i in w.running_indices() if getattr(w.hosts[i].cur, "mesh", None) is not None
        ]
        if not running:
            return
        i = running[self.rng.randrange(len(running))]
        proc = w.hosts[i].cur
        assert proc is not None
        self._ref += 1
        rec = BroadcastRecord(b"", i, w.now)
        self._pending[self._ref] = rec
        alive_then = {j: w.hosts[j].cur for j in running}  # the very processes
        payload = self.rng.randbytes(self.spec.payload_bytes)
        outs = proc.mesh.handle(w.now, Broadcast(self._ref, Channel.USER, payload))
        self.carry_out(proc, outs, w.now)
        w.at(w.now + self.spec.settle_s, lambda: self._settle(rec, alive_then))

    def _settle(self, rec: BroadcastRecord, alive_then: dict[int, Any]) -> None:
        if not rec.id:
            return  # refused (rate limit): not a broadcast
        hosts = self.w.hosts
        if rec.copies == 0 and alive_then.get(rec.origin) is not hosts[rec.origin].cur:
            # Started at the instant its origin crashed (or just before): no
            # copy ever left, nobody could have it. Counted apart, not as lost.
            rec.origin_died = True
            self.origin_died += 1
            return
        # nodes whose process ran from the broadcast until now (not restarted)
        eligible = [
            i
            for i in self.w.running_indices()
            if i != rec.origin and alive_then.get(i) is hosts[i].cur
        ]
        rec.eligible = len(eligible)
        rec.reached = sum(1 for i in eligible if i in rec.delivered)
        self.broadcasts.append(rec)

    # --- links ----------------------------------------------------------------------

    def handle(self, proc: Proc, inp: Any, t: float) -> None:
        if inp.__class__ is MessageIn and inp.msg.__class__ is Gossip:
            rec = self.by_id.get(inp.msg.id)
            if rec is not None:
                rec.copies += 1
        self.carry_out(proc, proc.mesh.handle(t, inp), t)

    def carry_out(self, proc: Proc, outs: list[Any], t: float) -> None:
        me = proc.host.index
        for o in outs:
            c = o.__class__
            if c is Send:
                self._send(me, o, t)
            elif c is SetMeshTimer:
                self.w._push(o.at, proc.mesh_target, MeshTimerFired(o.timer))
            elif c is Connect:
                self._connect(me, o.peer, t)
            elif c is CloseLink:
                self._close(me, o.node)
            elif c is NeighborUp or c is NeighborDown:
                # registry deltas over the mesh while it has neighbours, as
                # in the daemon (gossip before the first and after the last)
                self.w._push(t, proc, MeshConnected(bool(proc.mesh.hyparview.active_ids())))
            elif c is Deliver and o.channel is Channel.REGISTRY:
                self.w._push(t, proc, MeshDelivered(int(o.channel), o.origin, o.payload))
            elif c is Deliver:
                rec = self.by_id.get(o.id)
                if rec is not None and me not in rec.delivered:
                    rec.delivered[me] = o.round
                    rec.delays.append(t - rec.at)
                    rec.last_s = max(rec.last_s, t - rec.at)
            elif o.__class__.__name__ == "BroadcastResult":
                rec = self._pending.pop(o.ref, None)
                if rec is not None and o.id is not None:
                    rec.id = o.id
                    self.by_id[o.id] = rec

    def _latency(self) -> float:
        return self.w.latency_with(self.net_rng)

    def cast(self, proc: Proc, channel: int, payload: bytes, t: float) -> None:
        """The node's own broadcast (registry deltas) into its mesh."""
        if proc.mesh is None:
            return
        self._ref += 1
        outs = proc.mesh.handle(t, Broadcast(self._ref, Channel(channel), payload))
        if any(getattr(o, "error", None) for o in outs):
            self.counts["cast_refused"] += 1
        self.carry_out(proc, outs, t)

    def _host_of(self, node: bytes) -> int | None:
        return self.w.index_of.get(node)

    def _set_up(self, a: int, b: int, up: bool) -> _Link:
        key = (a, b) if a < b else (b, a)
        old = self.links.get(key)
        if old is not None and old.up:
            self._count(key, -1)
        g = _Link((old.gen + 1) if old else 1, up)
        self.links[key] = g
        if old is None:
            self.links_of[a][key] = None
            self.links_of[b][key] = None
        if up:
            self._count(key, 1)
        return g

    def _count(self, key: tuple[int, int], d: int) -> None:
        for i in key:
            n = self.link_count[i] + d
            self.link_count[i] = n
            if n > self.max_links:
                self.max_links = n
                self.max_links_at = self.w.now

    def _connect(self, me: int, peer: MeshPeer, t: float) -> None:
        w = self.w
        other = self._host_of(peer.node)
        if other is None:
            return
        key = (me, other) if me < other else (other, me)
        g = self.links.get(key)
        if g is not None and g.up:
            return
        self.counts["connects"] += 1
        host = w.hosts[other]
        if host.cur is None or w._blocked(me, other):
            # refused by a live host at once; else the SYN times out
            g = self._set_up(me, other, False)
            g.dropped |= {(me, other), (other, me)}
            self.counts["refused"] += 1
            refused = host.cur is None and host.icmp and host.started and not w._blocked(me, other)
            delay = 2 * self._latency() if refused else min(5.0, w.stream_timeout)
            self._event(other, me, g, None, t + delay)
            return
        self._set_up(me, other, True)

    def _close(self, me: int, node: bytes) -> None:
        other = self._host_of(node)
        if other is None:
            return
        key = (me, other) if me < other else (other, me)
        g = self.links.get(key)
        if g is None:
            return
        g.closed_by.add(me)
        if g.up:
            g.up = False
            self._count(key, -1)
            g.dropped.add((other, me))
            self._event(me, other, g, None, self.w.now)

    def _fail(self, g: _Link, a: int, b: int, notify: tuple[int, ...], delay: float) -> None:
        if g.up:
            g.up = False
            self._count((a, b) if a < b else (b, a), -1)
        g.dropped |= {(a, b), (b, a)}
        self.counts["link_failures"] += 1
        for dst in notify:
            src = b if dst == a else a
            self._event(src, dst, g, None, self.w.now + delay, force=True)

    def _send(self, me: int, o: Send, t: float) -> None:
        w = self.w
        other = self._host_of(o.dst)
        if other is None:
            return
        key = (me, other) if me < other else (other, me)
        g = self.links.get(key)
        if g is None or not g.up:
            self.counts["dropped_no_link"] += 1
            return
        size = msg_bytes(o.msg)
        self.counts["msgs"] += 1
        self.counts["bytes"] += size
        host = w.hosts[other]
        if w.netfaults and w._blocked(me, other) or (host.cur is None and not host.icmp):
            # Nothing comes back: the sender's TCP gives up after a while.
            self._fail(g, me, other, notify=(me,), delay=w.stream_timeout)
            return
        self._event(me, other, g, o.msg, t)

    def _event(self, src: int, dst: int, g: _Link, msg: Any, t: float, force: bool = False) -> None:
        """Queue a message (None: the end of the link) src -> dst, in order."""
        w = self.w
        key = (src, dst)
        when = max(t + self._latency() + w.link_delay(src, dst), self.chan_at.get(key, 0.0))
        self.chan_at[key] = when
        w.at(when, lambda: self._arrive(src, dst, g, msg, force))

    def _arrive(self, src: int, dst: int, g: _Link, msg: Any, force: bool) -> None:
        w = self.w
        proc = w.hosts[dst].cur
        if proc is None or getattr(proc, "mesh", None) is None:
            return
        if msg is None:
            if force or dst not in g.closed_by:
                w._push(w.now, proc.mesh_target, LinkDown(w.hosts[src].node_id))
            return
        if (src, dst) in g.dropped or dst in g.closed_by:
            return
        w._push(w.now, proc.mesh_target, MessageIn(w.hosts[src].node_id, msg))

    # --- the summary ------------------------------------------------------------------

    def summary(self) -> dict[str, Any]:

        n = self.w.n
        recs = self.broadcasts
        rel = [r.reached / r.eligible for r in recs if r.eligible]
        red = [r.copies / r.reached for r in recs if r.reached]
        hops = sorted(h for r in recs for i, h in r.delivered.items() if i != r.origin)
        ns = self.w.rec.node_seconds or 1.0
        return {
            "enabled": True,
            "max_links_per_node": self.max_links,
            "links_bound": bound_links(n),
            "links_at_end": {
                "max": max(self.link_count, default=0),
                "mean": round(
                    statistics.mean([self.link_count[i] for i in self.w.running_indices()] or [0]),
                    3,
                ),
            },
            "broadcasts": len(recs),
            "broadcasts_origin_died": self.origin_died,
            "broadcast_reliability": {
                "min": round(min(rel), 6) if rel else None,
                "mean": round(statistics.mean(rel), 6) if rel else None,
            },
            "broadcast_redundancy": {
                "mean": round(statistics.mean(red), 4) if red else None,
                "max": round(max(red), 4) if red else None,
            },
            "broadcast_hops": {
                "p50": _pct(hops, 0.5),
                "p99": _pct(hops, 0.99),
                "max": hops[-1] if hops else None,
            },
            # broadcast -> delivered at a node, and -> the last node reached
            "delivery_s": stats3([d for r in recs for d in r.delays]),
            "all_reached_s": stats3([r.last_s for r in recs if r.reached == r.eligible]),
            # every process's Plumtree: repair grafts (a node the tree missed
            # waited for one), tree moves (section 3.8) and those dropped
            "tree": self._tree_summary(),
            "msgs_per_node_s": round(self.counts["msgs"] / ns, 3),
            "bytes_per_node_s": round(self.counts["bytes"] / ns, 1),
            **{k: v for k, v in self.counts.items() if k not in ("msgs", "bytes")},
        }

    def _tree_summary(self) -> dict[str, int]:
        c = collections.Counter(self.tree_counters)
        for h in self.w.hosts:
            if h.cur is not None and getattr(h.cur, "mesh", None) is not None:
                c.update(h.cur.mesh.plumtree.counters)
        return {
            "grafts": c["grafts_out"],
            "moves": c["optimizations"],
            "moves_dropped": sum(
                c[f"optimizations_{why}"] for why in ("overtaken", "crossed", "lost", "moot")
            ),
            "regrafts": c["regrafts"],
        }

    def records_after(self, t: float) -> list[BroadcastRecord]:
        return [r for r in self.broadcasts if r.at >= t]


def bound_links(n: int) -> int:
    """The issue's bound on links per node: 2 log2 N."""
    return max(2, math.ceil(2 * math.log2(max(n, 2))))


def _pct(sorted_values: list[int], q: float) -> int | None:
    if not sorted_values:
        return None
    return sorted_values[max(0, math.ceil(q * len(sorted_values)) - 1)]
