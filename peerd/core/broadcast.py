"""Transmit-limited broadcast queue (SWIM 2002, section 4.1 "infection-style
dissemination").

Updates ride piggybacked on probe traffic and on periodic gossip packets. Each
update is sent a bounded number of times (the retransmit limit, which grows
with log N so that an update still reaches everyone w.h.p. as the cluster
grows). Fresh updates go first: the queue is ordered by how often an item has
been sent, then newest first. A new update under the same key (for example a
newer state of the same node) replaces the older one, so stale news never
competes with current news for space in a packet.

The queue stores already-encoded messages so that filling a datagram is a walk
over byte strings, with no re-encoding on the hot path.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field

from sortedcontainers import SortedList


@dataclass(slots=True)
class _Item:
    key: Hashable
    data: bytes
    seq: int
    transmits: int = 0
    sort_key: tuple[int, int] = field(default=(0, 0))


class BroadcastQueue:
    def __init__(self) -> None:
        self._items: dict[Hashable, _Item] = {}
        # (transmits, -seq) -> fewest-sent first, then newest first
        self._order: SortedList = SortedList()
        self._seq = 0

    def __len__(self) -> int:
        return len(self._items)

    def enqueue(self, key: Hashable, data: bytes) -> None:
        """Queue ``data``; replaces any queued item with the same key."""
        self.invalidate(key)
        self._seq += 1
        item = _Item(key, data, self._seq)
        item.sort_key = (0, -self._seq)
        self._items[key] = item
        self._order.add((item.sort_key, key_token(item)))

    def has(self, key: Hashable) -> bool:
        return key in self._items

    def get(self, key: Hashable) -> bytes | None:
        item = self._items.get(key)
        return None if item is None else item.data

    def invalidate(self, key: Hashable) -> None:
        old = self._items.pop(key, None)
        if old is not None:
            self._order.remove((old.sort_key, key_token(old)))

    def take(self, budget: int, limit: int, overhead_per_item: int = 0) -> list[bytes]:
        """Return encoded items whose sizes (plus ``overhead_per_item`` each) fit
        in ``budget`` bytes, counting one transmission for each. Items sent
        ``limit`` times are dropped."""
        if not self._items or budget <= 0:
            return []
        chosen: list[bytes] = []
        picked: list[_Item] = []
        for _sort_key, token in self._order:
            item = self._items[token[1]]
            need = len(item.data) + overhead_per_item
            if need > budget:
                if budget < 16:
                    break
                continue
            budget -= need
            chosen.append(item.data)
            picked.append(item)
        for item in picked:
            self._order.remove((item.sort_key, key_token(item)))
            item.transmits += 1
            if item.transmits >= limit:
                del self._items[item.key]
            else:
                item.sort_key = (item.transmits, -item.seq)
                self._order.add((item.sort_key, key_token(item)))
        return chosen

    def prune(self, max_items: int) -> None:
        """Bound the queue: drop the most-sent (oldest) items beyond ``max_items``."""
        while len(self._items) > max_items:
            _sort_key, token = self._order.pop(-1)
            self._items.pop(token[1], None)


def key_token(item: _Item) -> tuple[int, Hashable]:
    # SortedList needs totally ordered entries; seq is unique so comparison
    # never reaches the (possibly unorderable) key.
    return (item.seq, item.key)
