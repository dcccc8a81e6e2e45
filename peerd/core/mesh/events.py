"""Inputs and outputs of the partial mesh (HyParView + Plumtree).

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
"""

from __future__ import annotations

from dataclasses import dataclass

from peerd.core.events import Log
from peerd.core.timers import MeshTimer as MeshTimer  # re-exported
from peerd.core.timers import MeshTimerKind as MeshTimerKind  # re-exported
from peerd.wire.messages import (
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
    Shuffle,
    ShuffleReply,
)

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
