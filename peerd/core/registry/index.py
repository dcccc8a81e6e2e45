"""The registry's name and group indexes: ``(scope, name) -> claims``.

Theory of operation. A replica answers "who holds this name" and "who is in
this group" from an index over its partitions (peerd.core.registry.state).
Almost every unique name has exactly one claim: two claims exist only during
a race or a healed partition, until the loser's owner withdraws it. A dict of
claims per name, keyed by ``(origin, eid)``, costs a dict, a tuple and a
slot per name on every replica, several hundred bytes for what is one pointer
in the common case. So a key's value is the :class:`Claim` itself while it is
alone, and becomes a dict ``{(origin, eid): claim}`` (in insertion order) only
while two or more claims share the key, going back to the bare claim when
one is left: the same adaptive representation a B-tree leaf or a small-set
optimisation uses. What callers see is unchanged: claims in insertion order
(the order a dict of claims would give), so the clash rule
(:func:`peerd.core.registry.state.winner`) and every listing stay identical.

The index keeps its mapping in a table with ``get`` (a lookup for possible
mutation) and ``peek`` (a read), so a simulator can hand a replica a
copy-on-write table over a shared converged index (peerd.sim.store); the
:class:`IndexLike` protocol is what a replica needs of an index, so a
simulator may also give one that derives claims from shared partitions
(peerd.sim.regshare).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from peerd.wire.messages import NodeId, RegEntry

Key = tuple[str, str]  # (scope, name)


@dataclass(frozen=True, slots=True)
class Claim:
    """An entry together with its origin: what the indexes hold."""

    origin: NodeId
    entry: RegEntry

    def rank(self) -> tuple[int, NodeId, int]:
        return (self.entry.claimed_ms, self.origin, self.entry.eid)


class IndexLike(Protocol):
    """What a replica needs of a name or group index."""

    def add(self, key: Key, claim: Claim) -> None: ...

    def remove(self, key: Key, origin: NodeId, eid: int) -> None: ...

    def get(self, key: Key) -> list[Claim]: ...

    def count(self, key: Key) -> int: ...

    def keys(self) -> Iterable[Key]: ...


class ClaimIndex:
    """``(scope, name) -> claims``: a bare :class:`Claim` while a key has one,
    a dict keyed by ``(origin, eid)`` while it has more (see the module docs)."""

    __slots__ = ("_t",)

    def __init__(self, table: Any = None) -> None:
        # a dict with ``peek`` (peerd.core.registry.state._Table) or a
        # simulator's copy-on-write table with the same methods
        self._t: Any = table if table is not None else _Table()

    @property
    def table(self) -> Any:
        return self._t

    def add(self, key: Key, claim: Claim) -> None:
        t = self._t
        have = t.get(key)
        if have is None:
            t[key] = claim
        elif type(have) is Claim:
            k = (claim.origin, claim.entry.eid)
            if (have.origin, have.entry.eid) == k:
                t[key] = claim
            else:
                t[key] = {(have.origin, have.entry.eid): have, k: claim}
        else:
            have[(claim.origin, claim.entry.eid)] = claim

    def remove(self, key: Key, origin: NodeId, eid: int) -> None:
        t = self._t
        have = t.peek(key)
        if have is None:
            return
        if type(have) is Claim:
            if have.origin == origin and have.entry.eid == eid:
                del t[key]
            return
        if (origin, eid) not in have:
            return
        have = t.get(key)  # ours to change (a copy-on-write table copies here)
        del have[(origin, eid)]
        if len(have) == 1:
            t[key] = next(iter(have.values()))
        elif not have:
            del t[key]

    def get(self, key: Key) -> list[Claim]:
        """The claims of ``key`` in insertion order."""
        have = self._t.peek(key)
        if have is None:
            return []
        if type(have) is Claim:
            return [have]
        return list(have.values())

    def count(self, key: Key) -> int:
        have = self._t.peek(key)
        if have is None:
            return 0
        return 1 if type(have) is Claim else len(have)

    def keys(self) -> Iterator[Key]:
        return iter(self._t)

    def __len__(self) -> int:
        return len(self._t)


def copy_value(value: Any) -> Any:
    """A table value as a copy-on-write table copies it: a bare claim is
    immutable, a dict of claims is copied."""
    return value if type(value) is Claim else dict(value)


class _Table(dict):  # type: ignore[type-arg]
    """A dict with ``peek``: a read that promises not to mutate what it gets."""

    __slots__ = ()
    peek = dict.get
