"""The registry service's one state, and what every part of it shares.

The service (peerd.core.registry.service) is one object over one state,
written as a chain of mixins, one concern each, each building on the ones
below it: this base; anti-entropy and pulls (sync); dissemination (spread);
API commands (commands); membership hooks (service). They share this state
rather than talk through interfaces because every concern acts on the same
few maps in the same handler call, and the order of those actions within a
call is part of the behaviour the simulator pins down.

What lives here is what every concern needs: the Host protocol (what the
registry asks of the node that drives it), the state and its owners (which
API connection holds which of our entries), the events to the API (changes
and name conflicts: when a claim of ours loses to an older claim elsewhere,
the owning connection is told the winner and our entry goes, so that no
duplicate outlives the merge), and settled waits (a write made with
wait=settled is answered once every live member acknowledged its version, or
when the wait times out).
"""

from __future__ import annotations

from collections.abc import Callable as _Callable
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any as _Any
from typing import Protocol

from peerd.core.events import (
    CommandResult,
    Output,
    RegEventKind,
    RegistryEvent,
)
from peerd.core.registry.staging import _Staged
from peerd.core.registry.state import Registry
from peerd.core.timers import MembershipTimer
from peerd.wire.messages import (
    Message,
    NodeId,
    RegAck,
    RegDelta,
    RegEntry,
    RegKind,
    RegSync,
)


class Host(Protocol):
    """What the registry needs from the node that drives it."""

    @property
    def node_id(self) -> NodeId: ...

    def reg_emit(self, out: Output) -> None: ...

    def reg_broadcast(self, key: Hashable, msg: Message, data: bytes | None = None) -> None:
        """Queue ``msg`` (encoded: ``data``, when given) for gossip, replacing a
        queued item with ``key`` (it goes at the next gossip round; call
        :meth:`reg_flush_soon` for one within milliseconds)."""

    def reg_queued(self, key: Hashable) -> bytes | None:
        """The encoded message queued under ``key``, if any."""

    def reg_flush_soon(self) -> None:
        """Call :meth:`RegistryService.flush` shortly (before the next gossip),
        or, while there is nobody to send to, once there is."""

    def reg_send(self, node: NodeId, msg: Message) -> None:
        """Send ``msg`` in a datagram to a live member."""

    def reg_pull(self, node: NodeId, msg: RegSync) -> None:
        """Open a stream to a live member with ``msg``; its reply comes back
        through :meth:`RegistryService.on_sync_reply`."""

    def reg_live(self) -> list[tuple[NodeId, int]]:
        """(node id, generation) of every live member other than us."""

    def reg_live_count(self) -> int:
        """How many live members other than us."""

    def reg_known(self, node: NodeId) -> bool:
        """Whether ``node`` is a live member (or us): only their partitions
        are kept, so made-up or long-gone origins cannot grow our state."""

    def reg_arm(
        self, make: _Callable[..., MembershipTimer], delay: float, *context: _Any
    ) -> int: ...

    def reg_random_peer(self) -> NodeId | None:
        """A live member other than us, at random (None when alone)."""

    def reg_cast(self, payload: bytes) -> None:
        """Broadcast ``payload`` over the partial mesh (see ``via_mesh``)."""


@dataclass(slots=True)
class Settle:
    ref: int
    eid: int
    version: int
    acked: set[NodeId] = field(default_factory=set)


class RegistryBase:
    """The state every concern of the registry service works on."""

    def __init__(self, host: Host, generation: int) -> None:
        self.host = host
        self.state = Registry(host.node_id, generation)
        # conn -> {(kind, scope, name): eid}
        self._owned: dict[int, dict[tuple[RegKind, str, str], int]] = {}
        self._owner_of: dict[int, int] = {}  # eid -> conn
        self._settles: dict[int, Settle] = {}  # ref -> wait
        # Origins we know we are behind on: origin -> (generation, version,
        # who told us, pulls tried). One pull is in flight at a time; when it
        # ends, what is still missing is pulled again (a bounded number of times).
        self._wants: dict[NodeId, tuple[int, int, NodeId | None, int]] = {}
        # The peer the pull in flight went to, until it answers or fails:
        # only its answer ends the pull, not the reply of an ordinary round.
        self._pull_from: NodeId | None = None
        self._notified: set[tuple[int, NodeId, int]] = set()  # (loser eid, winner)
        # origin -> delta waiting for the flush (see _queue_delta), and the
        # last message queued per origin with its encoding (saves a decode)
        self._staged: dict[NodeId, _Staged] = {}
        self._queued: dict[NodeId, tuple[bytes, RegDelta | RegAck]] = {}
        self._sync_armed = False
        # Deltas travel as mesh broadcasts (the driver runs a partial mesh)
        # instead of gossip: set by the node on its MeshConnected input.
        self.via_mesh = False
        self._heal_peer: NodeId | None = None
        # node -> generation declared dead (until seen alive again or reaped)
        self._was_down: dict[NodeId, int] = {}

    def _fail(self, ref: int, code: str, message: str) -> None:
        self.host.reg_emit(CommandResult(ref, error=(code, message)))

    # --- reads for the host ------------------------------------------------------

    def owner_conn(self, eid: int) -> int | None:
        """The API connection that holds our entry ``eid`` (None if none)."""
        return self._owner_of.get(eid)

    def held_by_conn(self, conn: int) -> list[tuple[RegKind, str, str]]:
        """(kind, scope, name) of what connection ``conn`` holds here, oldest first."""
        return list(self._owned.get(conn, {}))

    def eid_of(self, conn: int, kind: RegKind, scope: str, name: str) -> int | None:
        """The id of the entry ``conn`` holds as (kind, scope, name), if any."""
        return self._owned.get(conn, {}).get((kind, scope, name))

    def _won(self, entry: RegEntry) -> bool:
        if entry.kind is not RegKind.NAME:
            return True
        w = self.state.lookup(entry.scope, entry.name)
        return w is not None and w.origin == self.host.node_id and w.entry.eid == entry.eid

    # --- settled waits ------------------------------------------------------------

    def _acked(self, node: NodeId, version: int) -> None:
        if not self._settles:
            return
        for settle in list(self._settles.values()):
            if version >= settle.version:
                settle.acked.add(node)
        self.check_settled()

    def check_settled(self) -> None:
        """Answer waits that every live member has acknowledged (also called
        when membership changes: a member that died no longer counts)."""
        if not self._settles:
            return
        live = {n for n, _ in self.host.reg_live()}
        for ref, settle in list(self._settles.items()):
            if live <= settle.acked:
                self._finish_settle(ref, settled=True)

    def settle_timeout(self, ref: int) -> None:
        if ref in self._settles:
            self._finish_settle(ref, settled=False)

    def _finish_settle(self, ref: int, settled: bool) -> None:
        settle = self._settles.pop(ref)
        entry = self.state.local.entries.get(settle.eid)
        if entry is None:
            self._fail(ref, "conflict", "the entry was removed before it settled")
            return
        value = entry_to_dict(self.host.node_id, entry)
        value.update(settled=settled, won=self._won(entry))
        self.host.reg_emit(CommandResult(ref, value=value))

    # --- events ---------------------------------------------------------------------

    def _emit_changes(self) -> None:
        changes = self.state.drain_changes()
        if not changes:
            return
        names: set[tuple[str, str]] = set()
        for kind, claim in changes:
            self.host.reg_emit(RegistryEvent(kind, claim.origin, claim.entry))
            if claim.entry.kind is RegKind.NAME:
                names.add((claim.entry.scope, claim.entry.name))
        for scope, name in sorted(names):
            self._resolve_conflicts(scope, name)

    def _resolve_conflicts(self, scope: str, name: str) -> None:
        for conflict in self.state.conflicts_for_local(scope, name):
            loser = conflict.loser
            conn = self._owner_of.get(loser.eid)
            mark = (loser.eid, conflict.winner.origin, conflict.winner.entry.eid)
            if mark in self._notified:
                continue
            self._notified.add(mark)
            self.host.reg_emit(
                RegistryEvent(
                    RegEventKind.CONFLICT,
                    self.host.node_id,
                    loser,
                    conn,
                    (conflict.winner.origin, conflict.winner.entry),
                )
            )
            # The loser's entry goes, so no duplicate outlives the merge; its
            # process was told and can hand over.
            if conn is not None:
                self._remove_local(conn, loser.eid)

    def _remove_local(self, conn: int, eid: int) -> None:
        """Remove our entry ``eid`` held by ``conn`` (see
        :mod:`peerd.core.registry.commands`, which defines it)."""
        raise NotImplementedError


def entry_to_dict(origin: NodeId, entry: RegEntry) -> dict[str, object]:
    return {
        "kind": "name" if entry.kind is RegKind.NAME else "group",
        "scope": entry.scope,
        "name": entry.name,
        "node": origin.hex(),
        "pid": entry.pid,
        "uid": entry.uid,
        "meta": dict(entry.meta),
        "claimed_ms": entry.claimed_ms,
    }
