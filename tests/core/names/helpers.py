"""A fake NamesView for the names core: plain dicts the tests fill in."""

from __future__ import annotations

import collections
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from peerd.core.names.core import Names, NamesConfig
from peerd.core.names.view import LocalEntry, MemberRef, OwnerRef
from peerd.wire.messages import NodeId, RegKind, Status

ME, OTHER, THIRD = b"\x01" * 16, b"\x02" * 16, b"\x03" * 16
ADDR = {ME: ("10.0.0.1", 7946), OTHER: ("10.0.0.2", 7946), THIRD: ("10.0.0.3", 7946)}


@dataclass
class FakeView:
    generation: int | None = 4
    is_leaving: bool = False
    names: dict[tuple[str, str], OwnerRef] = field(default_factory=dict)
    groups: dict[tuple[str, str], list[OwnerRef]] = field(default_factory=dict)
    members: dict[NodeId, MemberRef] = field(default_factory=dict)
    local: dict[int, LocalEntry] = field(default_factory=dict)
    owners: dict[int, int] = field(default_factory=dict)  # eid -> conn
    senders: dict[int, tuple[str, str, int]] = field(default_factory=dict)
    open_conns: set[int] = field(default_factory=set)

    def me(self) -> NodeId:
        return ME

    def my_generation(self) -> int | None:
        return self.generation

    def leaving(self) -> bool:
        return self.is_leaving

    def lookup(self, scope: str, name: str) -> OwnerRef | None:
        return self.names.get((scope, name))

    def group_members(self, scope: str, name: str) -> Sequence[OwnerRef]:
        return self.groups.get((scope, name), [])

    def member(self, node: NodeId) -> MemberRef | None:
        return self.members.get(node)

    def local_entry(self, eid: int) -> LocalEntry | None:
        return self.local.get(eid)

    def owner_conn(self, eid: int) -> int | None:
        return self.owners.get(eid)

    def sender_of(self, conn: int) -> tuple[str, str, int]:
        return self.senders.get(conn, ("", "", 0))

    def conn_open(self, conn: int) -> bool:
        return conn in self.open_conns

    # --- filling it in ---------------------------------------------------------------

    def hold(self, eid: int, kind: RegKind, name: str, conn: int, scope: str = "default") -> None:
        """This daemon holds ``name`` (entry ``eid``) for open connection ``conn``."""
        self.local[eid] = LocalEntry(kind, scope, name)
        self.owners[eid] = conn
        self.open_conns.add(conn)
        ref = OwnerRef(ME, eid, self.generation or 0)
        if kind is RegKind.NAME:
            self.names[(scope, name)] = ref
        else:
            self.groups.setdefault((scope, name), []).append(ref)
        if kind is RegKind.NAME and conn not in self.senders:
            self.senders[conn] = (name, scope, eid)

    def remote(self, node: NodeId, eid: int, kind: RegKind, name: str, generation: int = 2) -> None:
        ref = OwnerRef(node, eid, generation)
        if kind is RegKind.NAME:
            self.names[("default", name)] = ref
        else:
            self.groups.setdefault(("default", name), []).append(ref)
        self.members.setdefault(node, MemberRef(Status.ALIVE, generation, ADDR[node]))


def make(
    config: NamesConfig | None = None, seed: int = 1
) -> tuple[Names, FakeView, collections.Counter[str]]:
    view = FakeView()
    view.members[ME] = MemberRef(Status.ALIVE, 4, ADDR[ME])
    counters: collections.Counter[str] = collections.Counter()
    return Names(view, config, rng=random.Random(seed), counters=counters), view, counters
