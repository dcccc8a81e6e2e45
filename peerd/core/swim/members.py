"""The members table of SWIM membership: one record per known node.

Theory of operation: a node knows each member by id (the identity; name and
address are attributes that may change when a node moves or restarts). A
record carries what SWIM disseminates about the member (status, incarnation;
SWIM 4.2) and, while the member is suspect, its running suspicion timer
(Lifeguard IV-B dogpile: the timer shrinks with each independent
confirmation). Live ids are also kept in a :class:`LiveSet`, which gives the
uniform random choice that probing helpers, gossip targets and anti-entropy
partners are drawn with (SWIM 4.1, 4.3) in O(1) per change.

The tables a node keeps over its members (the records, the address, name and
id-prefix indexes, the live ids, the id ring, the probe order and the digest
of the whole) form its *members store*: :class:`MemberTables`, built by a
:data:`StoreFactory` handed to the node. :func:`local_tables` is the plain
store of a daemon, which starts knowing only itself and learns its peers by
joining. A simulator that starts thousands of nodes from one converged
cluster supplies its own factory (peerd.sim.store: copy-on-write tables over
one shared snapshot); the protocols below name exactly the operations the
node performs on each table, so any implementation of them will do. The node
binds the tables to its own attributes once, at construction: the hot paths
pay no indirection for the store.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, MutableMapping
from dataclasses import dataclass
from typing import Protocol, cast

from sortedcontainers import SortedList

from peerd.core.digest import Digest
from peerd.core.events import MemberInfo
from peerd.wire.messages import NODE_PREFIX_BYTES, Addr, MemberState, NodeId, Status, Tags


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


class LiveIds(Protocol):
    """The live ids other than the node's own: set operations and uniform sampling."""

    def __len__(self) -> int: ...
    def __contains__(self, node: object) -> bool: ...
    def __iter__(self) -> Iterator[NodeId]: ...
    def add(self, node: NodeId) -> None: ...
    def discard(self, node: NodeId) -> None: ...
    def sample(
        self, rng: random.Random, k: int, exclude: tuple[NodeId, ...] = ()
    ) -> list[NodeId]: ...


class IdRing(Protocol):
    """The live ids, the node's own included, in id order (ring successors)."""

    def __len__(self) -> int: ...
    def add(self, node: NodeId) -> None: ...
    def remove(self, node: NodeId) -> None: ...
    def index(self, node: NodeId) -> int: ...
    def __getitem__(self, j: int) -> NodeId: ...


class ProbeOrder(Protocol):
    """The shuffled round-robin order of probe targets (SWIM 4.3)."""

    def __len__(self) -> int: ...
    def __getitem__(self, i: int) -> NodeId: ...
    def insert(self, pos: int, node: NodeId) -> None: ...


class MemberTables:
    """A node's members store (see the module docs). ``peek`` reads a record
    the caller will not change (a store that shares records answers it without
    a copy); ``preloaded`` says the store starts with a converged cluster
    (the node then starts without a join announcement)."""

    __slots__ = (
        "members",
        "peek",
        "by_addr",
        "by_name",
        "by_prefix",
        "live",
        "ring",
        "probe_order",
        "digest",
        "preloaded",
    )

    def __init__(
        self,
        *,
        members: MutableMapping[NodeId, Member],
        peek: Callable[[NodeId], Member],
        by_addr: MutableMapping[Addr, NodeId],
        by_name: MutableMapping[str, NodeId],
        by_prefix: MutableMapping[bytes, NodeId],
        live: LiveIds,
        ring: IdRing,
        probe_order: ProbeOrder,
        digest: Digest,
        preloaded: bool = False,
    ) -> None:
        self.members = members
        self.peek = peek
        self.by_addr = by_addr
        self.by_name = by_name
        self.by_prefix = by_prefix
        self.live = live
        self.ring = ring
        self.probe_order = probe_order
        self.digest = digest
        self.preloaded = preloaded


# Builds a node's store from its own record and its RNG.
StoreFactory = Callable[[Member, random.Random], MemberTables]


def local_tables(me: Member, rng: random.Random) -> MemberTables:
    """The plain store: plain dicts and lists, knowing only ``me``."""
    members: dict[NodeId, Member] = {me.node: me}
    digest = Digest()
    digest.toggle(me.node, me.incarnation, me.status)
    return MemberTables(
        members=members,
        peek=cast(Callable[[NodeId], Member], members.get),
        by_addr={me.addr: me.node},
        by_name={me.name: me.node},
        by_prefix={me.node[:NODE_PREFIX_BYTES]: me.node},
        live=LiveSet(),
        ring=SortedList([me.node]),
        probe_order=[],
        digest=digest,
    )
