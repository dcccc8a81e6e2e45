"""The registry inside a node: API commands, dissemination, anti-entropy.

:mod:`peerd.core.registry.state` is the replicated data type; this module is
the protocol around it, driven by the membership node (its *host*):

* **Writes** come from API connections. Each entry belongs to the connection
  that made it; only that connection may change it, and when the connection
  closes (its process exited) its entries are removed cluster-wide.
* **Deltas** are broadcast at once (a flush a few milliseconds after the
  write, not at the next gossip tick) to a few random peers, and every node
  that learns something new passes it on the same way: an epidemic that
  reaches N nodes in O(log N) hops. Consecutive deltas of one origin are
  merged in the broadcast queue, so a burst of writes costs one queue item
  per origin, not one per write; a merged delta that grows too large is sent
  as an announcement (``RegAck``: "I hold origin X at version v"), and a
  node that is behind pulls the difference over a stream. Until the flush,
  deltas are *staged* as objects and merged there: encoding (and merging
  with what is still queued) happens once per origin and flush, not once
  per write, so a burst of writes costs O(1) each.
  In clusters of up to ``DIRECT_MAX`` peers, the origin also sends its
  own changes straight to every live peer at the flush (one datagram each
  per flush, whatever the number of writes batched in it), so the random
  fan-out missing a node costs nothing; a node that got a delta straight
  from its origin then does not relay it (second-hand news it still
  passes on, at the gossip's pace).
* **Anti-entropy**: with every membership push-pull the node also exchanges a
  ``RegSync`` (digest plus what the peer lacks) with the same peer.
* **Membership**: a node declared dead or left loses its entries everywhere;
  a restarted node (new generation) starts with none of its old ones. The
  death of a node that held entries is spread at once (a flush round a few
  milliseconds later, not the next gossip tick), as registry news is.
* **Conflicts**: when a local name claim loses to an older claim elsewhere,
  the owning connection gets a ``conflict`` event naming the winner and the
  losing entry is removed, so no duplicate outlives the merge.
* **wait=settled**: the delta asks for acknowledgements; the command answers
  once every live member holds the entry, or when the wait times out.

The service is one object over one state, written as a chain of mixins, one
concern per module: the shared state, events, conflicts and settled waits
(base), anti-entropy and pulls (sync), dissemination (spread), API commands
(commands), and here the membership hooks that tie the registry to the
members table. Import the service and its limits from this module.
"""

from __future__ import annotations

from collections.abc import Mapping

from peerd.core.registry.base import Host, Settle, entry_to_dict
from peerd.core.registry.commands import (
    MAX_ENTRIES_PER_CONN,
    MAX_LOCAL_ENTRIES,
    MAX_META_BYTES,
    RegistryCommands,
    meta_problem,
    name_problem,
)
from peerd.core.registry.spread import (
    DIRECT_MAX,
    MAX_DELTA_BYTES,
    MAX_DIRECT_CHUNKS,
    MAX_MESH_CHUNKS,
    MAX_MESH_DELTA_BYTES,
    MESH_CHANNEL,
)
from peerd.core.registry.staging import merge_deltas
from peerd.core.registry.state import RegistryTables
from peerd.core.registry.sync import (
    FULL_DIGEST_MAX,
    HEAL_SYNC_DELAY_S,
    ORIGINS_PER_BUCKET,
    SYNC_INTERVAL_S,
    sync_bits,
)
from peerd.wire.messages import NodeId

__all__ = [
    "DIRECT_MAX",
    "FULL_DIGEST_MAX",
    "HEAL_SYNC_DELAY_S",
    "MAX_DELTA_BYTES",
    "MAX_DIRECT_CHUNKS",
    "MAX_ENTRIES_PER_CONN",
    "MAX_LOCAL_ENTRIES",
    "MAX_MESH_CHUNKS",
    "MAX_MESH_DELTA_BYTES",
    "MAX_META_BYTES",
    "MESH_CHANNEL",
    "ORIGINS_PER_BUCKET",
    "SYNC_INTERVAL_S",
    "Host",
    "RegistryService",
    "Settle",
    "entry_to_dict",
    "merge_deltas",
    "meta_problem",
    "name_problem",
    "sync_bits",
]


class RegistryService(RegistryCommands):
    """The registry inside a node (see the module docstring)."""

    def preload(self, tables: RegistryTables, owners: Mapping[int, int]) -> None:
        """Simulator only: start from a converged registry (:meth:`Registry.adopt`);
        ``owners`` maps each of our own entries (eid) to the API connection
        that holds it."""
        self.state.adopt(tables)
        local = self.state.local.entries
        if set(owners) != set(local):
            raise ValueError("every local entry of the snapshot needs an owner, and only those")
        for eid, conn in owners.items():
            entry = local[eid]
            self._owned.setdefault(conn, {})[(entry.kind, entry.scope, entry.name)] = eid
            self._owner_of[eid] = conn

    def on_start(self) -> None:
        """The node started: a registry that starts with data (preloaded)
        starts its rounds."""
        if self.state.origins() > 1 or self.state.local.entries:
            self.arm_sync()

    # --- membership -----------------------------------------------------------------

    def node_down(self, node: NodeId, generation: int) -> bool:
        """Drop a dead or departed node's entries; True if it had any (the
        host then spreads the news of its death at once)."""
        self._was_down[node] = generation
        removed = self.state.node_down(node, generation)
        self._emit_changes()
        self.check_settled()
        return bool(removed)

    def node_up(self, node: NodeId, generation: int) -> None:
        revived = self._was_down.pop(node, None) == generation
        self.state.node_up(node, generation)
        self._emit_changes()
        if revived:
            # A node we had given up for dead is back: a partition healed.
            # One sync with it soon brings what its side wrote meanwhile
            # (one per burst of revivals, not one per revived node).
            self._one_round_soon(node)

    def forget(self, node: NodeId) -> None:
        self._was_down.pop(node, None)
        self.state.forget(node)
        self._queued.pop(node, None)
