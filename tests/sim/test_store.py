"""The simulator's shared membership tables (peerd.sim.store) behave like
the plain structures the node uses in a daemon."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st
from sortedcontainers import SortedList

from peerd.core.swim.members import LiveSet
from peerd.sim import store as shared
from peerd.wire.messages import MemberState, Status

N = 40


def ids(n: int) -> list[bytes]:
    return [random.Random(i).randbytes(16) for i in range(n)]


def snapshot(nodes: list[bytes]) -> shared.Snapshot:
    return shared.Snapshot(
        [
            MemberState(x, f"n{i}", ("10.0.0.1", 1000 + i), 0, 1, (), Status.ALIVE)
            for i, x in enumerate(nodes)
        ]
    )


ops = st.lists(st.tuples(st.booleans(), st.integers(0, N + 9)), max_size=80)


@settings(max_examples=200, deadline=None)
@given(ops=ops, me_in_base=st.booleans())
def test_ring_and_live_set_match_the_plain_structures(
    ops: list[tuple[bool, int]], me_in_base: bool
) -> None:
    every = ids(N + 10)  # the last 10 are not in the snapshot
    me = every[0] if me_in_base else every[N]
    snap = snapshot(every[:N])
    ring, live = shared.Ring(snap, me), shared.LiveSet(snap, me)
    plain_ring = SortedList(set(every[:N]) | {me})
    plain_live = LiveSet()
    for x in every[:N]:
        if x != me:
            plain_live.add(x)
    for up, k in ops:
        x = every[k]
        if x == me:
            continue
        if up and x not in plain_live:
            plain_live.add(x)
            live.add(x)
            plain_ring.add(x)
            ring.add(x)
        elif not up and x in plain_live:
            plain_live.discard(x)
            live.discard(x)
            plain_ring.remove(x)
            ring.remove(x)
        assert len(ring) == len(plain_ring)
        assert len(live) == len(plain_live)
        assert sorted(live) == sorted(plain_live)
        i = ring.index(me)
        assert i == plain_ring.index(me)
        n = len(plain_ring)
        for step in range(1, min(n, 4)):
            assert ring[(i + step) % n] == plain_ring[(i + step) % n]
