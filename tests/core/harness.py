"""A minimal deterministic driver for several cores (test helper).

Not the simulator (peerd/sim): just an event heap, instant-ish delivery with a
fixed latency, and switches to crash or isolate a node, enough to check that
the core's outputs compose into a working protocol.
"""

from __future__ import annotations

import heapq
import itertools
import random
from dataclasses import dataclass, field

from peerd.core import config as cfgmod
from peerd.core.events import (
    Input,
    LinkClosed,
    MemberEvent,
    OpenStream,
    Output,
    PacketIn,
    SendPacket,
    SetTimer,
    Start,
    StreamFailed,
    StreamReply,
    StreamRequest,
    StreamResponse,
    TimerFired,
    Unreachable,
    WatchLinks,
)
from peerd.core.peer import Peer
from peerd.core.swim.membership import Node
from peerd.wire.messages import Addr, Status


@dataclass
class Cluster:
    n: int
    seed: int = 1
    config: cfgmod.SwimConfig = field(default_factory=cfgmod.lan)
    latency: float = 0.001
    icmp: bool = False  # report closed ports like a live host would
    now: float = 0.0
    nodes: list[Node] = field(default_factory=list)
    down: set[int] = field(default_factory=set)  # crashed: receive nothing, send nothing
    cut: set[int] = field(default_factory=set)  # isolated: network-partitioned
    events: list[tuple[float, int, MemberEvent]] = field(default_factory=list)
    watches: dict[int, tuple[Addr, ...]] = field(default_factory=dict)
    # Run the registry beside membership: each node is then a Peer (without a
    # mesh or names) whose membership and registry are siblings.
    registry: bool = False

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self._heap: list[tuple[float, int, int, Input]] = []
        self._seq = itertools.count()
        self._streams: dict[tuple[int, int], tuple[int, int]] = {}
        self._sid = itertools.count(1)
        self.addr_of: dict[int, Addr] = {}
        self.by_addr: dict[Addr, int] = {}
        for i in range(self.n):
            self.add_node(i)

    def add_node(
        self, i: int, incarnation: int = 0, generation: int = 0, node_id: bytes | None = None
    ) -> Node:
        addr = (f"127.0.{i // 250}.{i % 250 + 1}", 7950)
        self.addr_of[i] = addr
        self.by_addr[addr] = i
        make = Peer if self.registry else Node
        node = make(
            node_id=node_id or i.to_bytes(16, "big"),
            name=f"n{i}",
            addr=addr,
            config=self.config,
            rng=random.Random(self.rng.random()),
            incarnation=incarnation,
            generation=generation,
        )
        if i < len(self.nodes):
            self.nodes[i] = node
        else:
            self.nodes.append(node)
        return node

    def restart(
        self,
        i: int,
        incarnation: int,
        generation: int,
        seeds: tuple[int, ...] = (0,),
        node_id: bytes | None = None,
    ) -> Node:
        """Bring crashed node i back as a new process with the same id (or
        ``node_id``: a wiped state dir), name and address: the old process's
        timers, in-flight packets and streams are gone (streams it was serving
        fail for their openers)."""
        self._heap = [e for e in self._heap if e[2] != i]
        heapq.heapify(self._heap)
        for key, (opener, stream) in list(self._streams.items()):
            if opener == i:
                del self._streams[key]
            elif key[0] == i:
                del self._streams[key]
                self.feed(opener, StreamFailed(stream, "reset"), self.latency)
        self.down.discard(i)
        self.watches.pop(i, None)
        node = self.add_node(i, incarnation=incarnation, generation=generation, node_id=node_id)
        self.start(i, seeds)
        return node

    def start(self, i: int, seeds: tuple[int, ...] = (0,)) -> None:
        self.feed(i, Start(tuple(self.addr_of[s] for s in seeds)), delay=0.0)

    def feed(self, i: int, inp: Input, delay: float = 0.0) -> None:
        heapq.heappush(self._heap, (self.now + delay, next(self._seq), i, inp))

    def crash(self, i: int) -> None:
        """Kill node i's process: silent, but with icmp=True its host's kernel
        closes its watch links (like kill -9 on a live host)."""
        self.down.add(i)
        if self.icmp:
            for j, addrs in self.watches.items():
                if self.addr_of[i] in addrs and j not in self.down:
                    self.feed(j, LinkClosed(self.addr_of[i]), self.latency)

    def reachable(self, a: int, b: int) -> bool:
        return b not in self.down and (a in self.cut) == (b in self.cut)

    def _apply(self, i: int, outs: list[Output]) -> None:
        for o in outs:
            match o:
                case SendPacket(dst, data):
                    j = self.by_addr.get(dst)
                    if j is None or i in self.down:
                        continue
                    if self.reachable(i, j):
                        self.feed(j, PacketIn(self.addr_of[i], data), self.latency)
                    elif j in self.down and self.icmp and (i in self.cut) == (j in self.cut):
                        self.feed(i, Unreachable(dst), self.latency)
                case SetTimer(at, timer):
                    heapq.heappush(self._heap, (at, next(self._seq), i, TimerFired(timer)))
                case OpenStream(stream, dst, data):
                    j = self.by_addr.get(dst)
                    if j is None or not self.reachable(i, j):
                        self.feed(i, StreamFailed(stream, "refused"), self.latency)
                        continue
                    sid = next(self._sid)
                    self._streams[(j, sid)] = (i, stream)
                    self.feed(j, StreamRequest(sid, self.addr_of[i], data), self.latency)
                case StreamReply(sid, data):
                    opener = self._streams.pop((i, sid), None)
                    if opener is None:
                        continue
                    a, stream = opener
                    if data is None or not self.reachable(i, a):
                        self.feed(a, StreamFailed(stream, "closed"), self.latency)
                    else:
                        self.feed(a, StreamResponse(stream, data), self.latency)
                case WatchLinks(addrs):
                    self.watches[i] = addrs
                case MemberEvent():
                    self.events.append((self.now, i, o))
                case _:
                    pass

    def run_until(self, t: float) -> None:
        while self._heap and self._heap[0][0] <= t:
            at, _, i, inp = heapq.heappop(self._heap)
            self.now = max(self.now, at)
            if i in self.down:
                continue
            self._apply(i, self.nodes[i].handle(self.now, inp))
        self.now = t

    def view(self, i: int) -> dict[str, Status]:
        return {m.name: m.status for m in self.nodes[i].members()}

    def all_see(self, target: int, status: Status, among: range | list[int] | None = None) -> bool:
        name = f"n{target}"
        idx = among if among is not None else range(self.n)
        return all(
            self.view(i).get(name) == status for i in idx if i not in self.down and i != target
        )

    def converged(self) -> bool:
        live = [i for i in range(self.n) if i not in self.down]
        return all(
            sum(1 for s in self.view(i).values() if s is Status.ALIVE) == len(live) for i in live
        )
