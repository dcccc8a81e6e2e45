"""The partial mesh in a simulated run: the broadcast workload and its figures.

Every simulated process is a whole :class:`peerd.core.peer.Peer` with its
mesh on (HyParView + Plumtree, :mod:`peerd.core.mesh`): the Peer itself
hints its mesh with SWIM's member events, joins the overlay after each join
of the membership, sends the registry's deltas over the tree and leaves the
mesh first on a graceful leave, exactly as in the daemon. The simulator only
carries out its link outputs (:mod:`peerd.sim.links`) and measures.

Workload (``[mesh]``): a broadcast of ``payload_bytes`` from a random running
node every ``broadcast_every_s``. For each broadcast the world records, once
``settle_s`` has passed, which of the nodes that ran throughout got it, how
many payload copies arrived, and the hops (``round``) it took.
"""

from __future__ import annotations

import collections
import math
import random
import statistics
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from peerd.core.events import Broadcast, BroadcastResult, Deliver
from peerd.core.mesh.config import PRESETS as MESH_PRESETS
from peerd.sim.measure import stats3
from peerd.wire.messages import Channel

if TYPE_CHECKING:
    from peerd.sim.engine import Proc
    from peerd.sim.faults import Faults as World
    from peerd.sim.scenario import MeshSpec


@dataclass(slots=True)
class BroadcastRecord:
    id: bytes
    origin: int
    at: float
    eligible: int = 0  # nodes other than the origin that ran throughout
    reached: int = 0
    copies: int = 0  # payload messages received (all nodes)
    delivered: dict[int, int] = field(default_factory=dict)  # host -> round
    last_s: float = 0.0  # the last delivery, after the broadcast
    delays: list[float] = field(default_factory=list)
    # the origin's process ended before any copy reached another process: no
    # protocol could deliver it, so it is not a broadcast to measure
    origin_died: bool = False


class MeshWorld:
    def __init__(self, world: World, spec: MeshSpec) -> None:
        self.w = world
        self.spec = spec
        self.config = MESH_PRESETS.get(world.sc.preset, MESH_PRESETS["lan"])()
        self.rng = random.Random(f"peerd-sim-mesh:{world.sc.seed}")
        self.links = world.links  # (the world's: mesh and names share them)
        self.links.gossip_seen = {}
        self.broadcasts: list[BroadcastRecord] = []
        self.origin_died = 0  # broadcasts not measured: see BroadcastRecord.origin_died
        self.by_id: dict[bytes, BroadcastRecord] = self.links.gossip_seen
        self._pending: dict[int, BroadcastRecord] = {}  # ref -> record
        self._ref = 0
        # Plumtree counters of the processes that stopped (the running ones
        # are added in the summary)
        self.tree_counters: collections.Counter[str] = collections.Counter()

    # --- processes ----------------------------------------------------------------

    def stop(self, proc: Proc) -> None:
        """The process is gone: keep its tree's counters."""
        mesh = proc.node.mesh
        if mesh is not None:
            self.tree_counters.update(mesh.plumtree.counters)
        self.tree_counters["mesh_cast_refused"] += proc.node.counters["mesh_cast_refused"]

    # --- the workload ---------------------------------------------------------------

    def schedule(self) -> None:
        s = self.spec
        if not s.broadcast_every_s:
            return
        t = s.broadcast_from_s
        end = s.broadcast_until_s if s.broadcast_until_s is not None else self.w.sc.duration_s
        while t <= end - s.settle_s + 1e-9:
            self.w.at(t, self._broadcast)
            t = round(t + s.broadcast_every_s, 9)

    def _broadcast(self) -> None:
        w = self.w
        running = w.running_indices()
        if not running:
            return
        i = running[self.rng.randrange(len(running))]
        proc = w.hosts[i].cur
        assert proc is not None
        self._ref += 1
        rec = BroadcastRecord(b"", i, w.now)
        self._pending[self._ref] = rec
        alive_then = {j: w.hosts[j].cur for j in running}  # the very processes
        payload = self.rng.randbytes(self.spec.payload_bytes)
        # (an API call of one of its clients, carried out at once)
        outs = proc.node.handle(w.now, Broadcast(self._ref, Channel.USER, payload))
        w._carry_out(proc, outs, w.now)
        w.at(w.now + self.spec.settle_s, lambda: self._settle(rec, alive_then))

    def _settle(self, rec: BroadcastRecord, alive_then: dict[int, Any]) -> None:
        if not rec.id:
            return  # refused (rate limit): not a broadcast
        hosts = self.w.hosts
        if rec.copies == 0 and alive_then.get(rec.origin) is not hosts[rec.origin].cur:
            # Started at the instant its origin crashed (or just before): no
            # copy ever left, nobody could have it. Counted apart, not as lost.
            rec.origin_died = True
            self.origin_died += 1
            return
        # nodes whose process ran from the broadcast until now (not restarted)
        eligible = [
            i
            for i in self.w.running_indices()
            if i != rec.origin and alive_then.get(i) is hosts[i].cur
        ]
        rec.eligible = len(eligible)
        rec.reached = sum(1 for i in eligible if i in rec.delivered)
        self.broadcasts.append(rec)

    # --- what the processes report ----------------------------------------------------

    def delivered(self, proc: Proc, o: Deliver, t: float) -> None:
        rec = self.by_id.get(o.id)
        me = proc.host.index
        if rec is not None and me not in rec.delivered:
            rec.delivered[me] = o.round
            rec.delays.append(t - rec.at)
            rec.last_s = max(rec.last_s, t - rec.at)

    def result(self, o: BroadcastResult) -> None:
        rec = self._pending.pop(o.ref, None)
        if rec is not None and o.id is not None:
            rec.id = o.id
            self.by_id[o.id] = rec

    # --- the summary ------------------------------------------------------------------

    def summary(self) -> dict[str, Any]:

        n = self.w.n
        recs = self.broadcasts
        rel = [r.reached / r.eligible for r in recs if r.eligible]
        red = [r.copies / r.reached for r in recs if r.reached]
        hops = sorted(h for r in recs for i, h in r.delivered.items() if i != r.origin)
        ns = self.w.rec.node_seconds or 1.0
        links = self.links
        return {
            "enabled": True,
            "max_links_per_node": links.max_links,
            "links_bound": bound_links(n),
            "links_at_end": {
                "max": max(links.link_count, default=0),
                "mean": round(
                    statistics.mean([links.link_count[i] for i in self.w.running_indices()] or [0]),
                    3,
                ),
            },
            "broadcasts": len(recs),
            "broadcasts_origin_died": self.origin_died,
            "broadcast_reliability": {
                "min": round(min(rel), 6) if rel else None,
                "mean": round(statistics.mean(rel), 6) if rel else None,
            },
            "broadcast_redundancy": {
                "mean": round(statistics.mean(red), 4) if red else None,
                "max": round(max(red), 4) if red else None,
            },
            "broadcast_hops": {
                "p50": _pct(hops, 0.5),
                "p99": _pct(hops, 0.99),
                "max": hops[-1] if hops else None,
            },
            # broadcast -> delivered at a node, and -> the last node reached
            "delivery_s": stats3([d for r in recs for d in r.delays]),
            "all_reached_s": stats3([r.last_s for r in recs if r.reached == r.eligible]),
            # every process's Plumtree: repair grafts (a node the tree missed
            # waited for one), tree moves (section 3.8) and those dropped
            "tree": self._tree_summary(),
            "msgs_per_node_s": round(links.counts["msgs"] / ns, 3),
            "bytes_per_node_s": round(links.counts["bytes"] / ns, 1),
            **{k: v for k, v in links.counts.items() if k not in ("msgs", "bytes")},
            # the registry's deltas the mesh refused (its rate limit): gossip carried them
            "cast_refused": self._cast_refused(),
        }

    def _cast_refused(self) -> int:
        n = self.tree_counters["mesh_cast_refused"]
        for h in self.w.hosts:
            if h.cur is not None:
                n += h.cur.node.counters["mesh_cast_refused"]
        return n

    def _tree_summary(self) -> dict[str, int]:
        c = collections.Counter(self.tree_counters)
        for h in self.w.hosts:
            if h.cur is not None and h.cur.node.mesh is not None:
                c.update(h.cur.node.mesh.plumtree.counters)
        return {
            "grafts": c["grafts_out"],
            "moves": c["optimizations"],
            "moves_dropped": sum(
                c[f"optimizations_{why}"] for why in ("overtaken", "crossed", "lost", "moot")
            ),
            "regrafts": c["regrafts"],
        }

    def records_after(self, t: float) -> list[BroadcastRecord]:
        return [r for r in self.broadcasts if r.at >= t]


def bound_links(n: int) -> int:
    """The issue's bound on links per node: 2 log2 N."""
    return max(2, math.ceil(2 * math.log2(max(n, 2))))


def _pct(sorted_values: list[int], q: float) -> int | None:
    if not sorted_values:
        return None
    return sorted_values[max(0, math.ceil(q * len(sorted_values)) - 1)]
