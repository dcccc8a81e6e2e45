"""Messages to names through the daemon's runner: a real Peer (its names core
routes, the runner carries out) over a fake registry replica, fake links and
fake API connections: resolution, local and remote delivery, every error and
its API text, timeouts on the runner's timer heap."""

from __future__ import annotations

import collections
import io
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
import trio
import trio.testing

from peerd.api.protocol import ApiError, SendArgs, parse_send_args
from peerd.core.config import SwimConfig
from peerd.core.events import LogLevel, MarkQuiet
from peerd.core.names.core import NamesConfig
from peerd.core.names.view import LocalEntry, MemberRef, OwnerRef
from peerd.core.peer import Peer
from peerd.shell.links import LinkLost, LinkMessages
from peerd.shell.logs import Logger
from peerd.shell.messaging import DIRECT_PRIORITY, HINT_TTL_S, MAX_HINTS, Pending
from peerd.shell.runner import Runner
from peerd.wire.messages import NameMsg, NameReply, NameStatus, NodeId, RegKind, Status

ME, OTHER, THIRD = b"\x01" * 16, b"\x02" * 16, b"\x03" * 16


@dataclass
class Entry:
    eid: int
    kind: RegKind
    scope: str
    name: str


@dataclass
class Claim:
    origin: bytes
    entry: Entry


@dataclass
class Part:
    entries: dict[int, Entry] = field(default_factory=dict)


class State:
    def __init__(self) -> None:
        self.claims: list[Claim] = []
        self.local = Part()
        self.generation = 4  # this daemon's life

    def version_of(self, origin: bytes) -> tuple[int, int]:
        if origin == ME:
            return (self.generation, 1)
        return (2, 1) if any(c.origin == origin for c in self.claims) else (0, 0)

    def lookup(self, scope: str, name: str) -> Claim | None:
        for c in self.claims:
            if (c.entry.kind, c.entry.scope, c.entry.name) == (RegKind.NAME, scope, name):
                return c
        return None

    def group_members(self, scope: str, name: str) -> list[Claim]:
        return [
            c
            for c in self.claims
            if (c.entry.kind, c.entry.scope, c.entry.name) == (RegKind.GROUP, scope, name)
        ]


class Registry:
    def __init__(self) -> None:
        self.state = State()
        self._owner_of: dict[int, int] = {}
        self._owned: dict[int, dict[tuple[RegKind, str, str], int]] = {}

    def add(
        self, origin: bytes, eid: int, kind: RegKind, name: str, conn: int | None = None
    ) -> None:
        e = Entry(eid, kind, "default", name)
        self.state.claims.append(Claim(origin, e))
        if origin == ME:
            self.state.local.entries[eid] = e
            assert conn is not None
            self._owner_of[eid] = conn
            self._owned.setdefault(conn, {})[(kind, "default", name)] = eid

    # the two reads messaging makes of peerd.core.registry.service.RegistryService
    def owner_conn(self, eid: int) -> int | None:
        return self._owner_of.get(eid)

    def held_by_conn(self, conn: int) -> list[tuple[RegKind, str, str]]:
        return list(self._owned.get(conn, {}))

    def eid_of(self, conn: int, kind: RegKind, scope: str, name: str) -> int | None:
        return self._owned.get(conn, {}).get((kind, scope, name))


@dataclass
class Member:
    node: bytes
    addr: tuple[str, int]
    status: Status = Status.ALIVE
    generation: int = 2


class Node:
    def __init__(self) -> None:
        self.registry = Registry()
        self.members: dict[bytes, Member] = {}  # overrides

    def local_member(self) -> Member:
        return Member(ME, ("127.0.0.1", 1))

    def member(self, node: bytes) -> Member | None:
        if node in self.members:
            return self.members[node]
        return Member(node, ("127.0.0.9", 9)) if node != b"\x09" * 16 else None


class Links:
    def __init__(self) -> None:
        self.sent: list[tuple[bytes, Any, int, Any]] = []
        self.connected: list[bytes] = []
        self.accept = True
        self.link = 1  # the id link_id gives

    def has(self, peer: bytes) -> bool:
        return peer in self.connected

    def link_id(self, peer: bytes) -> int | None:
        return self.link if peer in self.connected else None

    def connect(self, peer: bytes, addr: Any, *, mesh: bool = True) -> None:
        self.connected.append(peer)

    def send(self, peer: bytes, msg: Any, priority: int = 0, *, mesh: bool | None = None) -> bool:
        self.sent.append((peer, msg, priority, mesh))
        return self.accept


class View:
    """The names core's view (peerd.core.names.view.NamesView) over the fake
    node and the runner's API connections, in place of the Peer's own."""

    def __init__(self, node: Node, conns: dict[int, Any]) -> None:
        self.node = node
        self.conns = conns
        self.is_leaving = False

    def me(self) -> NodeId:
        return ME

    def my_generation(self) -> int | None:
        return self.node.registry.state.generation

    def leaving(self) -> bool:
        return self.is_leaving

    def _gen_of(self, origin: bytes) -> int:
        return self.node.registry.state.version_of(origin)[0]

    def lookup(self, scope: str, name: str) -> OwnerRef | None:
        claim = self.node.registry.state.lookup(scope, name)
        if claim is None:
            return None
        return OwnerRef(claim.origin, claim.entry.eid, self._gen_of(claim.origin))

    def group_members(self, scope: str, name: str) -> Sequence[OwnerRef]:
        return [
            OwnerRef(c.origin, c.entry.eid, self._gen_of(c.origin))
            for c in self.node.registry.state.group_members(scope, name)
        ]

    def member(self, node: NodeId) -> MemberRef | None:
        m = self.node.member(node)
        return None if m is None else MemberRef(m.status, m.generation, m.addr)

    def local_entry(self, eid: int) -> LocalEntry | None:
        e = self.node.registry.state.local.entries.get(eid)
        return None if e is None else LocalEntry(e.kind, e.scope, e.name)

    def owner_conn(self, eid: int) -> int | None:
        return self.node.registry.owner_conn(eid)

    def sender_of(self, conn: int) -> tuple[str, str, int]:
        registry = self.node.registry
        for kind, scope, name in registry.held_by_conn(conn):
            if kind is RegKind.NAME:
                return name, scope, registry.eid_of(conn, kind, scope, name) or 0
        return "", "", 0

    def conn_open(self, conn: int) -> bool:
        c = self.conns.get(conn)
        return c is not None and not getattr(c, "closed", False)


class Messenger:
    """The test's handle on a runner whose Peer has names messaging: what an
    API ``send`` and the peer links do, in the runner's own entry points."""

    def __init__(
        self,
        node: Node,
        links: Any,
        conns: dict[int, Any] | None = None,
        counters: collections.Counter[str] | None = None,
        send_timeout_s: float = 10,
    ) -> None:
        self.node = node
        self.peer = Peer(
            node_id=ME,
            name="me",
            addr=("127.0.0.1", 1),
            config=SwimConfig(),
            rng=random.Random(1),
            generation=4,
            names=NamesConfig(
                send_timeout_s=send_timeout_s, hint_ttl_s=HINT_TTL_S, max_hints=MAX_HINTS
            ),
            names_rng=random.Random(2),
        )
        self.runner = Runner(
            self.peer,
            packets=None,  # type: ignore[arg-type]
            streams=None,  # type: ignore[arg-type]
            logger=Logger(LogLevel.DEBUG, io.StringIO()),
            counters=counters,
            links=links,
        )
        self.conns = self.runner._reg_conns
        self.conns.update(conns or {})
        assert self.peer.names is not None
        self.names = self.peer.names
        self.view = View(node, self.conns)
        self.names.view = self.view
        self.counters = self.peer.counters

    @property
    def pending(self) -> int:
        return self.names.pending

    def begin(self, conn: object, a: SendArgs) -> Pending:
        return self.runner._send_begin(conn, a)

    async def wait(self, p: Pending) -> dict[str, Any]:
        """The call's outcome; the runner's timers fire meanwhile (as its loop would)."""
        runner = self.runner
        while not p.finished and runner._timers:
            await trio.sleep_until(runner._timers[0][0])
            runner._fire_due_timers()
        assert runner.sends is not None
        return await runner.sends.wait(p)

    def on_message(self, src: bytes, msg: NameMsg) -> None:
        self.runner._dispatch(LinkMessages(src, (msg,)))

    def on_reply(self, src: bytes, reply: NameReply) -> None:
        self.runner._dispatch(LinkMessages(src, (reply,)))

    def link_lost(self, node: bytes, link: int | None = None) -> None:
        self.runner._dispatch(LinkLost(node, False, link))

    def mark_quiet(self, eid: int) -> None:
        self.runner._handle(MarkQuiet(eid))

    def pump(self) -> None:
        """One turn of the runner: what other tasks queued for it."""
        while True:
            try:
                item = self.runner._receive.receive_nowait()
            except trio.WouldBlock:
                break
            self.runner._dispatch(item)
        if self.runner._taken:  # what the writers took
            self.runner._feed_taken()


class Conn:
    def __init__(self, cid: int, room: int = 10) -> None:
        self.id = cid
        self.room = room
        self.events: list[tuple[int, str, dict[str, Any]]] = []
        self.closed = False

    def offer(self, stream: int, event: str, data: dict[str, Any]) -> str:
        if self.closed:
            return "closed"
        if len(self.events) >= self.room:
            return "full"
        self.events.append((stream, event, data))
        return "ok"


def setup() -> tuple[Messenger, Node, Links, dict[int, Any]]:
    node, links = Node(), Links()
    m = Messenger(node, links, send_timeout_s=10)
    return m, node, links, m.conns


def args(name: str, payload: bytes = b"hi", **kw: Any) -> SendArgs:
    return parse_send_args({"name": name, "payload": payload, **kw})


async def test_unknown_name_is_not_found() -> None:
    m, *_ = setup()
    with pytest.raises(ApiError) as e:
        m.begin(Conn(1), args("nobody"))
    assert e.value.code == "not_found" and "no name 'nobody'" in e.value.message


async def test_local_owner_gets_it_at_once_with_the_sender_name() -> None:
    m, node, links, conns = setup()
    owner, sender = Conn(7), Conn(8)
    conns[7] = owner
    node.registry.add(ME, 1, RegKind.NAME, "db", conn=7)
    node.registry.add(ME, 2, RegKind.NAME, "client", conn=8)
    p = m.begin(sender, args("db", b"ping"))
    assert await m.wait(p) == {"delivered": 1}
    assert owner.events == [
        (
            0,
            "message",
            {
                "from": "client",
                "from_scope": "default",
                "from_node": ME.hex(),
                "kind": "name",
                "scope": "default",
                "name": "db",
                "payload": b"ping",
                "reply_to": f"{ME.hex()}.4.8",  # this daemon, life 4, connection 8
            },
        )
    ]
    assert links.sent == []


async def test_remote_owner_roundtrip_and_errors() -> None:
    m, node, links, _ = setup()
    node.registry.add(OTHER, 5, RegKind.NAME, "db")
    p1 = m.begin(Conn(1), args("db", b"a"))
    p2 = m.begin(Conn(1), args("db", b"b"))
    p3 = m.begin(Conn(1), args("db", b"c"))
    assert links.connected == [OTHER]  # one link, reused
    msgs = [s[1] for s in links.sent]
    assert [(x.seq, x.eid, x.payload, x.sender) for x in msgs] == [
        (1, 5, b"a", ""),
        (2, 5, b"b", ""),
        (3, 5, b"c", ""),
    ]
    assert {(s[2], s[3]) for s in links.sent} == {(DIRECT_PRIORITY, False)}
    m.on_reply(OTHER, NameReply(1, NameStatus.DELIVERED))
    m.on_reply(OTHER, NameReply(2, NameStatus.MAILBOX_FULL))
    m.on_reply(THIRD, NameReply(3, NameStatus.DELIVERED))  # wrong peer: ignored
    assert m.counters["send_reply_unexpected"] == 1
    m.on_reply(OTHER, NameReply(3, NameStatus.NOT_FOUND))
    assert await m.wait(p1) == {"delivered": 1}
    with pytest.raises(ApiError) as e:
        await m.wait(p2)
    assert e.value.code == "mailbox_full" and "mailbox full" in e.value.message
    with pytest.raises(ApiError) as e:
        await m.wait(p3)
    assert e.value.code == "not_found" and "vanished" in e.value.message
    assert m.pending == 0


async def test_link_lost_fails_what_waits_on_it() -> None:
    m, node, _, _ = setup()
    node.registry.add(OTHER, 5, RegKind.NAME, "db")
    node.registry.add(THIRD, 6, RegKind.NAME, "web")
    p1, p2 = m.begin(Conn(1), args("db")), m.begin(Conn(1), args("web"))
    m.link_lost(OTHER)
    with pytest.raises(ApiError) as e:
        await m.wait(p1)
    assert e.value.code == "unavailable" and "lost" in e.value.message
    assert not p2.finished


async def test_no_answer_times_out(autojump_clock: trio.testing.MockClock) -> None:
    m, node, _, _ = setup()
    node.registry.add(OTHER, 5, RegKind.NAME, "db")
    p = m.begin(Conn(1), args("db"))
    t0 = trio.current_time()
    with pytest.raises(ApiError) as e:
        await m.wait(p)
    assert trio.current_time() - t0 == pytest.approx(10)
    assert "no answer" in e.value.message and m.pending == 0
    m.on_reply(OTHER, NameReply(1, NameStatus.DELIVERED))  # too late: ignored
    assert m.counters["send_reply_unexpected"] == 1


async def test_full_link_and_unknown_member_are_errors() -> None:
    m, node, links, _ = setup()
    node.registry.add(OTHER, 5, RegKind.NAME, "db")
    node.registry.add(b"\x09" * 16, 6, RegKind.NAME, "ghost")
    links.accept = False
    with pytest.raises(ApiError) as e:
        await m.wait(m.begin(Conn(1), args("db")))
    assert "full or down" in e.value.message
    with pytest.raises(ApiError) as e:
        await m.wait(m.begin(Conn(1), args("ghost")))
    assert "not a known member" in e.value.message


async def test_group_one_prefers_local_and_all_reaches_everyone() -> None:
    m, node, links, conns = setup()
    conns[7] = local = Conn(7)
    node.registry.add(OTHER, 5, RegKind.GROUP, "workers")
    node.registry.add(ME, 6, RegKind.GROUP, "workers", conn=7)
    node.registry.add(THIRD, 7, RegKind.GROUP, "workers")
    assert await m.wait(
        m.begin(Conn(1), parse_send_args({"group": "workers", "payload": b"x"}))
    ) == {"delivered": 1}
    assert len(local.events) == 1 and links.sent == []
    p = m.begin(Conn(1), parse_send_args({"group": "workers", "payload": b"y", "all": True}))
    assert sorted(s[0] for s in links.sent) == [OTHER, THIRD]
    seqs = {s[0]: s[1].seq for s in links.sent}
    m.on_reply(OTHER, NameReply(seqs[OTHER], NameStatus.DELIVERED))
    m.on_reply(THIRD, NameReply(seqs[THIRD], NameStatus.MAILBOX_FULL))
    result = await m.wait(p)
    assert result["delivered"] == 2  # the local member and OTHER
    assert [f["node"] for f in result["failed"]] == [THIRD.hex()]


async def test_receiver_checks_the_entry_and_answers_each() -> None:
    m, node, links, conns = setup()
    conns[7] = owner = Conn(7, room=1)
    node.registry.add(ME, 3, RegKind.NAME, "db", conn=7)
    ok = NameMsg(11, RegKind.NAME, "default", "db", 3, "asker", b"1")
    m.on_message(OTHER, ok)
    m.on_message(OTHER, NameMsg(12, RegKind.NAME, "default", "db", 3, "asker", b"2"))  # full
    m.on_message(OTHER, NameMsg(13, RegKind.NAME, "default", "db", 99, "", b"3"))  # vanished
    m.on_message(OTHER, NameMsg(14, RegKind.GROUP, "default", "db", 3, "", b"4"))  # wrong kind
    owner.closed = True
    m.on_message(OTHER, NameMsg(15, RegKind.NAME, "default", "db", 3, "", b"5"))  # going away
    assert [s[1] for s in links.sent] == [
        NameReply(11, NameStatus.DELIVERED),
        NameReply(12, NameStatus.MAILBOX_FULL),
        NameReply(13, NameStatus.NOT_FOUND),
        NameReply(14, NameStatus.NOT_FOUND),
        NameReply(15, NameStatus.NOT_FOUND),
    ]
    assert owner.events[0][2]["from"] == "asker"
    m.view.is_leaving = True
    m.on_message(OTHER, ok)
    assert links.sent[-1][1] == NameReply(11, NameStatus.REFUSED)


async def test_reply_to_reaches_the_sending_connection_and_nothing_else() -> None:
    # Receiver side: a message from OTHER's connection 41 (life 2) carries a
    # token naming exactly that connection; no registry is involved.
    m, node, links, conns = setup()
    conns[7] = owner = Conn(7)
    node.registry.add(ME, 3, RegKind.NAME, "db", conn=7)
    m.on_message(OTHER, NameMsg(11, RegKind.NAME, "default", "db", 3, "", b"q", 2, 41, "", 0, 4, 0))
    data = owner.events[0][2]
    assert data["from"] is None and data["reply_to"] == f"{OTHER.hex()}.2.29"
    p = m.begin(owner, parse_send_args({"reply_to": data["reply_to"], "payload": b"a"}))
    out = links.sent[-1][1]
    assert links.sent[-1][0] == OTHER
    assert (out.to_gen, out.to_conn, out.eid, out.name, out.sender, out.from_conn) == (
        2,
        41,
        0,
        "",
        "db",
        7,
    )
    m.on_reply(OTHER, NameReply(out.seq, NameStatus.NOT_FOUND))
    with pytest.raises(ApiError) as e:
        await m.wait(p)
    assert e.value.code == "not_found" and "sent the message is gone" in e.value.message

    # Sender side (the daemon that issued the token): the reply reaches the
    # connection while it is open, then never (not another one).
    m2, node2, links2, conns2 = setup()
    conns2[41] = asker = Conn(41)
    msg = NameMsg(5, RegKind.NAME, "", "", 0, "db", b"a", 2, 7, "default", 3, 4, 41)
    m2.on_message(OTHER, msg)
    assert links2.sent[-1][1] == NameReply(5, NameStatus.DELIVERED)
    ev = asker.events[-1][2]
    assert (ev["kind"], ev["name"], ev["from"], ev["payload"]) == ("reply", "", "db", b"a")
    assert ev["reply_to"] == f"{OTHER.hex()}.2.7"  # and the conversation can go on
    m2.on_message(OTHER, NameMsg(6, RegKind.NAME, "", "", 0, "db", b"b", 2, 7, "", 0, 3, 41))
    assert links2.sent[-1][1] == NameReply(6, NameStatus.NOT_FOUND)  # an earlier life
    m2.on_message(OTHER, NameMsg(7, RegKind.NAME, "", "", 0, "db", b"c", 2, 7, "", 0, 4, 42))
    assert links2.sent[-1][1] == NameReply(7, NameStatus.NOT_FOUND)  # no such connection
    asker.closed = True
    m2.on_message(OTHER, msg)
    assert links2.sent[-1][1] == NameReply(5, NameStatus.NOT_FOUND)
    assert len(asker.events) == 1


async def test_reply_to_a_local_sender_and_stale_tokens() -> None:
    m, node, links, conns = setup()
    conns[7] = owner = Conn(7)
    node.registry.add(ME, 3, RegKind.NAME, "db", conn=7)
    asker = Conn(8)  # holds no name: replies find it all the same
    assert await m.wait(m.begin(asker, args("db", b"q"))) == {"delivered": 1}
    token = owner.events[0][2]["reply_to"]
    assert await m.wait(m.begin(owner, parse_send_args({"reply_to": token, "payload": b"a"})))
    assert asker.events[0][2]["payload"] == b"a" and links.sent == []
    asker.closed = True
    with pytest.raises(ApiError) as e:
        await m.wait(m.begin(owner, parse_send_args({"reply_to": token, "payload": b"b"})))
    assert e.value.code == "not_found"
    # A token of a life of ours that ended, or of a node known dead or
    # restarted since, fails at once.
    for tok, setup_member in (
        (f"{ME.hex()}.3.8", None),
        (f"{OTHER.hex()}.1.8", None),  # OTHER is in life 2 now
        (f"{THIRD.hex()}.2.8", Status.DEAD),
    ):
        if setup_member is not None:
            node.members[THIRD] = Member(THIRD, ("127.0.0.9", 9), setup_member, 2)
        sent = len(links.sent)
        with pytest.raises(ApiError) as e:
            await m.wait(m.begin(owner, parse_send_args({"reply_to": tok, "payload": b"c"})))
        assert e.value.code == "not_found", tok
        assert len(links.sent) == sent
    for bad in ("", "x.1.1", f"{ME.hex()}.0.1", f"{ME.hex()}.1", f"{ME.hex()}.01.1", 7):
        with pytest.raises(ApiError) as e:
            parse_send_args({"reply_to": bad, "payload": b""})
        assert e.value.code == "bad_args"
    with pytest.raises(ApiError):
        parse_send_args({"reply_to": token, "name": "x", "payload": b""})


async def test_a_sender_name_is_reachable_before_the_replica_has_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    m, node, links, conns = setup()
    conns[7] = Conn(7)
    node.registry.add(ME, 3, RegKind.NAME, "db", conn=7)
    # caller-1 on OTHER (life 2, entry 9) sent before its registration arrived.
    m.on_message(
        OTHER,
        NameMsg(11, RegKind.NAME, "default", "db", 3, "caller-1", b"q", 2, 41, "jobs", 9, 4, 0),
    )
    assert conns[7].events[0][2]["from_scope"] == "jobs"
    with pytest.raises(ApiError):  # another scope: no hint
        m.begin(conns[7], args("caller-1"))
    p = m.begin(conns[7], args("caller-1", scope="jobs"))
    out = links.sent[-1][1]
    assert links.sent[-1][0] == OTHER and (out.scope, out.name, out.eid, out.to_gen) == (
        "jobs",
        "caller-1",
        9,
        2,
    )
    m.on_reply(OTHER, NameReply(out.seq, NameStatus.DELIVERED))
    assert await m.wait(p) == {"delivered": 1}
    assert m.counters["send_via_hint"] == 1
    # The replica, once it knows the name, wins (here: another holder).
    node.registry.state.claims.append(Claim(THIRD, Entry(5, RegKind.NAME, "jobs", "caller-1")))
    m.begin(conns[7], args("caller-1", scope="jobs"))
    assert links.sent[-1][0] == THIRD and links.sent[-1][1].eid == 5
    node.registry.state.claims.pop()
    # A restarted or dead node's hint is not used; hints expire.
    node.members[OTHER] = Member(OTHER, ("127.0.0.9", 9), Status.ALIVE, 3)
    with pytest.raises(ApiError):
        m.begin(conns[7], args("caller-1", scope="jobs"))
    del node.members[OTHER]
    m.on_message(
        OTHER,
        NameMsg(12, RegKind.NAME, "default", "db", 3, "caller-1", b"q", 2, 41, "jobs", 9, 4, 0),
    )
    m.begin(conns[7], args("caller-1", scope="jobs"))
    await trio.sleep(31)
    with pytest.raises(ApiError):
        m.begin(conns[7], args("caller-1", scope="jobs"))


async def test_a_quiet_holder_gets_no_receiver_never_delivered() -> None:
    m, node, links, conns = setup()
    conns[7] = held = Conn(7)
    node.registry.add(ME, 3, RegKind.NAME, "job", conn=7)
    m.mark_quiet(3)
    with pytest.raises(ApiError) as e:
        await m.wait(m.begin(Conn(8), args("job")))
    assert e.value.code == "no_receiver" and "takes no messages" in e.value.message
    new = NameMsg(11, RegKind.NAME, "default", "job", 3, "", b"1", 2, 41, "", 0, 4, 0)
    old = NameMsg(12, RegKind.NAME, "default", "job", 3, "", b"1")  # an older sender
    m.on_message(OTHER, new)
    m.on_message(OTHER, old)
    assert [s[1].status for s in links.sent] == [NameStatus.NO_RECEIVER, NameStatus.REFUSED]
    assert held.events == []


def test_send_args() -> None:
    a = parse_send_args({"group": "g", "all": True, "payload": "t", "scope": "s"})
    assert (a.kind, a.scope, a.name, a.payload, a.all) == (RegKind.GROUP, "s", "g", b"t", True)
    for bad in (
        {"name": "x", "all": True},
        {"name": "x", "group": "y"},
        {"name": "x", "payload": 3},
        {"name": "x", "payload": b"z" * (256 * 1024 + 1)},
        {"payload": b""},
        {"name": "x", "all": 1},
    ):
        with pytest.raises(ApiError) as e:
            parse_send_args(bad)
        assert e.value.code == "bad_args"


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_actions = st.lists(
    st.one_of(
        st.tuples(
            st.just("send"), st.sampled_from(["db", "web", "workers", "nobody"]), st.booleans()
        ),
        st.tuples(st.just("reply"), st.integers(0, 30), st.sampled_from(list(NameStatus))),
        st.tuples(st.just("stray"), st.integers(0, 30), st.sampled_from([OTHER, THIRD])),
        st.tuples(st.just("lost"), st.sampled_from([OTHER, THIRD]), st.booleans()),
    ),
    max_size=40,
)


@given(_actions)
@settings(max_examples=200, deadline=None)
def test_every_send_ends_exactly_once(actions: list[tuple[Any, ...]]) -> None:
    async def run() -> None:
        every_send_ends_exactly_once(actions)

    trio.run(run)


def every_send_ends_exactly_once(actions: list[tuple[Any, ...]]) -> None:
    m, node, links, conns = setup()
    conns[7] = Conn(7, room=3)
    node.registry.add(OTHER, 5, RegKind.NAME, "db")
    node.registry.add(THIRD, 6, RegKind.NAME, "web")
    node.registry.add(OTHER, 7, RegKind.GROUP, "workers")
    node.registry.add(THIRD, 8, RegKind.GROUP, "workers")
    node.registry.add(ME, 9, RegKind.GROUP, "workers", conn=7)
    calls = []
    for action in actions:
        match action:
            case ("send", name, every):
                a = {"group": name, "all": every} if name == "workers" else {"name": name}
                try:
                    calls.append(m.begin(Conn(1), parse_send_args({**a, "payload": b"p"})))
                except ApiError as e:
                    assert e.code == "not_found"
            case ("reply", i, status):
                sent = [s for s in links.sent if isinstance(s[1], NameMsg)]
                if sent:
                    peer, msg = sent[i % len(sent)][:2]
                    m.on_reply(peer, NameReply(msg.seq, status))  # may be a duplicate
            case ("stray", seq, peer):
                m.on_reply(peer, NameReply(seq, NameStatus.DELIVERED))
            case ("lost", peer, _):
                m.link_lost(peer)
    for peer in (OTHER, THIRD):  # whatever still waits ends with its link
        m.link_lost(peer)
    assert m.pending == 0
    for p in calls:
        assert p.finished
        try:
            r = p.result()
        except ApiError as e:
            assert e.code in ("not_found", "unavailable", "no_receiver", "mailbox_full")
        else:
            assert r["delivered"] >= 1 or p.every


async def test_the_core_counts_a_real_mailbox_until_the_writer_takes_it() -> None:
    # The API connection reports what its writer took, and its close: the
    # names core's per-daemon mailbox count follows.
    from peerd.shell.api_server import Connection, _write_loop

    m, node, _, conns = setup()
    send, receive = trio.open_memory_channel[bytes](4)
    conns[7] = real = Connection(7, None, send, 1 << 20, 8)
    node.registry.add(ME, 3, RegKind.NAME, "db", conn=7)
    for _ in range(3):
        assert await m.wait(m.begin(Conn(8), args("db"))) == {"delivered": 1}
    assert (m.names.mailbox_messages, m.names.mailbox_bytes) == (3, 6)
    client, server = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_write_loop, server, receive, nursery.cancel_scope, real)
        await client.receive_some()
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    m.pump()  # the runner's next turn hears what the writer took
    assert m.names.mailbox_messages == 0
    send2, _receive2 = trio.open_memory_channel[bytes](4)
    conns[9] = other = Connection(9, None, send2, 1 << 20, 8)
    node.registry.add(ME, 4, RegKind.NAME, "web", conn=9)
    assert await m.wait(m.begin(Conn(8), args("web"))) == {"delivered": 1}
    assert m.names.mailbox_messages == 1 and other.on_mail is not None
    # What the server does when the connection ends: the registry and the
    # mailboxes hear it as one input.
    other._closed = True
    other.on_mail(None)
    m.runner.connection_closed(other)
    m.pump()
    assert (m.names.mailbox_messages, m.names.mailbox_bytes) == (0, 0)
