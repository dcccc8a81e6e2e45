"""BroadcastQueue: ordering, invalidation, retransmit limit, byte budget."""

from __future__ import annotations

from peerd.core.broadcast import BroadcastQueue

BIG = 10_000


def q_with(*items: tuple[str, bytes]) -> BroadcastQueue:
    q = BroadcastQueue()
    for key, data in items:
        q.enqueue(key, data)
    return q


def test_newest_first() -> None:
    q = q_with(("a", b"A"), ("b", b"B"), ("c", b"C"))
    assert q.take(BIG, limit=10) == [b"C", b"B", b"A"]


def test_fewest_sent_before_newest() -> None:
    q = q_with(("a", b"A"), ("b", b"B"))
    assert q.take(BIG, limit=10) == [b"B", b"A"]
    q.enqueue("c", b"C")
    q.enqueue("d", b"D")
    # c and d were never sent: they go first, newest first, then the rest.
    assert q.take(BIG, limit=10) == [b"D", b"C", b"B", b"A"]
    assert len(q) == 4


def test_enqueue_same_key_replaces() -> None:
    q = q_with(("a", b"old"), ("b", b"B"))
    q.enqueue("a", b"new")
    assert len(q) == 2
    assert q.take(BIG, limit=10) == [b"new", b"B"]


def test_replacement_resets_transmit_count() -> None:
    q = q_with(("a", b"A1"), ("b", b"B"))
    assert q.take(BIG, limit=2) == [b"B", b"A1"]
    q.enqueue("a", b"A2")
    assert q.take(BIG, limit=2) == [b"A2", b"B"]  # b reaches its limit here
    assert q.take(BIG, limit=2) == [b"A2"]
    assert q.take(BIG, limit=2) == []
    assert len(q) == 0


def test_invalidate() -> None:
    q = q_with(("a", b"A"), ("b", b"B"))
    q.invalidate("a")
    q.invalidate("missing")
    assert len(q) == 1
    assert q.take(BIG, limit=10) == [b"B"]


def test_retransmit_limit() -> None:
    q = q_with(("a", b"A"))
    assert q.take(BIG, limit=3) == [b"A"]
    assert q.take(BIG, limit=3) == [b"A"]
    assert len(q) == 1
    assert q.take(BIG, limit=3) == [b"A"]
    assert len(q) == 0
    assert q.take(BIG, limit=3) == []


def test_byte_budget_stops_when_nearly_full() -> None:
    q = q_with(("a", b"a" * 10), ("b", b"b" * 20), ("c", b"c" * 30))
    # c (30) fits, 15 left: b does not, and under 16 bytes left is not worth a scan.
    assert q.take(45, limit=10) == [b"c" * 30]
    # Not-taken items keep their count: a and b (0 sends) now go before c (1 send).
    assert q.take(25, limit=10) == [b"b" * 20]
    assert q.take(BIG, limit=10) == [b"a" * 10, b"c" * 30, b"b" * 20]


def test_byte_budget_skips_an_item_too_big_for_the_room_left() -> None:
    q = q_with(("small", b"s" * 10), ("big", b"B" * 50))
    assert q.take(40, limit=10) == [b"s" * 10]
    assert q.take(BIG, limit=10) == [b"B" * 50, b"s" * 10]


def test_overhead_per_item_counts_against_budget() -> None:
    q = q_with(("a", b"a" * 10), ("b", b"b" * 10))
    assert q.take(24, limit=10, overhead_per_item=2) == [b"b" * 10, b"a" * 10]
    q2 = q_with(("a", b"a" * 10), ("b", b"b" * 10))
    assert q2.take(23, limit=10, overhead_per_item=2) == [b"b" * 10]


def test_no_budget_or_empty() -> None:
    assert BroadcastQueue().take(BIG, limit=3) == []
    q = q_with(("a", b"A"))
    assert q.take(0, limit=3) == []
    assert q.take(-5, limit=3) == []
    assert q.take(BIG, limit=3) == [b"A"]  # nothing was counted above


def test_prune_drops_most_sent_oldest() -> None:
    q = q_with(("a", b"A"), ("b", b"B"))
    q.take(BIG, limit=10)  # a and b sent once
    q.enqueue("c", b"C")
    q.prune(2)
    assert len(q) == 2
    # a is the most sent and the oldest: it goes first.
    assert q.take(BIG, limit=10) == [b"C", b"B"]
    q.prune(0)
    assert len(q) == 0


# --- counter-style rumour mongering and items already in the packet -----------


def test_heard_again_counts_a_transmission() -> None:
    q = BroadcastQueue()
    q.enqueue("a", b"A", ident=("dead", 0))
    q.enqueue("b", b"B")
    assert q.heard("a", ("dead", 0), limit=3)
    # a now ranks as sent once: b (never sent) goes first.
    assert q.take(BIG, limit=3) == [b"B", b"A"]
    assert q.heard("a", ("dead", 0), limit=3)  # a's third transmission: dropped
    assert not q.has("a")
    assert q.take(BIG, limit=3) == [b"B"]


def test_heard_again_needs_the_same_update() -> None:
    q = BroadcastQueue()
    q.enqueue("a", b"A", ident=("dead", 1))
    q.enqueue("b", b"B")  # no ident: never counted down
    assert not q.heard("a", ("dead", 0), limit=1)
    assert not q.heard("b", None, limit=1)
    assert not q.heard("missing", ("dead", 1), limit=1)
    assert len(q) == 2
    q.enqueue("a", b"A2")  # replaced by an update without an ident
    assert not q.heard("a", ("dead", 1), limit=1)
    assert q.take(BIG, limit=10) == [b"A2", b"B"]


def test_skipped_items_count_as_sent_without_being_returned() -> None:
    q = q_with(("a", b"A"), ("b", b"B"))
    # The caller put A in the packet already (ahead of the piggyback).
    assert q.take(BIG, limit=2, skip=frozenset({b"A"})) == [b"B"]
    assert q.take(BIG, limit=2) == [b"B", b"A"]
    assert len(q) == 0
