"""The names core, input by input: the exact outputs for every outcome of a send
(delivered n, not_found, no_receiver, mailbox_full, unavailable and why), the
receiver's checks, reply tokens, hints and the mailbox bounds."""

from __future__ import annotations

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
    NameMsgIn,
    NameReplyIn,
    Offered,
    OfferOutcome,
    ReplyAddr,
    ReplyToSender,
    SendDeadline,
    SendError,
    SendResult,
    SendToName,
)
from peerd.core.events import Why as W
from peerd.core.names.core import NamesConfig
from peerd.core.names.view import MemberRef
from peerd.wire.messages import NameMsg, NameReply, NameStatus, RegKind, Status
from tests.core.names.helpers import ADDR, ME, OTHER, THIRD, make

T0 = 100.0


def event(d: object) -> tuple[object, ...]:
    """What a DeliverToConn makes of its message (the API's ``message`` event)."""
    assert isinstance(d, DeliverToConn)
    return (
        d.token,
        d.conn,
        d.sender,
        d.from_node,
        d.from_scope,
        d.kind,
        d.scope,
        d.name,
        d.payload,
        d.reply_to,
    )


def send(call: int, name: str, conn: int = 0, **kw: object) -> SendToName:
    kind = kw.pop("kind", RegKind.NAME)
    return SendToName(call, conn, kind, str(kw.pop("scope", "default")), name, b"hi", **kw)  # type: ignore[arg-type]


def msg(seq: int, eid: int, name: str = "db", **kw: object) -> NameMsg:
    fields = dict(from_gen=0, from_conn=0, from_scope="", from_eid=0, to_gen=0, to_conn=0)
    fields.update(kw)
    sender = str(fields.pop("sender", ""))
    return NameMsg(seq, RegKind.NAME, "default", name, eid, sender, b"m", **fields)  # type: ignore[arg-type]


def test_nobody_holds_it_not_found_at_once() -> None:
    names, _, counters = make()
    assert names.handle(T0, send(1, "nobody")) == [
        SendResult(
            1,
            0,
            (Failure(ME, SendError.NOT_FOUND, W.NO_SUCH_NAME),),
            Failure(ME, SendError.NOT_FOUND, W.NO_SUCH_NAME),
            at_once=True,
        )
    ]
    out = names.handle(T0, send(2, "g", kind=RegKind.GROUP))
    assert out[0].error == Failure(ME, SendError.NOT_FOUND, W.NO_SUCH_GROUP)  # type: ignore[union-attr]
    assert names.pending == 0 and not counters


def test_remote_owner_roundtrip_delivered() -> None:
    names, view, counters = make()
    view.remote(OTHER, 5, RegKind.NAME, "db")
    view.senders[8] = ("client", "jobs", 2)
    out = names.handle(T0, send(1, "db", conn=8))
    sent = NameMsg(1, RegKind.NAME, "default", "db", 5, "client", b"hi", 4, 8, "jobs", 2, 2, 0)
    assert out == [LinkSend(OTHER, ADDR[OTHER], sent, 1), SendDeadline(T0 + 10, 1)]
    assert names.handle(T0, LinkSendDone(1, True, 7)) == []
    assert names.outstanding(1) == {1: OTHER}
    assert names.handle(T0 + 1, NameReplyIn(OTHER, NameReply(1, NameStatus.DELIVERED))) == [
        SendResult(1, 1, (), None)
    ]
    assert names.pending == 0 and counters == {"send_remote": 1}
    # a late or stray answer changes nothing
    assert names.handle(T0 + 2, NameReplyIn(OTHER, NameReply(1, NameStatus.DELIVERED))) == []
    assert names.handle(T0 + 2, DeadlineFired(SendDeadline(T0 + 10, 1))) == []
    assert counters["send_reply_unexpected"] == 1


def test_each_remote_status_is_its_outcome() -> None:
    names, view, counters = make()
    view.remote(OTHER, 5, RegKind.NAME, "db")
    cases = [
        (NameStatus.NOT_FOUND, SendError.NOT_FOUND, W.VANISHED),
        (NameStatus.MAILBOX_FULL, SendError.MAILBOX_FULL, W.MAILBOX_FULL),
        (NameStatus.REFUSED, SendError.UNAVAILABLE, W.REFUSED),
        (NameStatus.NO_RECEIVER, SendError.NO_RECEIVER, W.NO_RECEIVER),
    ]
    for call, (status, error, why) in enumerate(cases, 1):
        names.handle(T0, send(call, "db"))
        f = Failure(OTHER, error, why)
        assert names.handle(T0, NameReplyIn(OTHER, NameReply(call, status))) == [
            SendResult(call, 0, (f,), f)
        ]
    assert counters == {
        "send_remote": 4,  # handed to the link (no LinkSendDone: taken)
        "send_failed_not_found": 1,
        "send_failed_unavailable": 2,  # the API shows a full mailbox as unavailable
        "send_failed_no_receiver": 1,
    }


def test_an_answer_from_another_node_is_ignored() -> None:
    names, view, counters = make()
    view.remote(OTHER, 5, RegKind.NAME, "db")
    names.handle(T0, send(1, "db"))
    assert names.handle(T0, NameReplyIn(THIRD, NameReply(1, NameStatus.DELIVERED))) == []
    assert counters["send_reply_unexpected"] == 1 and names.pending == 1


def test_unavailable_unknown_member_link_refused_lost_and_timeout() -> None:
    names, view, counters = make()
    view.remote(OTHER, 5, RegKind.NAME, "db")
    view.remote(THIRD, 6, RegKind.NAME, "web")
    view.names[("default", "ghost")] = view.names[("default", "db")].__class__(b"\x09" * 16, 1, 1)
    f = Failure(b"\x09" * 16, SendError.UNAVAILABLE, W.UNKNOWN_MEMBER)
    assert names.handle(T0, send(1, "ghost")) == [SendResult(1, 0, (f,), f)]

    names.handle(T0, send(2, "db"))
    f = Failure(OTHER, SendError.UNAVAILABLE, W.LINK_REFUSED)
    assert names.handle(T0, LinkSendDone(1, False)) == [SendResult(2, 0, (f,), f)]

    # lost: only what went on that link (or on a link not known yet)
    names.handle(T0, send(3, "db"))  # seq 2
    names.handle(T0, LinkSendDone(2, True, 1))
    names.handle(T0, send(4, "db"))  # seq 3
    names.handle(T0, LinkSendDone(3, True, 2))
    names.handle(T0, send(5, "web"))  # seq 4, THIRD
    f = Failure(OTHER, SendError.UNAVAILABLE, W.LINK_LOST)
    assert names.handle(T0, LinkLost(OTHER, 1)) == [SendResult(3, 0, (f,), f)]
    assert names.handle(T0, LinkLost(OTHER)) == [SendResult(4, 0, (f,), f)]
    assert names.pending == 1

    f = Failure(THIRD, SendError.UNAVAILABLE, W.TIMEOUT)
    assert names.handle(T0 + 10, DeadlineFired(SendDeadline(T0 + 10, 5))) == [
        SendResult(5, 0, (f,), f)
    ]
    assert names.pending == 0
    assert counters["send_timeouts"] == 1 and counters["send_failed_unavailable"] == 5


def test_no_registry_is_unavailable_at_once() -> None:
    names, view, _ = make()
    view.generation = None
    f = Failure(ME, SendError.UNAVAILABLE, W.NO_REGISTRY)
    assert names.handle(T0, send(1, "db")) == [SendResult(1, 0, (f,), f, at_once=True)]


def test_local_owner_offered_and_each_answer() -> None:
    names, view, counters = make()
    view.hold(3, RegKind.NAME, "db", conn=7)
    view.hold(4, RegKind.NAME, "client", conn=8)
    out = names.handle(T0, send(1, "db", conn=8))
    assert event(out[0]) == (
        1,
        7,
        "client",
        ME,
        "default",
        RegKind.NAME,
        "default",
        "db",
        b"hi",
        ReplyAddr(ME, 4, 8),
    )
    assert out[1:] == [SendDeadline(T0 + 10, 1)]
    assert names.handle(T0, Offered(1, OfferOutcome.OK)) == [SendResult(1, 1, (), None)]
    assert (names.mailbox_messages, names.mailbox_bytes) == (1, 2)
    names.handle(T0, send(2, "db"))
    f = Failure(ME, SendError.MAILBOX_FULL, W.MAILBOX_FULL)
    assert names.handle(T0, Offered(2, OfferOutcome.FULL)) == [SendResult(2, 0, (f,), f)]
    names.handle(T0, send(3, "db"))
    f = Failure(ME, SendError.NOT_FOUND, W.VANISHED)
    assert names.handle(T0, Offered(3, OfferOutcome.CLOSED)) == [SendResult(3, 0, (f,), f)]
    assert counters["send_local"] == 3 and counters["message_delivered"] == 1
    # a closed holder is not asked at all
    view.open_conns.discard(7)
    assert names.handle(T0, send(4, "db")) == [SendResult(4, 0, (f,), f)]


def test_receiver_checks_then_answers_by_link() -> None:
    names, view, counters = make()
    view.hold(3, RegKind.NAME, "db", conn=7)
    out = names.handle(T0, NameMsgIn(OTHER, msg(11, 3, sender="asker")))
    # one call: the delivery carries its answer, sent if the connection takes it
    delivered = LinkSend(OTHER, None, NameReply(11, NameStatus.DELIVERED))
    deliver = out[0]
    assert event(deliver) == (0, 7, "asker", OTHER, "", RegKind.NAME, "default", "db", b"m", None)
    assert isinstance(deliver, DeliverToConn) and deliver.answer == delivered and len(out) == 1
    assert names.mailbox_messages == 1 and counters["message_delivered"] == 1
    # a refusal comes back with the delivery: out of the mailbox, and answered
    for outcome, status in (
        (OfferOutcome.FULL, NameStatus.MAILBOX_FULL),
        (OfferOutcome.CLOSED, NameStatus.NOT_FOUND),
    ):
        out = names.handle(T0, NameMsgIn(OTHER, msg(12, 3, sender="asker")))
        assert names.mailbox_messages == 2
        assert names.handle(T0, Offered(0, outcome, out[0])) == [  # type: ignore[arg-type]
            LinkSend(OTHER, None, NameReply(12, status))
        ]
        assert (names.mailbox_messages, names.mailbox_bytes) == (1, 1)
    names.handle(T0, ConnClosed(7))
    # counts gone with the connection: the sender still hears (never silence)
    assert names.handle(T0, Offered(0, OfferOutcome.CLOSED, deliver)) == [
        LinkSend(OTHER, None, NameReply(11, NameStatus.NOT_FOUND))
    ]
    assert names.mailbox_messages == 0 and counters["message_delivered"] == 1
    assert counters["message_mailbox_full"] == 1 and counters["message_not_found"] == 2
    counters.clear()
    for m, status in (
        (msg(13, 99), NameStatus.NOT_FOUND),  # vanished
        (msg(14, 3, name="other"), NameStatus.NOT_FOUND),  # re-registered since
        (msg(15, 3, to_gen=3), NameStatus.NOT_FOUND),  # an earlier life of ours
        (msg(16, 3, to_conn=41, to_gen=4), NameStatus.NOT_FOUND),  # no such connection
    ):
        assert names.handle(T0, NameMsgIn(OTHER, m)) == [
            LinkSend(OTHER, None, NameReply(m.seq, status))
        ]
    view.is_leaving = True
    assert names.handle(T0, NameMsgIn(OTHER, msg(17, 3))) == [
        LinkSend(OTHER, None, NameReply(17, NameStatus.REFUSED))
    ]
    assert counters["message_not_found"] == 4 and counters["message_refused"] == 1


def test_quiet_holder_no_receiver_old_sender_refused() -> None:
    names, view, counters = make()
    view.hold(3, RegKind.NAME, "job", conn=7)
    names.handle(T0, MarkQuiet(3))
    new = msg(11, 3, name="job", from_gen=2, from_conn=41, to_gen=4)
    old = msg(12, 3, name="job")
    assert names.handle(T0, NameMsgIn(OTHER, new)) == [
        LinkSend(OTHER, None, NameReply(11, NameStatus.NO_RECEIVER))
    ]
    assert names.handle(T0, NameMsgIn(OTHER, old)) == [
        LinkSend(OTHER, None, NameReply(12, NameStatus.REFUSED))
    ]
    f = Failure(ME, SendError.NO_RECEIVER, W.NO_RECEIVER)
    assert names.handle(T0, send(1, "job")) == [SendResult(1, 0, (f,), f)]
    assert counters["message_no_receiver"] == 3


def test_group_local_first_else_seeded_choice_and_every() -> None:
    names, view, _ = make(seed=3)
    view.remote(OTHER, 5, RegKind.GROUP, "workers")
    view.remote(THIRD, 7, RegKind.GROUP, "workers")
    first = names.handle(T0, send(1, "workers", kind=RegKind.GROUP))
    again, _, _ = make(seed=3)
    again.view.remote(OTHER, 5, RegKind.GROUP, "workers")  # type: ignore[attr-defined]
    again.view.remote(THIRD, 7, RegKind.GROUP, "workers")  # type: ignore[attr-defined]
    assert again.handle(T0, send(1, "workers", kind=RegKind.GROUP)) == first  # deterministic
    view.hold(6, RegKind.GROUP, "workers", conn=7)
    out = names.handle(T0, send(2, "workers", kind=RegKind.GROUP))
    assert isinstance(out[0], DeliverToConn) and out[0].conn == 7
    names.handle(T0, Offered(out[0].token, OfferOutcome.OK))

    out = names.handle(T0, send(3, "workers", kind=RegKind.GROUP, every=True))
    assert [type(o).__name__ for o in out] == [
        "LinkSend",
        "LinkSend",
        "DeliverToConn",
    ]  # no timer: the one armed for call 1 (still open) comes first
    sends = {o.node: o.seq for o in out if isinstance(o, LinkSend)}
    names.handle(T0, Offered(out[2].token, OfferOutcome.OK))  # type: ignore[union-attr]
    names.handle(T0, NameReplyIn(OTHER, NameReply(sends[OTHER], NameStatus.DELIVERED)))
    f = Failure(THIRD, SendError.MAILBOX_FULL, W.MAILBOX_FULL)
    assert names.handle(
        T0, NameReplyIn(THIRD, NameReply(sends[THIRD], NameStatus.MAILBOX_FULL))
    ) == [SendResult(3, 2, (f,), None)]
    # every, none delivered: the first failure is the call's error
    out = names.handle(T0, send(4, "workers", kind=RegKind.GROUP, every=True))
    names.handle(T0, LinkLost(OTHER))
    names.handle(T0, LinkLost(THIRD))
    res = names.handle(T0, Offered(out[2].token, OfferOutcome.CLOSED))  # type: ignore[union-attr]
    lost = [Failure(n, SendError.UNAVAILABLE, W.LINK_LOST) for n in (OTHER, THIRD)]
    gone = Failure(ME, SendError.NOT_FOUND, W.VANISHED)
    assert res == [SendResult(4, 0, (*lost, gone), lost[0])]


def test_reply_tokens() -> None:
    names, view, counters = make()
    view.members[OTHER] = MemberRef(Status.ALIVE, 2, ADDR[OTHER])
    view.senders[7] = ("db", "default", 3)
    out = names.handle(T0, ReplyToSender(1, 7, ReplyAddr(OTHER, 2, 41), b"a"))
    sent = NameMsg(1, RegKind.NAME, "", "", 0, "db", b"a", 4, 7, "default", 3, 2, 41)
    assert out == [LinkSend(OTHER, ADDR[OTHER], sent, 1), SendDeadline(T0 + 10, 1)]
    f = Failure(OTHER, SendError.NOT_FOUND, W.REPLY_GONE)
    assert names.handle(T0, NameReplyIn(OTHER, NameReply(1, NameStatus.NOT_FOUND))) == [
        SendResult(1, 0, (f,), f)
    ]
    # a restarted, dead or unknown node: not_found at once, nothing sent
    view.members[THIRD] = MemberRef(Status.DEAD, 2, ADDR[THIRD])
    for call, to in (
        (2, ReplyAddr(OTHER, 1, 41)),
        (3, ReplyAddr(THIRD, 2, 1)),
        (4, ReplyAddr(b"\x09" * 16, 1, 1)),
    ):
        f = Failure(ME, SendError.NOT_FOUND, W.REPLY_GONE)
        assert names.handle(T0, ReplyToSender(call, 7, to, b"b")) == [
            SendResult(call, 0, (f,), f, at_once=True)
        ]
    # to a connection of ours: queued on exactly it, as a reply; an earlier life: gone
    view.open_conns.add(41)
    out = names.handle(T0, ReplyToSender(5, 7, ReplyAddr(ME, 4, 41), b"c"))
    assert event(out[0]) == (1, 41, "db", ME, "default", None, "", "", b"c", ReplyAddr(ME, 4, 7))
    f = Failure(ME, SendError.NOT_FOUND, W.REPLY_GONE)
    assert names.handle(T0, ReplyToSender(6, 7, ReplyAddr(ME, 3, 41), b"d")) == [
        SendResult(6, 0, (f,), f)
    ]
    assert counters["send_failed_not_found"] == 5


def test_hints_reach_a_sender_before_the_replica_then_expire() -> None:
    cfg = NamesConfig(hint_ttl_s=30, max_hints=2)
    names, view, counters = make(cfg)
    view.hold(3, RegKind.NAME, "db", conn=7)
    view.members[OTHER] = MemberRef(Status.ALIVE, 2, ADDR[OTHER])
    carrier = msg(
        11, 3, sender="caller-1", from_gen=2, from_conn=41, from_scope="jobs", from_eid=9, to_gen=4
    )
    names.handle(T0, NameMsgIn(OTHER, carrier))
    assert names.handle(T0, send(1, "caller-1"))[0].error.why is W.NO_SUCH_NAME  # type: ignore[union-attr]
    out = names.handle(T0 + 1, send(2, "caller-1", scope="jobs"))
    assert isinstance(out[0], LinkSend) and out[0].node == OTHER
    assert (out[0].msg.eid, out[0].msg.to_gen) == (9, 2)  # type: ignore[union-attr]
    assert counters["send_via_hint"] == 1
    # the replica wins once it holds the name
    view.remote(THIRD, 5, RegKind.NAME, "x")
    view.names[("jobs", "caller-1")] = view.names.pop(("default", "x"))
    out = names.handle(T0 + 1, send(3, "caller-1", scope="jobs"))
    assert out[0].node == THIRD  # type: ignore[union-attr]
    del view.names[("jobs", "caller-1")]
    # a newer life of the node: dropped
    view.members[OTHER] = MemberRef(Status.ALIVE, 3, ADDR[OTHER])
    assert names.handle(T0 + 1, send(4, "caller-1", scope="jobs"))[0].at_once  # type: ignore[union-attr]
    assert len(names.hints) == 0
    # expiry, and the bound (least recently refreshed dropped first)
    view.members[OTHER] = MemberRef(Status.ALIVE, 2, ADDR[OTHER])
    names.handle(T0, NameMsgIn(OTHER, carrier))
    assert names.handle(T0 + 30, send(5, "caller-1", scope="jobs"))[0].at_once  # type: ignore[union-attr]
    for i, who in enumerate(("a", "b", "c")):
        names.handle(T0 + i, NameMsgIn(OTHER, msg(20 + i, 3, sender=who, from_gen=2, from_eid=9)))
    assert names.hints.peek("default", "a") is None
    assert names.hints.peek("default", "c") is not None and len(names.hints) == 2
    # a reply carries no hint
    names.handle(
        T0,
        NameMsgIn(
            OTHER, msg(30, 0, name="", sender="d", from_gen=2, from_eid=9, to_conn=7, to_gen=4)
        ),
    )
    assert names.hints.peek("default", "d") is None


def test_daemon_mailbox_bound_counted_taken_and_closed() -> None:
    names, view, counters = make(NamesConfig(daemon_mailbox_messages=2))
    view.hold(3, RegKind.NAME, "db", conn=7)
    view.hold(4, RegKind.NAME, "web", conn=8)
    for seq, eid in ((1, 3), (2, 4)):  # counted from the DeliverToConn (no Offered if taken)
        out = names.handle(T0, NameMsgIn(OTHER, msg(seq, eid, "db" if eid == 3 else "web")))
        assert isinstance(out[0], DeliverToConn) and out[0].answer is not None
    assert names.handle(T0, NameMsgIn(OTHER, msg(3, 3))) == [
        LinkSend(OTHER, None, NameReply(3, NameStatus.MAILBOX_FULL))
    ]
    assert counters["message_mailbox_full_daemon"] == 1
    names.handle(T0, MailboxTaken(7, 5))  # more than it holds: what it holds
    assert names.mailbox_messages == 1
    assert isinstance(names.handle(T0, NameMsgIn(OTHER, msg(4, 3)))[0], DeliverToConn)
    assert names.mailbox_messages == 2
    names.handle(T0, ConnClosed(8))
    names.handle(T0, ConnClosed(8))  # twice: nothing more
    names.handle(T0, ConnClosed(7))
    assert (names.mailbox_messages, names.mailbox_bytes) == (0, 0)
    # bytes too
    names, view, _ = make(NamesConfig(daemon_mailbox_bytes=1))
    view.hold(3, RegKind.NAME, "db", conn=7)
    assert isinstance(names.handle(T0, NameMsgIn(OTHER, msg(1, 3)))[0], DeliverToConn)  # fits
    assert names.handle(T0, NameMsgIn(OTHER, msg(2, 3))) == [
        LinkSend(OTHER, None, NameReply(2, NameStatus.MAILBOX_FULL))
    ]


def test_a_duplicate_call_id_is_ignored() -> None:
    names, view, counters = make()
    view.remote(OTHER, 5, RegKind.NAME, "db")
    names.handle(T0, send(1, "db"))
    assert names.handle(T0, send(1, "db")) == [] and counters["send_duplicate_call"] == 1


def test_a_local_delivery_answered_after_its_deadline_still_counts_in_the_mailbox() -> None:
    names, view, _ = make()
    view.hold(3, RegKind.NAME, "db", conn=7)
    out = names.handle(T0, send(1, "db"))
    f = Failure(ME, SendError.UNAVAILABLE, W.TIMEOUT)
    assert names.handle(T0 + 10, DeadlineFired(SendDeadline(T0 + 10, 1))) == [
        SendResult(1, 0, (f,), f)
    ]
    assert names.handle(T0 + 11, Offered(out[0].token, OfferOutcome.OK)) == []  # type: ignore[union-attr]
    assert names.mailbox_messages == 1


def test_one_deadline_timer_armed_for_the_first_open_call() -> None:
    names, view, counters = make()
    view.remote(OTHER, 5, RegKind.NAME, "db")
    assert names.handle(T0, send(1, "db"))[-1] == SendDeadline(T0 + 10, 1)
    assert not any(isinstance(o, SendDeadline) for o in names.handle(T0 + 1, send(2, "db")))
    names.handle(T0 + 2, send(3, "db"))
    names.handle(T0 + 2, send(4, "db"))
    names.handle(T0 + 3, NameReplyIn(OTHER, NameReply(1, NameStatus.DELIVERED)))
    names.handle(T0 + 3, NameReplyIn(OTHER, NameReply(3, NameStatus.DELIVERED)))
    # call 1's timer fires: nothing due; re-armed for call 2, the first still open
    assert names.handle(T0 + 10, DeadlineFired(SendDeadline(T0 + 10, 1))) == [
        SendDeadline(T0 + 11, 2)
    ]
    f = Failure(OTHER, SendError.UNAVAILABLE, W.TIMEOUT)
    assert names.handle(T0 + 11, DeadlineFired(SendDeadline(T0 + 11, 2))) == [
        SendResult(2, 0, (f,), f),
        SendDeadline(T0 + 12, 4),  # call 3 ended: skipped
    ]
    # a runtime late by more than one deadline: every call due ends in that turn
    names.handle(T0 + 12, send(5, "db"))
    assert names.handle(T0 + 30, DeadlineFired(SendDeadline(T0 + 12, 4))) == [
        SendResult(4, 0, (f,), f),
        SendResult(5, 0, (f,), f),
    ]
    assert names.pending == 0 and counters["send_timeouts"] == 3
