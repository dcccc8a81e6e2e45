"""API watches: bounded event channels the loop fills without waiting.

The runner must never wait for an API client, so each watch is a bounded trio
channel that the loop offers events to with ``send_nowait``; a watcher that
falls behind is closed, with a last ``end`` event telling it why, rather than
slowing the core. A watch with a snapshot yields the records of one consistent
cut (taken in the same synchronous step that registered the watch) before the
live events queued behind it, so no change falls between the two.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import trio

from peerd.api.protocol import (
    STREAM_END,
    ErrorCode,
    Topic,
    snapshot_end_to_wire,
    snapshot_entry_to_wire,
    snapshot_member_to_wire,
)
from peerd.shell.ports import EventItem, NodeLike


@dataclass(eq=False)
class Watch:
    """One API watch: the sending end of its event channel (the server reads the other)."""

    conn: object
    topics: frozenset[str]
    send: trio.MemorySendChannel[EventItem]
    # The registry scopes this watcher may read (peerd.shell.authz); None: all.
    readable: Callable[[str], bool] | None = None

    def offer(self, item: EventItem) -> bool:
        """Queue an event; False once the watch is gone (closed or too slow).

        The last free slot is kept for an ``end`` event, so a client that
        fell behind learns why its stream stopped. A registry event of a
        scope the watcher may not read is skipped (True: the watch stays).
        """
        data = item[1]
        if (
            self.readable is not None
            and data.get("topic") == Topic.REGISTRY.value
            and not self.readable(str(data.get("scope", "")))
        ):
            return True
        stats = self.send.statistics()
        try:
            if stats.current_buffer_used >= stats.max_buffer_size - 1:
                self.send.send_nowait(
                    (
                        STREAM_END,
                        {
                            "code": str(ErrorCode.UNAVAILABLE),
                            "message": "watcher too slow: events were dropped; watch again",
                        },
                    )
                )
                self.send.close()
                return False
            self.send.send_nowait(item)
        except trio.WouldBlock:
            self.send.close()
            return False
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self.send.close()
            return False
        return True


class SnapshotThenLive(trio.abc.ReceiveChannel[EventItem]):
    """A watch with a snapshot: the items of the cut first, then the live channel.

    The cut is a list of references to immutable records (member infos,
    registry entries) taken in the same synchronous step as the watch was
    registered, so no event can fall between the two; the records are turned
    into wire maps only as the client reads them. Live events queue behind
    the snapshot in the watch's bounded channel meanwhile (a client that
    reads the snapshot too slowly while many changes happen is dropped like
    any slow watcher)."""

    def __init__(
        self, first: Iterator[EventItem], live: trio.MemoryReceiveChannel[EventItem]
    ) -> None:
        self._first: Iterator[EventItem] | None = first
        self._live = live

    async def receive(self) -> EventItem:
        if self._first is not None:
            item = next(self._first, None)
            if item is not None:
                await trio.lowlevel.checkpoint()
                return item
            self._first = None
        return await self._live.receive()

    async def aclose(self) -> None:
        self._first = None
        await self._live.aclose()


TOPICS = frozenset({Topic.MEMBERS.value, Topic.REGISTRY.value, Topic.EVENTS.value})


def snapshot_cut(
    node: NodeLike, topics: Sequence[str], readable: Callable[[str], bool] | None = None
) -> Iterator[EventItem]:
    """The state of ``topics`` now, as references; converted when read (the
    registry's only of the scopes ``readable`` admits, when given)."""
    members = list(node.members())
    cut: list[tuple[str, list[Any]]] = []
    for topic in topics:
        if topic == Topic.MEMBERS.value:
            cut.append((topic, members))
        elif topic == Topic.REGISTRY.value:
            registry = getattr(node, "registry", None)
            claims = list(registry.state.entries()) if registry is not None else []
            if readable is not None:
                claims = [c for c in claims if readable(c.entry.scope)]
            cut.append((topic, claims))
        else:  # events: nothing is current; only the end marker
            cut.append((topic, []))
    by_node = {m.node: m for m in members}

    def items() -> Iterator[EventItem]:
        for topic, records in cut:
            for r in records:
                if topic == Topic.MEMBERS.value:
                    yield snapshot_member_to_wire(r)
                else:
                    yield snapshot_entry_to_wire(r.origin, r.entry, by_node.get(r.origin))
            yield snapshot_end_to_wire(topic, len(records))

    return items()
