"""Expectations a scenario can state (``[[expect]] check = ...``), as a registry.

Each check reads the :class:`peerd.sim.measure.Record` a run produced and returns
``(passed, value, limit)``. Values are in seconds or counts; ``None`` means the
thing never happened (a cluster that never converged, a crash nobody saw).
Add a check by writing a function, registering it in ``_FNS`` and naming the
keys it needs in :data:`peerd.sim.scenario.CHECK_NEEDS` (the scenario language).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from peerd.sim.measure import first_true_at
from peerd.sim.scenario import CHECK_NEEDS
from peerd.sim.workloads.mesh import bound_links
from peerd.sim.workloads.names import hist_pct

if TYPE_CHECKING:
    from peerd.sim.measure import Record
    from peerd.sim.scenario import Expect

Result = tuple[bool, Any, Any]


@dataclass(frozen=True, slots=True)
class CheckSpec:
    fn: Callable[[Record, Expect], Result]
    needs: tuple[str, ...]
    doc: str


def _converged(rec: Record, e: Expect) -> Result:
    """Every running node sees exactly the running nodes alive (and no one
    else alive or suspect) at some moment within [after_s, after_s + within_s].
    Value: seconds after after_s."""
    assert e.within_s is not None
    t = rec.first_converged_at(e.after_s)
    value = None if t is None else round(t - e.after_s, 3)
    return value is not None and value <= e.within_s, value, e.within_s


def _no_false_positives(rec: Record, e: Expect) -> Result:
    """No running node was declared dead (in its current life) by anyone at or
    after after_s. ``max`` allows that many such nodes. Value: their count."""
    limit = int(e.max or 0)
    n = sum(1 for _node, t in rec.false_positive_times.items() if t >= e.after_s)
    return n <= limit, n, limit


def _false_suspicions(rec: Record, e: Expect) -> Result:
    """Suspicions of running nodes raised at or after after_s, summed over
    observers (each observer's suspicion counts once). Needs ``max``."""
    limit = int(e.max or 0)
    n = sum(1 for t in rec.false_suspicion_times if t >= e.after_s)
    return n <= limit, n, limit


def _detected(rec: Record, e: Expect) -> Result:
    """Every node crashed at or after after_s was seen dead by every running
    node within within_s of its crash. Value: the slowest, in seconds."""
    assert e.within_s is not None
    crashes = [c for c in rec.crashes if c.at >= e.after_s]
    if not crashes:
        return False, None, e.within_s
    times = [c.all_s for c in crashes]
    if any(t is None for t in times):
        return False, None, e.within_s
    worst = round(max(t for t in times if t is not None), 3)
    return worst <= e.within_s, worst, e.within_s


def _detected_first(rec: Record, e: Expect) -> Result:
    """Every node crashed at or after after_s was declared dead by someone
    within within_s. Value: the slowest first detection, in seconds."""
    assert e.within_s is not None
    crashes = [c for c in rec.crashes if c.at >= e.after_s]
    if not crashes or any(c.first_s is None for c in crashes):
        return False, None, e.within_s
    worst = round(max(c.first_s for c in crashes if c.first_s is not None), 3)
    return worst <= e.within_s, worst, e.within_s


def _suspected(rec: Record, e: Expect) -> Result:
    """Every paused or slowed node was suspected by someone while impaired
    (failure detection noticed). Value: how many were."""
    impaired = rec.impairments
    n = sum(1 for p in impaired if p.suspected_at is not None)
    return bool(impaired) and n == len(impaired), n, len(impaired)


def _refuted(rec: Record, e: Expect) -> Result:
    """After each pause or slowdown ends, every running node sees the node
    alive again within within_s. Value: the slowest, in seconds."""
    assert e.within_s is not None
    impaired = rec.impairments
    if not impaired or any(p.cleared_s is None for p in impaired):
        return False, None, e.within_s
    worst = round(max(p.cleared_s for p in impaired if p.cleared_s is not None), 3)
    return worst <= e.within_s, worst, e.within_s


def _no_cascade(rec: Record, e: Expect) -> Result:
    """No node other than the impaired ones was declared dead or suspected
    by anyone at or after after_s. Value: how many such nodes."""
    impaired = {p.node for p in rec.impairments}
    hit = {n for n, t in rec.false_positive_times.items() if t >= e.after_s} | {
        n for n, t in rec.first_false_suspicion.items() if t >= e.after_s
    }
    n = len(hit - impaired)
    limit = int(e.max or 0)
    return n <= limit, n, limit


def _left(rec: Record, e: Expect) -> Result:
    """Every node that left at or after after_s is seen gone (not alive nor
    suspect) by every running node within within_s. Value: the slowest."""
    assert e.within_s is not None
    leaves = [c for c in rec.leaves if c.at >= e.after_s]
    if not leaves or any(c.all_s is None for c in leaves):
        return False, None, e.within_s
    worst = round(max(c.all_s for c in leaves if c.all_s is not None), 3)
    return worst <= e.within_s, worst, e.within_s


def _msgs_per_node_s(rec: Record, e: Expect) -> Result:
    """Messages (datagrams and stream frames) per running node per second,
    over the whole run, at most ``max``."""
    v = round(rec.traffic()["msgs_per_node_s"], 3)
    return e.max is None or v <= e.max, v, e.max


def _bytes_per_node_s(rec: Record, e: Expect) -> Result:
    """Bytes on the wire per running node per second, whole run, at most ``max``."""
    v = round(rec.traffic()["bytes_per_node_s"], 1)
    return e.max is None or v <= e.max, v, e.max


def _registry_converged(rec: Record, e: Expect) -> Result:
    """Registry workload: every running node holds exactly the live entries
    (none missing, none stale) at some moment within [after_s, after_s +
    within_s]. A name's losing claim counts as live until its node reports
    the conflict: duplicate claims are what duplicates_after_heal checks.
    Value: seconds after after_s."""

    assert e.within_s is not None
    t = first_true_at(rec.registry_convergence, e.after_s)
    value = None if t is None else round(t - e.after_s, 3)
    return value is not None and value <= e.within_s, value, e.within_s


def _registry_count(rec: Record, e: Expect) -> Result:
    limit = int(e.max or 0)
    v = rec.registry_evals.get(e.index)
    return v is not None and v <= limit, v, limit


def _lost_live_entries(rec: Record, e: Expect) -> Result:
    """Registry workload, counted at after_s + within_s: (running node,
    entry) pairs where the entry's process asked for it at or before
    after_s and still holds it, but the node does not have it. ``max``
    (default 0) allows that many."""
    return _registry_count(rec, e)


def _stale_entries(rec: Record, e: Expect) -> Result:
    """Registry workload, counted at after_s + within_s: (running node,
    entry) pairs where the node still holds an entry whose process exited,
    whose node crashed, restarted or left, or which lost its name, at or
    before after_s. ``max`` (default 0)."""
    return _registry_count(rec, e)


def _duplicates_after_heal(rec: Record, e: Expect) -> Result:
    """Registry workload, counted at after_s + within_s: (running node,
    name) pairs where the node holds two or more claims of one unique name
    (the conflict rule has not run yet). ``max`` (default 0)."""
    return _registry_count(rec, e)


def _max_links_per_node(rec: Record, e: Expect) -> Result:
    """Mesh: the most links (active view; the simulator opens no direct
    links) any node held at any moment, at most ``max`` (default 2 log2 N)."""

    assert rec.mesh is not None
    limit = int(e.max) if e.max is not None else bound_links(rec.nodes)
    v = rec.mesh["max_links_per_node"]
    return v <= limit, v, limit


def _mesh_records(rec: Record, e: Expect) -> list[Any]:
    until = math.inf if e.until_s is None else e.until_s
    return [
        r
        for r in rec.mesh_records
        if e.after_s <= r.at < until and r.eligible and not r.origin_died
    ]


def _broadcast_reliability(rec: Record, e: Expect) -> Result:
    """Mesh: every broadcast sent at or after after_s reached at least
    ``min`` (default 1.0) of the nodes that ran from the broadcast until it
    was measured. A broadcast whose origin died before any copy of it left
    is not counted (the summary reports those as broadcasts_origin_died).
    Value: the lowest fraction."""
    limit = e.min if e.min is not None else 1.0
    recs = _mesh_records(rec, e)
    if not recs:
        return False, None, limit
    v = round(min(r.reached / r.eligible for r in recs), 6)
    return v >= limit, v, limit


def _broadcast_redundancy(rec: Record, e: Expect) -> Result:
    """Mesh: payload copies received per node reached, averaged over the
    broadcasts sent at or after after_s, at most ``max`` (1.0 is a perfect
    tree)."""
    recs = [r for r in _mesh_records(rec, e) if r.reached]
    if not recs:
        return False, None, e.max
    v = round(sum(r.copies for r in recs) / sum(r.reached for r in recs), 4)
    return e.max is None or v <= e.max, v, e.max


def _broadcast_hops(rec: Record, e: Expect) -> Result:
    """Mesh: the 99th percentile of hops from the origin over deliveries of
    broadcasts sent at or after after_s, at most ``max`` (default 2 log2 N)."""

    limit = e.max if e.max is not None else bound_links(rec.nodes)
    hops = sorted(h for r in _mesh_records(rec, e) for i, h in r.delivered.items() if i != r.origin)
    if not hops:
        return False, None, limit
    v = hops[max(0, -(-99 * len(hops) // 100) - 1)]
    return v <= limit, v, limit


def _name_delivery(rec: Record, e: Expect) -> Result:
    """Names workload: of the messages sent at or after after_s to a name
    whose owner was live at send time and for the next second, the fraction
    that reached that owner, at least ``min`` (default 0.999)."""
    limit = e.min if e.min is not None else 0.999
    tot = rec.names_at.get((e.after_s, e.until_s))
    v = tot.delivery() if tot is not None else None
    return v is not None and v >= limit, v, limit


def _name_latency(rec: Record, e: Expect) -> Result:
    """Names workload: the p99 of send-to-delivery time of the messages sent
    at or after after_s that were delivered, in milliseconds (0.1 ms
    resolution), at most ``max_ms``."""
    tot = rec.names_at.get((e.after_s, e.until_s))
    v = hist_pct(tot.latency, 0.99) if tot is not None else None
    return v is not None and v <= (e.max_ms or 0.0), v, e.max_ms


def _lost_messages(rec: Record, e: Expect) -> Result:
    """Names workload: messages sent at or after after_s that were neither
    delivered nor failed with an error to the sender within settle_s (they
    vanished), plus API calls (sends and replies, whenever made) still without
    a result at the end of the run past their deadline, at most ``max``
    (default 0). Fails when nothing was sent."""
    limit = int(e.max or 0)
    tot = rec.names_at.get((e.after_s, e.until_s))
    if tot is None or not tot.sent:
        return False, None, limit
    v = tot.lost + int((rec.names or {}).get("no_result", 0))
    return v <= limit, v, limit


_FNS: dict[str, Callable[[Record, Expect], Result]] = {
    "converged": _converged,
    "no_false_positives": _no_false_positives,
    "false_suspicions": _false_suspicions,
    "detected": _detected,
    "detected_first": _detected_first,
    "suspected": _suspected,
    "refuted": _refuted,
    "no_cascade": _no_cascade,
    "left": _left,
    "msgs_per_node_s": _msgs_per_node_s,
    "bytes_per_node_s": _bytes_per_node_s,
    "registry_converged": _registry_converged,
    "lost_live_entries": _lost_live_entries,
    "stale_entries": _stale_entries,
    "duplicates_after_heal": _duplicates_after_heal,
    "max_links_per_node": _max_links_per_node,
    "broadcast_reliability": _broadcast_reliability,
    "broadcast_redundancy": _broadcast_redundancy,
    "broadcast_hops": _broadcast_hops,
    "name_delivery": _name_delivery,
    "name_latency": _name_latency,
    "lost_messages": _lost_messages,
}
CHECKS: dict[str, CheckSpec] = {
    name: CheckSpec(fn, CHECK_NEEDS[name], fn.__doc__ or "") for name, fn in _FNS.items()
}
assert set(CHECKS) == set(CHECK_NEEDS), "a check in scenario.CHECK_NEEDS has no function here"


def evaluate(rec: Record, expects: tuple[Expect, ...]) -> list[dict[str, Any]]:
    out = []
    for e in expects:
        passed, value, limit = CHECKS[e.check].fn(rec, e)
        name = e.check if not e.after_s else f"{e.check}@{e.after_s:g}s"
        out.append({"name": name, "passed": bool(passed), "value": value, "limit": limit})
    return out
