"""Staged deltas: a burst of writes costs one message, not one per write.

An origin's changes are numbered by consecutive versions, so two deltas of
one origin and generation where one ends where the other begins can be
merged into one (the newest change per entry wins). The registry merges its
own writes, and news it relays, while they wait for the flush a few
milliseconds later (a _Staged is cheap to extend: no encoding), and merges
again with what is still queued for gossip. Encoding happens once per origin
and flush, so a burst of N writes costs O(N), not O(N^2).
"""

from __future__ import annotations

from dataclasses import dataclass

from peerd.wire.messages import (
    NodeId,
    RegChange,
    RegDelta,
)


@dataclass(slots=True)
class _Staged:
    """A delta being built from consecutive deltas of one origin (newest
    change per entry wins), cheap to extend; encoded only at the flush."""

    origin: NodeId
    generation: int
    base: int
    top: int
    changes: dict[int, RegChange]
    ack: bool

    @classmethod
    def of(cls, delta: RegDelta, ack: bool) -> _Staged:
        return cls(
            delta.origin,
            delta.generation,
            delta.base,
            delta.top,
            {c.eid: c for c in delta.changes},
            ack or delta.ack,
        )

    def extend(self, delta: RegDelta, ack: bool) -> bool:
        if delta.generation != self.generation or delta.base != self.top:
            return False
        changes = self.changes
        for change in delta.changes:
            changes.pop(change.eid, None)  # re-insert: dict order stays by version
            changes[change.eid] = change
        self.top = delta.top
        self.ack = self.ack or ack or delta.ack
        return True

    def delta(self) -> RegDelta:
        return RegDelta(
            self.origin,
            self.generation,
            self.base,
            self.top,
            tuple(sorted(self.changes.values(), key=_version)),
            self.ack,
        )


def _version(change: RegChange) -> int:
    return change.version


def _change_size(change: RegChange) -> int:
    """About the encoded size of ``change`` (an underestimate is caught:
    the caller checks the encoded chunks)."""
    e = change.entry
    if e is None:
        return 16
    return (
        48
        + len(e.scope.encode())
        + len(e.name.encode())
        + sum(len(k.encode()) + len(v.encode()) + 4 for k, v in e.meta)
    )


def merge_deltas(old: RegDelta, new: RegDelta) -> RegDelta:
    """One delta covering both (``old.top == new.base``): the newest change
    per entry wins."""
    latest: dict[int, RegChange] = {}
    for change in (*old.changes, *new.changes):
        latest[change.eid] = change
    changes = tuple(sorted(latest.values(), key=lambda c: c.version))
    return RegDelta(old.origin, old.generation, old.base, new.top, changes, old.ack or new.ack)
