"""A peer link superseded by a new one from the same peer (the contract in
peerd.core.mesh.events): the old link is read to its end, its LinkLost comes
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

import trio
import trio.testing

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
from peerd.shell.messaging import Messenger
from peerd.shell.tcp import FrameError, encode_frame, read_frame
from peerd.wire import codec
from peerd.wire.messages import Channel, Gossip, Message, NameMsg, NameReply, NameStatus, RegKind
from peerd.wire.seal import Opener
from tests.shell.conftest import Net
from tests.shell.test_messaging import Conn, Links, Node, args

KEY = bytes(range(32))
A, B = b"\x0a" * 16, b"\x0b" * 16


class MemConn(trio.abc.HalfCloseableStream):
    """A memory stream that takes the socket options the link manager sets."""

    def __init__(self, stream: trio.StapledStream[Any, Any]) -> None:
        self.stream = stream

    def setsockopt(self, *_args: object) -> None:
        pass

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
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

    def __init__(self, net: Net, stream: trio.StapledStream[Any, Any]) -> None:
        self.net = net
        self.stream = stream
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
        self.nursery.start_soon(self.links.accept, MemConn(theirs), A,
                                MAGIC + HELLO + A + B + nonce)
        end = PeerEnd(self.peer, ours)
        with trio.fail_after(60):
            _sender, payload = end.opener.open(await read_frame(ours, 1 << 20))
        n = len(MAGIC) + 1
        assert payload[:n] == MAGIC + ACK and payload[n + 16:n + 24] == nonce
        end.b_nonce = payload[n + 24:]
        return end

    async def next(self) -> Any:
        with trio.fail_after(60):
            return await self.net.receive.receive()

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
    links = LinkManager(B, sealer=net.sealer, keyring=net.keyring, inputs=net.send,
                        counters=net.counters, log=net.log, limits=limits)
    async with trio.open_nursery() as nursery:
        await nursery.start(links.run)
        yield Side(nursery, links, net)
        nursery.cancel_scope.cancel()


def gossip(i: int) -> Gossip:
    return Gossip(i.to_bytes(16, "big"), A, 1, Channel.USER, b"x%d" % i)


async def test_superseded_link_is_read_to_its_end_then_lost_then_the_new_one(
        autojump_clock: trio.testing.MockClock) -> None:
    async with side_b() as b:
        old = await b.open()
        for i in range(5):
            await old.send(gossip(i))
        await old.stream.send_eof()  # A closed it (after flushing) ...
        new = await b.open()  # ... and opened another at once
        await new.send(gossip(99))
        got = await b.until(LinkMessages(A, (gossip(99),)))
        assert got[:5] == [LinkMessages(A, (gossip(i),)) for i in range(5)]
        assert len(got) == 7 and isinstance(got[5], LinkLost)
        assert (got[5].node, got[5].mesh) == (A, True)
        assert got[5].link is not None and got[5].link != b.links.link_id(A)
        assert b.links.is_up(A) and b.net.counters["link_superseded"] == 1
        assert b.net.counters["link_lost_superseded"] == 1


async def test_a_half_open_superseded_link_ends_after_the_drain_timeout(
        autojump_clock: trio.testing.MockClock) -> None:
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
        autojump_clock: trio.testing.MockClock) -> None:
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
        autojump_clock: trio.testing.MockClock) -> None:
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
