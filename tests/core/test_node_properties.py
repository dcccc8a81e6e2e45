"""Property tests: hostile bytes never raise; random valid traffic keeps invariants."""

from __future__ import annotations

from typing import Any

import cbor2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from peerd.core.events import (
    EventKind,
    LinkClosed,
    MemberEvent,
    OpenStream,
    SendPacket,
    SetTags,
    SetTimer,
    StreamFailed,
    StreamReply,
    StreamRequest,
    StreamResponse,
    Unreachable,
)
from peerd.core.events import Leave as LeaveInput
from peerd.wire import codec
from peerd.wire.messages import (
    Ack,
    Alive,
    Dead,
    Left,
    MemberState,
    Message,
    Nack,
    Ping,
    PingReq,
    PushPull,
    RegSync,
    Status,
    Suspect,
)

from .util import Rig, addr, decode, nid, of, state_of

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def fresh() -> Rig:
    """Node 1 with two peers and two join streams (1, 2) still open."""
    r = Rig.make()
    r.start(addr(2), addr(3))
    r.join(2, 3, now=0.0)
    return r


# --- hostile bytes -----------------------------------------------------------------

cbor_leaf = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.binary(max_size=20),
    st.sampled_from([nid(1), nid(2), bytes([10, 0, 0, 2]), bytes(16)]),
    st.text(max_size=10),
    st.booleans(),
    st.none(),
    st.just(1.5),
)
cbor_value = st.recursive(
    cbor_leaf,
    lambda children: st.one_of(
        st.lists(children, max_size=8),
        st.dictionaries(st.text(max_size=5), children, max_size=4),
    ),
    max_leaves=12,
)
# Message-shaped: [type, field...] with plausible and implausible fields.
message_like = st.builds(
    lambda t, fields: [t, *fields],
    st.integers(min_value=-1, max_value=12),
    st.lists(cbor_value, max_size=7),
)
datagram_like = st.lists(st.one_of(message_like, cbor_value), max_size=4).map(cbor2.dumps)
hostile = st.one_of(st.binary(max_size=1500), datagram_like, message_like.map(cbor2.dumps))


@FUZZ
@given(data=hostile)
def test_any_datagram_never_raises(data: bytes) -> None:
    r = fresh()
    outs = r.recv_raw(2, data, now=1.0)
    for o in of(outs, SetTimer):
        assert o.at >= 1.0


@FUZZ
@given(data=hostile)
def test_any_stream_request_never_raises(data: bytes) -> None:
    r = fresh()
    outs = r.handle(StreamRequest(9, addr(2), data), now=1.0)
    (reply,) = of(outs, StreamReply)
    assert reply.stream == 9
    if reply.data is not None:
        state_of(reply.data)


@FUZZ
@given(data=hostile)
def test_any_stream_response_never_raises(data: bytes) -> None:
    r = fresh()
    r.handle(StreamResponse(1, data), now=1.0)
    r.handle(StreamResponse(2, data), now=1.1)
    assert r.node.local_member().status is Status.ALIVE


# --- random valid traffic about a few nodes -----------------------------------------

NODES = st.integers(min_value=1, max_value=5)
INCS = st.integers(min_value=0, max_value=6)
ADDRS = st.one_of(
    NODES.map(addr),
    NODES.map(lambda i: (f"10.0.1.{i}", 8000)),
    st.sampled_from([("0.0.0.0", 7946), ("10.0.0.9", 0), ("::1", 7946)]),
)
NAMES = st.sampled_from(["n1", "n2", "n3", "n4", "n5"])
TAGS = st.lists(
    st.tuples(st.sampled_from(["a", "b", "role"]), st.sampled_from(["x", "y"])),
    max_size=3,
    unique_by=lambda kv: kv[0],
).map(lambda kv: tuple(sorted(kv)))
SEQS = st.integers(min_value=0, max_value=30)

messages: st.SearchStrategy[Message] = st.one_of(
    st.builds(Alive, NODES.map(nid), NAMES, ADDRS, INCS, st.integers(0, 2), TAGS),
    st.builds(Suspect, NODES.map(nid), INCS, NODES.map(nid)),
    st.builds(Dead, NODES.map(nid), INCS, NODES.map(nid)),
    st.builds(Left, NODES.map(nid), INCS),
    st.builds(Ping, SEQS, NODES.map(nid)),
    st.builds(PingReq, SEQS, NODES.map(nid), ADDRS, st.booleans()),
    st.builds(Ack, SEQS),
    st.builds(Nack, SEQS),
)
member_states = st.builds(
    MemberState,
    NODES.map(nid),
    NAMES,
    ADDRS,
    INCS,
    st.integers(0, 2),
    TAGS,
    st.sampled_from(list(Status)),
)
push_pulls = st.builds(PushPull, st.booleans(), st.lists(member_states, max_size=5).map(tuple))

ops = st.one_of(
    st.tuples(st.just("packet"), NODES, st.lists(messages, min_size=1, max_size=4)),
    st.tuples(st.just("timer"), st.integers(min_value=0, max_value=10_000)),
    st.tuples(st.just("timer"), st.integers(min_value=0, max_value=10_000)),
    st.tuples(st.just("hint"), st.booleans(), ADDRS),
    st.tuples(st.just("sync_in"), push_pulls),
    st.tuples(st.just("sync_out"), st.integers(1, 4), st.one_of(push_pulls, st.none())),
    st.tuples(st.just("tags"), TAGS),
    st.tuples(st.just("leave")),
)


def run_op(r: Rig, op: tuple[Any, ...]) -> list:
    match op:
        case ("packet", src, msgs):
            return r.recv(src, *msgs)
        case ("timer", pick):
            if not r.pending:
                return []
            return r.fire(r.pending[pick % len(r.pending)])
        case ("hint", closed, where):
            return r.handle(LinkClosed(where) if closed else Unreachable(where))
        case ("sync_in", pp):
            return r.handle(StreamRequest(5, addr(2), codec.encode(pp)))
        case ("sync_out", stream, pp):
            if pp is None:
                return r.handle(StreamFailed(stream, "refused"))
            return r.handle(StreamResponse(stream, codec.encode(pp)))
        case ("tags", tags):
            return r.handle(SetTags(tags))
        case ("leave",):
            return r.handle(LeaveInput())
    raise AssertionError(op)


EVENT_STATUS = {
    EventKind.JOINED: Status.ALIVE,
    EventKind.ALIVE: Status.ALIVE,
    EventKind.SUSPECT: Status.SUSPECT,
    EventKind.DEAD: Status.DEAD,
    EventKind.LEFT: Status.LEFT,
}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=st.lists(st.tuples(st.floats(min_value=0.0, max_value=3.0), ops), max_size=40))
def test_random_traffic_keeps_invariants(steps: list[tuple[float, tuple[Any, ...]]]) -> None:
    r = fresh()
    leaving = False
    my_inc = r.node.incarnation
    seen_inc: dict[bytes, int] = {}
    for dt, op in steps:
        r.now += dt
        now = r.now
        outs = run_op(r, op)
        leaving = leaving or op == ("leave",)

        me = r.node.local_member()
        assert me.status is (Status.LEFT if leaving else Status.ALIVE)
        assert me.incarnation >= my_inc
        my_inc = me.incarnation

        members = r.node.members()
        for m in members:
            assert m.incarnation >= seen_inc.get(m.node, 0), m
            seen_inc[m.node] = m.incarnation
        live = [
            m for m in members if m.node != nid(1) and m.status in (Status.ALIVE, Status.SUSPECT)
        ]
        assert r.node.live_count() == len(live) + 1

        for o in outs:
            match o:
                case SetTimer(at=at):
                    assert at >= now
                case OpenStream(data=data) | StreamReply(data=data) if data is not None:
                    # a membership push-pull, or the registry sync that follows it
                    assert isinstance(codec.decode(data), PushPull | RegSync)
                case MemberEvent(kind=kind, member=member) if kind in EVENT_STATUS:
                    assert member.status is EVENT_STATUS[kind]
        for o in of(outs, SendPacket):
            assert len(o.data) <= r.node.config.max_packet_bytes
            decode(o.data)
