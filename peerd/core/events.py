"""The one vocabulary of the core: every input a :class:`peerd.core.peer.Peer`
takes and every output it returns, as frozen values.

The shell (trio daemon) and the simulator both drive a peer the same way::

    outputs = peer.handle(now, some_input)

and then carry out each output: send a datagram, arm a timer, open a stream or
a link, answer an API call, tell API watchers. ``now`` is monotonic seconds;
the core never reads a clock. Timers are typed values (:mod:`peerd.core.timers`):
``SetTimer(at, timer)`` out, ``TimerFired(timer)`` back in.

Sections, in order: membership and the registry (datagrams, request/response
streams for anti-entropy, the API's registry commands); the partial mesh's
links (persistent, ordered connections to single peers, whose contract is
below); messages to names (the API's ``send``, over the same links). Payloads
here are plaintext; sealing is the transport's job (see
:mod:`peerd.wire.seal`). A subsystem reads only its own section; the peer
reads them all, and :data:`PeerInput` / :data:`PeerOutput` are what a runtime
must handle.

The mesh's link contract, for whoever carries out its outputs:

    The mesh is driven like the membership core (``outputs = mesh.handle(now,
    input)``) but talks about *links*: persistent, ordered, authenticated
    connections to single peers (TCP in the daemon, a fake in the simulator).

    Contract with whoever carries out the outputs (the shell's link manager):

    * At most one link per peer node. :class:`Connect` opens one (a no-op if one
      is open, in either direction); :class:`Send` writes a message on it, in
      order; :class:`CloseLink` writes out what was queued, then closes.
    * :class:`LinkDown` reports that a link failed (connect refused, reset,
      timeout) or that the *peer* closed it. It is never reported for a link the
      core closed itself.
    * Per peer, inputs arrive in the order the peer sent them, across links: if a
      peer closes a link and opens a new one, the old link's messages and its
      :class:`LinkDown` come before anything from the new one. (A new inbound link
      from a peer supersedes the old one: the old one is read to its end first.)
    * A :class:`Send` on a link that has died is dropped silently: its
      :class:`LinkDown` is on its way.
    * ``Send.priority``: lower is more urgent. A busy link writes queued frames
      lowest priority first and may drop frames of the lowest priority
      (user broadcasts) when its queue is over a bound; Plumtree repairs them.

Messages to names need answers from the runtime, each carrying a token the
core chose, and only where the core cannot guess them (one message is then
one core call at each end): a :class:`LinkSend` with a non-zero ``seq`` is
answered by :class:`LinkSendDone` when the link manager refused it or it
went on another link than ``LinkSend.link``; a :class:`DeliverToConn` by
:class:`Offered`, for a message from another daemon (``answer`` set) only
when the connection did not take it; the
:class:`~peerd.core.timers.SendDeadline` timer fires as :class:`DeadlineFired`.
Mailbox occupancy comes back as :class:`MailboxTaken` and :class:`ConnClosed`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from peerd.core.timers import MeshTimer as MeshTimer  # re-exported
from peerd.core.timers import MeshTimerKind as MeshTimerKind  # re-exported
from peerd.core.timers import SendDeadline as SendDeadline  # re-exported
from peerd.core.timers import Timer as Timer  # re-exported
from peerd.core.timers import TimerKind as TimerKind  # re-exported
from peerd.wire.messages import (
    Addr,
    Channel,
    Disconnect,
    ForwardJoin,
    Gossip,
    GossipControl,
    MeshJoin,
    MeshPeer,
    NameMsg,
    NameReply,
    Neighbor,
    NeighborReply,
    NodeId,
    RegEntry,
    RegKind,
    Shuffle,
    ShuffleReply,
    Status,
    Tags,
)

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


# --- membership and the registry, through the peer -----------------------------
#
# The registry is a sibling of membership (peerd.core.peer), yet its deltas
# ride membership's gossip queue, datagrams and streams. The two never call
# each other: membership reports the news the registry follows as outputs
# (below, "news"), at the point in its handling where it happened; the
# registry returns what it wants carried as values that are membership inputs
# (below, "carry"). The peer passes both on in order. A news value marked
# "pauses" is the last output of membership's handling: the peer gives the
# registry its turn, then feeds Resume, and membership goes on where it was
# (so the registry acts at exactly the point of the packet, or of the gossip
# round, where it acted when it was called from inside). None of these
# leaves the peer: a runtime never sees them. They are here, not in the
# registry's package, because they are membership's own vocabulary (what it
# reports, what it carries) and membership imports nothing of the registry.


@dataclass(frozen=True, slots=True)
class NodeStarted:
    """News: membership handled Start."""


@dataclass(frozen=True, slots=True)
class NodeUp:
    """News: ``node`` is alive in life ``generation`` (joined, refuted,
    restarted, or newer news of it)."""

    node: NodeId
    generation: int


@dataclass(frozen=True, slots=True)
class PeerLive:
    """News: a member became live (there is someone to send to)."""


@dataclass(frozen=True, slots=True)
class NodeDown:
    """News: ``node`` (life ``generation``) was declared dead or left."""

    node: NodeId
    generation: int


@dataclass(frozen=True, slots=True)
class DeathDeclared:
    """News: we declared ``node`` dead at ``incarnation`` (our suspicion of
    it ran out) and queued the news for gossip."""

    node: NodeId
    incarnation: int


@dataclass(frozen=True, slots=True)
class NodeForgotten:
    """News: ``node`` was long dead and left the members table."""

    node: NodeId


@dataclass(frozen=True, slots=True)
class SyncedWith:
    """News: a push-pull (or digest sync) with the live member ``node`` ended."""

    node: NodeId


@dataclass(frozen=True, slots=True)
class GossipDue:
    """News, pauses: a gossip round is about to go (the registry flushes first)."""


@dataclass(frozen=True, slots=True)
class Carried:
    """News: membership received a message that is not its own (a registry
    delta, snapshot or acknowledgement in a datagram: pauses; or a registry
    sync on stream ``stream``). ``src`` is the live member it came from."""

    src: NodeId | None
    msg: object
    stream: int | None = None


@dataclass(frozen=True, slots=True)
class QueueGossip:
    """Carry: queue ``data`` for gossip under ``key`` (replacing what is
    queued under it) and arm the gossip round."""

    key: object
    data: bytes


@dataclass(frozen=True, slots=True)
class SendTo:
    """Carry: send ``msg`` (with piggybacked gossip) to the live member ``node``."""

    node: NodeId
    msg: object


@dataclass(frozen=True, slots=True)
class StreamTo:
    """Carry: open a stream to the member ``node`` with ``data``. The peer
    keeps ``purpose`` and routes the reply back to the registry."""

    node: NodeId
    data: bytes
    purpose: str


@dataclass(frozen=True, slots=True)
class SendDirect:
    """Carry: these encoded messages, packed, straight to every live member
    (no piggyback); ``counter`` names what the datagrams are counted as."""

    parts: tuple[bytes, ...]
    counter: str | None = None


@dataclass(frozen=True, slots=True)
class GossipRound:
    """Carry: gossip one round now."""


@dataclass(frozen=True, slots=True)
class Resume:
    """Go on where the last news that pauses paused membership."""


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
    | QueueGossip
    | SendTo
    | StreamTo
    | SendDirect
    | GossipRound
    | Resume
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
    | NodeStarted
    | NodeUp
    | PeerLive
    | NodeDown
    | DeathDeclared
    | NodeForgotten
    | SyncedWith
    | GossipDue
    | Carried
    | QueueGossip
    | SendTo
    | StreamTo
    | SendDirect
    | GossipRound
)


# === the mesh's links (HyParView + Plumtree) ==========================================

HyParViewMessage = (
    MeshJoin | ForwardJoin | Neighbor | NeighborReply | Disconnect | Shuffle | ShuffleReply
)
PlumtreeMessage = Gossip | GossipControl
MeshMessage = HyParViewMessage | PlumtreeMessage
# What a peer link carries: the mesh's messages, messages to names and their answers.
LinkMessage = MeshMessage | NameMsg | NameReply

# Send priorities (lower first). Overlay and tree control is tiny and keeps
# the mesh itself alive, so it goes before any payload.
PRIORITY_CONTROL = 0


def channel_priority(channel: Channel) -> int:
    """Priority of a gossip payload on ``channel`` (after all control)."""
    return PRIORITY_CONTROL + 1 + int(channel)


# --- inputs ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class JoinMesh:
    """Start (the first time) and join the overlay through the first reachable
    of ``contacts``; the others are kept as passive peers. Empty: start alone
    (the first node), others will join us."""

    contacts: tuple[MeshPeer, ...] = ()


@dataclass(frozen=True, slots=True)
class MessageIn:
    """A message arrived over the link from ``src`` (the mesh's, or a message
    to a name and its answer: the peer routes them by type)."""

    src: NodeId
    msg: LinkMessage


@dataclass(frozen=True, slots=True)
class LinkDown:
    """The link to ``node`` failed or the peer closed it (see the module docs).

    ``link``: which link (None: any link to ``node``); ``mesh``: the mesh used
    it (a link opened only for messages to names is news for those alone)."""

    node: NodeId
    link: int | None = None
    mesh: bool = True


@dataclass(frozen=True, slots=True)
class MeshTimerFired:
    timer: MeshTimer


@dataclass(frozen=True, slots=True)
class MembershipHint:
    """What SWIM membership knows: ``alive`` members may seed the passive view
    (only where there is room); ``dead`` ones are forgotten, and an active link
    to one is dropped (a frozen process keeps its links open but carries
    nothing). The overlay works without hints; they make it heal faster."""

    alive: tuple[MeshPeer, ...] = ()
    dead: tuple[NodeId, ...] = ()
    # Members membership had declared dead that are back in the same life (a
    # refuted death: a partition healed), not restarted processes. A burst
    # of them makes HyParView bridge the overlays the partition split.
    revived: tuple[MeshPeer, ...] = ()


@dataclass(frozen=True, slots=True)
class LeaveMesh:
    """Leave: tell every neighbour (they forget us), close all links."""


@dataclass(frozen=True, slots=True)
class Broadcast:
    """Broadcast ``payload`` to every node on ``channel``; answered by a
    :class:`BroadcastResult` with the same ``ref``. The origin does not
    deliver its own broadcast to itself."""

    ref: int
    channel: Channel
    payload: bytes


@dataclass(frozen=True, slots=True)
class NeighborUp:
    """HyParView output (and Plumtree input): ``peer`` joined the active view."""

    peer: MeshPeer


@dataclass(frozen=True, slots=True)
class NeighborDown:
    """HyParView output (and Plumtree input): ``peer`` left the active view."""

    peer: MeshPeer


MeshInput = (
    JoinMesh
    | MessageIn
    | LinkDown
    | MeshTimerFired
    | MembershipHint
    | LeaveMesh
    | Broadcast
    | NeighborUp
    | NeighborDown
)

# --- outputs --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Connect:
    """Open a link to ``peer`` (no-op if one is open). Failure: :class:`LinkDown`."""

    peer: MeshPeer


@dataclass(frozen=True, slots=True)
class Send:
    """Write ``msg`` on the link to ``dst`` (see the module docs for ``priority``)."""

    dst: NodeId
    msg: MeshMessage
    priority: int = PRIORITY_CONTROL


@dataclass(frozen=True, slots=True)
class CloseLink:
    """Write out what is queued for ``node``, then close the link. ``mesh``
    False: close every link to ``node``, also those the mesh does not use
    (its daemon is dead: nothing will answer on them)."""

    node: NodeId
    mesh: bool = True


@dataclass(frozen=True, slots=True)
class SetMeshTimer:
    """Arm ``timer`` at monotonic time ``at`` (feed back :class:`MeshTimerFired`)."""

    at: float
    timer: MeshTimer


@dataclass(frozen=True, slots=True)
class Deliver:
    """A broadcast reached this node (once per id). ``round``: hops from the
    origin; ``src``: the neighbour it came from."""

    id: bytes
    origin: NodeId
    channel: Channel
    payload: bytes
    round: int
    src: NodeId


@dataclass(frozen=True, slots=True)
class BroadcastResult:
    """Answer to :class:`Broadcast`: the message ``id``, or ``error`` =
    (code, message) with code ``too_large`` or ``rate_limited``."""

    ref: int
    id: bytes | None = None
    error: tuple[str, str] | None = None


MeshOutput = (
    Connect
    | Send
    | CloseLink
    | SetMeshTimer
    | NeighborUp
    | NeighborDown
    | Deliver
    | BroadcastResult
    | Log
)


# === messages to names ==============================================================

# --- outcomes ---------------------------------------------------------------------


class SendError(enum.Enum):
    """How a send failed, as the API caller sees it (the shell maps these
    onto its error codes)."""

    NOT_FOUND = "not_found"
    NO_RECEIVER = "no_receiver"
    MAILBOX_FULL = "mailbox_full"
    UNAVAILABLE = "unavailable"


class Why(enum.Enum):
    """The precise reason behind a :class:`SendError` (for the message text)."""

    NO_SUCH_NAME = "no_such_name"  # nobody holds it in our replica (and no hint)
    NO_SUCH_GROUP = "no_such_group"
    VANISHED = "vanished"  # the owner's daemon no longer holds the entry
    REPLY_GONE = "reply_gone"  # the connection or daemon life a reply was for ended
    MAILBOX_FULL = "mailbox_full"  # the receiving connection is not reading
    REFUSED = "refused"  # the owner's daemon is leaving or has no registry
    NO_RECEIVER = "no_receiver"  # the holder registered with messages=false
    NO_REGISTRY = "no_registry"  # this daemon has no registry
    UNKNOWN_MEMBER = "unknown_member"  # the owner's node is not a known member
    LINK_REFUSED = "link_refused"  # the link to the owner's daemon is full or down
    LINK_LOST = "link_lost"  # the link was lost while we waited (delivery unknown)
    TIMEOUT = "timeout"  # no answer in time (delivery unknown)


@dataclass(frozen=True, slots=True)
class Failure:
    """One target that did not get the message."""

    node: NodeId
    error: SendError
    why: Why


@dataclass(frozen=True, slots=True)
class ReplyAddr:
    """A ``reply_to`` token: API connection ``conn`` of daemon ``node`` in its
    life ``generation`` (connection ids are never reused within a life)."""

    node: NodeId
    generation: int
    conn: int


# --- inputs -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SendToName:
    """API ``send`` from connection ``conn`` (0: none) to a name or a group
    (``every``: all its members). ``call`` is the shell's token for the call
    (unique, > 0), echoed in its :class:`SendResult`."""

    call: int
    conn: int
    kind: RegKind
    scope: str
    name: str
    payload: bytes
    every: bool = False


@dataclass(frozen=True, slots=True)
class ReplyToSender:
    """API ``send(reply_to=token)`` from connection ``conn``."""

    call: int
    conn: int
    to: ReplyAddr
    payload: bytes


@dataclass(frozen=True, slots=True)
class NameMsgIn:
    """A NameMsg from daemon ``src`` over a peer link."""

    src: NodeId
    msg: NameMsg


@dataclass(frozen=True, slots=True)
class NameReplyIn:
    """A NameReply from daemon ``src`` over a peer link."""

    src: NodeId
    reply: NameReply


@dataclass(frozen=True, slots=True)
class LinkSendDone:
    """The answer to a :class:`LinkSend` with ``seq``: ``ok`` False when the
    link manager refused it (full or down); ``link`` the link it went on.
    Needed only when refused or when ``link`` is not ``LinkSend.link``."""

    seq: int
    ok: bool
    link: int | None = None


@dataclass(frozen=True, slots=True)
class LinkLost:
    """The link to ``node`` failed or closed: what went on it (``link`` None:
    on any link to ``node``) is lost, delivery unknown."""

    node: NodeId
    link: int | None = None


class OfferOutcome(enum.Enum):
    """What an API connection said to a pushed message."""

    OK = "ok"
    FULL = "full"
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class Offered:
    """The answer to a :class:`DeliverToConn`: what the connection said. For
    one with an ``answer`` (token 0), only a refusal, carrying it back as
    ``delivery``."""

    token: int
    outcome: OfferOutcome
    delivery: DeliverToConn | None = None


@dataclass(frozen=True, slots=True)
class MailboxTaken:
    """The writer of connection ``conn`` took ``count`` queued messages."""

    conn: int
    count: int


@dataclass(frozen=True, slots=True)
class MarkQuiet:
    """Local entry ``eid`` is held by a process that takes no messages."""

    eid: int


@dataclass(frozen=True, slots=True)
class DeadlineFired:
    timer: SendDeadline


NamesInput = (
    SendToName
    | ReplyToSender
    | MessageIn  # carrying a NameMsg or a NameReply
    | NameMsgIn
    | NameReplyIn
    | LinkSendDone
    | LinkLost
    | Offered
    | MailboxTaken
    | ConnClosed
    | MarkQuiet
    | DeadlineFired
)

# --- outputs ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LinkSend:
    """Send ``msg`` to daemon ``node`` over a direct link (``addr``: open one
    there if none is up; None: only over a link that is up, as for an answer
    to a message that just came in). ``seq`` non-zero: answer with
    :class:`LinkSendDone` if the link manager refused it or it went on
    another link than ``link`` (the one the core last heard of; None: none)."""

    node: NodeId
    addr: Addr | None
    msg: NameMsg | NameReply
    seq: int = 0
    link: int | None = None


@dataclass(frozen=True, slots=True)
class DeliverToConn:
    """Push the ``message`` connection event of ``msg`` (from daemon
    ``from_node``) on API connection ``conn`` and answer with
    :class:`Offered` (same ``token``). ``answer`` (a message from another
    daemon, token 0): the core counted it in the mailbox already; carry
    ``answer`` out if the connection took it, else answer ``Offered(0,
    outcome, this)``. The event's fields are read off the message (below):
    one small object per message, built only if it is delivered."""

    token: int
    conn: int
    from_node: NodeId
    msg: NameMsg
    answer: LinkSend | None = None

    @property
    def sender(self) -> str:
        return self.msg.sender

    @property
    def from_scope(self) -> str:
        return self.msg.from_scope

    @property
    def kind(self) -> RegKind | None:
        """None: a reply (then ``scope``/``name`` are "")."""
        return None if self.msg.to_conn else self.msg.kind

    @property
    def scope(self) -> str:
        return self.msg.scope

    @property
    def name(self) -> str:
        return self.msg.name

    @property
    def payload(self) -> bytes:
        return self.msg.payload

    @property
    def reply_to(self) -> ReplyAddr | None:
        """The token that answers the sender (None: its daemon is too old to say)."""
        m = self.msg
        return (
            ReplyAddr(self.from_node, m.from_gen, m.from_conn)
            if m.from_gen and m.from_conn
            else None
        )


@dataclass(frozen=True, slots=True)
class SendResult:
    """The outcome of call ``call``: ``delivered`` copies, the ``failures``,
    and ``error`` when the call as a whole failed (for one target: its
    failure; for ``every``: when none was delivered). ``at_once``: the call
    failed before anything was sent (the API call raises right away)."""

    call: int
    delivered: int
    failures: tuple[Failure, ...]
    error: Failure | None
    at_once: bool = False


NamesOutput = LinkSend | DeliverToConn | SendResult | SendDeadline


# === everything together ==============================================================

# Everything a Peer takes and returns (one vocabulary: membership's and the
# registry's, the mesh's link inputs and outputs, names messaging's).
PeerInput = (
    Input
    | MessageIn
    | LinkDown
    | Broadcast
    | JoinMesh
    | SendToName
    | ReplyToSender
    | LinkSendDone
    | Offered
    | MailboxTaken
    | MarkQuiet
)
PeerOutput = Output | MeshOutput | NamesOutput
