"""What the names core may read of the rest of the daemon, and nothing more.

Routing a message needs three facts it does not own: who holds a name or a
group in the local registry replica (and, for entries held here, which API
connection holds them), what membership knows of the owner's node (alive?
which life? where?), and which API connections are open. The core reads
them through this Protocol at the moment of each decision and never keeps a
copy, so it cannot drift from the replica; it cannot change them either (a
send never writes to the registry or to membership). The trio shell
implements it over the Node and its RegistryService; the simulator over its
own model. Every call must be cheap (a dict lookup, or the members of one
group): the core makes O(1) of them per message.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from peerd.wire.messages import Addr, NodeId, RegKind, Status


@dataclass(frozen=True, slots=True)
class OwnerRef:
    """An entry in the replica: held by the daemon ``node``, entry id ``eid``
    there, in that node's life ``generation`` as the replica knows it (0:
    unknown)."""

    node: NodeId
    eid: int
    generation: int


@dataclass(frozen=True, slots=True)
class MemberRef:
    """What membership knows of a node."""

    status: Status
    generation: int
    addr: Addr


class MemberLike(Protocol):
    """What the core reads of membership's record of a node (a
    :class:`MemberRef`, or membership's own record, read in place)."""

    @property
    def status(self) -> Status: ...

    @property
    def generation(self) -> int: ...

    @property
    def addr(self) -> Addr: ...


@dataclass(frozen=True, slots=True)
class LocalEntry:
    """An entry held by this daemon."""

    kind: RegKind
    scope: str
    name: str


class LocalLike(Protocol):
    """What the core reads of an entry held here (a :class:`LocalEntry`, or
    the registry's own entry, read in place)."""

    @property
    def kind(self) -> RegKind: ...

    @property
    def scope(self) -> str: ...

    @property
    def name(self) -> str: ...


class NamesView(Protocol):
    def me(self) -> NodeId:
        """This daemon's node id (never changes)."""
        ...

    def my_generation(self) -> int | None:
        """This daemon's life; None: it has no registry (messaging is off)."""
        ...

    def leaving(self) -> bool:
        """The daemon is leaving the cluster: it takes no more messages."""
        ...

    def lookup(self, scope: str, name: str) -> OwnerRef | None:
        """The holder of a name in the replica."""
        ...

    def group_members(self, scope: str, name: str) -> Sequence[OwnerRef]:
        """The members of a group in the replica, in a stable order."""
        ...

    def member(self, node: NodeId) -> MemberLike | None:
        """Membership's record of ``node`` (None: not a known member)."""
        ...

    def local_entry(self, eid: int) -> LocalLike | None:
        """Entry ``eid`` if this daemon holds it."""
        ...

    def owner_conn(self, eid: int) -> int | None:
        """The API connection holding local entry ``eid``."""
        ...

    def sender_of(self, conn: int) -> tuple[str, str, int]:
        """(name, scope, eid) of the first name connection ``conn`` holds
        here, or ("", "", 0)."""
        ...

    def conn_open(self, conn: int) -> bool:
        """API connection ``conn`` is known to messaging and open: it wrote
        to the registry or sent a message, and has not closed."""
        ...
