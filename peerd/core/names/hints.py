"""Read-your-writes for the sender's own names: where a name was last seen sent from.

A message carries its sender's name with its scope and entry id
(``from_scope``, ``from_eid``). It goes straight to the owner's daemon over a
direct link, so it usually arrives before the registry delta that announces
the sender's name (that one travels by the mesh, or a few ms later). The
receiving daemon keeps a *hint* per sender name: (node, generation, eid). A
``send`` to a name its replica does not hold uses the hint: the message goes
to that node for that eid, and the owning daemon checks the entry as for any
message (it answers NOT_FOUND if the entry is gone), so a hint can be late
but never wrong. The replica, once it holds the name, always wins (the
caller only asks for a hint when the replica has none).

Hints expire ``ttl_s`` after the last message that carried them (the replica
learns an entry within milliseconds, or within one anti-entropy round of
10 s when a delta was lost, so the TTL only bounds memory); they are bounded
in number (least recently refreshed dropped first), and dropped once the
node is known dead, left, or in a newer generation. Why not make the sender
wait until its registration settled before sending? That costs every send a
cluster-wide round trip; a hint costs nothing, and needs no change to the
registry's replication.

Every operation is O(1): an insertion-ordered dict keyed by (scope, name)
strings gives both the lookup and the least-recently-refreshed order, and
the order never depends on hashing.
"""

from __future__ import annotations

from dataclasses import dataclass

from peerd.core.names.view import MemberLike
from peerd.wire.messages import NodeId, Status


@dataclass(frozen=True, slots=True)
class Hint:
    """Where the sender of a message held its name when it sent it."""

    node: NodeId
    generation: int
    eid: int
    expires: float


class Hints:
    def __init__(self, ttl_s: float, limit: int) -> None:
        self.ttl_s = ttl_s
        self.limit = limit
        self._hints: dict[tuple[str, str], Hint] = {}

    def __len__(self) -> int:
        return len(self._hints)

    def learn(
        self, now: float, scope: str, name: str, node: NodeId, generation: int, eid: int
    ) -> None:
        key = (scope, name)
        self._hints.pop(key, None)  # re-inserted last: most recently refreshed
        self._hints[key] = Hint(node, generation, eid, now + self.ttl_s)
        while len(self._hints) > self.limit:
            del self._hints[next(iter(self._hints))]

    def get(self, now: float, scope: str, name: str, member: MemberLike | None) -> Hint | None:
        """The hint for (scope, name) if still usable; ``member`` is
        membership's record of the hinted node (the caller looks it up)."""
        key = (scope, name)
        hint = self._hints.get(key)
        if hint is None:
            return None
        if (
            hint.expires <= now
            or member is None
            or member.status in (Status.DEAD, Status.LEFT)
            or member.generation > hint.generation
        ):
            del self._hints[key]
            return None
        return hint

    def peek(self, scope: str, name: str) -> Hint | None:
        """The stored hint, unchecked (to look up its node's member record)."""
        return self._hints.get((scope, name))
