"""A few whole Peers (membership, registry, mesh, names) on a tiny fake network.

Extends the membership test driver (:mod:`tests.core.harness`) with peer
links as the link contract of :mod:`peerd.core.events` describes them:
one link per pair, in order, a close is news for the other end only. API
connections are numbers; a message offered to one is always taken. Enough to
check that the Peer's outputs compose into working messaging and broadcast,
not a simulator.
"""

from __future__ import annotations

import heapq
import random
from dataclasses import dataclass, field

from peerd.core import events as nev
from peerd.core.events import (
    Broadcast,
    BroadcastResult,
    CloseLink,
    Connect,
    Deliver,
    LinkDown,
    MessageIn,
    Register,
    Send,
)
from peerd.core.mesh.config import local as mesh_local
from peerd.core.names.core import NamesConfig
from peerd.core.peer import Peer
from peerd.wire.messages import RegKind

from .harness import Cluster


@dataclass
class PeerCluster(Cluster):
    links: set[tuple[int, int]] = field(default_factory=set)
    delivered: list[tuple[float, int, nev.DeliverToConn]] = field(default_factory=list)
    results: dict[tuple[int, int], nev.SendResult] = field(default_factory=dict)
    user: list[tuple[float, int, Deliver]] = field(default_factory=list)
    bcast: dict[tuple[int, int], BroadcastResult] = field(default_factory=dict)
    registered: dict[tuple[int, int], object] = field(default_factory=dict)

    def add_node(self, i: int, incarnation: int = 0, generation: int = 0) -> Peer:  # type: ignore[override]
        addr = (f"127.0.{i // 250}.{i % 250 + 1}", 7950)
        self.addr_of[i] = addr
        self.by_addr[addr] = i
        peer = Peer(
            node_id=i.to_bytes(16, "big"),
            name=f"n{i}",
            addr=addr,
            config=self.config,
            rng=random.Random(self.rng.random()),
            incarnation=incarnation,
            generation=generation or 1,
            mesh=mesh_local(),
            names=NamesConfig(send_timeout_s=2.0),
            mesh_rng=random.Random(self.rng.random()),
            names_rng=random.Random(self.rng.random()),
        )
        if i < len(self.nodes):
            self.nodes[i] = peer  # type: ignore[call-overload]
        else:
            self.nodes.append(peer)  # type: ignore[arg-type]
        return peer

    # --- what the tests call ---------------------------------------------------------

    def register(self, i: int, name: str, conn: int = 1, ref: int = 1) -> None:
        self.feed(i, Register(ref, conn, RegKind.NAME, "default", name, (), 100, 0, 1))

    def send(self, i: int, call: int, name: str, conn: int = 2, payload: bytes = b"hi") -> None:
        self.feed(i, nev.SendToName(call, conn, RegKind.NAME, "default", name, payload))

    def broadcast(self, i: int, ref: int, payload: bytes) -> None:
        from peerd.wire.messages import Channel

        self.feed(i, Broadcast(ref, Channel.USER, payload))

    def crash(self, i: int) -> None:
        super().crash(i)
        for a, b in sorted(self.links):
            if i in (a, b):
                self.links.discard((a, b))
                # The host is up: its kernel resets the links at once.
                other = b if a == i else a
                self.feed(other, LinkDown(i.to_bytes(16, "big")), self.latency)

    # --- carrying out ------------------------------------------------------------------

    def _apply(self, i: int, outs: list) -> None:  # type: ignore[override,type-arg]
        rest = []
        for o in outs:
            match o:
                case Connect(peer):
                    j = int.from_bytes(peer.node, "big")
                    if j in self.down:
                        self.feed(i, LinkDown(peer.node), self.latency)
                    else:
                        self.links.add((min(i, j), max(i, j)))
                case Send(dst, msg):
                    self._link(i, int.from_bytes(dst, "big"), msg)
                case CloseLink(node):
                    j = int.from_bytes(node, "big")
                    if (min(i, j), max(i, j)) in self.links:
                        self.links.discard((min(i, j), max(i, j)))
                        self.feed(j, LinkDown(i.to_bytes(16, "big")), self.latency)
                case nev.LinkSend(node, addr, msg, seq):
                    j = int.from_bytes(node, "big")
                    key = (min(i, j), max(i, j))
                    if key not in self.links and addr is not None and j not in self.down:
                        self.links.add(key)
                    ok = key in self.links
                    if ok:
                        self._link(i, j, msg)
                    if seq:
                        self.feed(i, nev.LinkSendDone(seq, ok, 1 if ok else None))
                case nev.DeliverToConn():
                    self.delivered.append((self.now, i, o))
                    if o.answer is None:
                        self.feed(i, nev.Offered(o.token, nev.OfferOutcome.OK))
                    else:  # taken: its answer goes out now
                        self._apply(i, [o.answer])
                case nev.SendResult():
                    self.results[(i, o.call)] = o
                case Deliver():
                    self.user.append((self.now, i, o))
                case BroadcastResult(ref):
                    self.bcast[(i, ref)] = o
                case _:
                    rest.append(o)
        super()._apply(i, rest)

    def _link(self, i: int, j: int, msg: object) -> None:
        if (min(i, j), max(i, j)) in self.links and j not in self.down:
            self.feed(j, MessageIn(i.to_bytes(16, "big"), msg), self.latency)  # type: ignore[arg-type]

    def run_until(self, t: float) -> None:
        while self._heap and self._heap[0][0] <= t:
            at, _, i, inp = heapq.heappop(self._heap)
            self.now = max(self.now, at)
            if i in self.down:
                continue
            self._apply(i, self.nodes[i].handle(self.now, inp))  # type: ignore[arg-type]
        self.now = t
