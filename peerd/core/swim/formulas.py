"""The numbers that drive SWIM and Lifeguard, as pure functions.

Kept apart from the state machine so they can be table-tested and so that the
simulator's expectations can quote the same bounds the nodes use.
"""

from __future__ import annotations

import functools
import math


@functools.lru_cache(maxsize=4096)
def retransmit_limit(retransmit_mult: int, n: int) -> int:
    """How many times one update is sent: mult * ceil(log10(N + 1)).

    Epidemic spread needs O(log N) rounds to reach every node with high
    probability (SWIM 2002 section 4.1); the multiplier buys margin for loss.
    """
    return retransmit_mult * max(1, math.ceil(math.log10(n + 1)))


def suspicion_bounds(
    suspicion_mult: float, max_timeout_mult: float, n: int, probe_interval_s: float
) -> tuple[float, float]:
    """(min, max) suspicion timeout for a cluster of ``n`` nodes.

    The minimum grows with log10(N) because an update needs that many more
    gossip rounds to reach the suspected node so it can refute (SWIM 4.2).
    Lifeguard starts each suspicion at the maximum and shrinks it towards the
    minimum as independent confirmations arrive.
    """
    node_scale = max(1.0, math.log10(max(1, n)))
    low = suspicion_mult * node_scale * probe_interval_s
    return low, low * max_timeout_mult


def expected_confirmations(suspicion_mult: float, n: int) -> int:
    """Lifeguard's K: how many independent suspicions drive a suspicion timer
    down to its minimum. Fewer than K+2 nodes cannot produce them, so then
    K = 0 and the timer runs at the minimum from the start."""
    k = max(0, int(suspicion_mult) - 2)
    return 0 if n - 2 < k else k


def suspicion_timeout(low: float, high: float, k: int, confirmations: int) -> float:
    """Lifeguard dogpile: timeout after ``confirmations`` independent suspicions
    (the originator's own counts as none).

    max - (max - min) * log(C + 1) / log(K + 1), never below the minimum: the
    first confirmations cut the most, because they are the strongest evidence.
    """
    if k < 1:
        return low
    frac = math.log(confirmations + 1) / math.log(k + 1)
    return max(low, high - (high - low) * frac)


def push_pull_scale(interval_s: float, n: int) -> float:
    """Stretch the push-pull interval above 32 nodes so that the cluster-wide
    rate of full-state syncs (each of size O(N)) stays roughly flat."""
    threshold = 32
    if n <= threshold:
        return interval_s
    multiplier = math.ceil(math.log2(n) - math.log2(threshold)) + 1
    return interval_s * multiplier


def scaled(value_s: float, health_score: int) -> float:
    """Lifeguard local health: a node that misses acks or is refuted slows its
    own probing and widens its timeouts, since its own slowness is the likely
    cause (Lifeguard 2018, section IV-A)."""
    return value_s * (health_score + 1)


def nack_delay(probe_timeout_s: float, probe_interval_s: float, fraction: float) -> float:
    """How long an indirect-probe helper waits for the target before it nacks.

    The requester sends its ping-req one probe timeout into its period and
    counts nacks at the period's end (Lifeguard IV-A); a nack that lands after
    that counts as missing and wrongly lowers the requester's health. So the
    helper answers within ``fraction`` of whichever is shorter: the probe
    timeout, or what is left of the period after it.
    """
    return fraction * max(0.0, min(probe_timeout_s, probe_interval_s - probe_timeout_s))
