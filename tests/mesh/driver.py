"""A tiny discrete-event driver that wires many mesh cores together.

It keeps the link contract of :mod:`peerd.core.events`: one link per
pair of nodes at a time (a new *generation* after each close or failure),
messages in order per direction and across generations, a close delivers
what the closer sent and then tells the other end (whose own in-flight
messages die), a failure kills both directions and tells both ends, and
nobody hears of a close it made itself. Messages are the real wire messages,
round-tripped through the codec. Latency is random per message, so
interleavings vary with the seed; time is virtual.
"""

from __future__ import annotations

import collections
import functools
import heapq
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from peerd.core.events import (
    Broadcast,
    BroadcastResult,
    CloseLink,
    Connect,
    Deliver,
    JoinMesh,
    LinkDown,
    MeshInput,
    MeshOutput,
    MeshTimer,
    MeshTimerFired,
    MessageIn,
    NeighborUp,
    Send,
    SetMeshTimer,
)
from peerd.core.mesh.config import MeshConfig, PlumtreeConfig
from peerd.core.mesh.hyparview import HyParView
from peerd.core.mesh.mesh import Mesh
from peerd.wire import codec
from peerd.wire.messages import Channel, Gossip, GossipControl, MeshPeer, NodeId, TreeLink

Core = Mesh | HyParView


def nid(i: int) -> NodeId:
    return i.to_bytes(16, "big")


def peer(i: int) -> MeshPeer:
    return MeshPeer(nid(i), (f"10.0.{i // 256}.{i % 256}", 7946))


@dataclass(slots=True)
class _Gen:
    gen: int
    up: bool
    closed_by: set[NodeId] = field(default_factory=set)
    dropped: set[tuple[NodeId, NodeId]] = field(default_factory=set)  # dead directions


def _pair(a: NodeId, b: NodeId) -> tuple[NodeId, NodeId]:
    return (a, b) if a < b else (b, a)


class World:
    def __init__(
        self,
        seed: int,
        config: MeshConfig | None = None,
        *,
        latency: tuple[float, float] = (0.001, 0.010),
        hyparview_only: bool = False,
        check_codec: bool = True,
        stalls: tuple[float, float, float] | None = None,
    ) -> None:
        """``stalls``: (per second, shortest, longest): each node pauses now
        and then, as on a loaded host; what arrives for it and its timers
        wait until it runs again."""
        self.rng = random.Random(seed)
        self.stalls = stalls
        self._stall_rng = random.Random(f"stalls:{seed}")
        self._paused: dict[NodeId, list[tuple[float, float]]] = {}
        self.config = config or MeshConfig()
        self.latency = latency
        self.hyparview_only = hyparview_only
        self.check_codec = check_codec
        self.now = 0.0
        self.nodes: dict[NodeId, Core] = {}
        self.alive: dict[NodeId, bool] = {}
        # (when, seq, is_timer, action)
        self._heap: list[tuple[float, int, bool, Callable[[], None]]] = []
        self._seq = 0
        self._links: dict[tuple[NodeId, NodeId], _Gen] = {}
        self._chan_at: dict[tuple[NodeId, NodeId], float] = {}
        self.in_flight = 0  # link events (messages, downs) not yet delivered
        self.sent = collections.Counter[str]()
        # Per broadcast id: gossip payload messages received, and deliveries.
        self.payload_msgs: collections.Counter[bytes] = collections.Counter()
        self.deliveries: dict[bytes, dict[NodeId, int]] = collections.defaultdict(dict)
        self.results: dict[int, BroadcastResult] = {}
        self._ref = 0
        self.trace: list[str] | None = None  # set to a list to record every step

    # --- nodes -------------------------------------------------------------------

    def add(self, i: int) -> NodeId:
        me = peer(i)
        rng = random.Random(self.rng.getrandbits(64))
        core: Core
        if self.hyparview_only:
            core = HyParView(me, self.config.hyparview, rng)
        else:
            core = Mesh(me, self.config, rng)
        self.nodes[me.node] = core
        self.alive[me.node] = True
        return me.node

    def join(self, i: int, *contacts: int) -> None:
        node = self.add(i) if nid(i) not in self.nodes else nid(i)
        self.feed(node, JoinMesh(tuple(peer(c) for c in contacts)))

    def hv(self, node: NodeId) -> HyParView:
        core = self.nodes[node]
        return core if isinstance(core, HyParView) else core.hyparview

    def live(self) -> list[NodeId]:
        return [n for n, a in self.alive.items() if a]

    def crash(self, node: NodeId) -> None:
        """The process dies: every link of it fails, only the others hear it."""
        self.alive[node] = False
        for (a, b), g in self._links.items():
            if node in (a, b) and g.up:
                other = b if a == node else a
                g.up = False
                g.dropped |= {(a, b), (b, a)}
                self._link_event(node, other, g, None)

    def freeze(self, node: NodeId) -> None:
        """The process stops (SIGSTOP, a hung host): its links stay open, so
        nobody hears of it, and what is sent to it is never read."""
        self.alive[node] = False

    def fail_link(self, a: NodeId, b: NodeId) -> bool:
        g = self._links.get(_pair(a, b))
        if g is None or not g.up:
            return False
        g.up = False
        g.dropped |= {(a, b), (b, a)}
        self._link_event(a, b, g, None)
        self._link_event(b, a, g, None)
        return True

    def open_links(self) -> list[tuple[NodeId, NodeId]]:
        return [p for p, g in self._links.items() if g.up]

    # --- driving -----------------------------------------------------------------

    def feed(self, node: NodeId, inp: MeshInput) -> list[MeshOutput]:
        if not self.alive[node]:
            return []
        outs = self.nodes[node].handle(self.now, inp)
        if self.trace is not None:
            self.trace.append(f"{self.now:.4f} n{int.from_bytes(node, 'big')} <- {_short(inp)}")
            self.trace.extend(
                f"    -> {_short(o)}" for o in outs if not isinstance(o, SetMeshTimer)
            )
        for o in outs:
            self._apply(node, o)
        return outs

    def broadcast(
        self, node: NodeId, payload: bytes, channel: Channel = Channel.USER
    ) -> BroadcastResult:
        self._ref += 1
        self.feed(node, Broadcast(self._ref, channel, payload))
        return self.results[self._ref]

    def _at(self, when: float, fn: Callable[[], None], timer: bool = False) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (when, self._seq, timer, fn))

    def _delay(self) -> float:
        return self.rng.uniform(*self.latency)

    def _resume_at(self, node: NodeId, t: float) -> float:
        """When ``node`` runs again if something is due for it at ``t``."""
        if self.stalls is None:
            return t
        rate, shortest, longest = self.stalls
        pauses = self._paused.setdefault(node, [])
        while not pauses or pauses[-1][0] <= t:
            start = (pauses[-1][1] if pauses else 0.0) + self._stall_rng.expovariate(rate)
            pauses.append((start, start + self._stall_rng.uniform(shortest, longest)))
        for start, end in reversed(pauses):
            if start <= t:
                return max(t, end)
        return t

    def _link_event(self, src: NodeId, dst: NodeId, g: _Gen, msg: Any) -> None:
        """Queue a message (or, with msg None, the end of the link) src -> dst,
        in order after everything src sent dst before."""
        key = (src, dst)
        when = self._resume_at(dst, max(self.now + self._delay(), self._chan_at.get(key, 0.0)))
        self._chan_at[key] = when
        self.in_flight += 1

        def deliver() -> None:
            self.in_flight -= 1
            if not self.alive[dst]:
                return
            if msg is None:
                if dst not in g.closed_by:
                    self.feed(dst, LinkDown(src))
                return
            # A message dies with its link's direction (a failure kills both,
            # a close the closer's inbound one), and nobody reads a link it
            # closed itself.
            if (src, dst) in g.dropped or dst in g.closed_by:
                return
            if isinstance(msg, Gossip):
                self.payload_msgs[msg.id] += 1
            self.feed(dst, MessageIn(src, msg))

        self._at(when, deliver)

    def _new_gen(self, a: NodeId, b: NodeId, up: bool) -> _Gen:
        key = _pair(a, b)
        old = self._links.get(key)
        g = _Gen((old.gen + 1) if old else 1, up)
        self._links[key] = g
        return g

    def _apply(self, node: NodeId, o: MeshOutput) -> None:
        match o:
            case Connect(p):
                g = self._links.get(_pair(node, p.node))
                if g is not None and g.up:
                    return
                if not self.alive.get(p.node, False):
                    g = self._new_gen(node, p.node, up=False)
                    g.dropped |= {(node, p.node), (p.node, node)}
                    self._link_event(p.node, node, g, None)  # refused
                    return
                self._new_gen(node, p.node, up=True)
            case Send(dst, msg):
                self.sent[type(msg).__name__] += 1
                g = self._links.get(_pair(node, dst))
                if g is None or not g.up:
                    self.sent["dropped_no_link"] += 1
                    return
                if self.check_codec:
                    msg = codec.decode(codec.encode(msg))  # type: ignore[assignment]
                self._link_event(node, dst, g, msg)
            case CloseLink(other):
                g = self._links.get(_pair(node, other))
                if g is None:
                    return
                g.closed_by.add(node)
                if g.up:
                    g.up = False
                    g.dropped.add((other, node))
                    self._link_event(node, other, g, None)
            case SetMeshTimer(at, timer):
                self._at(self._resume_at(node, at), lambda: self._fire(node, timer), timer=True)
            case Deliver(msg_id, _origin, _channel, _payload, rnd, _src):
                assert node not in self.deliveries[msg_id], "delivered twice"
                self.deliveries[msg_id][node] = rnd
            case BroadcastResult(ref):
                self.results[ref] = o

    def _fire(self, node: NodeId, timer: MeshTimer) -> None:
        self.feed(node, MeshTimerFired(timer))

    def run_until(self, t: float) -> None:
        while self._heap and self._heap[0][0] <= t:
            when, _seq, _timer, fn = heapq.heappop(self._heap)
            self.now = max(self.now, when)
            fn()
        self.now = max(self.now, t)

    def run_for(self, dt: float) -> None:
        self.run_until(self.now + dt)

    def settle(self, max_events: int = 1_000_000) -> None:
        """Deliver link events until none is in flight, holding timers back
        (periodic shuffles would never let the overlay rest); they fire late,
        as after a pause, when the run goes on."""
        held = []
        n = 0
        while self.in_flight:
            item = heapq.heappop(self._heap)
            if item[2]:
                held.append(item)
                continue
            self.now = max(self.now, item[0])
            item[3]()
            n += 1
            assert n < max_events, "the overlay does not settle"
        for when, seq, timer, fn in held:
            heapq.heappush(self._heap, (max(when, self.now), seq, timer, fn))


def _short(o: object) -> str:
    """A compact, readable form of an input or output (node ids as n<i>)."""
    import re

    text = repr(o)
    text = re.sub(r"b'((?:\\x00){15})\\x([0-9a-f]{2})'", lambda m: f"n{int(m.group(2), 16)}", text)
    text = re.sub(r"b'(?:\\x00){15}(.)'", lambda m: f"n{ord(m.group(1))}", text)
    text = re.sub(r"MeshPeer\(node=(n\d+), addr=\([^)]*\)\)", r"\1", text)
    return text


class TreeNet:
    """Plumtree cores on a fixed overlay, for scenarios that need exact timing.

    No HyParView: the links are given (``links``: node pairs, each way
    ``default_latency`` unless ``latency[(a, b)]`` says how long a -> b takes),
    every node starts with all its links eager, and :meth:`lazy` makes a link
    lazy at both ends, as a PRUNE each way would. Messages keep their order
    per direction and go through the codec; time is virtual. ``delivered[id]``
    maps each node to when it delivered that broadcast.
    """

    def __init__(
        self,
        links: list[tuple[int, int]],
        config: PlumtreeConfig | None = None,
        latency: dict[tuple[int, int], float] | None = None,
        default_latency: float = 0.001,
    ) -> None:
        from peerd.core.mesh.plumtree import Plumtree

        self.config = config or PlumtreeConfig()
        self.latency = dict(latency or {})
        self.default_latency = default_latency
        self.now = 0.0
        self.nodes: dict[int, Plumtree] = {}
        self.delivered: dict[bytes, dict[int, float]] = collections.defaultdict(dict)
        self._heap: list[tuple[float, int, Callable[[], object]]] = []
        self._seq = 0
        self._chan_at: dict[tuple[int, int], float] = {}
        for a, b in links:
            for i in (a, b):
                if i not in self.nodes:
                    self.nodes[i] = Plumtree(nid(i), self.config, random.Random(i))
        for a, b in links:
            self.feed(a, NeighborUp(peer(b)))
            self.feed(b, NeighborUp(peer(a)))

    def lazy(self, a: int, b: int) -> None:
        prune = GossipControl((), (), TreeLink.LAZY)
        self.feed(a, MessageIn(nid(b), prune))
        self.feed(b, MessageIn(nid(a), prune))

    def eager(self, i: int) -> list[int]:
        return sorted(int.from_bytes(n, "big") for n in self.nodes[i].eager_peers())

    def counter(self, key: str) -> int:
        return sum(core.counters[key] for core in self.nodes.values())

    def broadcast(self, i: int, payload: bytes = b"x") -> bytes:
        outs = self.feed(i, Broadcast(0, Channel.USER, payload))
        result = next(o for o in outs if isinstance(o, BroadcastResult))
        assert result.id is not None
        self.delivered[result.id][i] = self.now
        return result.id

    def feed(self, i: int, inp: MeshInput) -> list[MeshOutput]:
        outs = self.nodes[i].handle(self.now, inp)
        for o in outs:
            match o:
                case Send(dst, msg):
                    self._send(i, int.from_bytes(dst, "big"), msg)
                case SetMeshTimer(at, timer):
                    self._at(at, functools.partial(self.feed, i, MeshTimerFired(timer)))
                case Deliver(msg_id):
                    self.delivered[msg_id].setdefault(i, self.now)
        return outs

    def _send(self, a: int, b: int, msg: Any) -> None:
        msg = codec.decode(codec.encode(msg))
        when = max(
            self.now + self.latency.get((a, b), self.default_latency),
            self._chan_at.get((a, b), 0.0),
        )
        self._chan_at[(a, b)] = when
        self._at(when, functools.partial(self.feed, b, MessageIn(nid(a), msg)))

    def _at(self, when: float, fn: Callable[[], object]) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (when, self._seq, fn))

    def run_until(self, t: float) -> None:
        while self._heap and self._heap[0][0] <= t:
            when, _seq, fn = heapq.heappop(self._heap)
            self.now = max(self.now, when)
            fn()
        self.now = max(self.now, t)
