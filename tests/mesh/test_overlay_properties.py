"""HyParView under random joins, link failures, crashes, leaves, hints and
shuffles, many instances wired by the test driver: the views stay within
bounds at every step, and once no message is in flight the active views are
symmetric, hold only live nodes, and no request is left hanging."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from peerd.core.events import LeaveMesh, MembershipHint
from peerd.core.mesh.config import HyParViewConfig, MeshConfig

from .driver import World, nid, peer

ACTIVE, PASSIVE = 3, 5

ops = st.lists(
    st.one_of(
        st.tuples(st.just("join"), st.integers(0, 1000)),
        st.tuples(st.just("fail_link"), st.integers(0, 1000)),
        st.tuples(st.just("crash"), st.integers(0, 1000)),
        st.tuples(st.just("leave"), st.integers(0, 1000)),
        st.tuples(st.just("hint"), st.integers(0, 1000)),
        st.tuples(st.just("run"), st.sampled_from([0.0, 0.002, 0.005, 0.02, 0.3, 1.0])),
    ),
    min_size=1,
    max_size=60,
)


def check_bounds(w: World) -> None:
    for n in w.live():
        hv = w.hv(n)
        active, passive = hv.active_ids(), hv.passive_ids()
        assert len(active) <= ACTIVE, "active view over its bound"
        assert len(passive) <= PASSIVE, "passive view over its bound"
        assert len(set(active)) == len(active)
        assert not set(active) & set(passive), "a peer both active and passive"
        assert n not in active and n not in passive, "a node in its own view"


def check_settled(w: World) -> None:
    live = set(w.live())
    for n in live:
        hv = w.hv(n)
        assert hv.pending_ids() == [], "a neighbor request left hanging"
        for m in hv.active_ids():
            assert m in live, "a crashed node in an active view"
            assert n in w.hv(m).active_ids(), "asymmetric active views"


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**32),
    script=ops,
    timeout=st.sampled_from([0.004, 0.03, 3.0]),
    latency=st.sampled_from([0.001, 0.01]),
)
def test_active_views_stay_symmetric_and_bounded(
    seed: int, script: list[tuple[str, float]], timeout: float, latency: float
) -> None:
    # A neighbour timeout near the link latency makes requests time out while
    # their answers are on the way: the late-answer paths get exercised.
    cfg = MeshConfig(
        HyParViewConfig(
            active_size=ACTIVE,
            passive_size=PASSIVE,
            arwl=4,
            prwl=2,
            shuffle_interval_s=0.25,
            shuffle_active=2,
            shuffle_passive=2,
            neighbor_timeout_s=timeout,
            reject_cooldown_s=0.5,
        )
    )
    w = World(seed, cfg, latency=(latency / 10, latency), hyparview_only=True)
    w.join(1)
    ever = 1
    for op, arg in script:
        live = w.live()
        match op:
            case "join":
                ever += 1
                contacts = [int.from_bytes(n, "big") for n in live]
                w.join(ever, contacts[int(arg) % len(contacts)] if contacts else 1)
            case "fail_link":
                links = w.open_links()
                if links:
                    w.fail_link(*links[int(arg) % len(links)])
            case "crash":
                if len(live) > 1:
                    w.crash(live[int(arg) % len(live)])
            case "leave":
                if len(live) > 1:
                    node = live[int(arg) % len(live)]
                    w.feed(node, LeaveMesh())
                    w.crash(node)  # then the process exits: links it did not close die
            case "hint":
                if live:
                    node = live[int(arg) % len(live)]
                    others = [int.from_bytes(n, "big") for n in live if n != node]
                    dead = [n for n in w.nodes if not w.alive[n]]
                    w.feed(
                        node,
                        MembershipHint(
                            alive=tuple(peer(i) for i in others[:4]), dead=tuple(dead[:2])
                        ),
                    )
            case "run":
                w.run_for(arg)
        check_bounds(w)
    w.settle()
    check_bounds(w)
    check_settled(w)
    # And it stays so after more upkeep (shuffles, refills) and settling again.
    w.run_for(1.0)
    w.settle()
    check_bounds(w)
    check_settled(w)


def test_a_settled_overlay_of_forty_is_full_and_symmetric() -> None:
    cfg = MeshConfig(
        HyParViewConfig(active_size=ACTIVE, passive_size=PASSIVE, shuffle_interval_s=0.5)
    )
    w = World(5, cfg, hyparview_only=True)
    w.join(1)
    for i in range(2, 41):
        w.join(i, w.rng.randint(1, i - 1))
        w.run_for(0.05)
    w.run_for(5.0)
    w.settle()
    check_settled(w)
    sizes = sorted(len(w.hv(n).active_ids()) for n in w.live())
    assert sizes[0] >= ACTIVE - 1 and sum(s == ACTIVE for s in sizes) >= 36
    assert all(len(w.hv(n).passive_ids()) == PASSIVE for n in w.live())
    assert nid(1) in w.nodes
