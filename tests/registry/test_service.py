"""The registry inside nodes: commands, spread, liveness, conflicts, settled waits.

Driven through real cores wired by tests/core/harness.py (virtual time).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from peerd.core.events import (
    CommandResult,
    ConnClosed,
    Output,
    RegEventKind,
    Register,
    RegistryEvent,
    Unregister,
    UpdateMeta,
)
from peerd.core.registry.service import MAX_DELTA_BYTES
from peerd.wire.messages import RegChange, RegDelta, RegKind, Status
from tests.core.harness import Cluster

NAME, GROUP = RegKind.NAME, RegKind.GROUP


@dataclass
class Rec:
    results: dict[tuple[int, int], CommandResult] = field(default_factory=dict)
    events: list[tuple[float, int, RegistryEvent]] = field(default_factory=list)


def cluster(n: int, seed: int = 1) -> tuple[Cluster, Rec]:
    c = Cluster(n, seed=seed, registry=True)
    rec = Rec()
    apply = c._apply

    def spy(i: int, outs: list[Output]) -> None:
        for o in outs:
            if isinstance(o, CommandResult):
                rec.results[(i, o.ref)] = o
            elif isinstance(o, RegistryEvent):
                rec.events.append((c.now, i, o))
        apply(i, outs)

    c._apply = spy  # type: ignore[method-assign]
    for i in range(n):
        c.start(i)
    c.run_until(5.0)
    assert c.converged()
    return c, rec


_refs = iter(range(1, 10**9))


def reg(
    c: Cluster,
    i: int,
    name: str,
    *,
    conn: int = 1,
    kind: RegKind = NAME,
    claimed_ms: int = 1000,
    settle: float | None = None,
    meta: tuple = (),
) -> int:
    ref = next(_refs)
    c.feed(i, Register(ref, conn, kind, "default", name, meta, 100 + i, 0, claimed_ms, settle))
    return ref


def holders(c: Cluster, name: str) -> dict[int, tuple[bytes, int] | None]:
    out = {}
    for i in range(c.n):
        if i in c.down:
            continue
        w = c.nodes[i].registry.state.lookup("default", name)
        out[i] = None if w is None else (w.origin, w.entry.eid)
    return out


def test_register_is_local_at_once_then_visible_everywhere_within_ms() -> None:
    c, rec = cluster(10)
    t0 = c.now
    ref = reg(c, 3, "db")
    c.run_until(t0)  # the command alone, no network time
    res = rec.results[(3, ref)]
    assert res.error is None and res.value is not None
    assert res.value["name"] == "db" and res.value["pid"] == 103
    assert c.nodes[3].registry.state.lookup("default", "db") is not None
    c.run_until(t0 + 0.05)
    assert all(h is not None for h in holders(c, "db").values())
    seen = [t for t, _i, e in rec.events if e.kind is RegEventKind.REGISTERED]
    assert len(seen) == 10 and max(seen) - t0 < 0.05


def test_taken_names_and_ownership_are_enforced() -> None:
    c, rec = cluster(3)
    r1 = reg(c, 0, "svc", conn=1)
    c.run_until(c.now + 0.1)
    r2 = reg(c, 0, "svc", conn=1)
    r3 = reg(c, 0, "svc", conn=2)
    r4 = reg(c, 1, "svc", conn=9)  # another node already sees it
    ref5 = next(_refs)
    c.feed(0, Unregister(ref5, 2, NAME, "default", "svc"))  # not the owner
    c.run_until(c.now + 0.01)
    assert rec.results[(0, r1)].error is None
    assert rec.results[(0, r2)].error is not None and rec.results[(0, r2)].error[0] == "conflict"
    assert rec.results[(0, r3)].error is not None and rec.results[(0, r3)].error[0] == "conflict"
    assert rec.results[(1, r4)].error is not None and rec.results[(1, r4)].error[0] == "conflict"
    assert rec.results[(0, ref5)].error == (
        "not_found",
        "this connection holds no name default/svc",
    )
    assert all(h is not None for h in holders(c, "svc").values())


@pytest.mark.parametrize(
    ("name", "meta", "why"),
    [
        ("", (), "empty name"),
        ("x" * 256, (), "names are at most 255 bytes"),
        ("ok", (("k", "v" * 600),), "metadata values are at most 512 bytes"),
        ("ok", (("a", "1"), ("a", "2")), "duplicate metadata key"),
    ],
)
def test_bad_arguments_are_refused(name: str, meta: tuple, why: str) -> None:
    c, rec = cluster(2)
    ref = reg(c, 0, name, meta=meta)
    c.run_until(c.now)
    assert rec.results[(0, ref)].error == ("bad_args", why)


def test_closing_the_connection_removes_its_entries_everywhere() -> None:
    c, rec = cluster(8)
    reg(c, 2, "a", conn=7)
    reg(c, 2, "workers", conn=7, kind=GROUP)
    reg(c, 2, "b", conn=8)
    c.run_until(c.now + 0.1)
    c.feed(2, ConnClosed(7))
    c.run_until(c.now + 0.1)
    for i in range(8):
        st = c.nodes[i].registry.state
        assert st.lookup("default", "a") is None
        assert st.group_members("default", "workers") == []
        assert st.lookup("default", "b") is not None


def test_groups_hold_many_members_and_meta_updates_spread() -> None:
    c, rec = cluster(5)
    for i in range(5):
        reg(c, i, "workers", kind=GROUP, conn=1)
    reg(c, 4, "jobs", kind=GROUP, conn=1)
    c.run_until(c.now + 0.1)
    for i in range(5):
        members = c.nodes[i].registry.state.group_members("default", "workers")
        assert sorted(m.entry.pid for m in members) == [100, 101, 102, 103, 104]
    ref = next(_refs)
    c.feed(1, UpdateMeta(ref, 1, GROUP, "default", "workers", (("load", "0.5"),)))
    c.run_until(c.now + 0.1)
    assert rec.results[(1, ref)].error is None
    for i in range(5):
        metas = [
            m.entry.meta
            for m in c.nodes[i].registry.state.group_members("default", "workers")
            if m.entry.pid == 101
        ]
        assert metas == [(("load", "0.5"),)]


def test_a_dead_node_loses_its_entries_everywhere_once_declared_dead() -> None:
    c, rec = cluster(10)
    reg(c, 6, "gone-soon")
    reg(c, 6, "workers", kind=GROUP)
    c.run_until(c.now + 0.1)
    c.crash(6)
    t = c.now
    while not c.all_see(6, Status.DEAD) and t < c.now + 30:
        t += 0.05
        c.run_until(t)
    assert c.all_see(6, Status.DEAD)
    for i in range(10):
        if i != 6:
            assert c.nodes[i].registry.state.entry_count() == 0


def test_restart_discards_the_old_generation_entries() -> None:
    c, rec = cluster(5)
    reg(c, 2, "old", conn=1)
    c.run_until(c.now + 0.1)
    c.crash(2)
    c.run_until(c.now + 0.001)
    c.restart(2, incarnation=c.nodes[2].incarnation + 1, generation=1, seeds=(0,))
    c.run_until(c.now + 3.0)
    for i in range(5):
        assert c.nodes[i].registry.state.lookup("default", "old") is None


def test_partition_claims_resolve_to_the_same_winner_and_the_loser_is_told() -> None:
    c, rec = cluster(10, seed=4)
    left, right = list(range(5)), list(range(5, 10))
    c.cut = set(right)
    c.run_until(c.now + 40)  # each side declares the other dead
    assert c.all_see(9, Status.DEAD, among=left)
    r_old = reg(c, 1, "leader", conn=3, claimed_ms=500)  # the older claim
    r_new = reg(c, 8, "leader", conn=4, claimed_ms=900)
    c.run_until(c.now + 1)
    assert rec.results[(1, r_old)].error is None and rec.results[(8, r_new)].error is None
    assert holders(c, "leader")[9] == (c.nodes[8].node_id, 1)
    c.cut = set()
    t = c.now
    while t < c.now + 40 and not c.converged():
        t += 0.5
        c.run_until(t)
    c.run_until(c.now + 5)
    assert c.converged()
    winners = set(holders(c, "leader").values())
    assert winners == {(c.nodes[1].node_id, 1)}
    conflicts = [e for _t, i, e in rec.events if e.kind is RegEventKind.CONFLICT]
    assert len(conflicts) == 1
    (ev,) = conflicts
    assert ev.conn == 4 and ev.origin == c.nodes[8].node_id
    assert ev.winner is not None and ev.winner[0] == c.nodes[1].node_id
    # the loser's entry is gone: no duplicate outlives the merge
    for i in range(10):
        assert len(c.nodes[i].registry.state.claims("default", "leader")) == 1


def test_wait_settled_answers_once_every_member_holds_it() -> None:
    c, rec = cluster(10)
    t0 = c.now
    ref = reg(c, 0, "settled", settle=2.0)
    c.run_until(t0)
    assert (0, ref) not in rec.results  # not yet: nobody acknowledged
    c.run_until(t0 + 0.1)
    res = rec.results[(0, ref)]
    assert res.value is not None and res.value["settled"] is True and res.value["won"] is True


def test_wait_settled_times_out_when_a_member_cannot_answer() -> None:
    c, rec = cluster(6)
    c.down.add(5)  # silent: not yet declared dead
    t0 = c.now
    ref = reg(c, 0, "slow", settle=0.3)
    c.run_until(t0 + 0.2)
    assert (0, ref) not in rec.results
    c.run_until(t0 + 0.35)
    res = rec.results[(0, ref)]
    assert res.value is not None and res.value["settled"] is False and res.value["won"] is True


def test_a_burst_of_writes_converges_everywhere() -> None:
    c, rec = cluster(6)
    for k in range(400):
        reg(c, k % 3, f"n{k}", conn=k)
    c.run_until(c.now + 0.01)
    c.feed(0, ConnClosed(0))
    c.run_until(c.now + 3.0)
    states = [
        {o: v for o, v in c.nodes[i].registry.state.state().items() if v[1] > 0} for i in range(6)
    ]
    assert len(states[0]) == 3 and all(s == states[0] for s in states)
    assert sum(1 for _ in c.nodes[5].registry.state.names()) == 399
    # big merged deltas were announced, not crammed into datagrams
    assert MAX_DELTA_BYTES < 1400


def test_partitions_of_unknown_origins_are_not_kept() -> None:
    from peerd.core.events import PacketIn
    from peerd.wire import codec
    from peerd.wire.messages import RegEntry, RegSnapshot

    c, rec = cluster(3)
    stranger = b"\xee" * 16
    entry = RegEntry(1, NAME, "default", "ghost", 1, 1, 0, ())
    snap = RegSnapshot(stranger, 1, 1, (entry,))
    outs = c.nodes[0].handle(c.now, PacketIn(c.addr_of[1], codec.pack([codec.encode(snap)])))
    assert [o for o in outs if isinstance(o, RegistryEvent)] == []
    assert stranger not in c.nodes[0].registry.state.digest()
    assert c.nodes[0].registry.state.lookup("default", "ghost") is None


def test_news_of_a_dead_origin_is_a_counted_drop() -> None:
    c, rec = cluster(5)
    reg(c, 3, "soon-gone")
    c.run_until(c.now + 0.1)
    c.crash(3)
    t = c.now
    while not c.all_see(3, Status.DEAD) and t < c.now + 30:
        t += 0.05
        c.run_until(t)
    service = c.nodes[0].registry
    origin = c.nodes[3].node_id
    before = service.counters["drop.origin_not_live"]
    late = RegDelta(origin, 0, 1, 2, (RegChange(2, 9, None),))
    service.on_message(None, late)  # a late delta (a datagram, the mesh)
    service._apply_items((late,))  # and in a sync reply
    assert service.counters["drop.origin_not_live"] == before + 2
    assert service.state.version_of(origin) == (0, 0)  # nothing applied
