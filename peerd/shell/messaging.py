"""Messages to registered names: the ``send`` op, over direct peer links.

Sender side (in the runner task): ``send(name | group, payload)`` resolves
the owner from the local registry replica (a name: its holder; a group: one
member, a local one first, else a random one; ``all``: every member). A
local owner gets the message at once; a remote one gets a
:class:`~peerd.wire.messages.NameMsg` over the link to its daemon (opened on
demand from the link manager's bounded pool of direct links; idle ones
close). Every NameMsg is answered by one :class:`NameReply` with its
``seq``, so the API call returns ``{"delivered": n}`` or a clear error:

* ``not_found``: nobody holds the name (here), or the owner vanished before
  the message got there (its entry is gone at the owner's daemon);
* ``unavailable``: the receiving connection's mailbox is full, the owner's
  daemon refused it, the link to it failed or it did not answer in time
  (then delivery is unknown: at most once, never twice).

Receiver side: the entry ``eid`` must still be held by this daemon (a name
re-registered since is a different entry, so a message for a vanished owner
never reaches its successor); the payload is queued on the owning API
connection as a connection event (stream 0) ``message`` with the sender's
registered name, if it has one, so the receiver can answer it. That
connection's bounded outgoing queue is the mailbox.

Order: the API server answers a connection's sends in batches, in order,
and one link carries everything between two daemons in order, so the
messages of one sender to one receiver arrive in the order they were sent.
"""

from __future__ import annotations

import collections
import itertools
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from peerd.api.protocol import (
    CONNECTION_STREAM,
    MESSAGE_EVENT,
    ApiError,
    ErrorCode,
    SendArgs,
    message_event_to_wire,
)
from peerd.shell.api_server import MAILBOX_BYTES, MAILBOX_MESSAGES
from peerd.wire.messages import NameMsg, NameReply, NameStatus, NodeId, RegKind

# Link priority of direct messages: with user broadcasts, after the daemon's own.
DIRECT_PRIORITY = 3
SEND_TIMEOUT_S = 10.0


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


_STATUS_ERROR = {
    NameStatus.NOT_FOUND: (
        ErrorCode.NOT_FOUND,
        "the owner of {target} vanished before the message arrived",
    ),
    NameStatus.MAILBOX_FULL: (
        ErrorCode.UNAVAILABLE,
        "mailbox full: the process holding {target} is not reading its messages",
    ),
    NameStatus.REFUSED: (
        ErrorCode.UNAVAILABLE,
        "the daemon of {target}'s owner refused the message (leaving, or no registry)",
    ),
}


@dataclass(eq=False, slots=True)
class Pending:
    """One ``send`` call: its outstanding NameMsgs (seq -> peer) and outcome."""

    target: str
    every: bool
    seqs: dict[int, NodeId] = field(default_factory=dict)
    delivered: int = 0
    failures: list[dict[str, Any]] = field(default_factory=list)
    error: ApiError | None = None
    done: trio.Event | None = None
    finished: bool = False

    def result(self) -> dict[str, Any]:
        if self.error is not None:
            raise self.error
        out: dict[str, Any] = {"delivered": self.delivered}
        if self.every:
            out["failed"] = self.failures
        return out


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
    ) -> None:
        self.node = node
        self.links = links
        self.conns = conns  # the runner's connections that wrote to the registry
        self.counters = counters
        self.send_timeout_s = send_timeout_s
        self.rng = rng or random.Random()
        self.leaving = leaving
        self._seq = itertools.count(1)
        self._pending: dict[int, Pending] = {}  # seq -> call
        self._via: dict[int, int | None] = {}  # seq -> the link it went on (LinkLost.link)
        self._my_id: NodeId | None = None

    @property
    def pending(self) -> int:
        return len(self._pending)

    def _me(self) -> NodeId:
        if self._my_id is None:  # a node's id never changes
            self._my_id = self.node.local_member().node
        return self._my_id

    def _registry(self) -> Any:
        registry = getattr(self.node, "registry", None)
        if registry is None:
            raise ApiError(ErrorCode.UNAVAILABLE, "this daemon has no registry")
        return registry

    # --- sender ---------------------------------------------------------------------

    def begin(self, conn: object, args: SendArgs) -> Pending:
        """Resolve and send (or deliver locally); the outcome fills in later."""
        state = self._registry().state
        what = "name" if args.kind is RegKind.NAME else "group"
        target = f"{args.scope}/{args.name}"
        if args.kind is RegKind.NAME:
            claim = state.lookup(args.scope, args.name)
            claims = [claim] if claim is not None else []
        else:
            claims = list(state.group_members(args.scope, args.name))
        if not claims:
            raise ApiError(ErrorCode.NOT_FOUND, f"no {what} {args.name!r} in scope {args.scope!r}")
        me = self._me()
        if args.kind is RegKind.GROUP and not args.all:
            local = [c for c in claims if c.origin == me]
            claims = [local[0] if local else self.rng.choice(claims)]
        sender = self._sender_name(getattr(conn, "id", None))
        p = Pending(target, args.all)
        links = self.links
        for c in claims:
            origin = c.origin
            if origin == me:
                self.counters["send_local"] += 1
                msg = NameMsg(
                    0, args.kind, args.scope, args.name, c.entry.eid, sender, args.payload
                )
                self._outcome(p, None, me, self.deliver(me, msg))
                continue
            if not links.has(origin):
                member = self.node.member(origin)
                if member is None:
                    self._outcome(p, None, origin, None, "the owner's node is not a known member")
                    continue
                links.connect(origin, member.addr, mesh=False)
            seq = next(self._seq)
            msg = NameMsg(seq, args.kind, args.scope, args.name, c.entry.eid, sender, args.payload)
            if not links.send(origin, msg, DIRECT_PRIORITY, mesh=False):
                self._outcome(
                    p, None, c.origin, None, "the link to the owner's daemon is full or down"
                )
                continue
            self.counters["send_remote"] += 1
            p.seqs[seq] = origin
            self._pending[seq] = p
            self._via[seq] = links.link_id(origin)
        self._maybe_finish(p)
        return p

    def _sender_name(self, conn_id: Any) -> str:
        if type(conn_id) is not int:
            return ""
        for kind, _scope, name in self._registry().held_by_conn(conn_id):
            if kind is RegKind.NAME:
                return str(name)
        return ""

    def _outcome(
        self, p: Pending, seq: int | None, peer: NodeId, status: NameStatus | None, why: str = ""
    ) -> None:
        if seq is not None:
            p.seqs.pop(seq, None)
            self._via.pop(seq, None)
        if status is NameStatus.DELIVERED:
            p.delivered += 1
            return
        if status is not None:
            code, text = _STATUS_ERROR[status]
            message = text.format(target=p.target)
        else:
            code, message = ErrorCode.UNAVAILABLE, f"{p.target}: {why}"
        self.counters[f"send_failed_{code}"] += 1
        p.failures.append({"node": peer.hex(), "code": str(code), "message": message})
        if not p.every:
            p.error = ApiError(code, message)

    def _maybe_finish(self, p: Pending) -> None:
        if p.seqs or p.finished:
            return
        p.finished = True
        if p.every and not p.delivered and p.failures:
            f = p.failures[0]
            p.error = ApiError(
                f["code"], f"delivered to none of the {len(p.failures)} members: {f['message']}"
            )
        if p.done is not None:
            p.done.set()

    async def wait(self, p: Pending, deadline: float | None = None) -> dict[str, Any]:
        """The call's result, or ApiError; bounded by ``send_timeout_s``."""
        if not p.finished:
            if p.done is None:
                p.done = trio.Event()
            with trio.move_on_at(
                deadline if deadline is not None else trio.current_time() + self.send_timeout_s
            ):
                await p.done.wait()
            if not p.finished:
                for seq, peer in list(p.seqs.items()):
                    self._pending.pop(seq, None)
                    self._outcome(
                        p,
                        seq,
                        peer,
                        None,
                        "no answer from the owner's daemon in "
                        f"{self.send_timeout_s:g} s (delivery "
                        "unknown)",
                    )
                self.counters["send_timeouts"] += 1
                self._maybe_finish(p)
        return p.result()

    def on_reply(self, src: NodeId, reply: NameReply) -> None:
        p = self._pending.get(reply.seq)
        if p is None or p.seqs.get(reply.seq) != src:
            self.counters["send_reply_unexpected"] += 1
            return
        del self._pending[reply.seq]
        self._outcome(p, reply.seq, src, reply.status)
        self._maybe_finish(p)

    def link_lost(self, node: NodeId, link: int | None = None) -> None:
        """Everything still waiting on ``node`` fails (delivery unknown); with
        ``link``, only what went on that link (a newer one carries the rest)."""
        lost = [
            seq
            for seq, p in self._pending.items()
            if p.seqs.get(seq) == node and (link is None or self._via.get(seq) in (None, link))
        ]
        for seq in lost:
            p = self._pending.pop(seq)
            self._outcome(
                p, seq, node, None, "the link to the owner's daemon was lost (delivery unknown)"
            )
            self._maybe_finish(p)

    # --- receiver -------------------------------------------------------------------

    def on_message(self, src: NodeId, msg: NameMsg) -> None:
        status = self.deliver(src, msg)
        self.links.send(src, NameReply(msg.seq, status), DIRECT_PRIORITY, mesh=False)

    def deliver(self, src: NodeId, msg: NameMsg) -> NameStatus:
        """Queue ``msg`` on the connection holding entry ``msg.eid`` here."""
        registry = getattr(self.node, "registry", None)
        if registry is None or self.leaving():
            self.counters["message_refused"] += 1
            return NameStatus.REFUSED
        entry = registry.state.local.entries.get(msg.eid)
        if (
            entry is None
            or entry.kind is not msg.kind
            or entry.scope != msg.scope
            or entry.name != msg.name
        ):
            self.counters["message_not_found"] += 1
            return NameStatus.NOT_FOUND
        conn_id = registry.owner_conn(msg.eid)
        conn = self.conns.get(conn_id) if conn_id is not None else None
        if conn is None or getattr(conn, "closed", False):
            self.counters["message_not_found"] += 1
            return NameStatus.NOT_FOUND
        data = message_event_to_wire(msg.sender, src, msg.kind, msg.scope, msg.name, msg.payload)
        try:
            outcome = conn.offer(CONNECTION_STREAM, MESSAGE_EVENT, data)
        except (AttributeError, ValueError):
            outcome = "closed"
        if outcome == "closed":  # the owner is going away: its entries follow
            self.counters["message_not_found"] += 1
            return NameStatus.NOT_FOUND
        if outcome != "ok":
            self.counters["message_mailbox_full"] += 1
            return NameStatus.MAILBOX_FULL
        self.counters["message_delivered"] += 1
        return NameStatus.DELIVERED
