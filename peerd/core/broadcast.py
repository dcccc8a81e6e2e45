"""Transmit-limited broadcast queue (SWIM 2002, section 4.1 "infection-style
dissemination").

Updates ride piggybacked on probe traffic and on periodic gossip packets. Each
update is sent a bounded number of times (the retransmit limit, which grows
with log N so that an update still reaches everyone w.h.p. as the cluster
grows). Fresh updates go first: the queue is ordered by how often an item has
been sent, then newest first. A new update under the same key (for example a
newer state of the same node) replaces the older one, so stale news never
competes with current news for space in a packet.

Counter-style rumour mongering (Demers et al. 1987, "counter" variant): an
update enqueued with an ``ident`` that then reaches us again from a peer,
unchanged, counts as one transmission of our copy (:meth:`heard`). A rumour
that keeps coming back is known widely, so we stop spending datagram space
on it sooner; a rumour that never comes back still gets the full limit.

The queue stores already-encoded messages so that filling a datagram is a walk
over byte strings, with no re-encoding on the hot path.
"""

from __future__ import annotations

import heapq
from collections.abc import Hashable
from dataclasses import dataclass, field

# Order key: fewest-sent first, then newest first, packed in one int so the
# sorted list compares machine integers, not tuples: (transmits << 48) |
# (2**48 - 1 - seq). Sequence numbers stay below 2**48 for any real lifetime.
_SEQ_BITS = 48
_SEQ_MASK = (1 << _SEQ_BITS) - 1


@dataclass(slots=True)
class _Item:
    key: Hashable
    data: bytes
    seq: int
    transmits: int = 0
    sort_key: int = field(default=0)
    ident: Hashable = None  # what a peer's copy must equal to count (see heard)


def _order_key(transmits: int, seq: int) -> int:
    return (transmits << _SEQ_BITS) | (_SEQ_MASK - seq)


class BroadcastQueue:
    """Items in order-key order, kept as a binary heap of order keys with lazy
    deletion: an item that is sent, heard again, replaced or dropped leaves
    its old key in the heap, and ``_by_order`` (order key -> item) says which
    keys are current. Re-keying is one ``heappush`` instead of a sorted-list
    remove and insert: every node pays it for each news item it sends or
    hears again, which in a burst of failures is most of its work."""

    def __init__(self) -> None:
        self._items: dict[Hashable, _Item] = {}
        self._heap: list[int] = []  # order keys; those not in _by_order are stale
        self._by_order: dict[int, _Item] = {}
        self._sizes: dict[int, int] = {}  # encoded length -> how many queued items have it
        self._seq = 0

    def __len__(self) -> int:
        return len(self._items)

    def _add(self, item: _Item) -> None:
        self._items[item.key] = item
        heapq.heappush(self._heap, item.sort_key)
        self._by_order[item.sort_key] = item
        n = len(item.data)
        self._sizes[n] = self._sizes.get(n, 0) + 1

    def _drop(self, item: _Item) -> None:
        """Forget ``item`` (its heap key goes stale); the caller removes it
        from ``_items``."""
        del self._by_order[item.sort_key]
        n = len(item.data)
        left = self._sizes[n] - 1
        if left:
            self._sizes[n] = left
        else:
            del self._sizes[n]
        self._compact()

    def _compact(self) -> None:
        heap = self._heap
        if len(heap) > 2 * len(self._by_order) + 64:  # mostly stale keys: rebuild
            heap[:] = self._by_order
            heapq.heapify(heap)

    def _sent(self, item: _Item, limit: int) -> None:
        """Count one transmission of ``item`` (its heap key already popped, or
        left stale); drop it at ``limit``."""
        item.transmits += 1
        if item.transmits >= limit:
            del self._items[item.key]
            self._drop(item)
            return
        by_order = self._by_order
        del by_order[item.sort_key]
        item.sort_key = key = _order_key(item.transmits, item.seq)
        heapq.heappush(self._heap, key)
        by_order[key] = item
        self._compact()

    def enqueue(self, key: Hashable, data: bytes, ident: Hashable = None) -> None:
        """Queue ``data``; replaces any queued item with the same key. With an
        ``ident``, copies heard back from peers count as transmissions."""
        self.invalidate(key)
        self._seq += 1
        item = _Item(key, data, self._seq, ident=ident)
        item.sort_key = _order_key(0, self._seq)
        self._add(item)

    def heard(self, key: Hashable, ident: Hashable, limit: int) -> bool:
        """A peer sent us the update ``ident`` under ``key`` again: if it is the
        one we queue, count one transmission of it (dropping it at ``limit``).
        Returns whether it was counted."""
        item = self._items.get(key)
        if item is None or ident is None or item.ident != ident:
            return False
        self._sent(item, limit)
        return True

    def has(self, key: Hashable) -> bool:
        return key in self._items

    def get(self, key: Hashable) -> bytes | None:
        item = self._items.get(key)
        return None if item is None else item.data

    def invalidate(self, key: Hashable) -> None:
        old = self._items.pop(key, None)
        if old is not None:
            self._drop(old)

    def take(
        self,
        budget: int,
        limit: int,
        overhead_per_item: int = 0,
        skip: frozenset[bytes] | None = None,
    ) -> list[bytes]:
        """Return encoded items whose sizes (plus ``overhead_per_item`` each) fit
        in ``budget`` bytes, counting one transmission for each. Items sent
        ``limit`` times are dropped. Items equal to one in ``skip`` (already in
        the packet) count as sent without being returned."""
        if not self._items or budget <= 0:
            if not self._items:
                self._heap.clear()
            return []
        # Once the budget is below the smallest item nothing more can fit:
        # stop there instead of walking the rest of the queue.
        smallest = min(self._sizes) + overhead_per_item
        chosen: list[bytes] = []
        picked: list[_Item] = []
        kept: list[int] = []  # current keys popped but not sent (too big)
        heap, by_order = self._heap, self._by_order
        pop = heapq.heappop
        while heap:
            item = by_order.get(heap[0])
            if item is None:
                pop(heap)  # stale
                continue
            if skip is not None and item.data in skip:
                pop(heap)
                picked.append(item)
                continue
            need = len(item.data) + overhead_per_item
            if need > budget:
                if budget < 16 or budget < smallest:
                    break
                kept.append(pop(heap))
                continue
            budget -= need
            chosen.append(item.data)
            picked.append(item)
            pop(heap)
        for k in kept:
            heapq.heappush(heap, k)
        for item in picked:
            self._sent(item, limit)
        return chosen

    def prune(self, max_items: int) -> None:
        """Bound the queue: drop the most-sent (oldest) items beyond ``max_items``."""
        excess = len(self._items) - max_items
        if excess <= 0:
            return
        for k in sorted(self._by_order)[-excess:]:
            item = self._by_order[k]
            self._items.pop(item.key, None)
            self._drop(item)
