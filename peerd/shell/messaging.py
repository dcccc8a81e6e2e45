"""Messages to registered names in the trio daemon: an adapter around the names core.

Every decision about a message (who owns the name, which route, which
``seq``, when a call times out, whether a receiver may have it, how full the
mailboxes are, what a reply token means, what the outcome is) is made by
:class:`peerd.core.names.core.Names`; its theory of operation is there.
This module only moves things between it and the daemon:

* in: the runner's calls (:meth:`Messenger.begin` for the API ``send``,
  :meth:`~Messenger.on_message` / :meth:`~Messenger.on_reply` for link
  traffic, :meth:`~Messenger.link_lost`, :meth:`~Messenger.mark_quiet`), and
  the API connections' reports (a mailbox message taken, the connection
  closed) become core inputs, stamped with the clock;
* out: :class:`~peerd.core.names.events.LinkSend` goes to the link manager
  (whose pool of direct links stays here), and its acceptance comes back;
  :class:`DeliverToConn` becomes a ``message`` connection event offered to
  the API connection, whose answer comes back; a :class:`SendResult`
  completes the waiting API call, with the core's error mapped onto the
  API's error codes and texts;
* time: a :class:`SendDeadline` is kept in a heap on the daemon's clock and
  fired when its API call stops waiting (:meth:`Messenger.wait`) or, for a
  call nobody waits for any more, at the next entry into the messenger. (A
  later step moves these timers into the runner's single timer heap.)

The read-only view the core needs (:class:`_View`) reads the Node, its
RegistryService and the runner's table of API connections that wrote to the
registry or sent a message; the core never changes them.
"""

from __future__ import annotations

import collections
import heapq
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
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
from peerd.core.names import events as ev
from peerd.core.names.core import Names, NamesConfig
from peerd.core.names.view import LocalEntry, MemberRef, OwnerRef
from peerd.shell.api_server import MAILBOX_BYTES, MAILBOX_MESSAGES
from peerd.wire.messages import NameMsg, NameReply, NodeId, RegKind

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


_CODE = {
    ev.SendError.NOT_FOUND: ErrorCode.NOT_FOUND,
    ev.SendError.NO_RECEIVER: ErrorCode.NO_RECEIVER,
    ev.SendError.MAILBOX_FULL: ErrorCode.UNAVAILABLE,
    ev.SendError.UNAVAILABLE: ErrorCode.UNAVAILABLE,
}
_TEXT = {
    ev.Why.VANISHED: "the owner of {target} vanished before the message arrived",
    ev.Why.MAILBOX_FULL: "mailbox full: the process holding {target} is not reading its messages",
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
    names: Names
    delivered: int = 0
    failures: list[dict[str, Any]] = field(default_factory=list)
    error: ApiError | None = None
    done: trio.Event | None = None
    finished: bool = False
    reply: bool = False  # a send to a reply_to token
    timer: ev.SendDeadline | None = None

    @property
    def seqs(self) -> dict[int, NodeId]:
        """What the call still waits for."""
        return {} if self.finished else self.names.outstanding(self.call)

    def result(self) -> dict[str, Any]:
        if self.error is not None:
            raise self.error
        out: dict[str, Any] = {"delivered": self.delivered}
        if self.every:
            out["failed"] = self.failures
        return out


class _View:
    """The core's read-only view of the Node, its registry and the runner's
    API connections (through the messenger, whose attributes tests replace)."""

    def __init__(self, m: Messenger) -> None:
        self.m = m
        self._me: NodeId | None = None

    def _registry(self) -> Any:
        return getattr(self.m.node, "registry", None)

    def me(self) -> NodeId:
        if self._me is None:  # a node's id never changes
            self._me = self.m.node.local_member().node
        return self._me

    def my_generation(self) -> int | None:
        registry = self._registry()
        return None if registry is None else int(getattr(registry.state, "generation", 0))

    def leaving(self) -> bool:
        return bool(self.m.leaving())

    def _gen_of(self, origin: NodeId) -> int:
        """The generation of ``origin``'s partition in our replica (0: unknown)."""
        version_of = getattr(self._registry().state, "version_of", None)
        return int(version_of(origin)[0]) if version_of is not None else 0

    def lookup(self, scope: str, name: str) -> OwnerRef | None:
        claim = self._registry().state.lookup(scope, name)
        if claim is None:
            return None
        return OwnerRef(claim.origin, claim.entry.eid, self._gen_of(claim.origin))

    def group_members(self, scope: str, name: str) -> Sequence[OwnerRef]:
        return [
            OwnerRef(c.origin, c.entry.eid, self._gen_of(c.origin))
            for c in self._registry().state.group_members(scope, name)
        ]

    def member(self, node: NodeId) -> MemberRef | None:
        m = self.m.node.member(node)
        return None if m is None else MemberRef(m.status, m.generation, m.addr)

    def local_entry(self, eid: int) -> LocalEntry | None:
        registry = self._registry()
        entry = registry.state.local.entries.get(eid) if registry is not None else None
        return None if entry is None else LocalEntry(entry.kind, entry.scope, entry.name)

    def owner_conn(self, eid: int) -> int | None:
        conn = self._registry().owner_conn(eid)
        return None if conn is None else int(conn)

    def sender_of(self, conn: int) -> tuple[str, str, int]:
        registry = self._registry()
        for kind, scope, name in registry.held_by_conn(conn):
            if kind is RegKind.NAME:
                eid_of = getattr(registry, "eid_of", None)
                eid = eid_of(conn, kind, scope, name) if eid_of is not None else None
                return str(name), str(scope), int(eid or 0)
        return "", "", 0

    def conn_open(self, conn: int) -> bool:
        c = self.m.conns.get(conn)
        return c is not None and not getattr(c, "closed", False)


def _clock() -> float:
    """Trio's clock inside a trio run (as the runner passes), else monotonic."""
    try:
        return trio.current_time()
    except RuntimeError:
        return time.monotonic()


class Messenger:
    """Owned by the runner (all methods but :meth:`wait` run in its task)."""

    def __init__(
        self,
        node: Any,
        links: Any,
        conns: dict[int, Any],
        counters: collections.Counter[str],
        *,
        send_timeout_s: float = SEND_TIMEOUT_S,
        rng: random.Random | None = None,
        leaving: Callable[[], bool] = lambda: False,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.node = node
        self.links = links
        self.conns = conns  # the runner's connections that wrote to the registry
        self.counters = counters
        self.send_timeout_s = send_timeout_s
        self.rng = rng or random.Random()
        self.leaving = leaving
        self.clock = clock or _clock
        self.names = Names(
            _View(self),
            NamesConfig(send_timeout_s=send_timeout_s, hint_ttl_s=HINT_TTL_S, max_hints=MAX_HINTS),
            rng=self.rng,
            counters=counters,
        )
        self._calls = 0
        self._waiting: dict[int, Pending] = {}  # call -> the API call's handle
        self._timers: list[tuple[float, int, ev.SendDeadline]] = []
        self._hooked: set[int] = set()  # connections that report taken mail

    @property
    def pending(self) -> int:
        return self.names.pending

    @property
    def quiet(self) -> set[int]:
        return self.names.quiet

    def mark_quiet(self, eid: int) -> None:
        """Entry ``eid`` (ours) is held by a process that takes no messages."""
        self._feed(ev.MarkQuiet(eid))

    # --- sender ---------------------------------------------------------------------

    def begin(self, conn: object, args: SendArgs) -> Pending:
        """Resolve and send (or deliver locally); the outcome fills in later."""
        self._fire_due()
        conn_id = getattr(conn, "id", None)
        if type(conn_id) is int and not getattr(conn, "closed", False):
            # Replies to this connection's messages must find it.
            self.conns.setdefault(conn_id, conn)
        else:
            conn_id = 0
        self._calls += 1
        call = self._calls
        inp: ev.NamesInput
        if args.reply_to is not None:
            to = args.reply_to
            p = Pending(REPLY_TARGET, False, call, self.names, reply=True)
            inp = ev.ReplyToSender(
                call, conn_id, ev.ReplyAddr(to.node, to.generation, to.conn), args.payload
            )
        else:
            p = Pending(f"{args.scope}/{args.name}", args.all, call, self.names)
            inp = ev.SendToName(
                call, conn_id, args.kind, args.scope, args.name, args.payload, args.all
            )
        self._waiting[call] = p
        refused = self._feed(inp)
        if refused is not None:
            what = "name" if args.kind is RegKind.NAME else "group"
            if refused.why in (ev.Why.NO_SUCH_NAME, ev.Why.NO_SUCH_GROUP):
                raise ApiError(
                    ErrorCode.NOT_FOUND, f"no {what} {args.name!r} in scope {args.scope!r}"
                )
            raise self._error(p, refused)
        return p

    async def wait(self, p: Pending, deadline: float | None = None) -> dict[str, Any]:
        """The call's result, or ApiError; bounded by its deadline."""
        if not p.finished and p.timer is not None:
            if p.done is None:
                p.done = trio.Event()
            at = trio.current_time() + max(0.0, p.timer.at - self.clock())
            with trio.move_on_at(at if deadline is None else min(at, deadline)):
                await p.done.wait()
            if not p.finished:
                self._feed(ev.DeadlineFired(p.timer))
        return p.result()

    def on_reply(self, src: NodeId, reply: NameReply) -> None:
        self._fire_due()
        self._feed(ev.NameReplyIn(src, reply))

    def link_lost(self, node: NodeId, link: int | None = None) -> None:
        """Everything still waiting on ``node`` fails (delivery unknown); with
        ``link``, only what went on that link (a newer one carries the rest)."""
        self._feed(ev.LinkLost(node, link))

    # --- receiver -------------------------------------------------------------------

    def on_message(self, src: NodeId, msg: NameMsg) -> None:
        self._fire_due()
        self._feed(ev.NameMsgIn(src, msg))

    # --- carrying out the core's outputs -------------------------------------------

    def _feed(self, first: ev.NamesInput) -> ev.Failure | None:
        """Hand ``first`` to the core and carry out what it says, feeding back
        the answers it asked for. Returns the failure of a call refused at once."""
        refused: ev.Failure | None = None
        inputs: collections.deque[ev.NamesInput] = collections.deque([first])
        while inputs:
            for out in self.names.handle(self.clock(), inputs.popleft()):
                match out:
                    case ev.LinkSend(node, addr, msg, seq):
                        inputs.extend(self._link_send(node, addr, msg, seq))
                    case ev.DeliverToConn():
                        inputs.append(ev.Offered(out.token, self._offer(out)))
                    case ev.SendDeadline():
                        heapq.heappush(self._timers, (out.at, out.call, out))
                        p = self._waiting.get(out.call)
                        if p is not None:
                            p.timer = out
                    case ev.SendResult():
                        if out.at_once:
                            self._waiting.pop(out.call, None)
                            refused = out.error
                        else:
                            self._complete(out)
        return refused

    def _link_send(
        self, node: NodeId, addr: Any, msg: NameMsg | NameReply, seq: int
    ) -> list[ev.NamesInput]:
        links = self.links
        if addr is not None and not links.has(node):
            links.connect(node, addr, mesh=False)
        ok = bool(links.send(node, msg, DIRECT_PRIORITY, mesh=False))
        if not seq:
            return []
        return [ev.LinkSendDone(seq, ok, links.link_id(node) if ok else None)]

    def _offer(self, d: ev.DeliverToConn) -> ev.OfferOutcome:
        conn = self.conns.get(d.conn)
        if conn is None:
            return ev.OfferOutcome.CLOSED
        if d.conn not in self._hooked and hasattr(conn, "on_mail"):
            self._hooked.add(d.conn)
            conn.on_mail = lambda n, c=d.conn: self._mail(c, n)
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

    def _mail(self, conn: int, taken: int | None) -> None:
        """An API connection's report: its writer took mailbox messages, or
        (None) it closed."""
        if taken is None:
            self._hooked.discard(conn)
            self._feed(ev.ConnClosed(conn))
        else:
            self._feed(ev.MailboxTaken(conn, taken))

    def _fire_due(self) -> None:
        now = self.clock()
        while self._timers and self._timers[0][0] <= now:
            timer = heapq.heappop(self._timers)[2]
            self._feed(ev.DeadlineFired(timer))

    def _complete(self, r: ev.SendResult) -> None:
        p = self._waiting.pop(r.call, None)
        if p is None:
            return
        p.delivered = r.delivered
        p.failures = [
            {"node": f.node.hex(), "code": str(_CODE[f.error]), "message": self._text(p, f)}
            for f in r.failures
        ]
        if r.error is not None:
            p.error = self._error(p, r.error)
            if p.every:
                first = p.failures[0]
                p.error = ApiError(
                    first["code"],
                    f"delivered to none of the {len(p.failures)} members: {first['message']}",
                )
        p.finished = True
        if p.done is not None:
            p.done.set()

    def _text(self, p: Pending, f: ev.Failure) -> str:
        if f.why is ev.Why.REPLY_GONE:
            return REPLY_GONE
        return _TEXT[f.why].format(target=p.target, timeout=self.send_timeout_s)

    def _error(self, p: Pending, f: ev.Failure) -> ApiError:
        return ApiError(_CODE[f.error], self._text(p, f))
