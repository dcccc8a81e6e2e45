"""What the event loop talks to, and what it receives.

The runner drives a core and carries out its outputs through small ports
(packets, streams, links, a lifecycle, a traffic observer), each a Protocol so
tests can hand in fakes and the real endpoints (UDP, TCP, links, systemd)
stay independent of the loop. Everything that reaches the loop arrives as one
:data:`Item` on one bounded channel (:func:`open_inputs`): core inputs from
the receivers, link messages, and closures other tasks want run in the
runner task (:class:`Call`), which is how the API backend reads and writes
the core without locks. These types sit below the runner, the backend and
key operations, which all use them, so none of those imports another in a
cycle.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import trio

from peerd.core.events import (
    Input,
    MemberInfo,
    PeerInput,
    PeerOutput,
)
from peerd.shell.links import LinkLost, LinkMessages
from peerd.wire.messages import (
    Addr,
    Message,
    NodeId,
)


class NodeLike(Protocol):
    """What the runner needs from :class:`peerd.core.peer.Peer` (fakes in tests)."""

    counters: collections.Counter[str]

    def handle(self, now: float, inp: PeerInput) -> list[PeerOutput]: ...
    def members(self) -> list[MemberInfo]: ...
    def local_member(self) -> MemberInfo: ...
    @property
    def health_score(self) -> int: ...
    def peer_addrs(self) -> list[Addr]: ...


class PacketPort(Protocol):
    def send(self, dst: Addr, payload: bytes) -> None: ...


class StreamPort(Protocol):
    def open_stream(self, stream: int, dst: Addr, data: bytes) -> None: ...
    def reply(self, stream: int, data: bytes | None) -> None: ...
    def set_watch_links(self, addrs: tuple[Addr, ...]) -> None: ...


class LinkPort(Protocol):
    """The link manager (:class:`peerd.shell.links.LinkManager`)."""

    def has(self, peer: NodeId) -> bool: ...
    def link_id(self, peer: NodeId) -> int | None: ...
    def connect(self, peer: NodeId, addr: Addr, *, mesh: bool = True) -> None: ...
    def send(
        self, peer: NodeId, msg: Message, priority: int = 0, *, mesh: bool | None = None
    ) -> bool: ...
    def close(self, peer: NodeId, *, mesh: bool = True) -> None: ...
    def close_all(self) -> None: ...
    def mesh_lost(self, peer: NodeId, link: int | None) -> None: ...


class Lifecycle(Protocol):
    """A service manager's view of the daemon (systemd: :mod:`peerd.shell.systemd`).

    Called from the runner task only, so implementations may read the core.
    ``deadline`` (runner clock) is when :meth:`tick` is next due; the loop
    waits for it alongside the core's timers, so a core stuck in a call
    stops the ticks (that is what makes a watchdog ping meaningful).
    """

    @property
    def deadline(self) -> float: ...
    def started(self, now: float, ok: int, failed: int) -> None: ...
    def members_changed(self, now: float) -> None: ...
    def leaving(self, reason: str) -> None: ...
    def tick(self, now: float) -> None: ...


class TrafficObserver(Protocol):
    """Counts what goes over the wire by message type (:mod:`peerd.shell.metrics`)."""

    def packet(self, direction: str, payload: bytes) -> None: ...
    def stream(self, direction: str, payload: bytes) -> None: ...


class CoreFailure(Exception):
    """The core raised: a bug. The daemon must exit non-zero."""


# --- items the runner receives besides core inputs -------------------------------


@dataclass(eq=False)
class Call:
    """Run ``fn`` inside the runner task (the only place the core is touched)."""

    fn: Callable[[], Any]
    done: trio.Event = field(default_factory=trio.Event)
    result: Any = None
    error: Exception | None = None


@dataclass(eq=False)
class Shutdown:
    reason: str


Item = Input | Call | Shutdown | LinkMessages | LinkLost
EventItem = tuple[str, dict[str, Any]]


@dataclass(eq=False)
class Waiter:
    """An API call (or the start) waiting for a JoinDone / LeaveDone."""

    label: str
    done: trio.Event = field(default_factory=trio.Event)
    result: Any = None


def open_inputs(
    size: int = 1024,
) -> tuple[trio.MemorySendChannel[Item], trio.MemoryReceiveChannel[Item]]:
    """The runner's input channel; receivers get the sending end."""
    send, receive = trio.open_memory_channel[Item](size)
    return send, receive
