"""Inputs fed to the sans-I/O core and the outputs it returns.

The shell (trio daemon) and the simulator both drive a core the same way::

    outputs = node.handle(now, some_input)

and then carry out each output: send a datagram, arm a timer, open a stream,
tell API watchers. ``now`` is monotonic seconds; the core never reads a clock.

Streams are request/response: the opener sends one frame and gets one frame
back (push-pull anti-entropy). Payloads here are plaintext; sealing is the
transport's job (see :mod:`peerd.wire.seal`).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from peerd.core.timers import Timer as Timer  # re-exported
from peerd.core.timers import (
    TimerKind as TimerKind,  # re-exported: the older name of a timer's purpose
)
from peerd.wire.messages import Addr, NodeId, RegEntry, RegKind, Status, Tags

# --- inputs -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Start:
    """First input. ``seeds`` are addresses to join (configured seeds plus the
    peers remembered in the state directory)."""

    seeds: tuple[Addr, ...] = ()


@dataclass(frozen=True, slots=True)
class PacketIn:
    """A datagram payload (already opened/authenticated) from ``src``."""

    src: Addr
    data: bytes


@dataclass(frozen=True, slots=True)
class Unreachable:
    """The OS reported that a datagram we sent to ``addr`` met a closed port
    (ICMP port unreachable): a hint, never proof, that the peer is gone."""

    addr: Addr


@dataclass(frozen=True, slots=True)
class LinkClosed:
    """A watch link (see :class:`WatchLinks`) to ``addr`` was closed by the
    peer's OS (FIN or RST): the process behind it is likely gone."""

    addr: Addr


@dataclass(frozen=True, slots=True)
class TimerFired:
    timer: Timer


@dataclass(frozen=True, slots=True)
class StreamRequest:
    """A peer opened a stream to us and sent one request frame."""

    stream: int
    src: Addr
    data: bytes


@dataclass(frozen=True, slots=True)
class StreamResponse:
    """The reply frame on a stream we opened with :class:`OpenStream`."""

    stream: int
    data: bytes


@dataclass(frozen=True, slots=True)
class StreamFailed:
    """A stream we opened failed (connect refused, timeout, bad frame)."""

    stream: int
    reason: str


@dataclass(frozen=True, slots=True)
class Join:
    """Join (more) peers at these addresses (API `join` or the agent's --join)."""

    addrs: tuple[Addr, ...]


@dataclass(frozen=True, slots=True)
class SetTags:
    """Replace this node's tags; spreads as a membership update."""

    tags: Tags


@dataclass(frozen=True, slots=True)
class Leave:
    """Leave gracefully: announce, then report :class:`LeaveDone`."""


# --- registry commands (from the API; ``ref`` pairs a command with its
# CommandResult, ``conn`` is the API connection that owns the entries) -------


@dataclass(frozen=True, slots=True)
class Register:
    """Register a unique name or join a group. ``claimed_ms`` is the daemon's
    wall clock (the conflict rule's "oldest claim"). With ``settle_s`` the
    result waits until every live member acknowledged the entry, or times out."""

    ref: int
    conn: int
    kind: RegKind
    scope: str
    name: str
    meta: Tags
    pid: int
    uid: int
    claimed_ms: int
    settle_s: float | None = None


@dataclass(frozen=True, slots=True)
class Unregister:
    """Remove a name or leave a group; only the owning connection may."""

    ref: int
    conn: int
    kind: RegKind
    scope: str
    name: str


@dataclass(frozen=True, slots=True)
class UpdateMeta:
    ref: int
    conn: int
    kind: RegKind
    scope: str
    name: str
    meta: Tags


@dataclass(frozen=True, slots=True)
class ConnClosed:
    """An API connection closed (its process exited): drop its entries."""

    conn: int


@dataclass(frozen=True, slots=True)
class MeshDelivered:
    """A broadcast on one of the node's own mesh channels (the registry's)
    reached us over the partial mesh (see :class:`MeshCast`)."""

    channel: int
    origin: NodeId
    payload: bytes


@dataclass(frozen=True, slots=True)
class MeshConnected:
    """The driver's partial mesh has neighbours (``connected``) or lost them
    all: while it has, registry deltas go out as :class:`MeshCast`."""

    connected: bool


Input = (
    Start
    | PacketIn
    | Unreachable
    | LinkClosed
    | TimerFired
    | StreamRequest
    | StreamResponse
    | StreamFailed
    | Join
    | SetTags
    | Leave
    | Register
    | Unregister
    | UpdateMeta
    | ConnClosed
    | MeshDelivered
    | MeshConnected
)

# --- outputs ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SendPacket:
    dst: Addr
    data: bytes


@dataclass(frozen=True, slots=True)
class SetTimer:
    """Arm ``timer`` (a typed value, :mod:`peerd.core.timers`) to fire at monotonic
    time ``at``: feed back :class:`TimerFired` with the same value."""

    at: float
    timer: Timer


@dataclass(frozen=True, slots=True)
class OpenStream:
    """Connect to ``dst``, send ``data`` as one frame, then feed back a
    :class:`StreamResponse` or :class:`StreamFailed` for ``stream``."""

    stream: int
    dst: Addr
    data: bytes


@dataclass(frozen=True, slots=True)
class StreamReply:
    """Answer to a :class:`StreamRequest`: send ``data`` (if any) and close."""

    stream: int
    data: bytes | None


@dataclass(frozen=True, slots=True)
class WatchLinks:
    """Keep an idle stream open to each of these addresses (and close others).

    A watch link carries no traffic; it exists so that when the peer's process
    dies while its host stays up, the peer's kernel closes the link at once
    and we hear of it (:class:`LinkClosed`) within a round trip instead of
    waiting for the next probe. A frozen process keeps its links open, so this
    never replaces probing; it only starts a suspicion sooner.
    """

    addrs: tuple[Addr, ...]


@dataclass(frozen=True, slots=True)
class MemberInfo:
    """A snapshot of one member, as the API shows it."""

    node: NodeId
    name: str
    addr: Addr
    status: Status
    incarnation: int
    generation: int
    tags: Tags


class EventKind(enum.Enum):
    JOINED = "joined"  # a node we did not know, alive
    UPDATED = "updated"  # address or tags changed
    SUSPECT = "suspect"
    ALIVE = "alive"  # a suspected or dead node is alive again
    DEAD = "dead"
    LEFT = "left"
    NAME_CONFLICT = "name_conflict"  # two live nodes claim one name
    REAPED = "reaped"  # a dead/left node was forgotten


@dataclass(frozen=True, slots=True)
class MemberEvent:
    kind: EventKind
    member: MemberInfo
    other: MemberInfo | None = None  # NAME_CONFLICT: the node already holding the name
    # ALIVE: the node had been declared dead in this same life (not a
    # restart): a refuted death, as after a partition heals
    revived: bool = False


@dataclass(frozen=True, slots=True)
class JoinDone:
    """A :class:`Start` or :class:`Join` finished: how many addresses answered."""

    ok: int
    failed: int


@dataclass(frozen=True, slots=True)
class LeaveDone:
    """The leave announcement had its time to spread; the daemon may exit."""


@dataclass(frozen=True, slots=True)
class IncarnationChanged:
    """Persist this before it matters: a restart must not reuse an incarnation."""

    incarnation: int


class LogLevel(enum.IntEnum):
    DEBUG = 10
    INFO = 20
    WARNING = 30
    ERROR = 40


@dataclass(frozen=True, slots=True)
class Log:
    level: LogLevel
    message: str


@dataclass(frozen=True, slots=True)
class CommandResult:
    """The answer to a registry command: ``value`` on success, else
    ``error`` = (code, message) with an API error code."""

    ref: int
    value: dict[str, object] | None = None
    error: tuple[str, str] | None = None


class RegEventKind(enum.Enum):
    REGISTERED = "registered"  # a name gained a claim
    UNREGISTERED = "unregistered"
    UPDATED = "updated"  # an entry's metadata changed
    JOINED = "joined"  # a process joined a group
    LEFT = "left"  # ... left it (or its process or node is gone)
    CONFLICT = "conflict"  # our claim lost its name to ``winner``


@dataclass(frozen=True, slots=True)
class RegistryEvent:
    kind: RegEventKind
    origin: NodeId
    entry: RegEntry
    # CONFLICT: the API connection that owned the losing entry, and the winner
    conn: int | None = None
    winner: tuple[NodeId, RegEntry] | None = None


@dataclass(frozen=True, slots=True)
class MeshCast:
    """Broadcast ``payload`` to every node over the partial mesh (Plumtree)
    on ``channel``. Emitted only by a node whose driver runs a mesh next to
    it (:class:`MeshConnected`); each receiver's driver
    feeds it back as :class:`MeshDelivered`."""

    channel: int
    payload: bytes


Output = (
    SendPacket
    | SetTimer
    | OpenStream
    | StreamReply
    | WatchLinks
    | MemberEvent
    | JoinDone
    | LeaveDone
    | IncarnationChanged
    | Log
    | CommandResult
    | RegistryEvent
    | MeshCast
)
