"""The registry's replicated state: names and groups as a per-origin CRDT.

Theory of operation (delta-state CRDTs: Almeida, Shoker, Baquero 2018):

Every entry is written by exactly one origin: the daemon (node id, generation)
whose API connection registered it. The replicated state is therefore a map
``origin -> Partition`` in which each partition has a single writer and a
version counter that the writer bumps on every change. Two partitions of the
same origin are ordered by ``(generation, version)``; merging full states is
"keep the larger per origin", which is commutative, associative and
idempotent, so replicas converge whatever the delivery order.

Changes travel as *deltas* ("origin X, from version a to b: these entries
changed, these were removed"). A replica at version v applies a delta that
starts at or before v and ends after it (it skips the part it has), buffers a
few that start later, and otherwise waits for anti-entropy, which compares
digests ``{origin: (generation, version)}`` and ships either a delta from the
origin's bounded change log or a full snapshot of that partition. Nothing is
kept per removed entry beyond the bounded log: state stays bounded under
churn.

No resurrection: a replica only ever moves a partition forward in
``(generation, version)``, so a late delta cannot bring back a removed entry.
When membership says an origin is dead, its partition is dropped but its
``(generation, version)`` is kept as a floor, so late deltas of that life are
ignored; if the node turns out to be alive (it refuted), a snapshot at or
above the floor restores its entries, and a new generation (a restart) starts
from empty.

Unique names are claimed without a lock, so two origins may both claim one
name (a race, or both sides of a partition). Every replica resolves the clash
with the same pure rule, :func:`winner`: the oldest claim by the claiming
daemon's wall clock, ties broken by origin id then entry id. Lookups return the
winner at once; the loser's owner learns of the conflict when it merges the
winner's entry (see :meth:`Registry.conflicts_for_local`).
"""

from __future__ import annotations

import collections
import enum
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from peerd.core.digest import FINE_BITS, Digest, bucket_of
from peerd.core.events import RegEventKind
from peerd.core.registry.index import Claim as Claim
from peerd.core.registry.index import ClaimIndex, IndexLike, _Table
from peerd.wire.messages import NodeId, RegChange, RegDelta, RegEntry, RegKind, RegSnapshot, Tags

Meta = Tags  # sorted (key, value) pairs, like node tags
# The replicated values are the wire's own dataclasses: what is merged is
# exactly what travels.
Kind = RegKind
Entry = RegEntry
Change = RegChange
Delta = RegDelta
Snapshot = RegSnapshot


@dataclass(slots=True)
class Partition:
    generation: int
    version: int = 0
    entries: dict[int, Entry] = field(default_factory=dict)


class Applied(enum.Enum):
    APPLIED = "applied"  # state moved forward
    STALE = "stale"  # nothing new (duplicate, old, or a dropped life)
    BUFFERED = "buffered"  # starts after our version: kept until the gap fills
    GAP = "gap"  # cannot apply: anti-entropy must fetch this origin


def winner(claims: Iterable[Claim]) -> Claim | None:
    """The claim that holds a unique name: the oldest claim (by the claiming
    daemon's wall clock), ties broken by origin id, then entry id. Pure and
    total, so every replica with the same claims picks the same winner."""
    return min(claims, key=Claim.rank, default=None)


@dataclass(frozen=True, slots=True)
class Conflict:
    """A local entry lost its name to ``winner``."""

    loser: Entry
    winner: Claim


MAX_PENDING_PER_ORIGIN = 16

_M = TypeVar("_M", Delta, Snapshot)


class Share(Protocol):
    """Maps a received delta or snapshot to an equal one (the same object for
    equal messages), so that many simulated replicas hold one copy of each
    entry, origin id and string (peerd.sim.regshare). It must return a value
    equal to its argument; a daemon has none."""

    def __call__(self, msg: _M, /) -> _M: ...


def part_key(part: Partition) -> int:
    """(generation, version) as one integer for the bucket hashes."""
    return (part.generation & 0xFFFFFFFF) << 32 | (part.version & 0xFFFFFFFF)


@dataclass(slots=True)
class RegistryTables:
    """A replica's tables, for a registry that starts converged
    (:meth:`Registry.adopt`): the partitions by origin (ours included), the
    bucket hashes of their versions, origins by finest bucket, and the name
    and group indexes. A simulator gives many nodes tables that share one
    converged registry (peerd.sim.store); a daemon never needs them."""

    parts: _Table
    hashes: Digest
    fine: _Table
    names: IndexLike
    groups: IndexLike


class Registry:
    """One replica of the registry, plus the local origin's write side."""

    def __init__(self, node_id: NodeId, generation: int, log_size: int = 1024) -> None:
        self.node_id = node_id
        self.generation = generation
        self._parts: _Table = _Table({node_id: Partition(generation)})
        # Bucket hashes of {origin: (generation, version)} for anti-entropy
        # between large registries (see peerd/core/digest.py), kept in O(1)
        # per change: a partition's row is toggled out before it changes
        # and back in after.
        self._hashes = Digest()
        self._toggle(node_id, self._parts[node_id])
        # Our own partition changes on every local write: its row is brought
        # up to date in the hashes only when they are read (bucket_hashes).
        self._own_key = part_key(self._parts[node_id])
        # finest bucket -> origins with a partition in it (rows of a bucket
        # without a scan of every partition)
        self._fine: _Table = _Table({bucket_of(node_id, FINE_BITS): {node_id}})
        self._floors: dict[NodeId, tuple[int, int]] = {}  # dropped lives
        self._revived: set[NodeId] = set()  # dropped, then seen alive again
        self._log: collections.deque[Change] = collections.deque(maxlen=log_size)
        self._pending: dict[NodeId, dict[int, Delta]] = {}
        self._next_eid = 0
        self._changes: list[tuple[RegEventKind, Claim]] = []  # for events, see drain_changes
        # (scope, name) -> claims (peerd/core/registry/index.py)
        self._names: IndexLike = ClaimIndex()
        self._groups: IndexLike = ClaimIndex()
        # a simulator may give equal messages one shared copy (see Share)
        self.share: Share | None = None

    def adopt(self, tables: RegistryTables) -> None:
        """Start from ``tables`` (a converged registry, for simulations: see
        :class:`RegistryTables`). Our own partition in them is ours; the
        caller gives its entries owners."""
        if self.entry_count() or len(self._parts) != 1:
            raise ValueError("preload a fresh registry only")
        own: Partition = tables.parts[self.node_id]
        if own.generation != self.generation:
            raise ValueError("the snapshot holds another life of this node")
        self._parts = tables.parts
        self._hashes = tables.hashes
        self._fine = tables.fine
        self._names = tables.names
        self._groups = tables.groups
        self._own_key = part_key(own)
        self._next_eid = max(own.entries, default=0)

    # --- local writes (this node is the origin) -------------------------------

    @property
    def local(self) -> Partition:
        part: Partition = self._parts[self.node_id]
        return part

    def register(
        self,
        kind: Kind,
        scope: str,
        name: str,
        *,
        claimed_ms: int,
        pid: int,
        uid: int,
        meta: Meta = (),
    ) -> tuple[Entry, Delta]:
        self._next_eid += 1
        entry = Entry(self._next_eid, kind, scope, name, claimed_ms, pid, uid, meta)
        return entry, self._write(entry.eid, entry)

    def update_meta(self, eid: int, meta: Meta) -> tuple[Entry, Delta] | None:
        old = self.local.entries.get(eid)
        if old is None:
            return None
        entry = Entry(
            old.eid, old.kind, old.scope, old.name, old.claimed_ms, old.pid, old.uid, meta
        )
        return entry, self._write(eid, entry)

    def unregister(self, eid: int) -> Delta | None:
        if eid not in self.local.entries:
            return None
        return self._write(eid, None)

    def _write(self, eid: int, entry: Entry | None) -> Delta:
        part = self.local
        part.version += 1  # its hash row follows lazily: see bucket_hashes
        change = Change(part.version, eid, entry)
        self._log.append(change)
        self._set(self.node_id, part, eid, entry)
        return Delta(self.node_id, part.generation, part.version - 1, part.version, (change,))

    def delta_since(self, version: int) -> Delta | Snapshot:
        """What a replica at ``version`` of our partition needs: a delta from
        the change log if it still reaches back that far, else a snapshot."""
        part = self.local
        if version >= part.version:
            return Delta(self.node_id, part.generation, part.version, part.version, ())
        if self._log and self._log[0].version <= version + 1:
            changes = tuple(c for c in self._log if c.version > version)
            return Delta(self.node_id, part.generation, version, part.version, changes)
        return self.snapshot(self.node_id)

    # --- replication ------------------------------------------------------------

    def digest(self) -> dict[NodeId, tuple[int, int]]:
        return {o: (p.generation, p.version) for o, p in self._parts.items()}

    def digest_in(self, bits: int, buckets: Iterable[int]) -> dict[NodeId, tuple[int, int]]:
        """The digest restricted to origins in ``buckets`` of ``2**bits``."""
        out: dict[NodeId, tuple[int, int]] = {}
        shift = FINE_BITS - bits
        for b in buckets:
            for f in range(b << shift, (b + 1) << shift):
                for origin in sorted(self._fine.peek(f, ())):
                    p = self._parts.peek(origin)
                    if p is not None:
                        out[origin] = (p.generation, p.version)
        return out

    def origins(self) -> int:
        return len(self._parts)

    def _fine_remove(self, origin: NodeId) -> None:
        f = bucket_of(origin, FINE_BITS)
        members = self._fine.get(f)
        if members is not None:
            members.discard(origin)
            if not members:
                del self._fine[f]

    def bucket_hashes(self) -> Digest:
        """Bucket hashes of the digest (peerd/core/digest.py), for
        anti-entropy; our own row is brought up to date here, not per write."""
        key = part_key(self.local)
        if key != self._own_key:
            self._hashes.toggle(self.node_id, self._own_key, 0)
            self._hashes.toggle(self.node_id, key, 0)
            self._own_key = key
        return self._hashes

    def _toggle(self, origin: NodeId, part: Partition) -> None:
        self._hashes.toggle(origin, part_key(part), 0)

    def version_of(self, origin: NodeId) -> tuple[int, int]:
        """``(generation, version)`` held of ``origin``'s partition, (0, 0) if none."""
        part = self._parts.peek(origin)
        return (0, 0) if part is None else (part.generation, part.version)

    def snapshot(self, origin: NodeId) -> Snapshot:
        part = self._parts.peek(origin)
        if part is None:
            raise KeyError(origin)
        return Snapshot(origin, part.generation, part.version, tuple(part.entries.values()))

    def apply_delta(self, delta: Delta) -> Applied:
        if delta.origin == self.node_id:
            return Applied.STALE
        if self.share is not None:
            delta = self.share(delta)
        floor = self._floors.get(delta.origin)
        if floor is not None and delta.generation <= floor[0]:
            return Applied.STALE  # a dropped life
        part = self._parts.get(delta.origin)
        if part is None or part.generation < delta.generation:
            if delta.base != 0:
                return self._buffer(delta) if part is None else Applied.GAP
            part = self._reset(delta.origin, delta.generation)
        elif part.generation > delta.generation:
            return Applied.STALE
        if delta.top <= part.version:
            return Applied.STALE
        if delta.base > part.version:
            return self._buffer(delta)
        for change in delta.changes:
            if change.version > part.version:
                self._set(delta.origin, part, change.eid, change.entry)
        self._toggle(delta.origin, part)
        part.version = delta.top
        self._toggle(delta.origin, part)
        self._drain(delta.origin)
        return Applied.APPLIED

    def apply_snapshot(self, snap: Snapshot) -> Applied:
        if snap.origin == self.node_id:
            return Applied.STALE
        if self.share is not None:
            snap = self.share(snap)
        floor = self._floors.get(snap.origin)
        # The same life after a refuted death may come back, from the state we
        # dropped onwards; an older life never.
        if (
            floor is not None
            and snap.generation <= floor[0]
            and (
                snap.generation < floor[0]
                or snap.origin not in self._revived
                or snap.version < floor[1]
            )
        ):
            return Applied.STALE
        part = self._parts.get(snap.origin)
        if part is not None and (snap.generation, snap.version) <= (part.generation, part.version):
            return Applied.STALE
        part = self._reset(snap.origin, snap.generation)
        for entry in snap.entries:
            self._set(snap.origin, part, entry.eid, entry)
        self._toggle(snap.origin, part)
        part.version = snap.version
        self._toggle(snap.origin, part)
        self._floors.pop(snap.origin, None)
        self._revived.discard(snap.origin)
        self._drain(snap.origin)
        return Applied.APPLIED

    def _buffer(self, delta: Delta) -> Applied:
        pending = self._pending.setdefault(delta.origin, {})
        if len(pending) >= MAX_PENDING_PER_ORIGIN and delta.base not in pending:
            return Applied.GAP
        pending[delta.base] = delta
        return Applied.BUFFERED

    def _drain(self, origin: NodeId) -> None:
        pending = self._pending.get(origin)
        part = self._parts.get(origin)
        while pending and part is not None:
            ready = [b for b in pending if b <= part.version]
            if not ready:
                break
            for base in sorted(ready):
                delta = pending.pop(base)
                if delta.generation == part.generation and delta.top > part.version:
                    for change in delta.changes:
                        if change.version > part.version:
                            self._set(origin, part, change.eid, change.entry)
                    self._toggle(origin, part)
                    part.version = delta.top
                    self._toggle(origin, part)
        if not pending:
            self._pending.pop(origin, None)

    # --- membership -------------------------------------------------------------

    def node_down(self, origin: NodeId, generation: int) -> list[Claim]:
        """Membership declared ``origin`` dead or left: drop its entries."""
        part = self._parts.get(origin)
        if origin != self.node_id and (part is None or part.generation <= generation):
            self._pending.pop(origin, None)
        if origin == self.node_id or part is None or part.generation > generation:
            return []
        removed = [Claim(origin, e) for e in part.entries.values()]
        for entry in list(part.entries.values()):
            self._index_remove(origin, entry)
            self._note(None, Claim(origin, entry))
        self._toggle(origin, part)
        del self._parts[origin]
        self._fine_remove(origin)
        self._pending.pop(origin, None)
        self._floors[origin] = (part.generation, part.version)
        return removed

    def node_up(self, origin: NodeId, generation: int) -> list[Claim]:
        """Membership sees ``origin`` alive at ``generation``. An older life's
        entries are discarded; a refuted death allows a resync at the floor."""
        removed: list[Claim] = []
        part = self._parts.get(origin)
        if part is not None and part.generation < generation:
            removed = [Claim(origin, e) for e in part.entries.values()]
            self._reset(origin, generation)
        floor = self._floors.get(origin)
        if floor is not None:
            if floor[0] < generation:
                del self._floors[origin]
            else:
                self._revived.add(origin)
        return removed

    def forget(self, origin: NodeId) -> None:
        """Membership reaped ``origin``: forget even its floor."""
        self._floors.pop(origin, None)
        self._revived.discard(origin)
        self._pending.pop(origin, None)

    # --- reads ------------------------------------------------------------------

    def lookup(self, scope: str, name: str) -> Claim | None:
        return winner(self._names.get((scope, name)))

    def claims(self, scope: str, name: str) -> list[Claim]:
        return sorted(self._names.get((scope, name)), key=Claim.rank)

    def group_members(self, scope: str, group: str) -> list[Claim]:
        return sorted(self._groups.get((scope, group)), key=Claim.rank)

    def names(self, scope: str | None = None, prefix: str = "") -> Iterator[Claim]:
        for sc, name in sorted(self._names.keys()):
            if (scope is None or sc == scope) and name.startswith(prefix):
                w = winner(self._names.get((sc, name)))
                if w is not None:
                    yield w

    def groups(self, scope: str | None = None, prefix: str = "") -> Iterator[tuple[str, str, int]]:
        for sc, name in sorted(self._groups.keys()):
            if (scope is None or sc == scope) and name.startswith(prefix):
                n = self._groups.count((sc, name))
                if n:
                    yield sc, name, n

    def entries(self) -> Iterator[Claim]:
        for origin, part in self._parts.items():
            for entry in part.entries.values():
                yield Claim(origin, entry)

    def entry_count(self) -> int:
        return sum(len(p.entries) for p in self._parts.values())

    def conflicts_for_local(self, scope: str, name: str) -> list[Conflict]:
        """Local name entries that lose ``(scope, name)`` to another claim."""
        claims = self._names.get((scope, name))
        if len(claims) < 2:
            return []
        w = winner(claims)
        assert w is not None
        return [Conflict(c.entry, w) for c in claims if c.origin == self.node_id and c is not w]

    def state(self) -> dict[NodeId, tuple[int, int, frozenset[Entry]]]:
        """The comparable replicated state (for tests and checks)."""
        return {
            o: (p.generation, p.version, frozenset(p.entries.values()))
            for o, p in self._parts.items()
        }

    # --- internals --------------------------------------------------------------

    def _reset(self, origin: NodeId, generation: int) -> Partition:
        old = self._parts.get(origin)
        if old is not None:
            self._toggle(origin, old)
            for entry in list(old.entries.values()):
                self._index_remove(origin, entry)
                self._note(None, Claim(origin, entry))
        else:
            self._fine.setdefault(bucket_of(origin, FINE_BITS), set()).add(origin)
        part = Partition(generation)
        self._parts[origin] = part
        self._toggle(origin, part)
        pending = self._pending.get(origin)
        if pending:
            for base in [b for b, d in pending.items() if d.generation != generation]:
                del pending[base]
        return part

    def drain_changes(self) -> list[tuple[RegEventKind, Claim]]:
        """What changed in the replica since the last call, as event kinds."""
        out, self._changes = self._changes, []
        return out

    def _note(self, new: Claim | None, old: Claim | None) -> None:
        if new is not None and old is not None:
            if new.entry.meta != old.entry.meta:
                self._changes.append((RegEventKind.UPDATED, new))
        elif new is not None:
            group = new.entry.kind is Kind.GROUP
            self._changes.append((RegEventKind.JOINED if group else RegEventKind.REGISTERED, new))
        elif old is not None:
            group = old.entry.kind is Kind.GROUP
            self._changes.append((RegEventKind.LEFT if group else RegEventKind.UNREGISTERED, old))

    def _set(self, origin: NodeId, part: Partition, eid: int, entry: Entry | None) -> None:
        old = part.entries.pop(eid, None)
        if old is not None:
            self._index_remove(origin, old)
        self._note(
            None if entry is None else Claim(origin, entry),
            None if old is None else Claim(origin, old),
        )
        if entry is not None:
            part.entries[eid] = entry
            index = self._names if entry.kind is Kind.NAME else self._groups
            index.add((entry.scope, entry.name), Claim(origin, entry))

    def _index_remove(self, origin: NodeId, entry: Entry) -> None:
        index = self._names if entry.kind is Kind.NAME else self._groups
        index.remove((entry.scope, entry.name), origin, entry.eid)
