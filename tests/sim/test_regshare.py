"""Registry replicas shared between simulated nodes (peerd.sim.regshare)
behave exactly like a replica's own tables: same answers, same orders, same
events, and a whole simulation gives the same summary with them."""

from __future__ import annotations

import random

from peerd.core.registry.state import Applied, Registry
from peerd.sim import regshare
from peerd.sim.report import summarize
from peerd.sim.world import World
from peerd.wire.messages import RegKind

from .helpers import scenario

ORIGINS = [bytes([i]) * 16 for i in range(1, 6)]


def _observe(r: Registry) -> object:
    keys = [("s", f"n{k}") for k in range(4)]
    return (
        r.digest(),
        list(r.digest_in(2, range(4))),
        r.state(),
        [r.lookup(*k) for k in keys],
        [r.claims(*k) for k in keys],
        [r.group_members(*k) for k in keys],
        list(r.names()),
        list(r.groups()),
        [r.conflicts_for_local(*k) for k in keys],
        r.drain_changes(),
        r.bucket_hashes().hashes(6),
    )


def _writers() -> dict[bytes, Registry]:
    return {o: Registry(o, 1) for o in ORIGINS}


def test_shared_replicas_answer_like_plain_ones() -> None:
    """Writers make changes; plain replicas and replicas over one pool get
    the same deltas, snapshots and membership news in the same random order
    and must agree on everything, and the pool's canonical partitions must
    never change under a replica."""
    for seed in range(4):
        rng = random.Random(seed)
        pool = regshare.Pool()
        me = ORIGINS[0]
        plain = [Registry(me, 1), Registry(b"\x09" * 16, 1)]
        shared = []
        for r in plain:
            s = Registry(r.node_id, 1)
            s.adopt(pool.tables(r.node_id, 1))
            s.share = pool.interner
            shared.append(s)
        writers = _writers()
        writers[me] = plain[0]  # replica 0 is also a writer: its own claims
        live: dict[bytes, list[int]] = {o: [] for o in ORIGINS}
        gens = dict.fromkeys(ORIGINS, 1)
        for _ in range(400):
            origin = rng.choice(ORIGINS)
            op = rng.random()
            w = writers[origin]
            if op < 0.45 or not live[origin]:
                kind = RegKind.NAME if rng.random() < 0.6 else RegKind.GROUP
                name = f"n{rng.randrange(4)}"
                entry, delta = w.register(
                    kind, "s", name, claimed_ms=rng.randrange(5), pid=rng.randrange(99), uid=0
                )
                live[origin].append(entry.eid)
            elif op < 0.75:
                eid = live[origin].pop(rng.randrange(len(live[origin])))
                d = w.unregister(eid)
                assert d is not None
                delta = d
            elif op < 0.85:
                res = w.update_meta(rng.choice(live[origin]), (("k", str(rng.random())),))
                assert res is not None
                delta = res[1]
            else:
                delta = None
            if origin == me and delta is not None:  # mirror our own writes on shared[0]
                for c in delta.changes:
                    if c.entry is None:
                        shared[0].unregister(c.eid)
                    elif c.eid in shared[0].local.entries:
                        shared[0].update_meta(c.eid, c.entry.meta)
                    else:
                        e = c.entry
                        shared[0].register(
                            e.kind, e.scope, e.name, claimed_ms=e.claimed_ms, pid=e.pid, uid=0
                        )
            for a, b in zip(plain, shared, strict=True):
                if origin == me and a is plain[0]:
                    continue
                pick = rng.random()
                if pick < 0.6 and delta is not None:
                    assert a.apply_delta(delta) == b.apply_delta(delta)
                elif pick < 0.8:
                    snap = writers[origin].snapshot(origin)
                    assert a.apply_snapshot(snap) == b.apply_snapshot(snap)
                elif pick < 0.9 and origin != me:
                    assert a.node_down(origin, gens[origin]) == b.node_down(origin, gens[origin])
                elif origin != me:
                    assert a.node_up(origin, gens[origin]) == b.node_up(origin, gens[origin])
            if origin != me and rng.random() < 0.03:  # the writer restarts
                gens[origin] += 1
                writers[origin] = Registry(origin, gens[origin])
                live[origin] = []
                for a, b in zip(plain, shared, strict=True):
                    assert a.node_up(origin, gens[origin]) == b.node_up(origin, gens[origin])
            for a, b in zip(plain, shared, strict=True):
                b._parts.flush()  # type: ignore[attr-defined]
                assert _observe(a) == _observe(b)
        assert pool.mismatches == 0
        assert pool.shared > 0


def test_parts_copy_before_change_and_share_after_flush() -> None:
    pool = regshare.Pool()
    w = Registry(ORIGINS[1], 1)
    _, d1 = w.register(RegKind.NAME, "s", "a", claimed_ms=0, pid=1, uid=0)
    reps = []
    for i in range(3):
        r = Registry(bytes([20 + i]) * 16, 1)
        r.adopt(pool.tables(r.node_id, 1))
        r.share = pool.interner
        assert r.apply_delta(d1) is Applied.APPLIED
        r._parts.flush()  # type: ignore[attr-defined]
        reps.append(r)
    canon = pool.parts[ORIGINS[1]]
    assert all(r._parts.peek(ORIGINS[1]) is canon for r in reps)  # one copy
    entry = canon.entries[1]
    assert all(r.lookup("s", "a").entry is entry for r in reps)  # type: ignore[union-attr]
    _, d2 = w.register(RegKind.NAME, "s", "b", claimed_ms=0, pid=2, uid=0)
    reps[0].apply_delta(d2)
    assert canon.version == 1 and list(canon.entries) == [1]  # copied, not changed
    assert reps[1].lookup("s", "b") is None and reps[0].lookup("s", "b") is not None
    reps[0]._parts.flush()  # type: ignore[attr-defined]
    assert pool.parts[ORIGINS[1]] is reps[0]._parts.peek(ORIGINS[1])
    reps[1].node_down(ORIGINS[1], 1)
    assert reps[1].lookup("s", "a") is None and reps[2].lookup("s", "a") is not None


def test_a_simulation_gives_the_same_summary_with_shared_replicas() -> None:
    """Registrations as nodes join, churn, conflicts across a partition that
    heals, crashes and restarts: the same summary with plain tables and with
    shared replicas."""
    sc = scenario(
        "[registry]\nnames_per_node = 2\ngroups = 5\njoins_per_node = 2\n"
        "preload = false\non_start_s = 1\nchurn_per_node_s = 0.05\nchurn_from_s = 3\n"
        "churn_until_s = 30\n"
        '[[fault]]\nat_s = 1\nkind = "join"\nnodes = "all"\nover_s = 4\n'
        '[[fault]]\nat_s = 9\nkind = "crash"\nnodes = 3\n'
        '[[fault]]\nat_s = 12\nkind = "restart"\nnodes = 3\ndown_s = 2\n'
        '[[fault]]\nat_s = 16\nkind = "partition"\ngroups = [0.5, 0.5]\n'
        '[[fault]]\nat_s = 18\nkind = "register"\nnodes = 6\nnames = 3\nprefix = "leader"\n'
        '[[fault]]\nat_s = 24\nkind = "heal"\n',
        nodes=30,
        duration=45,
        extra_top="start_nodes = 4",
    )
    out = []
    pool = None
    for use in (False, True):
        w = World(sc, compact=use)
        summary = summarize(sc, w.run(), 0.0)
        summary.pop("peak_rss_mib")
        out.append(summary)
        pool = w.regpool
    assert pool is not None and pool.mismatches == 0 and pool.shared > 0
    reg = out[0]["registry"]
    assert reg["conflicts"] > 0 and reg["churn"] > 0 and reg["node_down"] > 0
    assert out[0] == out[1]


def test_ground_truth_bits_match_a_set() -> None:
    """The registry workload's holdings (a bit per entry and observer)
    against a set per observer, the representation they replace."""
    from peerd.sim.workloads.registry import TEntry, _bits

    rng = random.Random(3)
    for _ in range(50):
        held = set(rng.sample(range(200), rng.randrange(40)))
        b = bytearray(30)
        for x in held:
            b[x >> 3] |= 1 << (x & 7)
        assert _bits(b) == sorted(held)
    sc = scenario("[registry]\nnames_per_node = 1\npreload = false\n", nodes=4, duration=5)
    w = World(sc)
    reg = w.reg
    assert reg is not None
    for i in range(3):
        reg.observer_on(i, False, 0.0)
    ref: dict[int, set[int]] = {i: set() for i in range(3)}
    for k in range(300):
        reg._add(TEntry(k % 4, 1, k, 10_000 + k, RegKind.NAME, f"x{k}", 0.0))
    for _ in range(3000):
        i, idx, add = rng.randrange(3), rng.randrange(300), rng.random() < 0.6
        reg._hold(i, idx, add, 1.0)
        (ref[i].add if add else ref[i].discard)(idx)
        assert reg._held(i, idx) == add
    for i in range(3):
        assert reg._held_set(i) == sorted(ref[i])
        assert [idx for idx in range(300) if reg._held(i, idx)] == sorted(ref[i])
