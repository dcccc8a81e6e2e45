"""The vocabulary of names messaging: what goes into the core and what comes out.

The names core (:mod:`peerd.core.names.core`) is driven by ``handle(now, input)``
and answers with a list of outputs; nothing else reaches it but a read-only
view of the registry replica and of membership (:mod:`peerd.core.names.view`).
Everything here is a frozen value, so a shell (trio) and the simulator can
queue, log and replay them.

Three kinds of exchange need an answer from the shell, each carrying a token
the core chose, so no decision is left to the shell:

* :class:`LinkSend` with a non-zero ``seq``: the shell reports
  :class:`LinkSendDone` (did the link manager take the message, and on which
  link; a later :class:`LinkLost` names that link);
* :class:`DeliverToConn`: the shell pushes the message event on the API
  connection and reports :class:`Offered` (its queue may be full or closed:
  only the connection knows the bytes of the encoded frame);
* :class:`SendDeadline`: a typed timer; the shell fires it as
  :class:`DeadlineFired` at or after ``at``.

The mailbox occupancy the core counts (for its per-daemon bound) comes from
:class:`MailboxTaken` (the connection's writer took queued messages) and
:class:`ConnClosed` (whatever was queued there is gone).

Names here are distinct from the other core vocabularies (membership,
registry, mesh) so that they can later merge into one module.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from peerd.core.events import ConnClosed as ConnClosed  # one type: the registry's too
from peerd.core.timers import SendDeadline as SendDeadline  # a typed timer
from peerd.wire.messages import Addr, NameMsg, NameReply, NodeId, RegKind

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
    link manager refused it (full or down); ``link`` the link it went on."""

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
    """The answer to a :class:`DeliverToConn`: what the connection said."""

    token: int
    outcome: OfferOutcome


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
    :class:`LinkSendDone`."""

    node: NodeId
    addr: Addr | None
    msg: NameMsg | NameReply
    seq: int = 0


@dataclass(frozen=True, slots=True)
class DeliverToConn:
    """Push a ``message`` connection event on API connection ``conn`` and
    answer with :class:`Offered` (same ``token``). ``kind`` None: a reply
    (``scope``/``name`` ""). ``reply_to``: the token that answers the sender
    (None: its daemon is too old to say)."""

    token: int
    conn: int
    sender: str
    from_node: NodeId
    from_scope: str
    kind: RegKind | None
    scope: str
    name: str
    payload: bytes
    reply_to: ReplyAddr | None


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
