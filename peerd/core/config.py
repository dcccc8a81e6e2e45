"""Membership configuration and presets.

Each field says what it trades off. The presets follow the same idea as
memberlist's DefaultLANConfig / DefaultWANConfig / DefaultLocalConfig: LAN is
tuned for a data centre, WAN for high and variable latency, local for a
single machine (loopback) where round trips are microseconds.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class SwimConfig:
    # How often each node probes one peer. Shorter finds failures sooner, at
    # one ping+ack per interval per node of steady traffic.
    probe_interval_s: float = 1.0
    # How long to wait for a direct ack before asking helpers. Must exceed the
    # network's round-trip time by a margin, or healthy nodes get suspected.
    probe_timeout_s: float = 0.5
    # Helpers asked to probe indirectly (SWIM's k). More helpers make a false
    # suspicion rarer when one path is lossy, at k ping-req per failed probe.
    indirect_checks: int = 3
    # Minimum suspicion timeout = suspicion_mult * log10(N) * probe_interval.
    # Larger gives a slow node more time to refute, but delays detection.
    suspicion_mult: float = 3.0
    # Lifeguard dogpile: a suspicion starts at this multiple of the minimum and
    # shrinks towards the minimum as independent confirmations arrive.
    suspicion_max_timeout_mult: float = 6.0
    # Gossip about one update is sent retransmit_mult * ceil(log10(N+1)) times.
    # Larger spreads more reliably under loss, at more bytes per update.
    retransmit_mult: int = 4
    # How often queued updates are gossiped, and to how many random peers.
    gossip_interval_s: float = 0.2
    gossip_fanout: int = 3
    # Keep gossiping to a node this long after it is dead/left (so it learns it
    # was declared dead and can refute if it is in fact alive).
    gossip_to_dead_s: float = 30.0
    # Full-state anti-entropy with one random peer this often (scaled up above
    # 32 nodes so total push-pull load stays flat). 0 disables.
    push_pull_interval_s: float = 30.0
    # At most this many push-pull exchanges we started may run at once.
    max_concurrent_syncs: int = 2
    # At most this many partition-healing attempts (reconnect_interval_s) may
    # run at once, apart from the push-pulls: after a mass failure most go to
    # dead nodes and wait for a connect timeout. More heals a split faster.
    max_concurrent_reconnects: int = 1
    # Lifeguard local health: the probe interval and timeout are multiplied by
    # (score + 1), score in [0, awareness_max - 1].
    awareness_max: int = 8
    # Partition healing: how often we try one dead node or seed again.
    reconnect_interval_s: float = 10.0
    # Forget dead/left nodes after this long (bounds memory under churn); a
    # row whose name and address a new id took over goes within seconds, and
    # a forgotten id is refused this long again (peerd.core.swim.ghosts).
    dead_reclaim_s: float = 3600.0
    # Largest datagram we build (bytes of plaintext payload).
    max_packet_bytes: int = 1400
    # A closed-port hint (ICMP port unreachable) for a probed node starts a
    # suspicion this short: an alive node refutes in one round trip, a crashed
    # one is declared dead without waiting for the full suspicion timeout.
    refused_suspicion_timeout_s: float = 0.5
    # Idle watch links kept open to this many ring successors (by node id):
    # when a peer's process dies on a live host, its kernel closes the link
    # and the death is noticed within a round trip. 0 disables.
    watch_links: int = 1
    # After announcing a leave, wait this long for it to spread before exiting.
    leave_propagate_s: float = 1.0
    # Bound on tags (count and total bytes of keys and values).
    max_tags: int = 32
    max_tags_bytes: int = 1024
    # Membership news over the mesh's broadcast tree (peerd.core.swim.treecast):
    # while the node has mesh neighbours, joins, deaths, leaves and tag changes
    # go as Plumtree broadcasts (each node receives each about once) instead of
    # being gossiped retransmit_mult * log10(N) times by every node. False:
    # gossip only, as without a mesh. Off by default until a mass crash costs
    # no more with it than without (benchmarks/sim/RESULTS.md, issue 15).
    tree_dissemination: bool = False
    # News for the tree is batched this long: a burst (a mass join, a mass
    # crash) goes as a few broadcasts carrying many updates, not one each.
    tree_batch_s: float = 0.005
    # Largest batch (encoded bytes) per broadcast; a longer burst is cut into
    # several. Well under the mesh's membership payload limit (64 KiB).
    tree_batch_bytes: int = 16 * 1024
    # News a connected node hears off the tree (a datagram, a push-pull) waits
    # a random time in [1, 3] x this for the tree to bring it (its subject or
    # detector broadcasts it there); if it does not, this node broadcasts it.
    tree_relay_after_s: float = 0.5
    # Deaths go to the "desk", the live member with the lowest id, which
    # broadcasts what it collected this long after the first: a mass crash's
    # hundreds of detectors then cost a few broadcasts, not one each over a
    # tree the crash has just cut. 0: each detector broadcasts its own.
    tree_desk_hold_s: float = 0.02

    def replace(self, **changes: object) -> SwimConfig:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


def lan() -> SwimConfig:
    """A data-centre network: sub-millisecond to a few ms round trips."""
    return SwimConfig()


def wan() -> SwimConfig:
    """Links with 50-300 ms round trips and more loss: slower, more patient."""
    return SwimConfig(
        probe_interval_s=5.0,
        probe_timeout_s=3.0,
        suspicion_mult=6.0,
        retransmit_mult=4,
        gossip_interval_s=0.5,
        gossip_fanout=4,
        push_pull_interval_s=60.0,
        gossip_to_dead_s=60.0,
        reconnect_interval_s=30.0,
        refused_suspicion_timeout_s=2.0,
        leave_propagate_s=3.0,
    )


def local() -> SwimConfig:
    """One machine (loopback): everything is fast, detect quickly."""
    return SwimConfig(
        probe_interval_s=1.0,
        probe_timeout_s=0.2,
        suspicion_mult=3.0,
        gossip_interval_s=0.1,
        push_pull_interval_s=15.0,
        gossip_to_dead_s=15.0,
        reconnect_interval_s=5.0,
        refused_suspicion_timeout_s=0.3,
        leave_propagate_s=0.5,
    )


PRESETS = {"lan": lan, "wan": wan, "local": local}
