"""Registry replicas shared between simulated nodes.

Theory of operation. In a simulated cluster every node holds a replica of the
same registry: N nodes x E entries, each pair with its own decoded entry, its
own partition dict and its own index slots, about 1.3 KB a pair (400 GB at
10,000 nodes and 30,000 entries). But the replicas differ only in *which
versions* of the partitions they hold, never in what a version contains: a
partition is written by a single origin, so ``(origin, generation, version)``
determines its entries, and their order, exactly (every replica applies the
same changes in the same order). This module keeps what is equal once per
simulation, the way peerd.sim.compact does for member records:

* :class:`Interner` is the replica's :class:`peerd.core.registry.state.Share`
  hook: a received delta or snapshot is replaced by one canonical equal copy
  (hash-consing, as in Lisp systems and the JVM's string table), whose origin
  id, strings and entries are themselves interned, so all replicas hold the
  same immutable objects.
* :class:`Pool` keeps one canonical :class:`Partition` per origin (its newest
  version seen). A node's partitions table (:class:`Parts`) holds references
  to canonical partitions; the core's lookup for mutation (``get``) copies
  one first (copy-on-write), and after each input (``flush``, the engine's
  per-input hook) a node's changed partitions are swapped for the canonical
  object of the same ``(origin, generation, version)``, or become it, after a
  check that their entries are equal (:attr:`Pool.mismatches` counts
  failures: always 0; the node then keeps its own copy).
* The name and group indexes are a function of the partitions a node holds,
  so a node needs none of its own: :class:`IndexView` answers from one list
  of ``(origin, eid)`` per key for the whole simulation, filtered by the
  node's partitions. Claims come in the order they were first added anywhere,
  except that a node's own claims move to the end when it adds them again (as
  a dict re-insertion would): only the owner's order among its own claims is
  observable (``conflicts_for_local``), and that order is exactly the dict's.
  Winners and listings are sorted or minima of unique ranks.
* The finest digest buckets (origins by bucket) are one superset for the
  whole simulation (:class:`FineView`): the only reader filters by the node's
  partitions.

The core is unchanged in behaviour: summaries are identical to plain tables
(``World(..., compact=False)``; tests/sim/test_regshare.py). A daemon never
uses this module.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, cast

from peerd.core.digest import FINE_BITS, Digest, bucket_of
from peerd.core.registry.index import Claim, Key
from peerd.core.registry.state import Partition, RegistryTables, part_key
from peerd.sim.store import DictOps
from peerd.wire.messages import NodeId, RegChange, RegDelta, RegEntry, RegKind, RegSnapshot

# Bounds on the memo tables: when one is full it starts again (only sharing
# is lost, never correctness).
MAX_MSGS = 1 << 18
MAX_ENTRIES = 1 << 21


class Interner:
    """Equal messages, entries, ids and strings as one object each."""

    def __init__(self) -> None:
        self.msgs: dict[Any, Any] = {}
        self.entries: dict[RegEntry, RegEntry] = {}
        self.ids: dict[NodeId, NodeId] = {}
        self.strs: dict[str, str] = {}
        self.hits = 0

    def __call__(self, msg: Any) -> Any:
        got = self.msgs.get(msg)
        if got is not None:
            self.hits += 1
            return got
        if len(self.msgs) >= MAX_MSGS:
            self.msgs.clear()
        if type(msg) is RegDelta:
            canon: Any = RegDelta(
                self.node(msg.origin),
                msg.generation,
                msg.base,
                msg.top,
                tuple(
                    RegChange(c.version, c.eid, None if c.entry is None else self.entry(c.entry))
                    for c in msg.changes
                ),
                msg.ack,
            )
        else:
            snap = cast(RegSnapshot, msg)
            canon = RegSnapshot(
                self.node(snap.origin),
                snap.generation,
                snap.version,
                tuple(self.entry(e) for e in snap.entries),
            )
        self.msgs[canon] = canon
        return canon

    def node(self, node: NodeId) -> NodeId:
        return self.ids.setdefault(node, node)

    def entry(self, e: RegEntry) -> RegEntry:
        got = self.entries.get(e)
        if got is not None:
            return got
        if len(self.entries) >= MAX_ENTRIES:
            self.entries.clear()
        s = self.strs
        meta = tuple((s.setdefault(k, k), s.setdefault(v, v)) for k, v in e.meta)
        got = RegEntry(
            e.eid,
            e.kind,
            s.setdefault(e.scope, e.scope),
            s.setdefault(e.name, e.name),
            e.claimed_ms,
            e.pid,
            e.uid,
            meta,
        )
        self.entries[got] = got
        return got


class Pool:
    """The registry state of a whole simulation: canonical partitions, the
    claim lists of the indexes, the bucket superset (see the module docs)."""

    def __init__(self) -> None:
        self.interner = Interner()
        self.parts: dict[NodeId, Partition] = {}  # origin -> newest canonical partition
        self.names: dict[Key, dict[tuple[NodeId, int], None]] = {}
        self.groups: dict[Key, dict[tuple[NodeId, int], None]] = {}
        self.fine: dict[int, set[NodeId]] = {}
        self.shared = 0  # partitions swapped for a canonical one
        self.mismatches = 0  # same (origin, generation, version), other entries: never

    def tables(self, node_id: NodeId, generation: int) -> RegistryTables:
        """Tables for a fresh replica of ``node_id`` in life ``generation``
        (:meth:`peerd.core.registry.state.Registry.adopt`)."""
        node_id = self.interner.node(node_id)
        own = Partition(generation)
        parts = Parts(self, node_id, own)
        hashes = Digest()
        hashes.toggle(node_id, part_key(own), 0)
        fine = FineView(self.fine)
        fine.setdefault(bucket_of(node_id, FINE_BITS), set()).add(node_id)
        return RegistryTables(
            parts=cast(Any, parts),
            hashes=hashes,
            fine=cast(Any, fine),
            names=IndexView(self.names, parts, node_id, RegKind.NAME),
            groups=IndexView(self.groups, parts, node_id, RegKind.GROUP),
        )


def _same(a: Partition, b: Partition) -> bool:
    return a.entries == b.entries and list(a.entries) == list(b.entries)


class Parts(DictOps):
    """A node's partitions by origin: canonical (shared) ones, and the ones
    it may change (its own, and copies made by ``get`` since the last flush)."""

    __slots__ = ("_d", "_mine", "_pool", "_me")

    def __init__(self, pool: Pool, me: NodeId, own: Partition) -> None:
        self._pool = pool
        self._me = me
        self._d: dict[NodeId, Partition] = {me: own}
        self._mine: set[NodeId] = {me}

    def peek(self, key: NodeId, default: Any = None) -> Any:
        return self._d.get(key, default)

    def get(self, key: NodeId, default: Any = None) -> Any:
        p = self._d.get(key)
        if p is None:
            return default
        if key in self._mine:
            return p
        p = Partition(p.generation, p.version, dict(p.entries))
        self._d[key] = p
        self._mine.add(key)
        return p

    def __setitem__(self, key: NodeId, value: Partition) -> None:
        self._d[key] = value
        self._mine.add(key)

    def __delitem__(self, key: NodeId) -> None:
        del self._d[key]
        if key != self._me:
            self._mine.discard(key)

    def __contains__(self, key: object) -> bool:
        return key in self._d

    def __len__(self) -> int:
        return len(self._d)

    def __iter__(self) -> Iterator[NodeId]:
        return iter(self._d)

    def values(self) -> Any:
        """Read-only view: shared partitions must not be changed through it."""
        return self._d.values()

    def items(self) -> Any:
        """Read-only view, like :meth:`values`."""
        return self._d.items()

    def flush(self) -> None:
        """After an input: share what this node changed (see the module docs)."""
        mine = self._mine
        if len(mine) == 1:
            return
        pool, d, me = self._pool, self._d, self._me
        for origin in mine:
            if origin == me:
                continue
            p = d.get(origin)
            if p is None:
                continue
            c = pool.parts.get(origin)
            if c is None or (c.generation, c.version) < (p.generation, p.version):
                pool.parts[origin] = p  # canonical from now on: no longer ours to change
            elif (c.generation, c.version) == (p.generation, p.version):
                if c is p:
                    continue
                if _same(c, p):
                    d[origin] = c
                    pool.shared += 1
                else:
                    pool.mismatches += 1
                    d[origin] = Partition(p.generation, p.version, dict(p.entries))
            # else: older than the canonical one; shared with nobody, but
            # copied again before any change like a shared one
        self._mine = {me}


class FineView(DictOps):
    """Origins by finest digest bucket: one superset for the simulation. The
    core adds through ``setdefault``, reads through ``peek`` (and keeps only
    origins it holds a partition of); its removals (``get`` then discard)
    see nothing, so they change nothing."""

    __slots__ = ("_g",)

    def __init__(self, shared: dict[int, set[NodeId]]) -> None:
        self._g = shared

    def peek(self, key: int, default: Any = None) -> Any:
        return self._g.get(key, default)

    def get(self, key: int, default: Any = None) -> Any:
        return default

    def setdefault(self, key: int, value: Any) -> Any:
        return self._g.setdefault(key, value)

    def __setitem__(self, key: int, value: set[NodeId]) -> None:
        self._g.setdefault(key, set()).update(value)

    def __delitem__(self, key: int) -> None:
        pass

    def __iter__(self) -> Iterator[int]:
        return iter(self._g)


class IndexView:
    """A node's name or group index, derived from its partitions and one
    claim list per key for the whole simulation (see the module docs)."""

    __slots__ = ("_keys", "_parts", "_me", "_kind")

    def __init__(
        self,
        keys: dict[Key, dict[tuple[NodeId, int], None]],
        parts: Parts,
        me: NodeId,
        kind: RegKind,
    ) -> None:
        self._keys = keys
        self._parts = parts
        self._me = me
        self._kind = kind

    def add(self, key: Key, claim: Claim) -> None:
        reg = self._keys.get(key)
        if reg is None:
            reg = self._keys[key] = {}
        k = (claim.origin, claim.entry.eid)
        if claim.origin == self._me:
            reg.pop(k, None)  # our own claims: in the order we (re)added them
            reg[k] = None
        elif k not in reg:
            reg[k] = None

    def remove(self, key: Key, origin: NodeId, eid: int) -> None:
        pass  # the partition no longer holds it: get() filters it out

    def get(self, key: Key) -> list[Claim]:
        reg = self._keys.get(key)
        if not reg:
            return []
        out: list[Claim] = []
        peek = self._parts.peek
        scope, name = key
        kind = self._kind
        for origin, eid in reg:
            p = peek(origin)
            if p is None:
                continue
            e = p.entries.get(eid)
            if e is None or e.kind is not kind or e.name != name or e.scope != scope:
                continue
            out.append(Claim(origin, e))
        return out

    def count(self, key: Key) -> int:
        return len(self.get(key))

    def keys(self) -> Iterator[Key]:
        return (k for k in self._keys if self.get(k))


def install(pool: Pool, node: Any, flush: Callable[[], None] | None) -> Callable[[], None]:
    """Give ``node`` (a fresh :class:`peerd.core.peer.Peer`) a replica over
    ``pool``; the engine's per-input hook, chained after ``flush`` (the
    compact members table's, if any)."""
    state = node.registry.state
    tables = pool.tables(state.node_id, state.generation)
    state.adopt(tables)
    state.share = pool.interner
    parts = cast(Parts, tables.parts)
    if flush is None:
        return parts.flush
    members_flush = flush

    def both() -> None:
        members_flush()
        parts.flush()

    return both
