"""Property and unit tests of the registry CRDT (peerd/core/registry/state.py)."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from peerd.core.registry.state import (
    Applied,
    Claim,
    Delta,
    Entry,
    Kind,
    Registry,
    Snapshot,
    winner,
)

ORIGINS = [bytes([i]) * 16 for i in range(1, 5)]
NAMES = ["a", "b", "c"]


def origin_ops(rng: random.Random, reg: Registry, steps: int) -> list[Delta]:
    """Random local writes on one origin; returns the deltas it would broadcast."""
    deltas: list[Delta] = []
    for _ in range(steps):
        live = list(reg.local.entries)
        op = rng.random()
        if op < 0.5 or not live:
            kind = Kind.NAME if rng.random() < 0.6 else Kind.GROUP
            _, d = reg.register(
                kind,
                "default",
                rng.choice(NAMES),
                claimed_ms=rng.randrange(5),
                pid=rng.randrange(1, 99),
                uid=0,
            )
        elif op < 0.8:
            d = reg.unregister(rng.choice(live))  # type: ignore[assignment]
        else:
            r = reg.update_meta(rng.choice(live), (("k", str(rng.random())),))
            assert r is not None
            d = r[1]
        assert d is not None
        deltas.append(d)
    return deltas


def anti_entropy(replica: Registry, origins: dict[bytes, Registry]) -> None:
    """Pull every origin's partition into ``replica`` the way push-pull does."""
    digest = replica.digest()
    for o, src in origins.items():
        if o == replica.node_id:
            continue
        _gen, version = digest.get(o, (src.generation, 0))
        if digest.get(o, (None,))[0] != src.generation:
            version = 0
        got = src.delta_since(version)
        if isinstance(got, Snapshot):
            replica.apply_snapshot(got)
        elif replica.apply_delta(got) is Applied.GAP:
            replica.apply_snapshot(src.snapshot(o))


def local_state(reg: Registry) -> tuple[int, int, frozenset[Entry]]:
    return reg.state()[reg.node_id]


@settings(max_examples=150, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    steps=st.integers(1, 25),
    loss=st.floats(0, 0.6),
    dup=st.floats(0, 0.5),
)
def test_any_order_duplication_and_loss_then_anti_entropy_converges(
    seed: int, steps: int, loss: float, dup: float
) -> None:
    rng = random.Random(seed)
    origins = {o: Registry(o, 1, log_size=8) for o in ORIGINS}
    traffic: list[Delta] = []
    for reg in origins.values():
        traffic += origin_ops(rng, reg, steps)
    replicas = [Registry(bytes([100 + i]) * 16, 1) for i in range(3)]
    for rep in replicas:
        stream = [d for d in traffic if rng.random() >= loss]
        stream += [d for d in stream if rng.random() < dup]
        rng.shuffle(stream)
        for d in stream:
            rep.apply_delta(d)
        anti_entropy(rep, origins)
    want = {o: local_state(r) for o, r in origins.items()}
    for rep in replicas:
        got = {o: v for o, v in rep.state().items() if o != rep.node_id}
        assert got == want
    # the conflict winner is the same on every replica and on every origin
    for reg in origins.values():
        anti_entropy(reg, origins)
    for name in NAMES:
        picks = {
            (w.origin, w.entry.eid) if (w := r.lookup("default", name)) else None
            for r in [*replicas, *origins.values()]
        }
        assert len(picks) == 1


def snapshots_of(rng: random.Random, steps: int) -> list[Snapshot]:
    """Snapshots of several origins at several points of their history."""
    out: list[Snapshot] = []
    for o in ORIGINS[:3]:
        reg = Registry(o, 1)
        for _ in range(3):
            origin_ops(rng, reg, steps)
            out.append(reg.snapshot(o))
    return out


def merged(snaps: list[Snapshot]) -> dict[bytes, tuple[int, int, frozenset[Entry]]]:
    r = Registry(b"\xff" * 16, 1)
    for s in snaps:
        r.apply_snapshot(s)
    return {o: v for o, v in r.state().items() if o != r.node_id}


@settings(max_examples=100, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), steps=st.integers(1, 6))
def test_merge_is_commutative_associative_idempotent(seed: int, steps: int) -> None:
    rng = random.Random(seed)
    snaps = snapshots_of(rng, steps)
    a, b, c = snaps[0::3], snaps[1::3], snaps[2::3]
    assert merged(a + b) == merged(b + a)
    assert merged((a + b) + c) == merged(a + (b + c))
    assert merged(a + a) == merged(a)
    shuffled = list(snaps)
    rng.shuffle(shuffled)
    assert merged(shuffled) == merged(snaps)


@settings(max_examples=100, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_no_resurrection_by_late_deltas_or_snapshots(seed: int) -> None:
    rng = random.Random(seed)
    origin = Registry(ORIGINS[0], 1)
    entry, d1 = origin.register(Kind.NAME, "default", "svc", claimed_ms=1, pid=5, uid=0)
    early_snap = origin.snapshot(ORIGINS[0])
    d2 = origin.unregister(entry.eid)
    assert d2 is not None
    replica = Registry(ORIGINS[1], 1)
    late = [d1, early_snap]
    rng.shuffle(late)
    replica.apply_delta(d2) if rng.random() < 0.5 else None
    replica.apply_delta(d1)
    replica.apply_delta(d2)
    for item in late:
        if isinstance(item, Snapshot):
            replica.apply_snapshot(item)
        else:
            replica.apply_delta(item)
    assert replica.lookup("default", "svc") is None


def test_winner_is_the_oldest_claim_then_origin_then_eid() -> None:
    e = Entry(1, Kind.NAME, "s", "n", 10, 1, 0, ())
    late = Claim(ORIGINS[0], Entry(1, Kind.NAME, "s", "n", 20, 1, 0, ()))
    tie_low = Claim(ORIGINS[0], Entry(2, Kind.NAME, "s", "n", 10, 1, 0, ()))
    tie_high = Claim(ORIGINS[1], e)
    assert winner([late, tie_high, tie_low]) == tie_low
    assert winner([late, tie_high]) == tie_high
    assert winner([]) is None


def test_partition_conflict_resolves_the_same_everywhere_and_tells_the_loser() -> None:
    a, b = Registry(ORIGINS[0], 1), Registry(ORIGINS[1], 1)
    _, da = a.register(Kind.NAME, "default", "leader", claimed_ms=100, pid=1, uid=0)
    eb, db = b.register(Kind.NAME, "default", "leader", claimed_ms=200, pid=2, uid=0)
    # each side sees only its own claim during the partition
    assert a.lookup("default", "leader").origin == ORIGINS[0]  # type: ignore[union-attr]
    assert b.lookup("default", "leader").origin == ORIGINS[1]  # type: ignore[union-attr]
    # heal
    a.apply_delta(db)
    b.apply_delta(da)
    assert a.lookup("default", "leader") == b.lookup("default", "leader")
    assert a.lookup("default", "leader").origin == ORIGINS[0]  # type: ignore[union-attr]
    (conflict,) = b.conflicts_for_local("default", "leader")
    assert conflict.loser == eb and conflict.winner.origin == ORIGINS[0]
    assert a.conflicts_for_local("default", "leader") == []


def test_dead_node_entries_vanish_and_late_deltas_of_that_life_are_ignored() -> None:
    origin = Registry(ORIGINS[0], 1)
    _, d1 = origin.register(Kind.GROUP, "default", "workers", claimed_ms=1, pid=9, uid=0)
    _, d2 = origin.register(Kind.NAME, "default", "db", claimed_ms=1, pid=9, uid=0)
    replica = Registry(ORIGINS[1], 1)
    assert replica.apply_delta(d1) is Applied.APPLIED
    removed = replica.node_down(ORIGINS[0], 1)
    assert [c.entry.name for c in removed] == ["workers"]
    assert replica.apply_delta(d2) is Applied.STALE
    assert replica.apply_snapshot(origin.snapshot(ORIGINS[0])) is Applied.STALE
    assert replica.entry_count() == 0
    # the node refutes its death (same generation): its state may come back
    replica.node_up(ORIGINS[0], 1)
    assert replica.apply_snapshot(origin.snapshot(ORIGINS[0])) is Applied.APPLIED
    assert replica.lookup("default", "db") is not None
    # a restart (new generation) discards the old life's entries at once
    removed = replica.node_up(ORIGINS[0], 2)
    assert {c.entry.name for c in removed} == {"workers", "db"}
    assert replica.entry_count() == 0
    assert replica.apply_delta(d2) is Applied.STALE


def test_out_of_order_deltas_are_buffered_then_applied() -> None:
    origin = Registry(ORIGINS[0], 1)
    deltas = [
        origin.register(Kind.GROUP, "s", f"g{i}", claimed_ms=i, pid=1, uid=0)[1] for i in range(4)
    ]
    replica = Registry(ORIGINS[1], 1)
    assert replica.apply_delta(deltas[2]) is Applied.BUFFERED
    assert replica.apply_delta(deltas[1]) is Applied.BUFFERED
    assert replica.apply_delta(deltas[0]) is Applied.APPLIED
    assert replica.digest()[ORIGINS[0]] == (1, 3)
    assert replica.apply_delta(deltas[3]) is Applied.APPLIED
    assert local_state(origin) == replica.state()[ORIGINS[0]]


def test_change_log_is_bounded_and_falls_back_to_a_snapshot() -> None:
    origin = Registry(ORIGINS[0], 1, log_size=4)
    for i in range(50):
        e, _ = origin.register(Kind.GROUP, "s", "g", claimed_ms=i, pid=1, uid=0)
        origin.unregister(e.eid)
    assert len(origin._log) == 4
    assert isinstance(origin.delta_since(0), Snapshot)
    recent = origin.delta_since(origin.local.version - 2)
    assert isinstance(recent, Delta) and len(recent.changes) == 2
    # churn leaves nothing behind per registration attempt
    assert origin.entry_count() == 0 and origin.local.entries == {}
