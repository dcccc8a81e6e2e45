"""Typed timers: every timer the core arms is a frozen value of its own type.

Theory of operation. A subsystem that needs to act later returns
``SetTimer(at, timer)``; the runtime (trio's deadline heap, the simulator's
event heap) keeps the value opaque and feeds it back as ``TimerFired(timer)``
at or after ``at``. The value says everything the subsystem needs when it
fires: which subsystem it belongs to (its type: the peer routes it there),
what it is for, and its context (the probe's sequence number, the suspect
and the incarnation the suspicion was about, the broadcast to graft...).

``token`` is unique per arming within the subsystem that armed it: a timer
that was superseded or cancelled is no longer in that subsystem's table of
armed timers and is ignored when it fires, so no runtime ever has to cancel
anything. (The mesh's two halves, HyParView and Plumtree, count tokens
separately: their timer types differ, so they never meet.)

``kind`` (a class attribute, not a field) names the timer's purpose in the
older vocabulary of :class:`TimerKind` / :class:`MeshTimerKind`, for logs and
tests that look for "the probe timer".
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import ClassVar

from peerd.wire.messages import NodeId


class TimerKind(enum.Enum):
    PROBE = "probe"  # next protocol period
    PROBE_TIMEOUT = "probe_timeout"  # direct ping unanswered: go indirect
    INDIRECT_TIMEOUT = "indirect_timeout"  # we probed for someone else; send nack
    SUSPICION = "suspicion"  # suspicion timer for one node
    CONFIRM_TIMEOUT = "confirm_timeout"  # our own check of someone else's suspect
    GOSSIP = "gossip"
    PUSH_PULL = "push_pull"
    RECONNECT = "reconnect"  # retry dead nodes and seeds (partition healing)
    REAP = "reap"  # forget long-dead nodes
    GHOST_REAP = "ghost_reap"  # forget a dead id whose name and address came back with a new id
    LEAVE = "leave"  # leave broadcast had time to spread
    REG_FLUSH = "reg_flush"  # spread fresh registry deltas now, not at the next gossip tick
    REG_SETTLE = "reg_settle"  # a register wait=settled timed out
    REG_SYNC = "reg_sync"  # the registry's own anti-entropy round
    TREE_FLUSH = "tree_flush"  # membership news batched for the broadcast tree
    TREE_RELAY = "tree_relay"  # news heard off the tree that the tree did not bring
    TREE_SWEEP = "tree_sweep"  # after a burst of deaths: ping a few random members


class MeshTimerKind(enum.Enum):
    SHUFFLE = "shuffle"  # HyParView: periodic shuffle and view upkeep
    NEIGHBOR_TIMEOUT = "neighbor_timeout"  # a neighbor request got no answer
    IHAVE_FLUSH = "ihave_flush"  # Plumtree: send batched announcements
    GRAFT = "graft"  # Plumtree: an announced broadcast did not arrive


# --- membership (SWIM) ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ProbeTick:
    """The next protocol period: probe the next member."""

    token: int
    kind: ClassVar[TimerKind] = TimerKind.PROBE


@dataclass(frozen=True, slots=True)
class ProbeTimeout:
    """The direct ping ``seq`` got no ack in time: probe indirectly."""

    token: int
    seq: int
    kind: ClassVar[TimerKind] = TimerKind.PROBE_TIMEOUT


@dataclass(frozen=True, slots=True)
class IndirectTimeout:
    """We ping for someone else (``seq``): no ack yet, send them a nack."""

    token: int
    seq: int
    kind: ClassVar[TimerKind] = TimerKind.INDIRECT_TIMEOUT


@dataclass(frozen=True, slots=True)
class SuspicionTimeout:
    """The suspicion of ``node`` at ``incarnation`` ran out: declare it dead."""

    token: int
    node: NodeId
    incarnation: int
    kind: ClassVar[TimerKind] = TimerKind.SUSPICION


@dataclass(frozen=True, slots=True)
class ConfirmTimeout:
    """Our own check (ping ``seq``) of a node someone else suspects ran out."""

    token: int
    seq: int
    kind: ClassVar[TimerKind] = TimerKind.CONFIRM_TIMEOUT


@dataclass(frozen=True, slots=True)
class GossipTick:
    """Gossip a round to random members."""

    token: int
    kind: ClassVar[TimerKind] = TimerKind.GOSSIP


@dataclass(frozen=True, slots=True)
class RingFlush:
    """Send final news owed to the ring successors (RingCast)."""

    token: int
    kind: ClassVar[TimerKind] = TimerKind.GOSSIP


@dataclass(frozen=True, slots=True)
class PushPullTick:
    """A periodic full-state exchange with a random member."""

    token: int
    kind: ClassVar[TimerKind] = TimerKind.PUSH_PULL


@dataclass(frozen=True, slots=True)
class ReconnectTick:
    """Retry dead members and the seeds (partition healing)."""

    token: int
    kind: ClassVar[TimerKind] = TimerKind.RECONNECT


@dataclass(frozen=True, slots=True)
class ReapTick:
    """Forget members dead or gone for long enough."""

    token: int
    kind: ClassVar[TimerKind] = TimerKind.REAP


@dataclass(frozen=True, slots=True)
class GhostReap:
    """Forget ``node``, down, whose name and address a live member has taken
    (a restart with a new id: see peerd.core.swim.ghosts)."""

    token: int
    node: NodeId
    kind: ClassVar[TimerKind] = TimerKind.GHOST_REAP


@dataclass(frozen=True, slots=True)
class LeaveSpread:
    """The leave announcement had its time to spread."""

    token: int
    kind: ClassVar[TimerKind] = TimerKind.LEAVE


# --- registry ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RegFlush:
    """Spread fresh registry deltas now, not at the next gossip round."""

    token: int
    kind: ClassVar[TimerKind] = TimerKind.REG_FLUSH


@dataclass(frozen=True, slots=True)
class RegSettleTimeout:
    """``register`` with wait=settled (command ``ref``) ran out of time."""

    token: int
    ref: int
    kind: ClassVar[TimerKind] = TimerKind.REG_SETTLE


@dataclass(frozen=True, slots=True)
class RegSyncTick:
    """The registry's anti-entropy round (``peer``: with that one, after a heal)."""

    token: int
    peer: NodeId | None
    kind: ClassVar[TimerKind] = TimerKind.REG_SYNC


# --- membership over the broadcast tree -------------------------------------------


@dataclass(frozen=True, slots=True)
class TreeFlush:
    """Broadcast the membership news batched for the tree."""

    token: int
    kind: ClassVar[TimerKind] = TimerKind.TREE_FLUSH


@dataclass(frozen=True, slots=True)
class TreeRelay:
    """News heard off the tree has waited for it: broadcast what did not come."""

    token: int
    kind: ClassVar[TimerKind] = TimerKind.TREE_RELAY


@dataclass(frozen=True, slots=True)
class TreeSweep:
    """A burst of deaths: ping a few random members (see treecast)."""

    token: int
    kind: ClassVar[TimerKind] = TimerKind.TREE_SWEEP


MembershipTimer = (
    ProbeTick
    | ProbeTimeout
    | IndirectTimeout
    | SuspicionTimeout
    | ConfirmTimeout
    | GossipTick
    | RingFlush
    | PushPullTick
    | ReconnectTick
    | ReapTick
    | GhostReap
    | LeaveSpread
    | TreeFlush
    | TreeRelay
    | TreeSweep
)
# The registry's (peerd.core.registry): the peer hands them to it.
RegistryTimer = RegFlush | RegSettleTimeout | RegSyncTick

# --- mesh (HyParView, Plumtree) ---------------------------------------------------


@dataclass(frozen=True, slots=True)
class ShuffleTick:
    """HyParView: the periodic shuffle and view upkeep."""

    token: int
    kind: ClassVar[MeshTimerKind] = MeshTimerKind.SHUFFLE


@dataclass(frozen=True, slots=True)
class NeighborTimeout:
    """HyParView: the neighbour request to ``node`` got no answer."""

    token: int
    node: NodeId
    kind: ClassVar[MeshTimerKind] = MeshTimerKind.NEIGHBOR_TIMEOUT


@dataclass(frozen=True, slots=True)
class IHaveFlush:
    """Plumtree: send the batched announcements."""

    token: int
    kind: ClassVar[MeshTimerKind] = MeshTimerKind.IHAVE_FLUSH


@dataclass(frozen=True, slots=True)
class GraftTimeout:
    """Plumtree: the announced broadcast ``msg_id`` did not arrive: graft."""

    token: int
    msg_id: bytes
    kind: ClassVar[MeshTimerKind] = MeshTimerKind.GRAFT


HyParViewTimer = ShuffleTick | NeighborTimeout
PlumtreeTimer = IHaveFlush | GraftTimeout
MeshTimer = HyParViewTimer | PlumtreeTimer

# --- names messaging --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SendDeadline:
    """Call ``call`` fails with TIMEOUT for whatever has not been answered at
    ``at``; firing a finished call's timer is a no-op (calls are unique, so
    the call is its own token)."""

    at: float
    call: int


Timer = MembershipTimer | RegistryTimer | MeshTimer | SendDeadline

_BY_KIND: dict[TimerKind, type] = {
    cls.kind: cls
    for cls in (
        ProbeTick,
        ProbeTimeout,
        IndirectTimeout,
        SuspicionTimeout,
        ConfirmTimeout,
        GossipTick,
        PushPullTick,
        ReconnectTick,
        ReapTick,
        GhostReap,
        LeaveSpread,
        RegFlush,
        RegSettleTimeout,
        RegSyncTick,
        TreeFlush,
        TreeRelay,
        TreeSweep,
    )
}
_CONTEXT_DEFAULTS: dict[TimerKind, tuple[object, ...]] = {
    TimerKind.PROBE_TIMEOUT: (0,),
    TimerKind.INDIRECT_TIMEOUT: (0,),
    TimerKind.SUSPICION: (b"", 0),
    TimerKind.CONFIRM_TIMEOUT: (0,),
    TimerKind.GHOST_REAP: (b"",),
    TimerKind.REG_SETTLE: (0,),
    TimerKind.REG_SYNC: (None,),
}


def membership_timer(
    kind: TimerKind, token: int, *context: object
) -> MembershipTimer | RegistryTimer:
    """The membership timer of ``kind`` (GOSSIP: the gossip round) with
    ``token``; without ``context``, placeholder context (tests, tools)."""
    args = context or _CONTEXT_DEFAULTS.get(kind, ())
    timer: MembershipTimer | RegistryTimer = _BY_KIND[kind](token, *args)
    return timer
