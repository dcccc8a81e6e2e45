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

Replies need no registry. Every NameMsg says where it came from: the
sending daemon's generation and the sending API connection there
(``from_gen``, ``from_conn``). The receiver turns them into the message
event's ``reply_to`` token (node, generation, connection), and
``send(reply_to=token)`` goes straight back over the link to that node,
which queues it on exactly that connection of that daemon life: a closed
connection or a restarted daemon answers ``not_found`` (connection ids are
never reused within a life, and a new life has a new generation), so a
reply never reaches another process. Only connections that sent a message
can be reached this way.

Read-your-writes for the sender's own names. A message also carries the
sender's name with its scope and entry id (``from_scope``, ``from_eid``).
It goes straight to the owner's daemon over a direct link, so it usually
arrives before the registry delta that announces the sender's name (that
one travels by the mesh, or a few ms later). The receiving daemon keeps a
*hint* per sender name: (node, generation, eid). A ``send`` to a name its
replica does not hold uses the hint: the message goes to that node for
that eid, and the owning daemon checks the entry as for any message (it
answers ``not_found`` if the entry is gone), so a hint can be late but
never wrong. The replica, once it holds the name, always wins; hints expire
after ``HINT_TTL_S`` (the replica learns an entry within milliseconds, or
within one anti-entropy round of 10 s when a delta was lost), are bounded in
number (least recently refreshed dropped first), and are ignored once the
node is known dead or in a newer generation. Why not make the sender wait
until its registration settled before sending? That costs every send a
cluster-wide round trip; the hint costs nothing, and needs no change to the
registry's replication.

Messages to a name whose holder registered with ``messages=false`` (e.g.
``peerd exec``, whose command cannot read them) are refused by the owning
daemon with NO_RECEIVER (API error ``no_receiver``), never ``delivered``.

Order: the API server answers a connection's sends in batches, in order,
and one link carries everything between two daemons in order, so the
messages of one sender to one receiver arrive in the order they were sent.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from peerd.api.protocol import (
    CONNECTION_STREAM,
    DEFAULT_SCOPE,
    MESSAGE_EVENT,
    ApiError,
    ErrorCode,
    ReplyTo,
    SendArgs,
    message_event_to_wire,
)
from peerd.shell.api_server import MAILBOX_BYTES, MAILBOX_MESSAGES
from peerd.wire.messages import NameMsg, NameReply, NameStatus, NodeId, RegKind, Status

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
    NameStatus.NO_RECEIVER: (
        ErrorCode.NO_RECEIVER,
        "{target} is held by a process that takes no messages (it registered with "
        "messages=false, as peerd exec does)",
    ),
}
REPLY_TARGET = "the sender of the message"
REPLY_GONE = (
    "the process that sent the message is gone (its connection closed, or its daemon "
    "restarted or died)"
)


@dataclass(slots=True)
class Hint:
    """Where the sender of a message held its name when it sent it."""

    node: NodeId
    generation: int
    eid: int
    expires: float


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
    reply: bool = False  # a send to a reply_to token

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
        clock: Callable[[], float] = time.monotonic,
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
        self.clock = clock
        # Entries (local eids) whose holder takes no messages (register's
        # "messages": false). Eids are never reused in a daemon life; ids of
        # entries gone are pruned as the set grows.
        self.quiet: set[int] = set()
        self._quiet_pruned = 64
        # (scope, name) -> where its holder sent from (see the module docstring)
        self._hints: collections.OrderedDict[tuple[str, str], Hint] = collections.OrderedDict()

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

    def _my_gen(self) -> int:
        return int(getattr(self._registry().state, "generation", 0))

    def mark_quiet(self, eid: int) -> None:
        """Entry ``eid`` (ours) is held by a process that takes no messages."""
        self.quiet.add(eid)
        if len(self.quiet) > 2 * self._quiet_pruned:
            local = self._registry().state.local.entries
            self.quiet = {e for e in self.quiet if e in local}
            self._quiet_pruned = max(64, len(self.quiet))

    # --- sender ---------------------------------------------------------------------

    def begin(self, conn: object, args: SendArgs) -> Pending:
        """Resolve and send (or deliver locally); the outcome fills in later."""
        state = self._registry().state
        conn_id = getattr(conn, "id", None)
        if type(conn_id) is int and not getattr(conn, "closed", False):
            # Replies to this connection's messages must find it (see deliver).
            self.conns.setdefault(conn_id, conn)
        if args.reply_to is not None:
            return self._begin_reply(conn_id, args, args.reply_to)
        what = "name" if args.kind is RegKind.NAME else "group"
        target = f"{args.scope}/{args.name}"
        # (owner node, entry id, the owner's generation as far as we know)
        targets: list[tuple[NodeId, int, int]]
        if args.kind is RegKind.NAME:
            claim = state.lookup(args.scope, args.name)
            if claim is not None:
                targets = [(claim.origin, claim.entry.eid, self._gen_of(claim.origin))]
            else:
                hint = self._hint(args.scope, args.name)
                targets = [(hint.node, hint.eid, hint.generation)] if hint is not None else []
                if targets:
                    self.counters["send_via_hint"] += 1
        else:
            targets = [
                (c.origin, c.entry.eid, self._gen_of(c.origin))
                for c in state.group_members(args.scope, args.name)
            ]
        if not targets:
            raise ApiError(ErrorCode.NOT_FOUND, f"no {what} {args.name!r} in scope {args.scope!r}")
        me = self._me()
        if args.kind is RegKind.GROUP and not args.all:
            local = [t for t in targets if t[0] == me]
            targets = [local[0] if local else self.rng.choice(targets)]
        p = Pending(target, args.all)
        for origin, eid, gen in targets:
            msg = self._msg(conn_id, args.kind, args.scope, args.name, eid, args.payload, gen, 0)
            self._dispatch(p, origin, msg)
        self._maybe_finish(p)
        return p

    def _begin_reply(self, conn_id: Any, args: SendArgs, to: ReplyTo) -> Pending:
        p = Pending(REPLY_TARGET, False, reply=True)
        if to.node != self._me():
            member = self.node.member(to.node)
            if (
                member is None
                or member.status in (Status.DEAD, Status.LEFT)
                or member.generation > to.generation
            ):
                self.counters["send_failed_not_found"] += 1
                raise ApiError(ErrorCode.NOT_FOUND, REPLY_GONE)
        msg = self._msg(conn_id, RegKind.NAME, "", "", 0, args.payload, to.generation, to.conn)
        self._dispatch(p, to.node, msg)
        self._maybe_finish(p)
        return p

    def _msg(
        self,
        conn_id: Any,
        kind: RegKind,
        scope: str,
        name: str,
        eid: int,
        payload: bytes,
        to_gen: int,
        to_conn: int,
    ) -> NameMsg:
        """A NameMsg (seq 0: set by _dispatch) with the sender's origin fields."""
        sender, sender_scope, sender_eid = "", "", 0
        if type(conn_id) is int:
            sender, sender_scope, sender_eid = self._sender(conn_id)
        else:
            conn_id = 0
        return NameMsg(
            0,
            kind,
            scope,
            name,
            eid,
            sender,
            payload,
            self._my_gen(),
            conn_id,
            sender_scope,
            sender_eid,
            to_gen,
            to_conn,
        )

    def _dispatch(self, p: Pending, origin: NodeId, msg: NameMsg) -> None:
        me = self._me()
        if origin == me:
            self.counters["send_local"] += 1
            self._outcome(p, None, me, self.deliver(me, msg))
            return
        links = self.links
        if not links.has(origin):
            member = self.node.member(origin)
            if member is None:
                self._outcome(p, None, origin, None, "the owner's node is not a known member")
                return
            links.connect(origin, member.addr, mesh=False)
        seq = next(self._seq)
        msg = dataclasses.replace(msg, seq=seq)
        if not links.send(origin, msg, DIRECT_PRIORITY, mesh=False):
            self._outcome(p, None, origin, None, "the link to the owner's daemon is full or down")
            return
        self.counters["send_remote"] += 1
        p.seqs[seq] = origin
        self._pending[seq] = p
        self._via[seq] = links.link_id(origin)

    def _gen_of(self, origin: NodeId) -> int:
        """The generation of ``origin``'s partition in our replica (0: unknown)."""
        version_of = getattr(self._registry().state, "version_of", None)
        return int(version_of(origin)[0]) if version_of is not None else 0

    def _hint(self, scope: str, name: str) -> Hint | None:
        key = (scope, name)
        hint = self._hints.get(key)
        if hint is None:
            return None
        member = self.node.member(hint.node)
        if (
            hint.expires <= self.clock()
            or member is None
            or member.status in (Status.DEAD, Status.LEFT)
            or member.generation > hint.generation
        ):
            del self._hints[key]
            return None
        return hint

    def _learn_hint(self, src: NodeId, msg: NameMsg) -> None:
        if not (msg.sender and msg.from_eid and msg.from_gen) or msg.to_conn:
            return
        key = (msg.from_scope or DEFAULT_SCOPE, msg.sender)
        self._hints[key] = Hint(src, msg.from_gen, msg.from_eid, self.clock() + HINT_TTL_S)
        self._hints.move_to_end(key)
        while len(self._hints) > MAX_HINTS:
            self._hints.popitem(last=False)

    def _sender(self, conn_id: int) -> tuple[str, str, int]:
        """(name, scope, eid) of the first name connection ``conn_id`` holds here."""
        registry = self._registry()
        for kind, scope, name in registry.held_by_conn(conn_id):
            if kind is RegKind.NAME:
                eid_of = getattr(registry, "eid_of", None)
                eid = eid_of(conn_id, kind, scope, name) if eid_of is not None else None
                return str(name), str(scope), int(eid or 0)
        return "", "", 0

    def _outcome(
        self, p: Pending, seq: int | None, peer: NodeId, status: NameStatus | None, why: str = ""
    ) -> None:
        if seq is not None:
            p.seqs.pop(seq, None)
            self._via.pop(seq, None)
        if status is NameStatus.DELIVERED:
            p.delivered += 1
            return
        if status is NameStatus.NOT_FOUND and p.reply:
            code, message = ErrorCode.NOT_FOUND, REPLY_GONE
        elif status is not None:
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
        self._learn_hint(src, msg)
        status = self.deliver(src, msg)
        self.links.send(src, NameReply(msg.seq, status), DIRECT_PRIORITY, mesh=False)

    def deliver(self, src: NodeId, msg: NameMsg) -> NameStatus:
        """Queue ``msg`` on the connection holding entry ``msg.eid`` here (or,
        for a reply, on connection ``msg.to_conn``)."""
        registry = getattr(self.node, "registry", None)
        if registry is None or self.leaving():
            self.counters["message_refused"] += 1
            return NameStatus.REFUSED
        my_gen = int(getattr(registry.state, "generation", 0))
        if msg.to_gen and my_gen and msg.to_gen != my_gen:  # meant for an earlier life
            self.counters["message_not_found"] += 1
            return NameStatus.NOT_FOUND
        kind: RegKind | None = msg.kind
        if msg.to_conn:  # a reply to one of our connections
            kind = None
            conn = self.conns.get(msg.to_conn)
        else:
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
            if msg.eid in self.quiet and conn is not None:
                self.counters["message_no_receiver"] += 1
                # An older sender cannot decode NO_RECEIVER: it gets REFUSED.
                return NameStatus.NO_RECEIVER if msg.extended else NameStatus.REFUSED
        if conn is None or getattr(conn, "closed", False):
            self.counters["message_not_found"] += 1
            return NameStatus.NOT_FOUND
        reply_to = (
            ReplyTo(src, msg.from_gen, msg.from_conn).token()
            if msg.from_gen and msg.from_conn
            else None
        )
        data = message_event_to_wire(
            msg.sender,
            src,
            kind,
            msg.scope,
            msg.name,
            msg.payload,
            from_scope=msg.from_scope,
            reply_to=reply_to,
        )
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
