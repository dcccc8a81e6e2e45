"""Messages to registered names in the trio daemon: the API side of the ``send`` op.

Every decision about a message (who owns the name, which route, which
``seq``, when a call times out, whether a receiver may have it, how full the
mailboxes are, what a reply token means, what the outcome is) is made by the
names core (:mod:`peerd.core.names.core`, its theory of operation is there),
which the one :class:`~peerd.core.peer.Peer` owns; the runner
(:mod:`peerd.shell.runner`) carries out its outputs like any other: link
sends through the link manager, :class:`~peerd.core.events.SendDeadline`
timers on the runner's one timer heap. What is left here is what only the
shell can know, the API:

* :class:`Sends`: an API ``send`` call becomes a core input with a fresh call
  token (:meth:`Sends.start`), and the call's :class:`Pending` handle waits,
  in the calling task, for the :class:`~peerd.core.events.SendResult`
  with that token (:meth:`Sends.complete`, :meth:`Sends.wait`);
* the core's :class:`~peerd.core.events.SendError` and
  :class:`~peerd.core.events.Why` become the API's error codes and
  texts;
* a :class:`~peerd.core.events.DeliverToConn` becomes a ``message``
  connection event offered to the API connection's mailbox
  (:meth:`Sends.offer`); the runner sends the answer it carries if the
  connection took it, else (or for a local call) feeds the outcome back.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import trio

from peerd.api.protocol import (
    CONNECTION_STREAM,
    MESSAGE_EVENT,
    ApiError,
    ErrorCode,
    ReplyTo,
    SendArgs,
    message_event_to_wire,
)
from peerd.core import events as ev
from peerd.core.names.core import NamesConfig
from peerd.shell.api_conn import MAILBOX_BYTES, MAILBOX_MESSAGES
from peerd.shell.api_limits import DEFAULT_MAILBOX_TOTAL_BYTES
from peerd.wire.messages import RegKind

# Link priority of direct messages: with user broadcasts, after the daemon's own.
DIRECT_PRIORITY = 3
SEND_TIMEOUT_S = 10.0
# A sender-name hint lives this long after the last message that carried it:
# well past the registry's own delay (milliseconds; one anti-entropy round,
# 10 s, when a delta was lost), so it only bounds memory.
HINT_TTL_S = 30.0
MAX_HINTS = 4096


@dataclass(frozen=True, slots=True)
class MessageLimits:
    """The ``[messages]`` settings (peerd.shell.settings)."""

    # A send to a remote owner waits this long for its daemon's answer, then
    # fails "no answer" (delivery unknown). Longer: fewer false failures
    # over slow links; shorter: a frozen owner's daemon blocks callers less.
    send_timeout_s: float = SEND_TIMEOUT_S
    # Per API connection, messages waiting for a client that does not read
    # (its mailbox); past either bound senders get "mailbox full".
    mailbox_messages: int = MAILBOX_MESSAGES
    mailbox_bytes: int = MAILBOX_BYTES
    # All mailboxes of the daemon together, in bytes of encoded frames; past
    # it senders get "mailbox full" whichever connection the message is for.
    mailbox_total_bytes: int = DEFAULT_MAILBOX_TOTAL_BYTES


def names_config(limits: MessageLimits) -> NamesConfig:
    """The names core's configuration from the ``[messages]`` settings (the
    per-connection mailbox bounds are the API server's)."""
    return NamesConfig(
        send_timeout_s=limits.send_timeout_s, hint_ttl_s=HINT_TTL_S, max_hints=MAX_HINTS
    )


_CODE = {
    ev.SendError.NOT_FOUND: ErrorCode.NOT_FOUND,
    ev.SendError.NO_RECEIVER: ErrorCode.NO_RECEIVER,
    ev.SendError.MAILBOX_FULL: ErrorCode.MAILBOX_FULL,
    ev.SendError.UNAVAILABLE: ErrorCode.UNAVAILABLE,
}
_TEXT = {
    ev.Why.VANISHED: "the owner of {target} vanished before the message arrived",
    ev.Why.MAILBOX_FULL: (
        "mailbox full: the process holding {target} is not reading its messages "
        "(or its daemon's mailboxes together are at their bound)"
    ),
    ev.Why.REFUSED: (
        "the daemon of {target}'s owner refused the message (leaving, or no registry)"
    ),
    ev.Why.NO_RECEIVER: (
        "{target} is held by a process that takes no messages (it registered with "
        "messages=false, as peerd exec does)"
    ),
    ev.Why.NO_REGISTRY: "this daemon has no registry",
    ev.Why.UNKNOWN_MEMBER: "{target}: the owner's node is not a known member",
    ev.Why.LINK_REFUSED: "{target}: the link to the owner's daemon is full or down",
    ev.Why.LINK_LOST: "{target}: the link to the owner's daemon was lost (delivery unknown)",
    ev.Why.TIMEOUT: (
        "{target}: no answer from the owner's daemon in {timeout:g} s (delivery unknown)"
    ),
}
REPLY_TARGET = "the sender of the message"
REPLY_GONE = (
    "the process that sent the message is gone (its connection closed, or its daemon "
    "restarted or died)"
)
_OFFER = {"ok": ev.OfferOutcome.OK, "closed": ev.OfferOutcome.CLOSED}


@dataclass(eq=False, slots=True)
class Pending:
    """One ``send`` call, as the API backend holds it until its outcome."""

    target: str
    every: bool
    call: int
    delivered: int = 0
    failures: list[dict[str, Any]] | None = None  # set by the outcome
    error: ApiError | None = None
    done: trio.Event | None = None
    finished: bool = False
    reply: bool = False  # a send to a reply_to token
    refused: ev.Failure | None = None  # failed before anything was sent

    def result(self) -> dict[str, Any]:
        if self.error is not None:
            raise self.error
        out: dict[str, Any] = {"delivered": self.delivered}
        if self.every:
            out["failed"] = self.failures or []
        return out


class Sends:
    """The API ``send`` calls waiting for their outcome, and the API
    connections messages are offered to. Owned by the runner: everything but
    :meth:`wait` runs in its task."""

    def __init__(self, conns: dict[int, Any], send_timeout_s: float = SEND_TIMEOUT_S) -> None:
        # The runner's API connections that wrote to the registry or sent a
        # message (id -> connection): replies and messages to names reach them.
        self.conns = conns
        self.send_timeout_s = send_timeout_s
        self._calls = 0
        self._waiting: dict[int, Pending] = {}  # call token -> the API call's handle
        self._hooked: set[int] = set()  # connections that report taken mail

    def start(
        self, conn: object, args: SendArgs
    ) -> tuple[Pending, ev.SendToName | ev.ReplyToSender]:
        """The handle of a new call and the core input that makes it."""
        conn_id = getattr(conn, "id", None)
        if type(conn_id) is int and not getattr(conn, "closed", False):
            # Replies to this connection's messages must find it.
            self.conns.setdefault(conn_id, conn)
        else:
            conn_id = 0
        self._calls += 1
        call = self._calls
        inp: ev.SendToName | ev.ReplyToSender
        if args.reply_to is not None:
            to = args.reply_to
            p = Pending(REPLY_TARGET, False, call, reply=True)
            inp = ev.ReplyToSender(
                call, conn_id, ev.ReplyAddr(to.node, to.generation, to.conn), args.payload
            )
        else:
            p = Pending(f"{args.scope}/{args.name}", args.all, call)
            inp = ev.SendToName(
                call, conn_id, args.kind, args.scope, args.name, args.payload, args.all
            )
        self._waiting[call] = p
        return p, inp

    def started(self, p: Pending, args: SendArgs) -> Pending:
        """After the core took the call's input: the handle, or the ApiError
        of a call refused at once."""
        refused = p.refused
        if refused is None:
            return p
        what = "name" if args.kind is RegKind.NAME else "group"
        if refused.why in (ev.Why.NO_SUCH_NAME, ev.Why.NO_SUCH_GROUP):
            raise ApiError(ErrorCode.NOT_FOUND, f"no {what} {args.name!r} in scope {args.scope!r}")
        raise self._error(p, refused)

    async def wait(self, p: Pending) -> dict[str, Any]:
        """The call's result, or ApiError. Every call ends: the core's
        SendDeadline bounds it, and a daemon that stops ends the rest."""
        if not p.finished:
            if p.done is None:
                p.done = trio.Event()
            await p.done.wait()
        return p.result()

    def complete(self, r: ev.SendResult) -> None:
        """The core's outcome of call ``r.call``."""
        p = self._waiting.pop(r.call, None)
        if p is None:
            return
        if r.at_once:
            p.refused = r.error
            p.finished = True
            return
        p.delivered = r.delivered
        p.failures = failures = [
            {"node": f.node.hex(), "code": str(_CODE[f.error]), "message": self._text(p, f)}
            for f in r.failures
        ]
        if r.error is not None:
            p.error = self._error(p, r.error)
            if p.every:
                first = failures[0]
                p.error = ApiError(
                    first["code"],
                    f"delivered to none of the {len(failures)} members: {first['message']}",
                )
        self._finish(p)

    def abandon(self, error: ApiError) -> None:
        """The daemon stops: every call still waiting fails with ``error``."""
        for p in self._waiting.values():
            p.error = error
            self._finish(p)
        self._waiting.clear()

    def offer(
        self, d: ev.DeliverToConn, on_mail: Callable[[int, int | None], None]
    ) -> ev.OfferOutcome:
        """Queue the ``message`` event on its API connection's mailbox; the
        connection then reports what its writer took to ``on_mail``."""
        conn = self.conns.get(d.conn)
        if conn is None:
            return ev.OfferOutcome.CLOSED
        if d.conn not in self._hooked and hasattr(conn, "on_mail"):
            self._hooked.add(d.conn)
            conn.on_mail = lambda n, c=d.conn: on_mail(c, n)
        reply_to = (
            ReplyTo(d.reply_to.node, d.reply_to.generation, d.reply_to.conn).token()
            if d.reply_to is not None
            else None
        )
        data = message_event_to_wire(
            d.sender,
            d.from_node,
            d.kind,
            d.scope,
            d.name,
            d.payload,
            from_scope=d.from_scope,
            reply_to=reply_to,
        )
        try:
            outcome = conn.offer(CONNECTION_STREAM, MESSAGE_EVENT, data)
        except (AttributeError, ValueError):
            outcome = "closed"
        return _OFFER.get(outcome, ev.OfferOutcome.FULL)

    def forget_conn(self, conn: int) -> None:
        self._hooked.discard(conn)

    def _finish(self, p: Pending) -> None:
        p.finished = True
        if p.done is not None:
            p.done.set()

    def _text(self, p: Pending, f: ev.Failure) -> str:
        if f.why is ev.Why.REPLY_GONE:
            return REPLY_GONE
        return _TEXT[f.why].format(target=p.target, timeout=self.send_timeout_s)

    def _error(self, p: Pending, f: ev.Failure) -> ApiError:
        return ApiError(_CODE[f.error], self._text(p, f))
