"""The registry service's one state, and what every part of it shares.

The service (peerd.core.registry.service) is one object over one state,
written as a chain of mixins, one concern each, each building on the ones
below it: this base; anti-entropy and pulls (sync); dissemination (spread);
API commands (commands); the way in and membership's news (service). They share this state
rather than talk through interfaces because every concern acts on the same
few maps in the same handler call, and the order of those actions within a
call is part of the behaviour the simulator pins down.

The service is a sibling of membership in the peer (peerd.core.peer) and
never calls it: each entry point takes ``now`` and returns the outputs of
that call, in order. Some are the API's (command results, registry events),
some are timers of its own (typed, peerd.core.timers), and the rest are what
membership should carry for it (queue an item for gossip, send a datagram,
open a stream: peerd.core.events, section "membership and the registry"),
which the peer hands to membership in the order they were produced. What it
must know of membership it reads through a view (peerd.core.registry.view).

What lives here is what every concern needs: emitting outputs and arming
timers, the state and its owners (which API connection holds which of our
entries), the events to the API (changes
and name conflicts: when a claim of ours loses to an older claim elsewhere,
the owning connection is told the winner and our entry goes, so that no
duplicate outlives the merge), and settled waits (a write made with
wait=settled is answered once every live member acknowledged its version, or
when the wait times out).
"""

from __future__ import annotations

import collections
import random
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

from peerd.core.events import (
    CommandResult,
    Log,
    LogLevel,
    Output,
    QueueGossip,
    RegEventKind,
    RegistryEvent,
    SetTimer,
    StreamTo,
)
from peerd.core.registry.config import RegistryConfig
from peerd.core.registry.staging import _Staged
from peerd.core.registry.state import Registry
from peerd.core.registry.view import MembersView
from peerd.core.timers import RegFlush, RegistryTimer
from peerd.wire import codec
from peerd.wire.messages import (
    NodeId,
    RegAck,
    RegDelta,
    RegEntry,
    RegKind,
    RegSync,
)


@dataclass(slots=True)
class Settle:
    ref: int
    eid: int
    version: int
    acked: set[NodeId] = field(default_factory=set)


class RegistryBase:
    """The state every concern of the registry service works on."""

    def __init__(
        self,
        members: MembersView,
        config: RegistryConfig,
        generation: int,
        rng: random.Random,
        counters: collections.Counter[str] | None = None,
    ) -> None:
        self.members = members
        self.config = config
        # Membership's generator, shared: the registry's draws (a random peer
        # to sync with) interleave with membership's in one sequence.
        self.rng = rng
        self.counters: collections.Counter[str] = (
            counters if counters is not None else collections.Counter()
        )
        self.node_id: NodeId = members.node_id
        self.state = Registry(self.node_id, generation)
        self._now = 0.0
        self._out: list[Output] = []
        # Items queued for gossip by this call, not yet in membership's queue.
        self._gossiped: dict[Hashable, bytes] = {}
        self._timer_token = 0
        self._timers: dict[int, RegistryTimer] = {}
        self._flush_armed = False
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
        # Deltas travel as mesh broadcasts (the peer runs a partial mesh)
        # instead of gossip: set on the MeshConnected input.
        self.via_mesh = False
        self._heal_peer: NodeId | None = None
        # node -> generation declared dead (until seen alive again or reaped)
        self._was_down: dict[NodeId, int] = {}

    # --- outputs ------------------------------------------------------------------

    def _begin(self, now: float) -> list[Output]:
        """Start an entry point's call: its outputs go to the list returned."""
        self._now = now
        out: list[Output] = []
        self._out = out
        if self._gossiped:
            self._gossiped = {}
        return out

    def _fail(self, ref: int, code: str, message: str) -> None:
        self._out.append(CommandResult(ref, error=(code, message)))

    def _arm(self, make: Callable[..., RegistryTimer], delay: float, *context: Any) -> int:
        """Arm the timer ``make(token, *context)`` to fire in ``delay`` s."""
        self._timer_token += 1
        token = self._timer_token
        timer = make(token, *context)
        self._timers[token] = timer
        self._out.append(SetTimer(self._now + delay, timer))
        return token

    def _take_timer(self, timer: RegistryTimer) -> bool:
        """Whether ``timer`` is one we armed (and still armed): it is ours now."""
        armed = self._timers.get(timer.token)
        if armed is None or (armed is not timer and armed != timer):
            return False
        del self._timers[timer.token]
        return True

    def _gossip(self, key: Hashable, data: bytes) -> None:
        """Queue ``data`` on membership's gossip, replacing the item ``key``."""
        self._gossiped[key] = data
        self._out.append(QueueGossip(key, data))

    def _queued_item(self, key: Hashable) -> bytes | None:
        data = self._gossiped.get(key)
        return data if data is not None else self.members.queued(key)

    def _known(self, node: NodeId) -> bool:
        """Whether ``node`` is a live member (or us): only their partitions
        are kept, so made-up or long-gone origins cannot grow our state."""
        return node == self.node_id or self.members.is_live_peer(node)

    def _random_peer(self) -> NodeId | None:
        peers = self.members.sample_live(self.rng, 1)
        return peers[0] if peers else None

    def _flush_soon(self) -> None:
        """Flush shortly (before the next gossip), or, while there is nobody
        to send to (alone, or not started), once there is (see peer_live)."""
        # Registry news goes out within milliseconds, not at the next gossip
        # tick: "visible everywhere" is what applications wait on.
        if not self._flush_armed and self.members.started and self.members.live_peer_count():
            self._flush_armed = True
            self._arm(RegFlush, self.config.registry_flush_s)

    def _pull(self, node: NodeId, msg: RegSync) -> None:
        """Ask the live member ``node`` over a stream; its reply comes back
        through on_stream_reply."""
        if not self.members.is_live_member(node):
            self.sync_failed(node)
            return
        self.counters["reg_pulls"] += 1
        self._out.append(StreamTo(node, codec.encode(msg), "reg"))

    def _drop(self, reason: str, detail: str = "") -> None:
        self.counters[f"drop.{reason}"] += 1
        self._out.append(Log(LogLevel.DEBUG, f"drop reason={reason} {detail}".rstrip()))

    def sync_failed(self, peer: NodeId | None) -> None:
        """A sync exchange with ``peer`` failed (see sync, which defines it)."""
        raise NotImplementedError

    # --- reads for the peer ------------------------------------------------------

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
        return w is not None and w.origin == self.node_id and w.entry.eid == entry.eid

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
        live = {n for n, _ in self.members.live_peers()}
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
        value = entry_to_dict(self.node_id, entry)
        value.update(settled=settled, won=self._won(entry))
        self._out.append(CommandResult(ref, value=value))

    # --- events ---------------------------------------------------------------------

    def _emit_changes(self) -> None:
        changes = self.state.drain_changes()
        if not changes:
            return
        names: set[tuple[str, str]] = set()
        for kind, claim in changes:
            self._out.append(RegistryEvent(kind, claim.origin, claim.entry))
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
            self._out.append(
                RegistryEvent(
                    RegEventKind.CONFLICT,
                    self.node_id,
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
