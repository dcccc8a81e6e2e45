"""Messages to registered names: every protocol decision of the ``send`` op, sans I/O.

Sender side. ``send(name | group, payload)`` resolves the owner from the
local registry replica, read through :class:`~peerd.core.names.view.NamesView`:
a name gives its holder; a group gives one member (a local one first, else
one drawn with the injected ``random.Random``) or, with ``every``, all of
them. A name the replica does not hold may still be reachable through a
read-your-writes hint (:mod:`peerd.core.names.hints`). A local owner gets
the message at once (:class:`DeliverToConn`, same checks as a remote
receiver); a remote one gets a :class:`~peerd.wire.messages.NameMsg` with a
fresh ``seq`` over a direct link to its daemon (:class:`LinkSend` with the
owner's address: the shell's link manager opens one on demand from its
bounded pool). Every NameMsg is answered by one
:class:`~peerd.wire.messages.NameReply` with its ``seq``, so each call ends
in exactly one :class:`SendResult`: ``delivered`` n, or a
:class:`SendError` with its :class:`Why`:

* NOT_FOUND: nobody holds the name (here), or the owner vanished before the
  message got there (the entry is gone at the owner's daemon), or, for a
  reply, the connection or daemon life it was for ended;
* NO_RECEIVER: the holder registered with ``messages=false`` (``peerd
  exec``, whose command cannot read them): never ``delivered``;
* MAILBOX_FULL: the receiving connection is not reading (its queue is full)
  or this daemon's mailboxes together hold their bound;
* UNAVAILABLE: the owner's daemon refused it (leaving, or no registry), the
  owner is not a known member, the link was full, down or lost, or no answer
  came by the call's :class:`SendDeadline` (``send_timeout_s``). Then
  delivery is unknown: at most once, never twice (a late answer is ignored).

Receiver side. The entry ``eid`` must still be held by this daemon with the
same kind, scope and name (a name re-registered since is a different entry,
so a message for a vanished owner never reaches its successor), the message
must be for this daemon's life (``to_gen``), and the holding connection must
be open. The payload is then queued on that connection as a ``message``
event with the sender's registered name, if it has one, so the receiver can
answer it: the :class:`DeliverToConn` carries the NameReply DELIVERED that
the shell sends if the connection took it; a refusal comes back as
:class:`Offered` with the delivery, and is answered then. So the usual
message costs one core call at each end (and a LinkSend is answered by
:class:`LinkSendDone` only when refused or sent on another link than the
one it names): the real daemons' throughput is per-call overhead.

Mailboxes. A connection's mailbox is its bounded queue of message events in
the API server: only that queue knows the bytes of an encoded frame, so the
per-connection bounds (``mailbox_messages``, ``mailbox_bytes`` of the
``[messages]`` settings) are enforced there and come back as
``Offered(FULL)``. The core counts what every mailbox holds (a message
counts from its delivery, or from ``Offered(OK)`` for a local call, until
the shell reports it refused, taken, :class:`MailboxTaken`, or its
connection closed, :class:`ConnClosed`) and
enforces a per-daemon total (``daemon_mailbox_messages`` and
``daemon_mailbox_bytes`` of payload) before it asks for a push, so many
slow readers together cannot hold unbounded memory.

Replies need no registry. Every NameMsg says where it came from: the sending
daemon's generation and the sending API connection there (``from_gen``,
``from_conn``). The receiver turns them into the event's ``reply_to``
(:class:`ReplyAddr`: node, generation, connection), and a send to it goes
straight back over the link to that node, which queues it on exactly that
connection of that daemon life: a closed connection or a restarted daemon
answers NOT_FOUND (connection ids are never reused within a life, and a new
life has a new generation), so a reply never reaches another process. A
token of a node membership knows dead, left or restarted fails at once.

Order. The shell answers a connection's sends in batches, in order, and one
link carries everything between two daemons in order, so the messages of one
sender to one receiver arrive in the order they were sent.

Cost and determinism (the simulator drives this at 10,000 nodes). Per
message the core makes O(1) view lookups (a group send to ``every`` member
costs one per member); its state is one record per outstanding call, per
outstanding seq and per local delivery waiting for :class:`Offered`, each
removed when answered, lost or timed out, plus the bounded hints and the per
connection mailbox counts. Deadlines come in call order (one timeout), so
one :class:`SendDeadline` timer is armed at a time, for the first call still
open: a call answered in time costs the runtime no timer. A lost link fails
only the seqs sent to that node (an index per node, no scan). Nothing iterates over a set or dict
whose order hashing could change; randomness is the injected generator;
time is only the ``now`` given to :meth:`Names.handle`.
"""

from __future__ import annotations

import bisect
import collections
import random
from dataclasses import dataclass, field

from peerd.core.events import (
    ConnClosed,
    DeadlineFired,
    DeliverToConn,
    Failure,
    LinkLost,
    LinkSend,
    LinkSendDone,
    MailboxTaken,
    MarkQuiet,
    MessageIn,
    NameMsgIn,
    NameReplyIn,
    NamesInput,
    NamesOutput,
    Offered,
    OfferOutcome,
    ReplyToSender,
    SendDeadline,
    SendError,
    SendResult,
    SendToName,
    Why,
)
from peerd.core.names.hints import Hints
from peerd.core.names.view import NamesView, OwnerRef
from peerd.wire.messages import Addr, NameMsg, NameReply, NameStatus, NodeId, RegKind, Status

DEFAULT_SCOPE = "default"  # the API's default scope (a hint's scope when none was sent)


@dataclass(frozen=True, slots=True)
class NamesConfig:
    # A send to a remote owner waits this long for its daemon's answer.
    send_timeout_s: float = 10.0
    # A sender-name hint lives this long after the last message that carried it.
    hint_ttl_s: float = 30.0
    max_hints: int = 4096
    # All mailboxes of this daemon together (payload bytes): past either
    # bound a message is refused MAILBOX_FULL.
    daemon_mailbox_messages: int = 262_144
    daemon_mailbox_bytes: int = 256 * 1024 * 1024


# The counter each error is counted under: the name of the API error code the
# caller sees (the shell shows a full mailbox as "unavailable"), as before the
# core existed, so the metrics keep their names.
_COUNTER = {
    SendError.NOT_FOUND: "send_failed_not_found",
    SendError.NO_RECEIVER: "send_failed_no_receiver",
    SendError.MAILBOX_FULL: "send_failed_unavailable",
    SendError.UNAVAILABLE: "send_failed_unavailable",
}

_STATUS = {
    NameStatus.NOT_FOUND: (SendError.NOT_FOUND, Why.VANISHED),
    NameStatus.MAILBOX_FULL: (SendError.MAILBOX_FULL, Why.MAILBOX_FULL),
    NameStatus.REFUSED: (SendError.UNAVAILABLE, Why.REFUSED),
    NameStatus.NO_RECEIVER: (SendError.NO_RECEIVER, Why.NO_RECEIVER),
}


@dataclass(eq=False, slots=True)
class _Call:
    """One send call: what is outstanding (seqs, and delivery tokens of a
    local target), and its outcome so far."""

    every: bool
    reply: bool
    open: dict[int, NodeId] = field(default_factory=dict)  # seq or -token -> node
    delivered: int = 0
    failures: list[Failure] | None = None  # made on the first (most calls have none)
    error: Failure | None = None


@dataclass(eq=False, slots=True)
class _Sent:
    call: int
    node: NodeId
    link: int | None = None


@dataclass(frozen=True, slots=True)
class _Delivery:
    """A message waiting for :class:`Offered`: for the call ``call`` (a local
    send) or, ``call`` 0, for the NameMsg ``seq`` from daemon ``src``."""

    token: int  # 0: answered at once, never offered
    conn: int
    size: int
    call: int
    src: NodeId
    seq: int


class Names:
    """The names-messaging core of one daemon. ``handle`` is the only way in."""

    def __init__(
        self,
        view: NamesView,
        config: NamesConfig | None = None,
        *,
        rng: random.Random,
        counters: collections.Counter[str] | None = None,
    ) -> None:
        self.view = view
        self.config = config or NamesConfig()
        self.rng = rng
        self.counters: collections.Counter[str] = (
            counters if counters is not None else collections.Counter()
        )
        self._next_seq = 1
        self._next_token = 1
        self._calls: dict[int, _Call] = {}
        self._sent: dict[int, _Sent] = {}  # seq -> where it went
        self._by_node: dict[NodeId, dict[int, None]] = {}  # node -> its seqs, in order
        # node -> the link the runtime last named for it (LinkSend.link)
        self._links: dict[NodeId, int] = {}
        self._deliveries: dict[int, _Delivery] = {}  # token -> waiting for Offered
        # (deadline, call) of the calls started, in deadline order (calls
        # that ended are dropped from the front), and the one timer armed
        self._due: collections.deque[tuple[float, int]] = collections.deque()
        self._armed: float | None = None
        self.hints = Hints(self.config.hint_ttl_s, self.config.max_hints)
        # Entries (local eids) whose holder takes no messages. Eids are never
        # reused in a daemon life; ids of entries gone are pruned as it grows.
        self.quiet: set[int] = set()
        self._quiet_pruned = 64
        # conn -> payload sizes of its queued messages, oldest first
        self._boxes: dict[int, collections.deque[int]] = {}
        self.mailbox_messages = 0
        self.mailbox_bytes = 0

    # --- queries (for gauges and tests) ---------------------------------------------

    @property
    def pending(self) -> int:
        """Calls without an outcome yet."""
        return len(self._calls)

    def outstanding(self, call: int) -> dict[int, NodeId]:
        """What call ``call`` still waits for (empty once it ended)."""
        c = self._calls.get(call)
        return dict(c.open) if c is not None else {}

    # --- the way in -----------------------------------------------------------------

    def handle(self, now: float, inp: NamesInput) -> list[NamesOutput]:
        out: list[NamesOutput] = []
        match inp:
            case SendToName():
                self._send_to_name(now, inp, out)
            case MessageIn(src, msg):  # as the peer link gave it (no re-wrapping)
                if msg.__class__ is NameReply:
                    self._on_reply(src, msg, out)
                elif msg.__class__ is NameMsg:
                    self._learn_hint(now, src, msg)
                    self._receive(src, msg, 0, out)
            case ReplyToSender():
                self._reply_to_sender(now, inp, out)
            case NameMsgIn(src, msg):
                self._learn_hint(now, src, msg)
                self._receive(src, msg, 0, out)
            case NameReplyIn(src, reply):
                self._on_reply(src, reply, out)
            case LinkSendDone(seq, ok, link):
                self._link_send_done(seq, ok, link, out)
            case LinkLost(node, link):
                self._link_lost(node, link, out)
            case Offered(token, outcome, delivery):
                if delivery is None:
                    self._offered(token, outcome, out)
                else:
                    self._refused(delivery, outcome, out)
            case MailboxTaken(conn, count):
                self._taken(conn, count)
            case ConnClosed(conn):
                self._taken(conn, None)
            case MarkQuiet(eid):
                self._mark_quiet(eid)
            case DeadlineFired(timer):
                self._deadline(now, timer, out)
        return out

    # --- sender ---------------------------------------------------------------------

    def _send_to_name(self, now: float, s: SendToName, out: list[NamesOutput]) -> None:
        if s.call <= 0 or s.call in self._calls:  # the shell's tokens: unique, > 0
            self.counters["send_duplicate_call"] += 1
            return
        my_gen = self.view.my_generation()
        if my_gen is None:
            self._refuse(s.call, SendError.UNAVAILABLE, Why.NO_REGISTRY, out)
            return
        targets: list[OwnerRef]
        if s.kind is RegKind.NAME:
            owner = self.view.lookup(s.scope, s.name)
            if owner is not None:
                targets = [owner]
            else:
                targets = []
                stored = self.hints.peek(s.scope, s.name)
                if stored is not None:
                    hint = self.hints.get(now, s.scope, s.name, self.view.member(stored.node))
                    if hint is not None:
                        targets = [OwnerRef(hint.node, hint.eid, hint.generation)]
                        self.counters["send_via_hint"] += 1
        else:
            targets = list(self.view.group_members(s.scope, s.name))
        if not targets:
            why = Why.NO_SUCH_NAME if s.kind is RegKind.NAME else Why.NO_SUCH_GROUP
            self._refuse(s.call, SendError.NOT_FOUND, why, out)
            return
        me = self.view.me()
        if s.kind is RegKind.GROUP and not s.every:
            local = [t for t in targets if t.node == me]
            targets = [local[0] if local else self.rng.choice(targets)]
        call = self._calls[s.call] = _Call(s.every, False)
        sender, sender_scope, sender_eid = self._sender(s.conn)
        for t in targets:
            route = self._route(call, t.node)
            if route is not None:
                seq, addr = route
                msg = NameMsg(
                    seq,
                    s.kind,
                    s.scope,
                    s.name,
                    t.eid,
                    sender,
                    s.payload,
                    my_gen,
                    s.conn,
                    sender_scope,
                    sender_eid,
                    t.generation,
                    0,
                )
                self._dispatch(s.call, call, t.node, addr, msg, out)
        self._started(now, s.call, call, out)

    def _reply_to_sender(self, now: float, r: ReplyToSender, out: list[NamesOutput]) -> None:
        if r.call <= 0 or r.call in self._calls:  # the shell's tokens: unique, > 0
            self.counters["send_duplicate_call"] += 1
            return
        my_gen = self.view.my_generation()
        if my_gen is None:
            self._refuse(r.call, SendError.UNAVAILABLE, Why.NO_REGISTRY, out)
            return
        to = r.to
        if to.node != self.view.me():
            member = self.view.member(to.node)
            if (
                member is None
                or member.status in (Status.DEAD, Status.LEFT)
                or member.generation > to.generation
            ):
                self.counters["send_failed_not_found"] += 1
                self._refuse(r.call, SendError.NOT_FOUND, Why.REPLY_GONE, out)
                return
        call = self._calls[r.call] = _Call(False, True)
        sender, sender_scope, sender_eid = self._sender(r.conn)
        route = self._route(call, to.node)
        if route is not None:
            seq, addr = route
            msg = NameMsg(
                seq,
                RegKind.NAME,
                "",
                "",
                0,
                sender,
                r.payload,
                my_gen,
                r.conn,
                sender_scope,
                sender_eid,
                to.generation,
                to.conn,
            )
            self._dispatch(r.call, call, to.node, addr, msg, out)
        self._started(now, r.call, call, out)

    def _sender(self, conn: int) -> tuple[str, str, int]:
        return self.view.sender_of(conn) if conn else ("", "", 0)

    def _refuse(self, call: int, error: SendError, why: Why, out: list[NamesOutput]) -> None:
        failure = Failure(self.view.me(), error, why)
        out.append(SendResult(call, 0, (failure,), failure, at_once=True))

    def _started(self, now: float, call_id: int, call: _Call, out: list[NamesOutput]) -> None:
        """After the first dispatch: the call ends now, or by its deadline.
        Deadlines come in call order (one timeout for all): one timer is
        armed, for the first call still open, and re-armed as it fires."""
        if not call.open:
            self._finish(call_id, call, out)
            return
        at = now + self.config.send_timeout_s
        due = self._due
        if due and at < due[-1][0]:  # time went back (tests): keep them in order
            bisect.insort(due, (at, call_id))
        else:
            due.append((at, call_id))
        if self._armed is None or at < self._armed:
            self._armed = at
            out.append(SendDeadline(at, call_id))

    def _route(self, call: _Call, node: NodeId) -> tuple[int, Addr | None] | None:
        """The seq of a copy for ``node`` (0: this daemon) and the owner's
        address, or None: not a known member (the call fails there)."""
        if node == self.view.me():
            return 0, None
        member = self.view.member(node)
        if member is None:
            self._fail(call, node, SendError.UNAVAILABLE, Why.UNKNOWN_MEMBER)
            return None
        seq = self._next_seq
        self._next_seq += 1
        return seq, member.addr

    def _dispatch(
        self,
        call_id: int,
        call: _Call,
        node: NodeId,
        addr: Addr | None,
        msg: NameMsg,
        out: list[NamesOutput],
    ) -> None:
        seq = msg.seq
        if not seq:
            self.counters["send_local"] += 1
            token = self._receive(node, msg, call_id, out)
            if token:
                call.open[-token] = node
            return
        call.open[seq] = node
        # Taken, on the link named last for ``node``, unless told otherwise.
        link = self._links.get(node)
        self._sent[seq] = _Sent(call_id, node, link)
        self._by_node.setdefault(node, {})[seq] = None
        self.counters["send_remote"] += 1
        out.append(LinkSend(node, addr, msg, seq, link))

    def _link_send_done(self, seq: int, ok: bool, link: int | None, out: list[NamesOutput]) -> None:
        sent = self._sent.get(seq)
        if sent is None:
            return
        if ok:
            sent.link = link
            if link is None:
                self._links.pop(sent.node, None)
            else:
                self._links[sent.node] = link
            return
        self.counters["send_remote"] -= 1
        self._end_seq(seq, sent, None, (SendError.UNAVAILABLE, Why.LINK_REFUSED), out)

    def _on_reply(self, src: NodeId, reply: NameReply, out: list[NamesOutput]) -> None:
        sent = self._sent.get(reply.seq)
        if sent is None or sent.node != src:
            self.counters["send_reply_unexpected"] += 1
            return
        self._end_seq(reply.seq, sent, reply.status, None, out)

    def _link_lost(self, node: NodeId, link: int | None, out: list[NamesOutput]) -> None:
        if link is None or self._links.get(node) == link:
            self._links.pop(node, None)
        seqs = self._by_node.get(node)
        if not seqs:
            return
        for seq in list(seqs):
            sent = self._sent[seq]
            if link is None or sent.link is None or sent.link == link:
                self._end_seq(seq, sent, None, (SendError.UNAVAILABLE, Why.LINK_LOST), out)

    def _deadline(self, now: float, timer: SendDeadline, out: list[NamesOutput]) -> None:
        if timer.at == self._armed:
            self._armed = None
        due = self._due
        while due and due[0][0] <= now:
            call_id = due.popleft()[1]
            call = self._calls.get(call_id)
            if call is not None:  # else it ended before its deadline
                self._time_out(call_id, call, out)
        self._prune_due()
        if self._armed is None and due:
            self._armed = due[0][0]
            out.append(SendDeadline(*due[0]))

    def _prune_due(self) -> None:
        due, calls = self._due, self._calls
        while due and due[0][1] not in calls:
            due.popleft()

    def _time_out(self, call_id: int, call: _Call, out: list[NamesOutput]) -> None:
        for key, node in list(call.open.items()):
            if key > 0:
                sent = self._sent.pop(key)
                self._unindex(key, sent.node)
            else:
                # A local delivery not yet offered: whatever the connection
                # says later still counts in its mailbox, but no longer here.
                pass
            del call.open[key]
            self._fail(call, node, SendError.UNAVAILABLE, Why.TIMEOUT)
        self.counters["send_timeouts"] += 1
        self._finish(call_id, call, out)

    def _end_seq(
        self,
        seq: int,
        sent: _Sent,
        status: NameStatus | None,
        failure: tuple[SendError, Why] | None,
        out: list[NamesOutput],
    ) -> None:
        del self._sent[seq]
        self._unindex(seq, sent.node)
        call = self._calls[sent.call]
        del call.open[seq]
        self._outcome(call, sent.node, status, failure)
        if not call.open:
            self._finish(sent.call, call, out)

    def _unindex(self, seq: int, node: NodeId) -> None:
        seqs = self._by_node[node]
        del seqs[seq]
        if not seqs:
            del self._by_node[node]

    def _outcome(
        self,
        call: _Call,
        node: NodeId,
        status: NameStatus | None,
        failure: tuple[SendError, Why] | None,
    ) -> None:
        if status is NameStatus.DELIVERED:
            call.delivered += 1
            return
        if status is not None:
            error, why = _STATUS[status]
            if status is NameStatus.NOT_FOUND and call.reply:
                why = Why.REPLY_GONE
        else:
            assert failure is not None
            error, why = failure
        self._fail(call, node, error, why)

    def _fail(self, call: _Call, node: NodeId, error: SendError, why: Why) -> None:
        self.counters[_COUNTER[error]] += 1
        f = Failure(node, error, why)
        if call.failures is None:
            call.failures = [f]
        else:
            call.failures.append(f)
        if not call.every:
            call.error = f

    def _finish(self, call_id: int, call: _Call, out: list[NamesOutput]) -> None:
        del self._calls[call_id]
        if self._due and self._due[0][1] == call_id:
            self._prune_due()
        error = call.error
        failures = call.failures
        if not failures:
            out.append(SendResult(call_id, call.delivered, (), error))
            return
        if call.every and not call.delivered:
            error = failures[0]
        out.append(SendResult(call_id, call.delivered, tuple(failures), error))

    # --- receiver -------------------------------------------------------------------

    def _learn_hint(self, now: float, src: NodeId, msg: NameMsg) -> None:
        if not (msg.sender and msg.from_eid and msg.from_gen) or msg.to_conn:
            return
        scope = msg.from_scope or DEFAULT_SCOPE
        self.hints.learn(now, scope, msg.sender, src, msg.from_gen, msg.from_eid)

    def _receive(self, src: NodeId, msg: NameMsg, call: int, out: list[NamesOutput]) -> int:
        """Check ``msg`` and ask for it to be queued on its connection (the
        token, answered by :class:`Offered`), or answer it now (0)."""
        status, conn = self._check(msg)
        if status is None:
            size = len(msg.payload)
            if (
                self.mailbox_messages >= self.config.daemon_mailbox_messages
                or self.mailbox_bytes + size > self.config.daemon_mailbox_bytes
            ):
                self.counters["message_mailbox_full_daemon"] += 1
                status = NameStatus.MAILBOX_FULL
            elif call:  # a local call: its outcome waits for Offered
                token = self._next_token
                self._next_token += 1
                self._deliveries[token] = _Delivery(token, conn, size, call, src, msg.seq)
                out.append(DeliverToConn(token, conn, src, msg))
                return token
            else:
                # From another daemon: counted as taken now, with the answer
                # to send if it is (a refusal comes back as Offered).
                self._queued(conn, size)
                answer = LinkSend(src, None, NameReply(msg.seq, NameStatus.DELIVERED))
                out.append(DeliverToConn(0, conn, src, msg, answer))
                return 0
        self._answer(_Delivery(0, 0, 0, call, src, msg.seq), status, out)
        return 0

    def _check(self, msg: NameMsg) -> tuple[NameStatus | None, int]:
        """Why ``msg`` cannot be queued here (None: it can, on the connection)."""
        my_gen = self.view.my_generation()
        if my_gen is None or self.view.leaving():
            self.counters["message_refused"] += 1
            return NameStatus.REFUSED, 0
        if msg.to_gen and my_gen and msg.to_gen != my_gen:  # meant for an earlier life
            self.counters["message_not_found"] += 1
            return NameStatus.NOT_FOUND, 0
        if msg.to_conn:  # a reply to one of our connections
            conn: int | None = msg.to_conn
        else:
            entry = self.view.local_entry(msg.eid)
            if (
                entry is None
                or entry.kind is not msg.kind
                or entry.scope != msg.scope
                or entry.name != msg.name
            ):
                self.counters["message_not_found"] += 1
                return NameStatus.NOT_FOUND, 0
            conn = self.view.owner_conn(msg.eid)
            if msg.eid in self.quiet and conn is not None and self.view.conn_open(conn):
                self.counters["message_no_receiver"] += 1
                # An older sender cannot decode NO_RECEIVER: it gets REFUSED.
                return (NameStatus.NO_RECEIVER if msg.extended else NameStatus.REFUSED), 0
        if conn is None or not self.view.conn_open(conn):
            self.counters["message_not_found"] += 1
            return NameStatus.NOT_FOUND, 0
        return None, conn

    def _queued(self, conn: int, size: int) -> None:
        self.counters["message_delivered"] += 1
        self._boxes.setdefault(conn, collections.deque()).append(size)
        self.mailbox_messages += 1
        self.mailbox_bytes += size

    def _refused(self, d: DeliverToConn, outcome: OfferOutcome, out: list[NamesOutput]) -> None:
        """A message from another daemon its connection did not take: out of
        the mailbox counts again (the refusal follows its delivery at once,
        so it is the last one counted there), and the sender hears why."""
        answer = d.answer
        if outcome is OfferOutcome.OK or answer is None or answer.msg.__class__ is not NameReply:
            return
        size = len(d.payload)
        box = self._boxes.get(d.conn)
        if box is not None and size in box:  # else: closed meanwhile, its count is gone
            if box[-1] == size:
                box.pop()
            else:
                box.remove(size)
            if not box:
                del self._boxes[d.conn]
            self.mailbox_messages -= 1
            self.mailbox_bytes -= size
            self.counters["message_delivered"] -= 1
        seq = answer.msg.seq
        self._offered_status(_Delivery(0, d.conn, size, 0, d.from_node, seq), outcome, out)

    def _offered(self, token: int, outcome: OfferOutcome, out: list[NamesOutput]) -> None:
        d = self._deliveries.pop(token, None)
        if d is None:
            return
        self._offered_status(d, outcome, out)

    def _offered_status(self, d: _Delivery, outcome: OfferOutcome, out: list[NamesOutput]) -> None:
        if outcome is OfferOutcome.OK:
            self._queued(d.conn, d.size)
            status = NameStatus.DELIVERED
        elif outcome is OfferOutcome.FULL:
            self.counters["message_mailbox_full"] += 1
            status = NameStatus.MAILBOX_FULL
        else:  # the owner is going away: its entries follow
            self.counters["message_not_found"] += 1
            status = NameStatus.NOT_FOUND
        self._answer(d, status, out)

    def _answer(self, d: _Delivery, status: NameStatus, out: list[NamesOutput]) -> None:
        """Tell the sender: a NameReply, or the outcome of a local call."""
        if not d.call:
            out.append(LinkSend(d.src, None, NameReply(d.seq, status)))
            return
        call = self._calls.get(d.call)
        if call is None:
            return  # it timed out meanwhile
        self._outcome(call, d.src, status, None)
        if d.token:  # offered later: the call may end here
            del call.open[-d.token]
            if not call.open:
                self._finish(d.call, call, out)

    def _taken(self, conn: int, count: int | None) -> None:
        box = self._boxes.get(conn)
        if box is None:
            return
        n = len(box) if count is None else min(count, len(box))
        for _ in range(n):
            self.mailbox_bytes -= box.popleft()
        self.mailbox_messages -= n
        if not box:
            del self._boxes[conn]

    def _mark_quiet(self, eid: int) -> None:
        self.quiet.add(eid)
        if len(self.quiet) > 2 * self._quiet_pruned:
            self.quiet = {e for e in self.quiet if self.view.local_entry(e) is not None}
            self._quiet_pruned = max(64, len(self.quiet))
