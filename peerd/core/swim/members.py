"""The members table of SWIM membership: one record per known node.

Theory of operation: a node knows each member by id (the identity; name and
address are attributes that may change when a node moves or restarts). A
record carries what SWIM disseminates about the member (status, incarnation;
SWIM 4.2) and, while the member is suspect, its running suspicion timer
(Lifeguard IV-B dogpile: the timer shrinks with each independent
confirmation). Live ids are also kept in a :class:`LiveSet`, which gives the
uniform random choice that probing helpers, gossip targets and anti-entropy
partners are drawn with (SWIM 4.1, 4.3) in O(1) per change.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from peerd.core.events import MemberInfo
from peerd.wire.messages import Addr, MemberState, NodeId, Status, Tags


@dataclass(slots=True)
class Suspicion:
    """A running suspicion timer (Lifeguard dogpile)."""

    incarnation: int
    origin: NodeId  # who suspected first; confirmations are everyone else
    started: float
    low: float
    high: float
    k: int
    confirmers: set[NodeId]
    token: int
    deadline: float
    # A closed-port hint caps the timer (see module docs).
    cap: float | None = None
    # We saw the suspect fail ourselves (our probe, a check, a hint). A
    # suspicion we only heard of is checked once before we declare death.
    verified: bool = False


# In Node._by_prefix: more than one known id has this prefix.
AMBIGUOUS: NodeId = b""


@dataclass(slots=True)
class Member:
    node: NodeId
    name: str
    addr: Addr
    incarnation: int
    generation: int
    tags: Tags
    status: Status
    changed_at: float
    suspicion: Suspicion | None = None

    def info(self) -> MemberInfo:
        return MemberInfo(
            self.node,
            self.name,
            self.addr,
            self.status,
            self.incarnation,
            self.generation,
            self.tags,
        )

    def state(self) -> MemberState:
        return MemberState(
            self.node,
            self.name,
            self.addr,
            self.incarnation,
            self.generation,
            self.tags,
            self.status,
        )


class LiveSet:
    """Ids of live members with O(1) add, remove and uniform random choice."""

    __slots__ = ("_items", "_index")

    def __init__(self) -> None:
        self._items: list[NodeId] = []
        self._index: dict[NodeId, int] = {}

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, node: object) -> bool:
        return node in self._index

    def add(self, node: NodeId) -> None:
        if node not in self._index:
            self._index[node] = len(self._items)
            self._items.append(node)

    def discard(self, node: NodeId) -> None:
        i = self._index.pop(node, None)
        if i is None:
            return
        last = self._items.pop()
        if i < len(self._items):
            self._items[i] = last
            self._index[last] = i

    def sample(self, rng: random.Random, k: int, exclude: tuple[NodeId, ...] = ()) -> list[NodeId]:
        """Up to ``k`` distinct random ids not in ``exclude``."""
        n = len(self._items)
        avail = n - sum(1 for e in exclude if e in self._index)
        k = min(k, avail)
        if k <= 0:
            return []
        if k * 3 >= avail:
            pool = [x for x in self._items if x not in exclude]
            return rng.sample(pool, k)
        out: list[NodeId] = []
        seen: set[NodeId] = set(exclude)
        while len(out) < k:
            x = self._items[rng.randrange(n)]
            if x not in seen:
                seen.add(x)
                out.append(x)
        return out

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self._items)
