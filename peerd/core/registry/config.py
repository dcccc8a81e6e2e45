"""The registry's configuration: how fast news spreads and how much it may cost.

Theory of operation: the registry is a sibling of membership in the peer
(peerd.core.peer), so its tuning is its own, as the mesh's is
(peerd.core.mesh.config). Every field trades speed of "visible everywhere"
against traffic: the flush delay batches a burst of writes into one message,
the direct send makes small clusters one hop but costs one datagram per peer,
the size limits decide when a delta is sent and when it is only announced
(and pulled over a stream), and the anti-entropy interval bounds how long a
delta the epidemic missed stays missing (Demers et al. 1987: rumor mongering
backed by anti-entropy). The defaults are the figures the simulator's
registry scenarios are measured with.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

# The defaults, by name (the modules that use them re-export them).
REGISTRY_FLUSH_S = 0.002
SYNC_INTERVAL_S = 10.0
FULL_DIGEST_MAX = 8
HEAL_SYNC_DELAY_S = 0.2
ORIGINS_PER_BUCKET = 64
MAX_DELTA_BYTES = 900
DIRECT_MAX = 32
MAX_DIRECT_CHUNKS = 64
MAX_MESH_DELTA_BYTES = 64 * 1024
MAX_MESH_CHUNKS = 64


@dataclass(frozen=True, slots=True)
class RegistryConfig:
    # Registry deltas are flushed to gossip_fanout random peers this long after
    # a change (batching a burst into one packet) instead of waiting for the
    # next gossip tick. Smaller is faster to see everywhere, larger batches more.
    registry_flush_s: float = REGISTRY_FLUSH_S
    # Anti-entropy of its own: every node compares its registry with one
    # random live peer this often (besides the sync that follows each
    # membership push-pull, minutes apart in large clusters), so a delta the
    # epidemic missed is repaired within about one round. Shorter repairs
    # sooner and costs one stream per node per round.
    sync_interval_s: float = SYNC_INTERVAL_S
    # Up to this many origins a sync sends the whole digest; above, bucket
    # hashes of it (about origins_per_bucket origins per bucket), and only the
    # rows of buckets that differ follow.
    full_digest_max: int = FULL_DIGEST_MAX
    origins_per_bucket: int = ORIGINS_PER_BUCKET
    # After a partition heals, the first extra sync waits this long (revivals
    # arrive in bursts: one sync per burst, not one per revived node).
    heal_sync_delay_s: float = HEAL_SYNC_DELAY_S
    # A merged delta larger than this (encoded) is announced instead of sent;
    # nodes that are behind pull it over a stream. Bounded by the datagram.
    max_delta_bytes: int = MAX_DELTA_BYTES
    # Up to this many live peers, a node sends its own changes straight to
    # every one of them at the flush, besides the epidemic: one hop, so a
    # registration is visible everywhere within milliseconds even when the
    # random fan-out misses a node; costs one datagram per peer per flush.
    direct_max: int = DIRECT_MAX
    # A flush's own changes go to every peer in at most this many datagrams;
    # a longer burst is announced, and peers pull it.
    max_direct_chunks: int = MAX_DIRECT_CHUNKS
    # Over the mesh a flush goes as deltas of at most this many bytes each,
    # at most this many of them (4 MiB of changes); more is announced.
    max_mesh_delta_bytes: int = MAX_MESH_DELTA_BYTES
    max_mesh_chunks: int = MAX_MESH_CHUNKS

    def replace(self, **changes: object) -> RegistryConfig:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]
