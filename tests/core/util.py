"""Helpers for exact-output tests of :class:`peerd.core.swim.membership.Node`.

Conventions: node ``i`` has id ``i`` as a 16-byte big-endian integer (so ring
order is numeric order), name ``n<i>`` and address ``10.0.0.<i>:7946``. The
node under test is node 1 unless a test says otherwise.

A :class:`Rig` wraps one node: it passes explicit ``now`` values, remembers
every timer the node armed (so a test can fire "the PROBE timer" without
digging through earlier outputs) and builds datagrams from peers with the real
codec.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TypeVar

from peerd.core import config as cfgmod
from peerd.core.config import SwimConfig
from peerd.core.events import (
    EventKind,
    Input,
    Log,
    MemberEvent,
    Output,
    PacketIn,
    SendPacket,
    SetTimer,
    Start,
    StreamRequest,
    TimerFired,
    TimerKind,
)
from peerd.core.swim.base import FIRST_GOSSIP_DELAY_S, NACK_AFTER
from peerd.core.swim.membership import Node
from peerd.wire import codec
from peerd.wire.messages import Addr, Alive, Message, NodeId, PushPull, Tags

T = TypeVar("T")

PORT = 7946


def nid(i: int) -> NodeId:
    return i.to_bytes(16, "big")


def addr(i: int) -> Addr:
    return (f"10.0.0.{i}", PORT)


def name(i: int) -> str:
    return f"n{i}"


def cfg(**changes: object) -> SwimConfig:
    """The LAN preset with ``changes``; every test states what it relies on."""
    return cfgmod.lan().replace(**changes)


def first_gossip_at(now: float, config: SwimConfig | None = None) -> float:
    """When the first GOSSIP round after a quiet spell is due, for news queued at ``now``."""
    return now + min(FIRST_GOSSIP_DELAY_S, (config or cfg()).gossip_interval_s)


def nack_at(now: float, config: SwimConfig | None = None) -> float:
    """When a ping-req helper that got the request at ``now`` gives up and nacks."""
    c = config or cfg()
    return now + NACK_AFTER * min(c.probe_timeout_s, c.probe_interval_s - c.probe_timeout_s)


def make_node(
    i: int = 1,
    *,
    seed: int = 7,
    config: SwimConfig | None = None,
    incarnation: int = 0,
    generation: int = 0,
    tags: Tags = (),
) -> Node:
    return Node(
        node_id=nid(i),
        name=name(i),
        addr=addr(i),
        config=config or cfg(),
        rng=random.Random(seed),
        incarnation=incarnation,
        generation=generation,
        tags=tags,
    )


def alive(
    i: int,
    inc: int = 0,
    *,
    gen: int = 0,
    tags: Tags = (),
    nm: str | None = None,
    at: Addr | None = None,
) -> Alive:
    return Alive(
        nid(i), nm if nm is not None else name(i), at if at is not None else addr(i), inc, gen, tags
    )


def packet(*msgs: Message) -> bytes:
    return codec.pack([codec.encode(m) for m in msgs])


# --- picking outputs -----------------------------------------------------------


def of(outs: Iterable[Output], kind: type[T]) -> list[T]:
    return [o for o in outs if isinstance(o, kind)]


def one(outs: Iterable[Output], kind: type[T]) -> T:
    found = of(outs, kind)
    assert len(found) == 1, f"expected exactly one {kind.__name__}, got {found!r}"
    return found[0]


def nologs(outs: Iterable[Output]) -> list[Output]:
    """``outs`` without :class:`Log` lines (their wording is not part of the contract)."""
    return [o for o in outs if not isinstance(o, Log)]


def decode(data: bytes) -> list[Message]:
    msgs, errors = codec.decode_packet(data)
    assert not errors, errors
    return msgs


def sends(outs: Iterable[Output]) -> list[tuple[Addr, list[Message]]]:
    """Every datagram in ``outs``, decoded: ``[(dst, [message, ...]), ...]``."""
    return [(o.dst, decode(o.data)) for o in of(outs, SendPacket)]


def sent_msgs(outs: Iterable[Output], kind: type[T]) -> list[tuple[Addr, T]]:
    """Each message of type ``kind`` in the datagrams of ``outs``, with its destination."""
    return [(dst, m) for dst, msgs in sends(outs) for m in msgs if isinstance(m, kind)]


def timers(outs: Iterable[Output], kind: TimerKind | None = None) -> list[SetTimer]:
    return [t for t in of(outs, SetTimer) if kind is None or t.timer.kind is kind]


def armed_at(outs: Iterable[Output]) -> list[tuple[TimerKind, float]]:
    """``(kind, deadline)`` of each timer armed in ``outs`` (tokens left out)."""
    return [(t.timer.kind, t.at) for t in of(outs, SetTimer)]


def events(outs: Iterable[Output]) -> list[tuple[EventKind, NodeId]]:
    return [(e.kind, e.member.node) for e in of(outs, MemberEvent)]


def fire(
    node: Node, outs: Iterable[Output], kind: TimerKind, now: float | None = None
) -> list[Output]:
    """Fire the one timer of ``kind`` armed in ``outs`` (at its deadline by default)."""
    t = one(timers(outs, kind), SetTimer)
    return node.handle(t.at if now is None else now, TimerFired(t.timer))


def state_of(data: bytes) -> PushPull:
    msg = codec.decode(data)
    assert isinstance(msg, PushPull)
    return msg


# --- one node on a test bench ----------------------------------------------------


@dataclass
class Rig:
    node: Node
    now: float = 0.0
    pending: list[SetTimer] = field(default_factory=list)
    history: list[Output] = field(default_factory=list)

    @classmethod
    def make(cls, i: int = 1, **kw: object) -> Rig:
        return cls(make_node(i, **kw))  # type: ignore[arg-type]

    def handle(self, inp: Input, now: float | None = None) -> list[Output]:
        if now is not None:
            self.now = now
        outs = self.node.handle(self.now, inp)
        self.pending.extend(timers(outs))
        self.history.extend(outs)
        return outs

    def start(self, *seeds: Addr, now: float = 0.0) -> list[Output]:
        return self.handle(Start(tuple(seeds)), now)

    def recv(self, src: int | Addr, *msgs: Message, now: float | None = None) -> list[Output]:
        return self.recv_raw(src, packet(*msgs), now)

    def recv_raw(self, src: int | Addr, data: bytes, now: float | None = None) -> list[Output]:
        return self.handle(PacketIn(addr(src) if isinstance(src, int) else src, data), now)

    def stream_in(
        self, stream: int, src: int | Addr, msg: Message, now: float | None = None
    ) -> list[Output]:
        src_addr = addr(src) if isinstance(src, int) else src
        return self.handle(StreamRequest(stream, src_addr, codec.encode(msg)), now)

    def armed(self, kind: TimerKind) -> list[SetTimer]:
        """Timers of ``kind`` armed and not fired yet (stale ones included)."""
        return [t for t in self.pending if t.timer.kind is kind]

    def timer(self, kind: TimerKind) -> SetTimer:
        """The most recently armed timer of ``kind`` that has not fired."""
        found = self.armed(kind)
        assert found, f"no {kind} timer armed"
        return found[-1]

    def fire(self, kind: TimerKind | SetTimer, now: float | None = None) -> list[Output]:
        """Fire a timer (by default the newest of ``kind``) at ``now``, by default
        at its deadline (or at once if the deadline has passed)."""
        t = kind if isinstance(kind, SetTimer) else self.timer(kind)
        self.pending.remove(t)
        return self.handle(TimerFired(t.timer), max(self.now, t.at) if now is None else now)

    def join(self, *peers: int, inc: int = 0, now: float | None = None) -> list[Output]:
        """Peers announce themselves (each one's Alive from its own address)."""
        outs: list[Output] = []
        for p in peers:
            outs += self.recv(p, alive(p, inc), now=now)
        return outs

    def drain(self) -> list[Output]:
        """Gossip (at the current time) until nothing is queued: later packets
        then carry only what a test makes happen. Alone, there is nobody to
        gossip to and the queue stays as it is."""
        outs: list[Output] = []
        if self.node.live_count() == 1:
            return outs
        for _ in range(100):
            if not self.node.queued_broadcasts():
                return outs
            if not self.armed(TimerKind.GOSSIP):
                break
            outs += self.fire(TimerKind.GOSSIP, now=self.now)
        assert not self.node.queued_broadcasts(), "broadcast queue did not drain"
        return outs

    def counter(self, key: str) -> int:
        return self.node.counters[key]

    def status(self, i: int) -> object:
        m = self.node.member(nid(i))
        return None if m is None else m.status


def deliver(
    sender: Rig, outs: Iterable[Output], rigs: Iterable[Rig], now: float | None = None
) -> dict[int, list[Output]]:
    """Hand the datagrams in ``outs`` from ``sender`` to whichever of ``rigs``
    they are addressed to; returns each receiver's outputs by node number."""
    by_addr = {r.node.local_member().addr: r for r in rigs}
    src = sender.node.local_member().addr
    got: dict[int, list[Output]] = {}
    for o in of(outs, SendPacket):
        r = by_addr.get(o.dst)
        if r is not None:
            i = int.from_bytes(r.node.node_id, "big")
            got.setdefault(i, []).extend(r.handle(PacketIn(src, o.data), now))
    return got
