"""Copy-on-write members and registry stores for simulations of large converged clusters.

A simulator that starts 10,000 cores from a converged cluster would give each
its own table of 10,000 members: 10^8 member records, tens of GiB. But at the
start every node's table is the same. :class:`Snapshot` holds that common
table once; :func:`install` gives a node overlay objects that read the
snapshot and keep only the node's own changes (a member it touched, a node
that died, one that joined): :meth:`Snapshot.tables` is a members-store factory
(:data:`peerd.core.swim.members.StoreFactory`) handed to the node at
construction. Reads of untouched members cost one extra dict
lookup; the first *lookup* of a member for possible mutation (``get`` or
``[]``) copies it into the node's own table, so the shared records are never
written. A real daemon never uses this module: it learns its peers by joining.

The overlays implement exactly the operations of the members-store protocols
(:mod:`peerd.core.swim.members`: the records, the indexes, the live ids, the
ring and the probe order); they are deterministic (no iteration over
hash-ordered sets). The registry's replica is shared the same way:
:class:`SharedState` holds a converged registry once and gives each node
copy-on-write tables over it (:class:`peerd.core.registry.state.RegistryTables`).
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Callable, Iterable, Iterator
from typing import Any, cast

from sortedcontainers import SortedList

from peerd.core.digest import FINE_BITS, Digest, bucket_of
from peerd.core.registry.index import ClaimIndex, copy_value
from peerd.core.registry.state import (
    Claim,
    Entry,
    Kind,
    Partition,
    RegistryTables,
    part_key,
)
from peerd.core.swim.members import AMBIGUOUS, Member, MemberTables
from peerd.wire.messages import NODE_PREFIX_BYTES, MemberState, NodeId, Status

_MISSING: Any = object()


class Snapshot:
    """One converged membership (all alive), shared read-only by many nodes."""

    def __init__(self, states: list[MemberState]) -> None:
        self.members: dict[NodeId, Member] = {}
        self.by_addr: dict[Any, NodeId] = {}
        self.by_name: dict[str, NodeId] = {}
        self.by_prefix: dict[bytes, NodeId] = {}
        for st in states:
            if st.status is not Status.ALIVE:
                raise ValueError("a shared snapshot holds alive members only")
            if st.node in self.members:
                continue
            self.members[st.node] = Member(
                st.node, st.name, st.addr, st.incarnation, st.generation, st.tags, st.status, 0.0
            )
            self.by_addr[st.addr] = st.node
            self.by_name.setdefault(st.name, st.node)
            p = st.node[:NODE_PREFIX_BYTES]
            self.by_prefix[p] = AMBIGUOUS if p in self.by_prefix else st.node
        self.digest = Digest()
        for m in self.members.values():
            self.digest.toggle(m.node, m.incarnation, m.status)
        self.ids: list[NodeId] = list(self.members)
        self.index: dict[NodeId, int] = {n: i for i, n in enumerate(self.ids)}
        self.sorted_ids: list[NodeId] = sorted(self.ids)

    def tables(self, me: Member, rng: random.Random) -> MemberTables:
        """The members store of a fresh node ``me`` that knows this snapshot's
        members, sharing its records (see the module docs). A
        :data:`peerd.core.swim.members.StoreFactory`."""
        _check_member_fields()
        members = Members(self.members, {me.node: me})
        by_addr = Index(self.by_addr)
        by_addr[me.addr] = me.node
        by_name = Index(self.by_name)
        by_name[me.name] = me.node
        by_prefix = Index(self.by_prefix)
        if me.node not in self.members:
            p = me.node[:NODE_PREFIX_BYTES]
            have = by_prefix.get(p, me.node)
            by_prefix[p] = me.node if have == me.node else AMBIGUOUS
        digest = Digest(self.digest.fine)
        template = self.members.get(me.node)
        if template is not None:  # the snapshot's row of this node gives way to its own
            digest.toggle(template.node, template.incarnation, template.status)
        digest.toggle(me.node, me.incarnation, me.status)
        return MemberTables(
            members=cast(Any, members),
            peek=members.peek,
            by_addr=cast(Any, by_addr),
            by_name=cast(Any, by_name),
            by_prefix=cast(Any, by_prefix),
            live=LiveSet(self, me.node),
            ring=Ring(self, me.node),
            probe_order=ProbeOrder(self, rng),
            digest=digest,
            preloaded=True,
        )


_MEMBER_FIELDS = (
    "node",
    "name",
    "addr",
    "incarnation",
    "generation",
    "tags",
    "status",
    "changed_at",
    "suspicion",
)


def _copy(m: Member) -> Member:
    return Member(
        m.node,
        m.name,
        m.addr,
        m.incarnation,
        m.generation,
        m.tags,
        m.status,
        m.changed_at,
        m.suspicion,
    )


def _check_member_fields() -> None:
    """_copy names Member's fields: fail loudly if they change."""
    import dataclasses

    got = tuple(f.name for f in dataclasses.fields(Member))
    if got != _MEMBER_FIELDS:
        raise AssertionError(f"peerd.sim.store._copy is out of date: Member has {got}")


class DictOps:
    """The dict methods the core uses besides lookups and writes, for tables
    that define ``get`` (a lookup for possible mutation), ``peek`` (a read),
    ``__setitem__``, ``__delitem__`` and ``__iter__``."""

    __slots__ = ()

    def __getitem__(self, key: Any) -> Any:
        v = self.get(key, _MISSING)  # type: ignore[attr-defined]
        if v is _MISSING:
            raise KeyError(key)
        return v

    def setdefault(self, key: Any, value: Any) -> Any:
        v = self.get(key, _MISSING)  # type: ignore[attr-defined]
        if v is _MISSING:
            self[key] = value  # type: ignore[index]
            return value
        return v

    def pop(self, key: Any, default: Any = _MISSING) -> Any:
        v = self.peek(key, _MISSING)  # type: ignore[attr-defined]
        if v is _MISSING:
            if default is _MISSING:
                raise KeyError(key)
            return default
        del self[key]  # type: ignore[attr-defined]
        return v

    def keys(self) -> Iterator[Any]:
        return iter(self)


class CowDict(DictOps):
    """A dict of mutable records over a shared base: the first lookup of a
    key for possible mutation (``get`` or ``[]``) copies the base record with
    ``copy`` into this node's own table, so shared records are never written.
    ``peek`` reads without copying (the caller promises not to mutate)."""

    __slots__ = ("_base", "_local", "_gone", "_extra", "_copy")

    def __init__(
        self, base: dict[Any, Any], local: dict[Any, Any], copy: Callable[[Any], Any]
    ) -> None:
        self._base = base
        self._local = local
        self._copy = copy
        self._gone: set[Any] = set()  # base keys deleted here
        self._extra = sum(1 for k in local if k not in base)  # local keys not in base

    def peek(self, key: Any, default: Any = None) -> Any:
        v = self._local.get(key)
        if v is not None:
            return v
        if key in self._gone:
            return default
        return self._base.get(key, default)

    def get(self, key: Any, default: Any = None) -> Any:
        v = self._local.get(key)
        if v is not None:
            return v
        b = self._base.get(key)
        if b is None or key in self._gone:
            return default
        v = self._copy(b)
        self._local[key] = v
        return v

    def __contains__(self, key: object) -> bool:
        return key in self._local or (key in self._base and key not in self._gone)

    def __setitem__(self, key: Any, value: Any) -> None:
        if key not in self._local and (key not in self._base or key in self._gone):
            if key in self._base:
                self._gone.discard(key)
            else:
                self._extra += 1
        self._local[key] = value

    def __delitem__(self, key: Any) -> None:
        if key not in self:
            raise KeyError(key)
        self._local.pop(key, None)
        if key in self._base:
            self._gone.add(key)
        else:
            self._extra -= 1

    def __len__(self) -> int:
        return len(self._base) - len(self._gone) + self._extra

    def __bool__(self) -> bool:
        return len(self) > 0

    def __iter__(self) -> Iterator[Any]:
        yield from self._local
        local, gone = self._local, self._gone
        for k in self._base:
            if k not in local and k not in gone:
                yield k

    def values(self) -> Iterator[Any]:
        """Read-only view: shared records must not be changed through it."""
        yield from self._local.values()
        local, gone = self._local, self._gone
        for k, v in self._base.items():
            if k not in local and k not in gone:
                yield v

    def items(self) -> Iterator[tuple[Any, Any]]:
        """Read-only view, like :meth:`values`."""
        yield from self._local.items()
        local, gone = self._local, self._gone
        for k, v in self._base.items():
            if k not in local and k not in gone:
                yield k, v


class Members(CowDict):
    """The ``_members`` table: a node's own records over the shared ones."""

    __slots__ = ()

    def __init__(self, base: dict[NodeId, Member], local: dict[NodeId, Member]) -> None:
        super().__init__(base, local, _copy)


class Index(CowDict):
    """``_by_addr`` / ``_by_name`` / ``_by_prefix``: a shared dict with local changes. Its
    values are node ids (immutable), so a read never copies."""

    __slots__ = ()

    def __init__(self, base: dict[Any, NodeId]) -> None:
        super().__init__(base, {}, lambda v: v)

    get = CowDict.peek


class LiveSet:
    """``_live``: the shared ids minus the ones that went down here, plus the
    ones that came up here. Same interface as :class:`peerd.core.swim.members.LiveSet`."""

    __slots__ = ("_base", "_bindex", "_removed", "_items", "_index")

    def __init__(self, snap: Snapshot, me: NodeId) -> None:
        self._base = snap.ids
        self._bindex = snap.index
        self._removed: set[NodeId] = {me} if me in snap.index else set()
        self._items: list[NodeId] = []  # up here, not in the base
        self._index: dict[NodeId, int] = {}

    def __len__(self) -> int:
        return len(self._base) - len(self._removed) + len(self._items)

    def __contains__(self, node: object) -> bool:
        if node in self._bindex:
            return node not in self._removed
        return node in self._index

    def add(self, node: NodeId) -> None:
        if node in self._bindex:
            self._removed.discard(node)
        elif node not in self._index:
            self._index[node] = len(self._items)
            self._items.append(node)

    def discard(self, node: NodeId) -> None:
        if node in self._bindex:
            self._removed.add(node)
            return
        i = self._index.pop(node, None)
        if i is None:
            return
        last = self._items.pop()
        if i < len(self._items):
            self._items[i] = last
            self._index[last] = i

    def __iter__(self) -> Iterator[NodeId]:
        removed = self._removed
        for x in self._base:
            if x not in removed:
                yield x
        yield from self._items

    def sample(self, rng: random.Random, k: int, exclude: tuple[NodeId, ...] = ()) -> list[NodeId]:
        """Up to ``k`` distinct random live ids not in ``exclude``."""
        avail = len(self) - sum(1 for e in exclude if e in self)
        k = min(k, avail)
        if k <= 0:
            return []
        nb = len(self._base)
        total = nb + len(self._items)
        if k * 3 >= avail or len(self._removed) * 2 > nb:
            pool = [x for x in self if x not in exclude]
            return rng.sample(pool, k)
        out: list[NodeId] = []
        seen: set[NodeId] = set(exclude)
        removed, base, items = self._removed, self._base, self._items
        while len(out) < k:
            i = rng.randrange(total)
            if i < nb:
                x = base[i]
                if x in removed:
                    continue
            else:
                x = items[i - nb]
            if x not in seen:
                seen.add(x)
                out.append(x)
        return out


class Ring:
    """``_ring``: live ids (the node itself included) in id order, as the
    shared sorted ids minus the ones down here plus a SortedList of the ones
    up here. Supports what the watch-link code uses: add, remove, len,
    index(x) and ring[j] for j near the last index asked. The ids down here
    are a SortedList too: ``index`` counts those below a node by bisection
    (a node asks after every death it learns, and a burst brings thousands),
    and 8 bytes per id instead of a set's ~40 keep a 30% crash of 10,000
    simulated nodes within memory."""

    __slots__ = ("_base", "_bset", "_removed", "_added", "_anchor")

    def __init__(self, snap: Snapshot, me: NodeId) -> None:
        self._base = snap.sorted_ids
        self._bset = snap.index
        self._removed: SortedList = SortedList()
        self._added: SortedList = SortedList()
        if me not in snap.index:
            self._added.add(me)
        self._anchor: tuple[int, NodeId] | None = None

    def __len__(self) -> int:
        return len(self._base) - len(self._removed) + len(self._added)

    def add(self, node: NodeId) -> None:
        if node in self._bset:
            if node in self._removed:
                self._removed.remove(node)
        elif node not in self._added:
            self._added.add(node)
        self._anchor = None

    def remove(self, node: NodeId) -> None:
        if node in self._bset:
            if node in self._removed:
                raise ValueError(node)
            self._removed.add(node)
        else:
            self._added.remove(node)
        self._anchor = None

    def _walk(self, start: NodeId) -> Iterator[NodeId]:
        """Live ids from ``start`` (inclusive) upwards, then wrapping around."""
        base, added, removed = self._base, self._added, self._removed
        for _lap in range(2):
            i = bisect.bisect_left(base, start) if _lap == 0 else 0
            j = added.bisect_left(start) if _lap == 0 else 0
            while i < len(base) or j < len(added):
                if j >= len(added) or (i < len(base) and base[i] < added[j]):
                    x = base[i]
                    i += 1
                    if x in removed:
                        continue
                else:
                    x = added[j]
                    j += 1
                yield x

    def index(self, node: NodeId) -> int:
        if (
            node in self._bset
            and node in self._removed
            or (node not in self._bset and node not in self._added)
        ):
            raise ValueError(node)
        pos = bisect.bisect_left(self._base, node)
        below = self._removed.bisect_left(node)  # base ids below node that are down
        idx: int = pos - below + int(self._added.bisect_left(node))
        self._anchor = (idx, node)
        return idx

    def __getitem__(self, j: int) -> NodeId:
        n = len(self)
        j %= n
        node, steps = b"", j  # from the bottom of the ring
        if self._anchor is not None:
            idx, anchor = self._anchor
            if (j - idx) % n < j:  # nearer the anchor
                node, steps = anchor, (j - idx) % n
        for k, x in enumerate(self._walk(node)):
            if k == steps:
                return x
        raise IndexError(j)


class ProbeOrder:
    """``_probe_order``: a lazily shuffled copy of the shared ids (Fisher-Yates
    done one position at a time as the round-robin reaches it), so that a
    node's first round costs nothing up front. ``insert`` adds a node at a
    random place among the positions not reached yet, as the list does."""

    __slots__ = ("_base", "_n", "_k", "_swapped", "_rng")

    def __init__(self, snap: Snapshot, rng: random.Random) -> None:
        self._base = snap.ids
        self._n = len(snap.ids)
        self._k = 0  # positions [0, k) are final
        self._swapped: dict[int, NodeId] = {}
        self._rng = rng

    def __len__(self) -> int:
        return self._n

    def _at(self, i: int) -> NodeId:
        v = self._swapped.get(i)
        return v if v is not None else self._base[i]

    def __getitem__(self, i: int) -> NodeId:
        if i < 0 or i >= self._n:
            raise IndexError(i)
        while self._k <= i:
            k = self._k
            j = self._rng.randrange(k, self._n)
            vk, vj = self._at(k), self._at(j)
            self._swapped[k], self._swapped[j] = vj, vk
            self._k = k + 1
        return self._at(i)

    def insert(self, pos: int, node: NodeId) -> None:
        # Any place among the unreached positions is as good as another: they
        # are shuffled when reached.
        self._swapped[self._n] = node
        self._n += 1


class SharedState:
    """A converged registry: every origin's partition, and the indexes over
    them, built once and shared read-only by simulated nodes (see
    :meth:`tables`). A real daemon never uses it."""

    def __init__(self, partitions: Iterable[tuple[NodeId, int, Iterable[Entry]]]) -> None:
        self.parts: dict[NodeId, Partition] = {}
        self.names: dict[tuple[str, str], Any] = {}  # a ClaimIndex's table
        self.groups: dict[tuple[str, str], Any] = {}
        names, groups = ClaimIndex(_Dict()), ClaimIndex(_Dict())
        for origin, generation, entries in partitions:
            part = Partition(generation)
            for entry in entries:
                part.entries[entry.eid] = entry
                part.version += 1
                index = names if entry.kind is Kind.NAME else groups
                index.add((entry.scope, entry.name), Claim(origin, entry))
            self.parts[origin] = part
        self.names, self.groups = dict(names.table), dict(groups.table)
        self.hashes = Digest()
        self.fine: dict[int, set[NodeId]] = {}
        for origin, part in self.parts.items():
            self.hashes.toggle(origin, part_key(part), 0)
            self.fine.setdefault(bucket_of(origin, FINE_BITS), set()).add(origin)

    def tables(self, node_id: NodeId, generation: int) -> RegistryTables:
        """Copy-on-write tables over this registry for the node ``node_id``
        in its life ``generation`` (for :meth:`peerd.core.registry.state.Registry.adopt`)."""
        own = self.parts.get(node_id)
        local = {node_id: Partition(generation)}
        if own is not None:
            if own.generation != generation:
                raise ValueError("the snapshot holds another life of this node")
            local[node_id] = _copy_partition(own)
        parts = CowDict(self.parts, local, _copy_partition)
        hashes = Digest(self.hashes.fine)
        fine = CowDict(self.fine, {}, set)
        if own is None:
            hashes.toggle(node_id, part_key(local[node_id]), 0)
            fine.setdefault(bucket_of(node_id, FINE_BITS), set()).add(node_id)
        return RegistryTables(
            parts=cast(Any, parts),
            hashes=hashes,
            fine=cast(Any, fine),
            names=ClaimIndex(CowDict(self.names, {}, copy_value)),
            groups=ClaimIndex(CowDict(self.groups, {}, copy_value)),
        )


class _Dict(dict):  # type: ignore[type-arg]
    __slots__ = ()
    peek = dict.get


def _copy_partition(part: Partition) -> Partition:
    return Partition(part.generation, part.version, dict(part.entries))
