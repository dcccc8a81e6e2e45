"""Digest anti-entropy (sync-digest / sync-rows) for large memberships."""

from __future__ import annotations

import random

import pytest

from peerd.core import config, digest
from peerd.core.events import (
    OpenStream,
    Output,
    SetTimer,
    Start,
    StreamReply,
    StreamRequest,
    StreamResponse,
    TimerFired,
    TimerKind,
)
from peerd.core.swim.base import DIGEST_SYNC_MIN_MEMBERS
from peerd.core.swim.membership import Node
from peerd.sim.store import Snapshot
from peerd.wire import codec
from peerd.wire.messages import (
    Dead,
    MemberState,
    PushPull,
    Status,
    SyncDigest,
    SyncRows,
)

N = 300


def nid(i: int) -> bytes:
    return random.Random(i).randbytes(16)


def addr(i: int) -> tuple[str, int]:
    return (f"10.0.{i // 250}.{i % 250 + 1}", 7946)


def state(i: int, inc: int = 0, status: Status = Status.ALIVE) -> MemberState:
    return MemberState(nid(i), f"n{i}", addr(i), inc, 1, (), status)


def make(i: int, n: int = N, shared: bool = False) -> tuple[Node, list[Output]]:
    states = [state(j) for j in range(n)]
    node = Node(
        node_id=nid(i),
        name=f"n{i}",
        addr=addr(i),
        config=config.lan(),
        rng=random.Random(i),
        generation=1,
        store=Snapshot(states).tables if shared else None,
    )
    if not shared:
        node.preload(states)
    return node, node.handle(0.0, Start(()))


def fire(node: Node, outs: list[Output], kind: TimerKind) -> tuple[float, list[Output]]:
    (t,) = [o for o in outs if isinstance(o, SetTimer) and o.timer.kind is kind]
    return t.at, node.handle(t.at, TimerFired(t.timer))


def scratch(node: Node, bits: int) -> bytes:
    d = digest.Digest()
    for m in node.members():
        d.toggle(m.node, m.incarnation, m.status)
    return d.hashes(bits)


def test_bucket_hash_is_an_order_free_xor() -> None:
    a, b = digest.Digest(), digest.Digest()
    for i in range(50):
        a.toggle(nid(i), i, 0)
    for i in reversed(range(50)):
        b.toggle(nid(i), i, 0)
    assert a.hashes(6) == b.hashes(6)
    a.toggle(nid(7), 7, 0)  # out again
    assert a.differing(6, b.hashes(6)) == [digest.bucket_of(nid(7), 6)]
    assert a.hashes(0) != b.hashes(0) and len(a.hashes(3)) == 4 * 8


@pytest.mark.parametrize(
    ("members", "bits"), [(1, 0), (16, 0), (17, 1), (300, 5), (1000, 6), (10_000, 10), (10**6, 12)]
)
def test_about_sixteen_members_per_bucket(members: int, bits: int) -> None:
    assert digest.bits_for(members) == bits


def test_folding_matches_hashing_at_fewer_bits() -> None:
    d = digest.Digest()
    for i in range(200):
        d.toggle(nid(i), 3, 1)
    for bits in (0, 4, 9):
        direct = [0] * (1 << bits)
        for i in range(200):
            direct[digest.bucket_of(nid(i), bits)] ^= digest.member_hash(nid(i), 3, 1)
        assert d.hashes(bits) == b"".join(v.to_bytes(4, "big") for v in direct)


@pytest.mark.parametrize("shared", [False, True])
def test_large_membership_syncs_by_digest_and_keeps_it_current(shared: bool) -> None:
    node, outs = make(1, shared=shared)
    # Changes of every kind: suspicion, death, refutation, a newcomer, a leave.
    node.handle(1.0, _packet(Dead(nid(5), 0, nid(9))))
    node.handle(1.1, _packet(Dead(nid(6), 0, nid(9))))
    from peerd.wire.messages import Alive, Left, Suspect

    node.handle(1.2, _packet(Alive(nid(6), "n6", addr(6), 1, 1, ())))
    node.handle(1.3, _packet(Suspect(nid(7), 0, nid(9))))
    node.handle(1.4, _packet(Alive(nid(N + 1), "new", addr(N + 1), 0, 1, ())))
    node.handle(1.5, _packet(Left(nid(8), 1)))
    at, outs = fire(node, outs, TimerKind.PUSH_PULL)
    (o,) = [x for x in outs if isinstance(x, OpenStream)]
    msg = codec.decode(o.data)
    bits = digest.bits_for(N + 1)
    assert msg == SyncDigest(bits, scratch(node, bits))
    assert len(o.data) < 4 * (1 << bits) + 8  # not the O(N) state
    assert node.counters["digest_sync_out"] == 1


def _packet(*msgs: object) -> object:
    from peerd.core.events import PacketIn

    return PacketIn(addr(9), codec.pack([codec.encode(m) for m in msgs]))  # type: ignore[arg-type]


def test_small_membership_still_pushes_and_pulls_the_full_state() -> None:
    node, outs = make(1, n=DIGEST_SYNC_MIN_MEMBERS - 2)
    _at, outs = fire(node, outs, TimerKind.PUSH_PULL)
    (o,) = [x for x in outs if isinstance(x, OpenStream)]
    assert isinstance(codec.decode(o.data), PushPull)


def _exchange(a: Node, b: Node, outs: list[Output], now: float) -> int:
    """Carry a's stream requests to b and b's replies back until done; bytes moved."""
    moved = 0
    pending = [o for o in outs if isinstance(o, OpenStream)]
    while pending:
        o = pending.pop(0)
        moved += len(o.data)
        (rep,) = [
            x
            for x in b.handle(now, StreamRequest(77, addr(1), o.data))
            if isinstance(x, StreamReply)
        ]
        assert rep.data is not None
        moved += len(rep.data)
        back = a.handle(now, StreamResponse(o.stream, rep.data))
        pending += [
            x
            for x in back
            if isinstance(x, OpenStream) and isinstance(codec.decode(x.data), SyncRows)
        ]
    return moved


def test_equal_views_exchange_only_the_digest() -> None:
    a, outs = make(1)
    b, _ = make(2)
    at, outs = fire(a, outs, TimerKind.PUSH_PULL)
    moved = _exchange(a, b, [x for x in outs if isinstance(x, OpenStream)], at)
    full = len(codec.encode(PushPull(False, tuple(state(j) for j in range(N)))))
    assert moved < full / 10
    assert b.counters["digest_sync_in"] == 1 and b.counters["digest_sync_rows_in"] == 0


def test_a_difference_moves_only_its_bucket_both_ways() -> None:
    a, outs = make(1)
    b, _ = make(2)
    b.handle(0.5, _packet(Dead(nid(40), 0, nid(9))))  # only b knows
    from peerd.wire.messages import Alive

    a.handle(0.5, _packet(Alive(nid(N + 5), "late", addr(N + 5), 0, 1, ())))  # only a knows
    at, outs = fire(a, outs, TimerKind.PUSH_PULL)
    _exchange(a, b, [x for x in outs if isinstance(x, OpenStream)], at)
    # b's dead is a suspicion for a (as with push-pull); a's newcomer reached b.
    got_a = a.member(nid(40))
    got_b = b.member(nid(N + 5))
    assert got_a is not None and got_a.status is Status.SUSPECT
    assert got_b is not None and got_b.status is Status.ALIVE
    assert a.counters["digest_sync_rows_out"] == 1


def test_a_healed_partition_learns_the_refutation_in_one_exchange() -> None:
    a, outs = make(1)
    b, _ = make(2)
    a.handle(0.5, _packet(Dead(nid(2), 0, nid(9))))  # a holds b dead
    at, outs = fire(a, outs, TimerKind.PUSH_PULL)
    opens = [x for x in outs if isinstance(x, OpenStream)]
    if not opens:  # the push-pull pick was not b: reconnect retries the dead
        at, outs = fire(a, outs, TimerKind.RECONNECT)
        opens = [x for x in outs if isinstance(x, OpenStream)]
    _exchange(a, b, opens, at)
    seen = a.member(nid(2))
    assert b.incarnation == 1  # b refuted what a pushed
    assert seen is not None and seen.status is Status.ALIVE and seen.incarnation == 1
