"""Random sequences of inputs to the names core: it never raises, every call ends
in exactly one SendResult, and no call outlives its deadline."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from peerd.core.events import (
    ConnClosed,
    DeadlineFired,
    DeliverToConn,
    LinkLost,
    LinkSend,
    LinkSendDone,
    MailboxTaken,
    MarkQuiet,
    NameMsgIn,
    NameReplyIn,
    NamesInput,
    NamesOutput,
    Offered,
    OfferOutcome,
    ReplyAddr,
    ReplyToSender,
    SendDeadline,
    SendResult,
    SendToName,
)
from peerd.core.names.core import NamesConfig
from peerd.wire.messages import NameMsg, NameReply, NameStatus, RegKind
from tests.core.names.helpers import ME, OTHER, THIRD, make

NODES = [ME, OTHER, THIRD, b"\x09" * 16]
TIMEOUT = 10.0

_action = st.one_of(
    st.tuples(
        st.just("send"),
        st.sampled_from(["db", "web", "mine", "workers", "nobody"]),
        st.booleans(),
        st.integers(0, 9),
    ),
    st.tuples(st.just("reply_to"), st.sampled_from(NODES), st.integers(0, 5), st.integers(0, 50)),
    st.tuples(st.just("answer"), st.integers(0, 40), st.sampled_from(list(NameStatus))),
    st.tuples(st.just("stray"), st.integers(0, 40), st.sampled_from(NODES)),
    st.tuples(st.just("link_done"), st.integers(0, 40), st.booleans(), st.integers(0, 3)),
    st.tuples(st.just("lost"), st.sampled_from(NODES), st.sampled_from([None, 0, 1, 2])),
    st.tuples(st.just("offer"), st.integers(0, 40), st.sampled_from(list(OfferOutcome))),
    st.tuples(st.just("incoming"), st.integers(0, 9), st.integers(0, 5), st.integers(0, 50)),
    st.tuples(st.just("taken"), st.integers(0, 9), st.integers(0, 3)),
    st.tuples(st.just("closed"), st.integers(0, 9)),
    st.tuples(st.just("quiet"), st.integers(0, 9)),
    st.tuples(st.just("wait"), st.floats(0, 12)),
)


@given(st.lists(_action, max_size=60))
@settings(max_examples=300, deadline=None)
def test_random_inputs_every_call_ends_once_by_its_deadline(actions: list[tuple[Any, ...]]) -> None:
    names, view, _ = make(NamesConfig(send_timeout_s=TIMEOUT, daemon_mailbox_messages=3))
    view.hold(3, RegKind.NAME, "mine", conn=7)
    view.hold(4, RegKind.GROUP, "workers", conn=8)
    view.remote(OTHER, 5, RegKind.NAME, "db")
    view.remote(THIRD, 6, RegKind.NAME, "web")
    view.remote(OTHER, 7, RegKind.GROUP, "workers")
    view.remote(THIRD, 8, RegKind.GROUP, "workers")
    now = 0.0
    calls = 0
    started: dict[int, float] = {}
    results: dict[int, int] = {}
    timers: list[SendDeadline] = []
    sent: list[tuple[bytes, NameMsg]] = []
    tokens: list[int] = []

    def feed(inp: NamesInput) -> None:
        outs: list[NamesOutput] = names.handle(now, inp)
        for out in outs:
            match out:
                case SendResult(call):
                    results[call] = results.get(call, 0) + 1
                case SendDeadline():
                    assert out.at == started[out.call] + TIMEOUT
                    timers.append(out)
                case LinkSend(node, _, NameMsg() as m, seq):
                    assert seq == m.seq
                    sent.append((node, m))
                case DeliverToConn(token):
                    tokens.append(token)

    def fire_due() -> None:
        for t in sorted((t for t in timers if t.at <= now), key=lambda t: (t.at, t.call)):
            timers.remove(t)
            feed(DeadlineFired(t))
            assert names.outstanding(t.call) == {}  # ended, at the latest now

    for action in actions:
        match action:
            case ("send", name, every, conn):
                calls += 1
                started[calls] = now
                kind = RegKind.GROUP if name == "workers" else RegKind.NAME
                feed(SendToName(calls, conn, kind, "default", name, b"p", every))
            case ("reply_to", node, gen, conn):
                calls += 1
                started[calls] = now
                feed(ReplyToSender(calls, 0, ReplyAddr(node, gen, conn), b"r"))
            case ("answer", i, status) if sent:
                node, m = sent[i % len(sent)]
                feed(NameReplyIn(node, NameReply(m.seq, status)))  # may be a duplicate
            case ("stray", seq, node):
                feed(NameReplyIn(node, NameReply(seq, NameStatus.DELIVERED)))
            case ("link_done", i, ok, link) if sent:
                feed(LinkSendDone(sent[i % len(sent)][1].seq, ok, link))
            case ("lost", node, link):
                feed(LinkLost(node, link))
            case ("offer", i, outcome) if tokens:
                feed(Offered(tokens[i % len(tokens)], outcome))
            case ("incoming", eid, gen, conn):
                m = NameMsg(
                    1, RegKind.NAME, "default", "mine", eid, "x", b"q", gen, conn, "", eid, gen, 0
                )
                feed(NameMsgIn(OTHER, m))
            case ("taken", conn, n):
                feed(MailboxTaken(conn, n))
            case ("closed", conn):
                feed(ConnClosed(conn))
                view.open_conns.discard(conn)
            case ("quiet", eid):
                feed(MarkQuiet(eid))
            case ("wait", dt):
                now += dt
                fire_due()
        assert names.mailbox_messages >= 0 and names.mailbox_bytes >= 0
    now += TIMEOUT
    fire_due()
    assert names.pending == 0 and not names._sent and not names._by_node
    assert results == {c: 1 for c in range(1, calls + 1)}
