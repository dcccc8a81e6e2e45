"""The names core's view of this peer: the registry replica and membership.

Theory of operation: routing a message needs facts that other subsystems
own (who holds a name, which life of which node, which API connections are
open). :class:`PeerView` answers the questions of
:class:`~peerd.core.names.view.NamesView` by reading the membership node and
its registry at the moment of each decision, never keeping a copy, so the
names core cannot drift from the replica and cannot change it. The peer
tells it which API connections messaging may reach (those that wrote to the
registry or sent a message, until they close) and whether it is leaving.
Every answer is a dict lookup, or the members of one group.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from peerd.core.names.view import LocalLike, MemberLike, OwnerRef
from peerd.core.registry.service import RegistryService
from peerd.wire.messages import NodeId, RegKind


class _Members(Protocol):
    @property
    def node_id(self) -> NodeId: ...

    def member_record(self, node: NodeId) -> MemberLike | None: ...


class PeerView:
    """A read-only :class:`~peerd.core.names.view.NamesView` over a peer."""

    __slots__ = ("_members", "_registry", "conns", "is_leaving")

    def __init__(self, members: _Members, registry: RegistryService) -> None:
        self._members = members
        self._registry = registry
        # API connections messaging may reach (the peer keeps this).
        self.conns: set[int] = set()
        self.is_leaving = False

    def me(self) -> NodeId:
        return self._members.node_id

    def my_generation(self) -> int | None:
        return self._registry.state.generation

    def leaving(self) -> bool:
        return self.is_leaving

    def _gen_of(self, origin: NodeId) -> int:
        """The generation of ``origin``'s partition in the replica (0: unknown)."""
        return self._registry.state.version_of(origin)[0]

    def lookup(self, scope: str, name: str) -> OwnerRef | None:
        claim = self._registry.state.lookup(scope, name)
        if claim is None:
            return None
        return OwnerRef(claim.origin, claim.entry.eid, self._gen_of(claim.origin))

    def group_members(self, scope: str, name: str) -> Sequence[OwnerRef]:
        return [
            OwnerRef(c.origin, c.entry.eid, self._gen_of(c.origin))
            for c in self._registry.state.group_members(scope, name)
        ]

    def member(self, node: NodeId) -> MemberLike | None:
        return self._members.member_record(node)

    def local_entry(self, eid: int) -> LocalLike | None:
        return self._registry.state.local.entries.get(eid)

    def owner_conn(self, eid: int) -> int | None:
        return self._registry.owner_conn(eid)

    def sender_of(self, conn: int) -> tuple[str, str, int]:
        registry = self._registry
        for kind, scope, name in registry.held_by_conn(conn):
            if kind is RegKind.NAME:
                eid = registry.eid_of(conn, kind, scope, name)
                return name, scope, eid or 0
        return "", "", 0

    def conn_open(self, conn: int) -> bool:
        return conn in self.conns
