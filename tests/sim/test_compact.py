"""The compact members tables (peerd.sim.compact) behave exactly like the
plain dicts, lists and live set a daemon uses: same answers, same iteration
order, same random draws, so a simulation gives the same summary with them."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from peerd.core.swim.members import LiveSet, Member, Suspicion
from peerd.sim import compact
from peerd.sim.report import summarize
from peerd.sim.world import World
from peerd.wire.messages import Status

from .helpers import scenario

K = 12
IDS = [bytes([i]) * 16 for i in range(K)]


def member(i: int, inc: int, status: Status, at: float) -> Member:
    return Member(
        IDS[i], f"n{i}", ("198.18.0.1", 7000 + i), inc, 1, (("k", str(i % 2)),), status, at
    )


def content(m: Member) -> tuple[object, ...]:
    return (m.node, m.name, m.addr, m.incarnation, m.generation, m.tags, m.status, m.changed_at)


# (op, key, incarnation, status): 0 set, 1 get and change, 2 delete, 3 flush,
# 4 suspect (stays hot), 5 clear the suspicion
member_ops = st.lists(
    st.tuples(
        st.integers(0, 5), st.integers(0, K - 1), st.integers(0, 3), st.sampled_from(list(Status))
    ),
    max_size=120,
)


@settings(max_examples=300, deadline=None)
@given(ops=member_ops)
def test_members_table_matches_a_dict(ops: list[tuple[int, int, int, Status]]) -> None:
    records = compact.Records()
    table = compact.CompactMembers(records)
    other = compact.CompactMembers(records)  # a second node shares the records
    plain: dict[bytes, Member] = {}
    for step, (op, i, inc, status) in enumerate(ops):
        node, at = IDS[i], float(step)
        if op == 0:
            table[node] = member(i, inc, status, at)
            plain[node] = member(i, inc, status, at)
            other[node] = member(i, 0, Status.ALIVE, 0.0)
        elif op == 1 and node in plain:
            for m in (table.get(node), plain[node]):
                m.incarnation, m.status, m.changed_at = inc, status, at
        elif op == 2 and node in plain:
            del plain[node]
            del table[node]
        elif op == 3:
            table.flush()
            other.flush()
        elif op == 4 and node in plain:
            for m in (table[node], plain[node]):
                m.suspicion = Suspicion(inc, node, at, 1.0, 2.0, 3, set(), 1, at + 2)
        elif op == 5 and node in plain:
            table[node].suspicion = plain[node].suspicion = None
        assert len(table) == len(plain)
        assert list(table) == list(plain)
        assert [content(m) for m in table.values()] == [content(m) for m in plain.values()]
        for j in range(K):
            assert (IDS[j] in table) == (IDS[j] in plain)
            p = table.peek(IDS[j])
            assert (p is None) == (IDS[j] not in plain)
            if p is not None:
                assert content(p) == content(plain[IDS[j]])
                assert (p.suspicion is None) == (plain[IDS[j]].suspicion is None)
    # the other node's view was never touched by this one's changes
    for m in other.values():
        assert (m.incarnation, m.status) == (0, Status.ALIVE)


index_ops = st.lists(
    st.tuples(st.integers(0, 3), st.integers(0, 5), st.integers(0, 3)), max_size=80
)


@settings(max_examples=300, deadline=None)
@given(ops=index_ops)
def test_index_matches_a_dict(ops: list[tuple[int, int, int]]) -> None:
    keys = compact.Keys()
    index, other = compact.CompactIndex(keys), compact.CompactIndex(keys)
    plain: dict[str, int] = {}
    for op, k, v in ops:
        key = f"k{k}"
        if op == 0:
            index[key] = plain[key] = v
            other[key] = 7 - v
        elif op == 1:
            assert index.setdefault(key, v) == plain.setdefault(key, v)
        elif op == 2 and key in plain:
            del index[key]
            del plain[key]
        elif op == 3:
            assert index.pop(key, None) == plain.pop(key, None)
        for j in range(6):
            kj = f"k{j}"
            assert index.get(kj) == plain.get(kj)
            assert (kj in index) == (kj in plain)


@settings(max_examples=200, deadline=None)
@given(ops=st.lists(st.tuples(st.booleans(), st.integers(0, K - 1)), max_size=80))
def test_live_set_matches_the_plain_one_draw_for_draw(ops: list[tuple[bool, int]]) -> None:
    records = compact.Records()
    live, plain = compact.CompactLiveSet(records), LiveSet()
    for step, (up, i) in enumerate(ops):
        if up:
            live.add(IDS[i])
            plain.add(IDS[i])
        else:
            live.discard(IDS[i])
            plain.discard(IDS[i])
        assert len(live) == len(plain) and list(live) == list(plain)
        for k in (1, 3, 8):
            exclude = (IDS[0], IDS[step % K])
            a, b = random.Random(step), random.Random(step)
            assert live.sample(a, k, exclude) == plain.sample(b, k, exclude)


def test_a_simulation_gives_the_same_summary_with_compact_tables() -> None:
    """Joins, crashes, restarts, a partition that heals and loss: every
    table operation the core makes, on nodes that joined (the compact ones)."""
    sc = scenario(
        '[[fault]]\nat_s = 1\nkind = "join"\nnodes = "all"\nover_s = 4\n'
        '[[fault]]\nat_s = 9\nkind = "crash"\nnodes = 3\n'
        '[[fault]]\nat_s = 12\nkind = "restart"\nnodes = 3\ndown_s = 2\n'
        '[[fault]]\nat_s = 16\nkind = "partition"\ngroups = [0.5, 0.5]\n'
        '[[fault]]\nat_s = 24\nkind = "heal"\n'
        '[[fault]]\nat_s = 5\nkind = "loss"\nloss = 0.05\nduration_s = 30\n',
        nodes=30,
        duration=40,
        extra_top="start_nodes = 4",
    )
    out = []
    for use in (False, True):
        w = World(sc, compact=use)
        summary = summarize(sc, w.run(), 0.0)
        summary.pop("peak_rss_mib")
        out.append(summary)
    assert out[0]["core"]["joins"] > 30 * 25  # they all joined and learnt each other
    assert out[0] == out[1]
