"""A peer link superseded by a new one from the same peer (the contract in
peerd.core.events): the old link is read to its end, its LinkLost comes
next, and only then anything from the new link.

The peer's side is written by hand over memory streams, so these run on the
mock clock with no sockets and no waiting on the wall clock.
"""

from __future__ import annotations

import collections
import secrets
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing

from peerd.api.protocol import ApiError
from peerd.shell import links as links_module
from peerd.shell.links import (
    ACK,
    HELLO,
    MAGIC,
    NONCE_BYTES,
    LinkLimits,
    LinkLost,
    LinkManager,
    LinkMessages,
    _split,
)
from peerd.shell.tcp import FrameError, encode_frame, read_frame
from peerd.wire import codec
from peerd.wire.messages import Channel, Gossip, Message, NameMsg, NameReply, NameStatus, RegKind
from peerd.wire.seal import Opener
from tests.shell.conftest import Net
from tests.shell.test_messaging import Conn, Links, Messenger, Node, args

KEY = bytes(range(32))
A, B, C = b"\x0a" * 16, b"\x0b" * 16, b"\x0c" * 16


class MemConn(trio.abc.HalfCloseableStream):
    """A memory stream that takes the socket options the link manager sets.
    ``stall``: B's writes on it never finish (A stopped reading)."""

    def __init__(self, stream: trio.StapledStream[Any, Any]) -> None:
        self.stream = stream
        self.stall = False

    def setsockopt(self, *_args: object) -> None:
        pass

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self.stall:
            await trio.sleep_forever()
        await self.stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.stream.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self.stream.send_eof()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.stream.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.stream.aclose()


class PeerEnd:
    """Peer A's end of one link to B, driven by hand."""

    def __init__(self, net: Net, stream: trio.StapledStream[Any, Any], conn: MemConn) -> None:
        self.net = net
        self.stream = stream
        self.conn = conn  # B's end
        self.opener = Opener(net.keyring, max_senders=1, max_size=1 << 20)
        self.b_nonce = b""

    async def send(self, *msgs: Message) -> None:
        """One data frame holding ``msgs``."""
        recs = b"".join(struct.pack(">I", len(d)) + d for d in map(codec.encode, msgs))
        await self.stream.send_all(encode_frame(self.net.sealer.seal(self.b_nonce + recs)))

    async def receive(self) -> tuple[Message, ...] | None:
        """The next data frame B wrote, None at B's EOF."""
        try:
            with trio.fail_after(60):
                frame = await read_frame(self.stream, 1 << 20)
        except FrameError:
            return None
        _sender, payload = self.opener.open(frame)
        return _split(payload, NONCE_BYTES)


class Side:
    def __init__(self, nursery: trio.Nursery, links: LinkManager, net: Net) -> None:
        self.nursery = nursery
        self.links = links
        self.net = net
        self.peer = Net(A, [KEY])

    async def open(self) -> PeerEnd:
        """A new link from A, as B's TCP listener hands it over; returns once
        B acknowledged it (so B has taken it, and superseded any older one)."""
        ours, theirs = trio.testing.memory_stream_pair()
        nonce = secrets.token_bytes(NONCE_BYTES)
        conn = MemConn(theirs)
        self.nursery.start_soon(self.links.accept, conn, A, MAGIC + HELLO + A + B + nonce)
        end = PeerEnd(self.peer, ours, conn)
        with trio.fail_after(60):
            _sender, payload = end.opener.open(await read_frame(ours, 1 << 20))
        n = len(MAGIC) + 1
        assert payload[:n] == MAGIC + ACK and payload[n + 16 : n + 24] == nonce
        end.b_nonce = payload[n + 24 :]
        return end

    async def next(self) -> Any:
        with trio.fail_after(60):
            return await self.net.receive.receive()

    async def open_with(self, n: int) -> PeerEnd:
        """A new link from A that carries gossip(0) .. gossip(n - 1), a frame each."""
        end = await self.open()
        for i in range(n):
            await end.send(gossip(i))
        return end

    async def refused(self) -> None:
        """A new link from A that B refuses (accept returns without an answer)."""
        ours, theirs = trio.testing.memory_stream_pair()
        with trio.fail_after(60):
            await self.links.accept(MemConn(theirs), A, MAGIC + HELLO + A + B + b"n" * NONCE_BYTES)
        await trio.testing.wait_all_tasks_blocked()

    async def until(self, last: Any) -> list[Any]:
        """What B's runner gets, up to ``last`` (at most 20 items)."""
        got: list[Any] = []
        while last not in got and len(got) < 20:
            got.append(await self.next())
        return got


@asynccontextmanager
async def side_b(queue: int = 1, limits: LinkLimits | None = None) -> AsyncIterator[Side]:
    # A one-item input queue: B's reader of a link stalls on the runner, so
    # frames are still unread when the new link comes.
    net = Net(B, [KEY], queue=queue)
    links = LinkManager(
        B,
        sealer=net.sealer,
        keyring=net.keyring,
        inputs=net.send,
        counters=net.counters,
        log=net.log,
        limits=limits,
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(links.run)
        yield Side(nursery, links, net)
        nursery.cancel_scope.cancel()


def gossip(i: int) -> Gossip:
    return Gossip(i.to_bytes(16, "big"), A, 1, Channel.USER, b"x%d" % i)


def frames(n: int) -> list[LinkMessages]:
    """What B's runner gets from :meth:`Side.open_with`."""
    return [LinkMessages(A, (gossip(i),)) for i in range(n)]


async def test_superseded_link_is_read_to_its_end_then_lost_then_the_new_one(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with side_b() as b:
        old = await b.open_with(5)
        await old.stream.send_eof()  # A closed it (after flushing) ...
        new = await b.open()  # ... and opened another at once
        await new.send(gossip(99))
        got = await b.until(LinkMessages(A, (gossip(99),)))
        assert got[:5] == frames(5)
        assert len(got) == 7 and isinstance(got[5], LinkLost)
        assert (got[5].node, got[5].mesh) == (A, True)
        assert got[5].link is not None and got[5].link != b.links.link_id(A)
        assert b.links.is_up(A) and b.net.counters["link_superseded"] == 1
        assert b.net.counters["link_lost_superseded"] == 1


async def test_a_half_open_superseded_link_ends_after_the_drain_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with side_b(limits=LinkLimits(drain_timeout_s=5)) as b:
        old = await b.open()
        await old.send(gossip(1))
        await old.send(gossip(2))
        new = await b.open()  # the old connection stays open: A vanished from it
        await new.send(gossip(3))
        t0 = trio.current_time()
        got = await b.until(LinkMessages(A, (gossip(3),)))
        assert got[:2] == [LinkMessages(A, (gossip(1),)), LinkMessages(A, (gossip(2),))]
        assert len(got) == 4 and isinstance(got[2], LinkLost) and got[2].node == A
        assert 5 <= trio.current_time() - t0 <= 6
        assert b.net.counters["link_drain_timeout"] == 1


async def test_sends_move_to_the_new_link_and_the_old_one_is_half_closed(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with side_b(queue=16) as b:
        old = await b.open()
        await old.send(gossip(1))
        assert await b.next() == LinkMessages(A, (gossip(1),))
        new = await b.open()
        assert b.links.send(A, NameReply(7, NameStatus.DELIVERED), mesh=False)
        assert await new.receive() == (NameReply(7, NameStatus.DELIVERED),)
        assert await old.receive() is None  # B wrote nothing more there, then EOF
        await old.stream.send_eof()
        lost = await b.next()
        assert isinstance(lost, LinkLost) and lost.mesh


async def test_a_link_closed_meanwhile_does_not_let_a_third_one_overtake(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with side_b() as b:
        old = await b.open()
        await old.send(gossip(1))
        await old.send(gossip(2))
        await b.open()
        b.links.close(A)  # B drops the second link before the first one is drained
        third = await b.open()
        await third.send(gossip(3))
        await old.stream.send_eof()
        got = await b.until(LinkMessages(A, (gossip(3),)))
        assert got[:2] == [LinkMessages(A, (gossip(1),)), LinkMessages(A, (gossip(2),))]
        assert len(got) == 4 and isinstance(got[2], LinkLost)


async def test_losing_a_superseded_link_fails_only_the_sends_made_on_it() -> None:
    node, links = Node(), Links()
    m = Messenger(node, links, {}, collections.Counter(), send_timeout_s=10)
    node.registry.add(A, 5, RegKind.NAME, "db")
    before = m.begin(Conn(1), args("db"))  # went on link 1
    links.link = 2  # the peer opened a new link; sends go there now
    after = m.begin(Conn(1), args("db"))
    m.link_lost(A, 1)
    assert before.finished and not after.finished
    second = [s[1] for s in links.sent if isinstance(s[1], NameMsg)][1]
    m.on_reply(A, NameReply(second.seq, NameStatus.DELIVERED))
    assert await m.wait(after) == {"delivered": 1}
    m.link_lost(A)  # no link given: every link to A
    assert m.pending == 0


def node_of(item: Any) -> bytes:
    return item.src if isinstance(item, LinkMessages) else item.node


async def test_at_max_links_a_peer_can_still_replace_its_link(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # The old link was torn down first and then the new one refused as
    # busy: the node lost its link to the peer.
    async with side_b(queue=16, limits=LinkLimits(max_links=1)) as b:
        old = await b.open()
        await old.send(gossip(1))
        assert await b.next() == LinkMessages(A, (gossip(1),))
        new = await b.open()  # answered: the old link's slot is counted as freed
        assert b.net.counters["link_superseded"] == 1 and b.net.counters["link_drop_busy"] == 0
        replacing = b.links.link_id(A)
        await b.refused()  # a third one while the old one drains: busy, nothing torn down
        assert b.net.counters["link_drop_busy"] == 1 and b.net.counters["link_superseded"] == 1
        assert b.links.is_up(A) and b.links.link_id(A) == replacing
        await new.send(gossip(2))
        await old.stream.send_eof()
        got = await b.until(LinkMessages(A, (gossip(2),)))
        assert len(got) == 2 and isinstance(got[0], LinkLost) and got[0].link != replacing
        assert b.links.is_up(A) and b.links.open_count == 1


async def test_a_peer_still_writing_on_the_old_link_holds_the_new_one_drain_timeout_s_at_most(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # drain_timeout_s was reset by every frame: a peer flushing a long queue
    # on the old link held the new link's delivery for as long as it wrote.
    async with side_b(queue=64, limits=LinkLimits(drain_timeout_s=5)) as b:
        old = await b.open()
        new = await b.open()
        t0 = trio.current_time()

        async def trickle() -> None:  # a frame a second for 30 s
            for i in range(30):
                await old.send(gossip(i))
                await trio.sleep(1)

        b.nursery.start_soon(trickle)
        await new.send(gossip(99))
        got = await b.until(LinkMessages(A, (gossip(99),)))
        assert trio.current_time() - t0 <= 5.5
        assert got[:-2] == [LinkMessages(A, (gossip(i),)) for i in range(len(got) - 2)]
        assert 5 <= len(got) - 2 <= 6 and isinstance(got[-2], LinkLost)
        assert b.net.counters["link_drain_timeout"] == 1


async def test_an_idle_closed_links_loss_comes_after_the_link_it_superseded(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # The reaper's LinkLost went straight into the inputs, before the old
    # link's last frames and its own LinkLost.
    limits = LinkLimits(idle_s=2, reap_interval_s=1, drain_timeout_s=5)
    async with side_b(queue=1, limits=limits) as b:
        _old = await b.open_with(4)
        await b.open()  # A left the old connection half-open; the new one stays idle
        await trio.sleep(4)  # the runner is busy meanwhile; the new link is reaped
        assert b.net.counters["link_idle_closed"] == 1
        got = [await b.next() for _ in range(6)]
        assert got[:4] == frames(4)
        assert isinstance(got[4], LinkLost) and got[4].mesh  # the old link's end...
        assert isinstance(got[5], LinkLost) and not got[5].mesh  # ...then the reaped one's
        assert got[4].link != got[5].link


async def test_an_evicted_links_loss_comes_after_the_link_it_superseded(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def refused(addr: Any) -> Any:
        raise OSError("connection refused")

    monkeypatch.setattr(links_module, "connect_tcp", refused)
    async with side_b(queue=1, limits=LinkLimits(max_direct_links=1)) as b:
        _old = await b.open_with(4)
        await b.open()  # a direct link (no mesh traffic yet)
        b.links.connect(C, ("127.0.0.1", 9), mesh=False)  # evicts it
        assert b.net.counters["link_direct_evicted"] == 1
        got = [await b.next() for _ in range(7)]
        from_a = [x for x in got if node_of(x) == A]
        assert from_a[:4] == frames(4)
        assert [type(x) for x in from_a[4:]] == [LinkLost, LinkLost]
        assert from_a[4].mesh and not from_a[5].mesh and from_a[4].link != from_a[5].link
        assert [x for x in got if node_of(x) == C] == [LinkLost(C, False)]


async def test_a_link_replacing_a_closed_one_waits_for_what_that_one_waited_for(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # The second link is closed by B (no LinkLost) while the first drains;
    # the third must still wait for the first's frames and LinkLost.
    async with side_b() as b:
        first = await b.open_with(3)
        await b.open()
        b.links.close(A, mesh=False)  # direct traffic done with it, and the mesh never used it
        third = await b.open()
        await third.send(gossip(9))
        await first.stream.send_eof()
        got = await b.until(LinkMessages(A, (gossip(9),)))
        assert got[:3] == frames(3)
        assert len(got) == 5 and isinstance(got[3], LinkLost)


async def test_a_crossing_link_waits_for_what_our_dropped_connect_waited_for(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def never(addr: Any) -> Any:
        await trio.sleep_forever()

    monkeypatch.setattr(links_module, "connect_tcp", never)
    async with side_b() as b:
        first = await b.open_with(3)
        await b.open()
        b.links.close(A, mesh=False)
        b.links.connect(A, ("127.0.0.1", 9))  # ours, still connecting when A's crosses it
        crossing = await b.open()  # A's id is lower: A's wins, ours is dropped quietly
        assert b.net.counters["link_drop_crossing"] == 0
        await crossing.send(gossip(9))
        await first.stream.send_eof()
        got = await b.until(LinkMessages(A, (gossip(9),)))
        assert got[:3] == frames(3)
        assert len(got) == 5 and isinstance(got[3], LinkLost)


async def test_a_mesh_mark_put_on_the_new_link_while_the_old_one_drained_is_cleared(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # The mesh sent on the new link during the drain (marking it its own),
    # then heard LinkDown with the old one's LinkLost, forgot the peer and
    # never closed the new link: the idle reaper skipped it for ever.
    async with side_b(queue=16, limits=LinkLimits(idle_s=10, reap_interval_s=1)) as b:
        old = await b.open()
        await old.send(gossip(1))  # a mesh link
        assert await b.next() == LinkMessages(A, (gossip(1),))
        new = await b.open()
        assert b.links.send(A, gossip(2), 3, mesh=True)  # goes on the new link
        assert await new.receive() == (gossip(2),)
        await old.stream.send_eof()
        lost = await b.next()
        assert isinstance(lost, LinkLost) and lost.mesh
        b.links.mesh_lost(A, lost.link)  # as the runner does, before LinkDown
        assert await b.next() == LinkLost(A, False)  # idle: closed by the reaper
        assert b.net.counters["link_idle_closed"] == 1


async def test_a_new_link_the_peer_made_a_mesh_link_keeps_its_mark(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with side_b(queue=16, limits=LinkLimits(idle_s=10, reap_interval_s=1)) as b:
        old = await b.open()
        await old.send(gossip(1))
        assert await b.next() == LinkMessages(A, (gossip(1),))
        new = await b.open()
        await new.send(gossip(2))  # mesh traffic in on the new link
        await old.stream.send_eof()
        lost = await b.next()
        assert isinstance(lost, LinkLost) and lost.mesh
        b.links.mesh_lost(A, lost.link)
        assert await b.next() == LinkMessages(A, (gossip(2),))
        await trio.sleep(60)
        assert b.links.is_up(A) and b.net.counters["link_idle_closed"] == 0


async def test_frames_dropped_with_a_superseded_link_are_counted_and_their_sends_fail(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with side_b(queue=16) as b:
        node = Node()
        m = Messenger(node, b.links, {}, b.net.counters, send_timeout_s=60)
        node.registry.add(A, 5, RegKind.NAME, "db")
        old = await b.open()
        old.conn.stall = True  # A stopped reading the old link
        written = m.begin(Conn(1), args("db"))  # taken by the writer, which stalls
        await trio.testing.wait_all_tasks_blocked()
        queued = [m.begin(Conn(1), args("db")) for _ in range(3)]  # wait in the queue
        new = await b.open()
        assert b.net.counters["link_drop_superseded"] == 3  # one per dropped message
        later = m.begin(Conn(1), args("db"))  # on the new link
        msgs = await new.receive()
        assert msgs is not None and isinstance(msgs[0], NameMsg)
        await old.stream.send_eof()
        lost = await b.next()
        assert isinstance(lost, LinkLost) and lost.link != b.links.link_id(A)
        m.link_lost(A, lost.link)  # what the runner does with it
        for p in [written, *queued]:
            assert p.finished
            with pytest.raises(ApiError) as info:
                p.result()
            assert info.value.code == "unavailable" and "link" in info.value.message
        assert not later.finished and m.pending == 1
