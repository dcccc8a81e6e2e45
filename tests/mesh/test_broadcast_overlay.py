"""Plumtree over HyParView, 200 nodes wired by the test driver: a broadcast
reaches every node with about one payload per node once the tree has formed;
after 30% of the nodes crash at once, reliability is back to 1.0 once the
overlay and the tree have repaired themselves (no membership hints: the mesh
heals on its own, since the survivors see the crashed nodes' links die).
When 30% freeze instead (links open, nothing read), nothing tells the mesh
until SWIM's dead hints arrive; then it repairs the same way.

Figures are printed (``pytest -s``) so a run can be compared with the table in
the report: reliability (nodes reached / live nodes other than the origin),
redundancy (payload messages received / nodes reached; 1.0 is a perfect
tree), and hops (``round`` at delivery).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from peerd.core.events import MembershipHint
from peerd.core.mesh.config import HyParViewConfig, MeshConfig, PlumtreeConfig
from peerd.wire.messages import Channel, NodeId

from .driver import World

N = 200


@dataclass(frozen=True)
class Stats:
    reliability: float
    redundancy: float
    mean_hops: float
    max_hops: int


def build(seed: int) -> World:
    cfg = MeshConfig(HyParViewConfig(shuffle_interval_s=2.0), PlumtreeConfig())
    w = World(seed, cfg, latency=(0.001, 0.010), check_codec=False)
    w.join(1)
    for i in range(2, N + 1):
        w.join(i, w.rng.randint(1, i - 1))
        w.run_for(0.02)
    w.run_for(5.0)
    return w


def broadcast(w: World, origin: NodeId | None = None, settle_s: float = 1.5) -> Stats:
    live = w.live()
    origin = origin or w.rng.choice(live)
    result = w.broadcast(origin, b"payload " + bytes(64), Channel.USER)
    assert result.error is None and result.id is not None
    w.run_for(settle_s)
    got = w.deliveries[result.id]
    reached = [n for n in got if w.alive[n]]
    rounds = list(got.values())
    return Stats(
        reliability=len(reached) / (len(live) - 1),
        redundancy=w.payload_msgs[result.id] / max(1, len(got)),
        mean_hops=statistics.mean(rounds) if rounds else 0.0,
        max_hops=max(rounds, default=0),
    )


def summary(label: str, runs: list[Stats]) -> str:
    return (
        f"{label}: reliability min {min(s.reliability for s in runs):.3f}, "
        f"redundancy mean {statistics.mean(s.redundancy for s in runs):.3f} "
        f"max {max(s.redundancy for s in runs):.3f}, "
        f"hops mean {statistics.mean(s.mean_hops for s in runs):.2f} "
        f"max {max(s.max_hops for s in runs)}"
    )


def test_broadcast_reaches_everyone_along_a_tree() -> None:
    w = build(seed=11)
    sizes = [len(w.hv(n).active_ids()) for n in w.live()]
    assert min(sizes) >= 3 and statistics.mean(sizes) >= 4.5
    first = broadcast(w)
    # The first broadcast floods the fresh (all eager) links and prunes them.
    assert first.reliability == 1.0 and first.redundancy > 2.0
    warm = [broadcast(w) for _ in range(3)]
    runs = [broadcast(w) for _ in range(10)]
    print("\n" + summary("200 nodes, first broadcast", [first]))
    print(summary("200 nodes, while the tree forms (2-4)", warm))
    print(summary("200 nodes, settled tree (5-14)", runs))
    assert all(s.reliability == 1.0 for s in warm + runs)
    assert statistics.mean(s.redundancy for s in runs) <= 1.05
    assert max(s.redundancy for s in runs) <= 1.1
    assert max(s.max_hops for s in runs) <= 20


def test_reliability_recovers_after_thirty_percent_crash() -> None:
    w = build(seed=12)
    for _ in range(4):
        broadcast(w)
    victims = w.rng.sample(w.live(), int(N * 0.3))
    for v in victims:
        w.crash(v)
    # Right after the crash: links are being replaced and grafts repair the
    # tree while the broadcast is under way.
    during = [broadcast(w, settle_s=2.0) for _ in range(3)]
    w.run_for(10.0)  # a few shuffle periods: views refilled, tree re-formed
    after = [broadcast(w) for _ in range(10)]
    print("\n" + summary("200 nodes, 60 crashed, first 3 broadcasts", during))
    print(summary("200 nodes, 60 crashed, after 10 s", after))
    assert all(s.reliability == 1.0 for s in after)
    assert statistics.mean(s.redundancy for s in after[3:]) <= 1.05
    # Every survivor has neighbours again, all of them alive.
    for n in w.live():
        active = w.hv(n).active_ids()
        assert len(active) >= 3 and all(w.alive[m] for m in active)


def test_reliability_recovers_after_thirty_percent_freeze_once_swim_tells() -> None:
    w = build(seed=13)
    for _ in range(4):
        broadcast(w)
    frozen = w.rng.sample(w.live(), int(N * 0.3))
    for v in frozen:
        w.freeze(v)
    # Frozen neighbours swallow eager pushes; lazy announcements from the
    # other neighbours graft around them, as far as live links reach.
    during = [broadcast(w, settle_s=2.0) for _ in range(3)]
    for n in w.live():
        w.feed(n, MembershipHint(dead=tuple(frozen)))
    w.run_for(10.0)
    after = [broadcast(w) for _ in range(10)]
    print("\n" + summary("200 nodes, 60 frozen, before SWIM's hints", during))
    print(summary("200 nodes, 60 frozen, 10 s after the hints", after))
    assert min(s.reliability for s in during) > 0.9
    assert all(s.reliability == 1.0 for s in after)
    assert statistics.mean(s.redundancy for s in after[3:]) <= 1.05
    for n in w.live():
        active = w.hv(n).active_ids()
        assert len(active) >= 3 and all(w.alive[m] for m in active)


def test_same_seed_same_run() -> None:
    def run(seed: int) -> tuple[object, ...]:
        w = World(seed, MeshConfig(HyParViewConfig(shuffle_interval_s=1.0)))
        w.trace = []
        w.join(1)
        for i in range(2, 41):
            w.join(i, w.rng.randint(1, i - 1))
            w.run_for(0.02)
        w.run_for(3.0)
        stats = [broadcast(w) for _ in range(3)]
        return (tuple(w.trace), tuple(stats), tuple(sorted(w.sent.items())))

    assert run(3) == run(3)
    assert run(3) != run(4)
