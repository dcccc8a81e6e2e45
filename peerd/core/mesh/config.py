"""Partial mesh configuration: one frozen config per protocol, and presets.

View sizes follow HyParView (2007, section 4.1): the active view holds
``log10(N) + c`` peers and the passive view ``k * (log10(N) + c)``; the
defaults (5 and 30) are the paper's for N = 10,000 (c = 1, k = 6). The formulas
are here so an operator can size a larger cluster; the views never grow on
their own (a node does not know N when it joins).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from peerd.wire.messages import Channel


def active_view_size(n: int, c: int = 1) -> int:
    """HyParView's active view size for ``n`` nodes: ceil(log10 n) + c, at least 1."""
    return max(1, math.ceil(math.log10(max(n, 1))) + c)


def passive_view_size(n: int, c: int = 1, k: int = 6) -> int:
    """HyParView's passive view size for ``n`` nodes: k * (ceil(log10 n) + c)."""
    return k * active_view_size(n, c)


@dataclass(frozen=True, slots=True)
class HyParViewConfig:
    # Neighbours (persistent links) per node. More gives more redundancy
    # against failures and a denser tree, at one link (and its keepalives)
    # each. Must be at least 1; 2+ for a connected overlay.
    active_size: int = 5
    # Backups to replace a failed neighbour from. Larger survives heavier
    # concurrent failure, at a little memory and shuffle traffic.
    passive_size: int = 30
    # Active random walk length: hops a forward-join (and a shuffle) travels.
    # Longer spreads a joiner's links further from its contact.
    arwl: int = 6
    # Passive random walk length: at this many hops left, a forward-join
    # leaves the joiner in the passive view of the node it passes.
    prwl: int = 3
    # Period of the shuffle that mixes passive views (and of view upkeep:
    # refilling a short active view, rejoining when isolated). Shorter keeps
    # passive views fresher under churn, at one walk per node per period.
    shuffle_interval_s: float = 10.0
    # Peers sent in a shuffle: from the active view (ka) and the passive (kp).
    shuffle_active: int = 3
    shuffle_passive: int = 4
    # A neighbor request (or join) unanswered this long is given up and the
    # next candidate tried; a frozen peer would otherwise hold a slot forever.
    neighbor_timeout_s: float = 3.0
    # A peer that refused us is not asked again for this long.
    reject_cooldown_s: float = 10.0

    def replace(self, **changes: object) -> HyParViewConfig:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


def _default_max_payload() -> dict[Channel, int]:
    return {Channel.MEMBERSHIP: 64 * 1024, Channel.REGISTRY: 512 * 1024, Channel.USER: 64 * 1024}


def _default_rate() -> dict[Channel, tuple[float, float]]:
    return {Channel.USER: (256 * 1024.0, 1024 * 1024.0)}


@dataclass(frozen=True, slots=True)
class PlumtreeConfig:
    # IHAVE announcements to lazy peers are batched for this long. Longer
    # means fewer, larger control frames but slower repair of a broken tree.
    ihave_interval_s: float = 0.05
    # An announced broadcast that has not arrived this long after its first
    # IHAVE is grafted from the announcer. Must exceed the usual extra delay of
    # the eager path over the lazy one, or healthy trees get redundant links.
    # With ``graft_lag_window`` this is the ceiling of the measured timeout.
    graft_timeout_s: float = 0.25
    # The first graft timeout is measured (plumtree.first_graft_timeout): twice
    # the largest delay, over the last ``graft_lag_window`` broadcasts this
    # node was announced, from the first IHAVE to the copy the tree brought
    # (0 when the copy came first), between this floor and graft_timeout_s.
    # It is the time a node cut off from the tree waits before it asks; the
    # floor keeps jitter beyond what was seen from causing needless grafts
    # (each costs a copy and moves a tree link). The floor while nothing is
    # measured yet; a window of 0 disables the measurement (graft_timeout_s).
    graft_timeout_min_s: float = 0.05
    graft_lag_window: int = 32
    # When a tree link to us goes down (an eager neighbour failed or left),
    # for this long the first graft timeout is the floor and no lag is
    # sampled: the tree above us is cut, an announced broadcast will not come
    # by it, and the lags measured while it is being repaired are the
    # repair's, not the tree's (after a mass crash they would hold the
    # timeout at its ceiling just when every node is being cut off). 0
    # disables.
    graft_cut_window_s: float = 2.0
    # After a graft, wait this long before grafting from the next announcer.
    graft_retry_s: float = 0.125
    # Tree optimisation (Plumtree section 3.8): when an IHAVE for the latest
    # broadcast shows a path at least this many hops shorter than the one it
    # came by, the announcer is grafted and, once it acknowledged, the old
    # parent pruned. Keeps hops low in large clusters. 0 disables.
    optimize_hops: int = 3
    # At most one optimisation per node per this interval. With broadcasts
    # from rotating origins each pulls the one shared tree toward itself:
    # undamped, 3 to 5 moves per broadcast over 30 nodes, 3 control messages
    # each. (A move is safe either way; this bounds their traffic.) Longer
    # leaves longer paths in large clusters.
    optimize_interval_s: float = 1.0
    # Broadcast ids remembered to drop duplicates: by age and by count. An id
    # forgotten while copies still circulate is delivered twice.
    seen_ttl_s: float = 120.0
    seen_max: int = 100_000
    # Payloads kept to answer grafts: by age and by total bytes.
    store_ttl_s: float = 30.0
    store_max_bytes: int = 16 * 1024 * 1024
    # Announced-but-missing broadcasts tracked at once (beyond: ignored, the
    # eager path or a later announcement still brings them).
    max_missing: int = 10_000
    # Largest payload per channel; a broadcast above it is refused (too_large)
    # and a relayed one dropped. At most codec.MAX_GOSSIP_PAYLOAD_BYTES.
    max_payload_bytes: dict[Channel, int] = field(default_factory=_default_max_payload)
    # Per-channel token bucket on broadcasts this node originates: (bytes per
    # second, burst bytes). Channels not listed are unlimited (the daemon's
    # own traffic). With the link priorities this keeps user payloads from
    # starving membership and registry traffic.
    rate: dict[Channel, tuple[float, float]] = field(default_factory=_default_rate)

    def replace(self, **changes: object) -> PlumtreeConfig:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class MeshConfig:
    hyparview: HyParViewConfig = field(default_factory=HyParViewConfig)
    plumtree: PlumtreeConfig = field(default_factory=PlumtreeConfig)


def lan() -> MeshConfig:
    """A data-centre network."""
    return MeshConfig()


def wan() -> MeshConfig:
    """High, variable latency: slower upkeep, more patient grafts."""
    return MeshConfig(
        HyParViewConfig(shuffle_interval_s=30.0, neighbor_timeout_s=10.0, reject_cooldown_s=30.0),
        PlumtreeConfig(
            ihave_interval_s=0.2, graft_timeout_s=1.0, graft_timeout_min_s=0.2, graft_retry_s=0.5
        ),
    )


def local() -> MeshConfig:
    """One machine (loopback)."""
    return MeshConfig(
        HyParViewConfig(shuffle_interval_s=5.0, neighbor_timeout_s=1.0, reject_cooldown_s=5.0),
        PlumtreeConfig(
            ihave_interval_s=0.02, graft_timeout_s=0.1, graft_timeout_min_s=0.02, graft_retry_s=0.05
        ),
    )


PRESETS = {"lan": lan, "wan": wan, "local": local}
