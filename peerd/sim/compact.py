"""A compact members table for simulations of clusters that grow by joining.

A simulated node that joins learns every member by decoding messages, so a
plain members table (:func:`peerd.core.swim.members.local_tables`) holds, per
(node, member) pair, a :class:`~peerd.core.swim.members.Member` object, a dict
slot, and its own copies of the member's id, name, address and tags: about 560
bytes a pair, measured at 203 nodes. At 10,000 nodes that is 10^8 pairs and
over 50 GB. Yet what a node knows of a member is almost always exactly what
every other node knows of it: the same (id, name, address, incarnation,
generation, tags, status), learnt at a different time.

So :class:`Records` keeps each distinct member content once for the whole
simulation (interned; the tuple holds the first decoded copy of each field)
and gives each member id a small global index. A node's table
(:class:`CompactMembers`) is then a few typed arrays indexed by that global
index: which content it holds (4 bytes), when it changed (8 bytes, its own
clock: it decides when a dead member is reaped), and the table's insertion
order (8 bytes), about 20 bytes a pair.

The core reads and changes members as mutable objects (SWIM updates set
``status`` and ``incarnation`` in place), so the table hands out real
:class:`Member` objects: ``get`` and ``[]`` (a lookup for possible mutation)
materialise one and keep it *hot*; ``peek``, ``values`` and ``items`` build
read-only copies (the members-store protocol's promise, as for the shared
snapshot of :mod:`peerd.sim.store`). Between two inputs the core holds no
member object except its own record, so the simulator calls :meth:`flush`
after each input: hot objects go back into the arrays, except the node's own
record and members under suspicion (their running timer is per node). The
order of iteration is the order a dict would give (insertion order; a
re-inserted key goes last), so a node behaves exactly as with a plain table:
the same seed gives the same summary (tests/sim/test_compact.py).

A real daemon never uses this module.
"""

from __future__ import annotations

import random
from array import array
from collections.abc import Iterator
from typing import Any, cast

from sortedcontainers import SortedList

from peerd.core.digest import Digest
from peerd.core.swim.members import LiveSet, Member, MemberTables
from peerd.sim.store import DictOps
from peerd.wire.messages import NODE_PREFIX_BYTES, NodeId

_MISSING: Any = object()

# One member content: (node, name, addr, incarnation, generation, tags, status).
Content = tuple[Any, ...]


class Records:
    """Member contents and member ids, interned for a whole simulation."""

    __slots__ = ("ids", "nodes", "contents", "_index", "_fields", "addrs", "names", "prefixes")

    def __init__(self) -> None:
        self.ids: dict[NodeId, int] = {}  # member id -> global index
        self.nodes: list[NodeId] = []  # global index -> member id
        self.contents: list[Content] = [()]  # content number -> content (0: none)
        self._index: dict[Content, int] = {}
        self._fields: dict[Any, Any] = {}  # names, addresses, tags: one copy each
        self.addrs, self.names, self.prefixes = Keys(), Keys(), Keys()

    def slot(self, node: NodeId) -> int:
        g = self.ids.get(node)
        if g is None:
            g = self.ids[node] = len(self.nodes)
            self.nodes.append(node)
        return g

    def intern(self, m: Member) -> int:
        """The number of ``m``'s content; ``m``'s fields become the shared copies."""
        key = (m.node, m.name, m.addr, m.incarnation, m.generation, m.tags, m.status)
        n = self._index.get(key)
        if n is None:
            f = self._fields
            key = (
                self.nodes[self.slot(m.node)],
                f.setdefault(m.name, m.name),
                f.setdefault(m.addr, m.addr),
                m.incarnation,
                m.generation,
                f.setdefault(m.tags, m.tags),
                m.status,
            )
            n = self._index[key] = len(self.contents)
            self.contents.append(key)
        c = self.contents[n]
        m.node, m.name, m.addr, m.tags = c[0], c[1], c[2], c[5]
        return n

    def tables(self, me: Member, rng: random.Random) -> MemberTables:
        """A members store (:data:`peerd.core.swim.members.StoreFactory`) of a
        node that starts knowing only ``me``, like the plain store."""
        members = CompactMembers(self)
        members[me.node] = me
        members.pin(me.node)
        by_addr, by_name, by_prefix = (
            CompactIndex(self.addrs),
            CompactIndex(self.names),
            CompactIndex(self.prefixes),
        )
        by_addr[me.addr] = me.node
        by_name[me.name] = me.node
        by_prefix[me.node[:NODE_PREFIX_BYTES]] = me.node
        digest = Digest()
        digest.toggle(me.node, me.incarnation, me.status)
        return MemberTables(
            members=cast(Any, members),
            peek=members.peek,
            by_addr=cast(Any, by_addr),
            by_name=cast(Any, by_name),
            by_prefix=cast(Any, by_prefix),
            live=CompactLiveSet(self),
            ring=SortedList([me.node]),
            probe_order=[],
            digest=digest,
        )


class CompactMembers(DictOps):
    """One node's members table over :class:`Records` (see the module docs).
    A ``MutableMapping[NodeId, Member]`` as the core uses it."""

    __slots__ = ("_r", "_rec", "_at", "_order", "_pos", "_holes", "_n", "_hot", "_pinned")

    def __init__(self, records: Records) -> None:
        self._r = records
        self._rec = array("i")  # global index -> content number (0: not here)
        self._at = array("d")  # global index -> changed_at
        self._order = array("i")  # global indexes in insertion order (-1: deleted)
        self._pos = array("i")  # global index -> its place in _order
        self._holes = 0
        self._n = 0
        self._hot: dict[NodeId, Member] = {}
        self._pinned: set[NodeId] = set()

    def pin(self, node: NodeId) -> None:
        """Keep ``node``'s object hot for good (the node's own record)."""
        self._pinned.add(node)

    def _grow(self, g: int) -> None:
        more = g + 1 - len(self._rec)
        if more > 0:
            more = max(more, len(self._rec) // 2, 64)
            self._rec.extend(array("i", [0]) * more)
            self._at.extend(array("d", [0.0]) * more)
            self._pos.extend(array("i", [0]) * more)

    def _index(self, node: object) -> int:
        g: int | None = self._r.ids.get(node)  # type: ignore[call-overload]
        if g is None or g >= len(self._rec) or not self._rec[g]:
            return -1
        return g

    def _make(self, g: int) -> Member:
        c = self._r.contents[self._rec[g]]
        return Member(c[0], c[1], c[2], c[3], c[4], c[5], c[6], self._at[g])

    # --- reads -----------------------------------------------------------------------

    def __len__(self) -> int:
        return self._n

    def __bool__(self) -> bool:
        return self._n > 0

    def __contains__(self, node: object) -> bool:
        return node in self._hot or self._index(node) >= 0

    def peek(self, node: NodeId, default: Any = None) -> Any:
        m = self._hot.get(node)
        if m is not None:
            return m
        g = self._index(node)
        return default if g < 0 else self._make(g)

    def get(self, node: NodeId, default: Any = None) -> Any:
        m = self._hot.get(node)
        if m is not None:
            return m
        g = self._index(node)
        if g < 0:
            return default
        m = self._hot[node] = self._make(g)
        return m

    def __iter__(self) -> Iterator[NodeId]:
        nodes = self._r.nodes
        for g in self._order:
            if g >= 0:
                yield nodes[g]

    def values(self) -> Iterator[Member]:
        """Read-only: a member to change is looked up with ``get``."""
        hot, nodes = self._hot, self._r.nodes
        for g in self._order:
            if g >= 0:
                m = hot.get(nodes[g])
                yield m if m is not None else self._make(g)

    def items(self) -> Iterator[tuple[NodeId, Member]]:
        """Read-only, like :meth:`values`."""
        for m in self.values():
            yield m.node, m

    # --- writes ----------------------------------------------------------------------

    def __setitem__(self, node: NodeId, m: Member) -> None:
        g = self._r.slot(node)
        self._grow(g)
        if not self._rec[g]:
            self._pos[g] = len(self._order)
            self._order.append(g)
            self._n += 1
        self._rec[g] = self._r.intern(m)
        self._at[g] = m.changed_at
        self._hot[node] = m

    def __delitem__(self, node: NodeId) -> None:
        g = self._index(node)
        if g < 0:
            raise KeyError(node)
        self._rec[g] = 0
        self._order[self._pos[g]] = -1
        self._holes += 1
        self._n -= 1
        self._hot.pop(node, None)
        self._pinned.discard(node)
        if self._holes > 64 and self._holes * 2 > len(self._order):
            self._compact()

    def _compact(self) -> None:
        order = array("i", (g for g in self._order if g >= 0))
        for i, g in enumerate(order):
            self._pos[g] = i
        self._order = order
        self._holes = 0

    def flush(self) -> None:
        """Put hot objects back into the arrays (call between inputs: see the
        module docs). Pinned members and members under suspicion stay hot."""
        hot = self._hot
        if len(hot) <= len(self._pinned):
            return
        ids, intern, rec, at = self._r.ids, self._r.intern, self._rec, self._at
        keep = self._pinned
        for node in [n for n, m in hot.items() if n not in keep and m.suspicion is None]:
            m = hot.pop(node)
            g = ids[node]
            rec[g] = intern(m)
            at[g] = m.changed_at


class Keys:
    """The keys of one kind of index (addresses, names or id prefixes) seen in
    a simulation, each numbered once, with the first value any node gave it."""

    __slots__ = ("index", "keys", "values")

    def __init__(self) -> None:
        self.index: dict[Any, int] = {}
        self.keys: list[Any] = []
        self.values: list[Any] = []

    def slot(self, key: Any, value: Any) -> int:
        k = self.index.get(key)
        if k is None:
            k = self.index[key] = len(self.keys)
            self.keys.append(key)
            self.values.append(value)
        return k


class CompactIndex(DictOps):
    """A node's ``by_addr``, ``by_name`` or ``by_prefix`` over :class:`Keys`:
    which keys it holds (a byte each) and, only where its value differs from
    the first value any node gave the key, that value. A dict as the core uses
    it (lookups, writes, deletes; the core never iterates an index)."""

    __slots__ = ("_keys", "_has", "_own")

    def __init__(self, keys: Keys) -> None:
        self._keys = keys
        self._has = bytearray()
        self._own: dict[Any, Any] = {}

    def _k(self, key: Any) -> int:
        k: int | None = self._keys.index.get(key)
        if k is None or k >= len(self._has) or not self._has[k]:
            return -1
        return k

    def peek(self, key: Any, default: Any = None) -> Any:
        k = self._k(key)
        if k < 0:
            return default
        v = self._own.get(key, _MISSING)
        return self._keys.values[k] if v is _MISSING else v

    get = peek  # values are node ids: nothing to copy

    def __contains__(self, key: object) -> bool:
        return self._k(key) >= 0

    def __setitem__(self, key: Any, value: Any) -> None:
        keys = self._keys
        k = keys.slot(key, value)
        if k >= len(self._has):
            self._has.extend(bytes(max(k + 1 - len(self._has), len(self._has) // 2, 64)))
        self._has[k] = 1
        if value == keys.values[k]:
            self._own.pop(key, None)
        else:
            self._own[key] = value

    def __delitem__(self, key: Any) -> None:
        k = self._k(key)
        if k < 0:
            raise KeyError(key)
        self._has[k] = 0
        self._own.pop(key, None)


class CompactLiveSet(LiveSet):
    """The live ids as global indexes in typed arrays (8 bytes an id instead of
    a list slot and a dict slot). The same positions, swaps and random draws
    as :class:`peerd.core.swim.members.LiveSet`, so the same choices."""

    __slots__ = ("_r", "_where")

    def __init__(self, records: Records) -> None:
        self._r = records
        self._items: Any = array("i")  # global indexes
        self._where = array("i")  # global index -> place in _items + 1 (0: absent)

    def __len__(self) -> int:
        return len(self._items)

    def _g(self, node: object) -> int:
        g: int | None = self._r.ids.get(node)  # type: ignore[call-overload]
        if g is None or g >= len(self._where) or not self._where[g]:
            return -1
        return g

    def __contains__(self, node: object) -> bool:
        return self._g(node) >= 0

    def add(self, node: NodeId) -> None:
        if self._g(node) < 0:
            g = self._r.slot(node)
            if g >= len(self._where):
                more = max(g + 1 - len(self._where), len(self._where) // 2, 64)
                self._where.extend(array("i", [0]) * more)
            self._items.append(g)
            self._where[g] = len(self._items)

    def discard(self, node: NodeId) -> None:
        g = self._g(node)
        if g < 0:
            return
        i = self._where[g] - 1
        self._where[g] = 0
        last = self._items.pop()
        if i < len(self._items):
            self._items[i] = last
            self._where[last] = i + 1

    def sample(self, rng: random.Random, k: int, exclude: tuple[NodeId, ...] = ()) -> list[NodeId]:
        nodes = self._r.nodes
        items = self._items
        n = len(items)
        avail = n - sum(1 for e in exclude if e in self)
        k = min(k, avail)
        if k <= 0:
            return []
        if k * 3 >= avail:
            pool = [x for x in map(nodes.__getitem__, items) if x not in exclude]
            return rng.sample(pool, k)
        out: list[NodeId] = []
        seen: set[NodeId] = set(exclude)
        while len(out) < k:
            x = nodes[items[rng.randrange(n)]]
            if x not in seen:
                seen.add(x)
                out.append(x)
        return out

    def __iter__(self):  # type: ignore[no-untyped-def]
        return map(self._r.nodes.__getitem__, self._items)
