"""Peer links (peerd.shell.links) on real loopback sockets, sharing the TCP
listener with push-pull streams; idling on memory streams under the mock
clock (no sockets, so no waiting on the wall clock)."""

from __future__ import annotations

import collections
import struct
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from peerd.shell import links as links_module
from peerd.shell.links import LinkLimits, LinkLost, LinkManager, LinkMessages, _split
from peerd.shell.tcp import TcpEndpoint, TcpLimits, encode_frame, open_tcp_listener, read_frame
from peerd.wire import codec
from peerd.wire.messages import Ack, Addr, Channel, Disconnect, Gossip, NeighborReply
from peerd.wire.seal import Opener
from tests.shell.conftest import Net, closed_tcp_port
from tests.shell.test_links_supersede import MemConn

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
A, B = b"\x0a" * 16, b"\x0b" * 16


class Side:
    def __init__(self, node: bytes, keys: list[bytes] | None, limits: LinkLimits) -> None:
        self.node = node
        self.net = Net(node, keys, queue=4096)
        listener = trio.SocketListener(
            trio.socket.from_stdlib_socket(open_tcp_listener(("127.0.0.1", 0)))
        )
        self.tcp = TcpEndpoint(
            listener,
            sealer=self.net.sealer,
            opener=self.net.opener,
            inputs=self.net.send,
            counters=self.net.counters,
            log=self.net.log,
            limits=TcpLimits(),
        )
        self.links = LinkManager(
            node,
            sealer=self.net.sealer,
            keyring=self.net.keyring,
            inputs=self.net.send,
            counters=self.net.counters,
            log=self.net.log,
            limits=limits,
        )
        self.tcp.on_link = self.links.accept

    @property
    def addr(self) -> tuple[str, int]:
        a = self.tcp.local_addr
        assert a is not None
        return a

    async def next(self) -> Any:
        with trio.fail_after(5):
            return await self.net.receive.receive()


@asynccontextmanager
async def pair(
    keys_a: list[bytes] | None = None,
    keys_b: list[bytes] | None = None,
    limits: LinkLimits | None = None,
) -> AsyncIterator[tuple[Side, Side]]:
    lim = limits or LinkLimits()
    a = Side(A, [KEY] if keys_a is None else keys_a, lim)
    b = Side(B, [KEY] if keys_b is None else keys_b, lim)
    async with trio.open_nursery() as nursery:
        for s in (a, b):
            await nursery.start(s.tcp.run)
            await nursery.start(s.links.run)
        yield a, b
        nursery.cancel_scope.cancel()


async def until(cond: Callable[[], bool]) -> None:
    with trio.fail_after(5):
        while not cond():
            await trio.sleep(0.001)


def gossip(i: int, channel: Channel = Channel.USER) -> Gossip:
    return Gossip(i.to_bytes(16, "big"), A, 1, channel, b"x%d" % i)


async def test_messages_arrive_in_order_both_ways() -> None:
    async with pair() as (a, b):
        a.links.connect(B, b.addr)
        for i in range(500):
            assert a.links.send(B, gossip(i), 3)
        got: list[Any] = []
        while len(got) < 500:
            item = await b.next()
            assert isinstance(item, LinkMessages) and item.src == A
            got.extend(item.msgs)
        assert got == [gossip(i) for i in range(500)]
        assert b.net.counters["link_frames_in"] < 500  # batched into fewer frames
        # The acceptor answers over the same link: one link per pair.
        assert b.links.send(A, NeighborReply(True))
        item = await a.next()
        assert item == LinkMessages(B, (NeighborReply(True),))
        assert a.links.open_count == 1 and b.links.open_count == 1


async def test_close_flushes_then_peer_hears_link_lost_not_closer() -> None:
    async with pair() as (a, b):
        a.links.connect(B, b.addr)
        a.links.send(B, Disconnect(True))
        a.links.close(B)
        assert await b.next() == LinkMessages(A, (Disconnect(True),))
        assert await b.next() == LinkLost(A, True)
        await until(lambda: a.links.open_count == 0 and b.links.open_count == 0)
        with trio.move_on_after(0.2):
            item = await a.net.receive.receive()
            pytest.fail(f"the closer heard {item!r}")


async def test_connect_refused_is_link_lost() -> None:
    async with pair() as (a, _b):
        a.links.connect(B, ("127.0.0.1", closed_tcp_port()))
        assert await a.next() == LinkLost(B, True)
        assert not a.links.send(B, gossip(1))  # no link: dropped, counted
        assert a.net.counters["link_send_no_link"] == 1


async def test_wrong_key_is_refused_and_counted() -> None:
    async with pair(keys_b=[OTHER_KEY]) as (a, b):
        a.links.connect(B, b.addr)
        assert await a.next() == LinkLost(B, True)
        await until(lambda: b.net.counters["tcp_drop_seal_unknown_key"] == 1)
        assert b.links.open_count == 0


async def test_hello_for_another_node_is_refused() -> None:
    async with pair() as (a, b):
        a.links.connect(b"\x0c" * 16, b.addr)  # the address is B's, not C's
        assert await a.next() == LinkLost(b"\x0c" * 16, True)
        assert b.net.counters["link_drop_not_me"] == 1


async def test_crossing_connects_leave_one_link() -> None:
    async with pair() as (a, b):
        a.links.connect(B, b.addr)
        b.links.connect(A, a.addr)
        a.links.send(B, NeighborReply(True))
        b.links.send(A, NeighborReply(False))
        assert await b.next() == LinkMessages(A, (NeighborReply(True),))
        assert await a.next() == LinkMessages(B, (NeighborReply(False),))
        await until(lambda: a.links.is_up(B) and b.links.is_up(A))
        await until(lambda: a.links.open_count == 1 and b.links.open_count == 1)
        # Neither end lost a link the other still uses.
        with trio.move_on_after(0.2):
            item = await a.net.receive.receive()
            pytest.fail(f"unexpected {item!r}")


async def test_garbage_after_hello_fails_the_link_only() -> None:
    async with pair() as (a, b):
        a.links.connect(B, b.addr)
        a.links.send(B, NeighborReply(True))
        assert await b.next() == LinkMessages(A, (NeighborReply(True),))
        link = b.links.links[A]
        assert link.conn is not None
        await link.conn.send_all(b"")  # no-op; now write garbage the other way
        a_link = a.links.links[B]
        assert a_link.conn is not None
        await a_link.conn.send_all(encode_frame(b"\x01garbage" * 10))
        assert await b.next() == LinkLost(A, True)
        assert sum(v for k, v in b.net.counters.items() if k.startswith("link_lost_seal")) == 1
        assert await a.next() == LinkLost(B, True)  # b closed it


async def test_oversized_frame_prefix_fails_the_link() -> None:
    async with pair(limits=LinkLimits(max_frame=1024)) as (a, b):
        a.links.connect(B, b.addr)
        a.links.send(B, NeighborReply(True))
        await b.next()
        a_link = a.links.links[B]
        assert a_link.conn is not None
        await a_link.conn.send_all(struct.pack(">I", 10**9))
        assert await b.next() == LinkLost(A, True)
        assert b.net.counters["link_lost_frame_too_large"] == 1


async def test_push_pull_still_works_next_to_links() -> None:
    async with pair() as (a, b):
        a.links.connect(B, b.addr)
        a.tcp.open_stream(1, b.addr, b"\x81\x00")  # a CBOR array: a push-pull request
        req = await b.next()
        assert type(req).__name__ == "StreamRequest"


def test_lowest_priority_dropped_over_the_bound() -> None:
    counters: collections.Counter[str] = collections.Counter()
    net = Net(A, [KEY])
    m = LinkManager(
        A,
        sealer=net.sealer,
        keyring=net.keyring,
        inputs=net.send,
        counters=counters,
        log=net.log,
        limits=LinkLimits(max_queue_bytes=1000, droppable_priority=3),
    )
    from peerd.shell.links import _Link

    link = _Link(B, ("127.0.0.1", 1), True, 1, state="up")
    m.links[B] = link
    big = Gossip(b"\x00" * 16, A, 1, Channel.USER, b"y" * 400)
    sent = [m._enqueue(link, codec.encode(big), 3) for _ in range(5)]
    assert sent == [True, True, True, False, False]
    assert counters["link_drop_queue_full"] == 2
    # Control still goes (up to the hard bound), and is written first.
    assert m._enqueue(link, codec.encode(NeighborReply(True)), 0)
    assert sorted(link.queues) == [0, 3]


class MemSide:
    """One node's link manager, its peer links carried by memory streams."""

    def __init__(self, node: bytes, limits: LinkLimits) -> None:
        self.node = node
        self.net = Net(node, [KEY], queue=4096)
        self.links = LinkManager(
            node,
            sealer=self.net.sealer,
            keyring=self.net.keyring,
            inputs=self.net.send,
            counters=self.net.counters,
            log=self.net.log,
            limits=limits,
        )

    async def next(self) -> Any:
        with trio.fail_after(60):  # mock clock: virtual seconds
            return await self.net.receive.receive()


@asynccontextmanager
async def mem_pair(
    monkeypatch: pytest.MonkeyPatch, limits_a: LinkLimits, limits_b: LinkLimits
) -> AsyncIterator[tuple[MemSide, MemSide, Addr]]:
    """A and B with no sockets: A's connect to B's address gets a memory
    stream whose other end is served as B's TCP listener does (the hello
    frame opened, then handed to ``accept``). Nothing waits on the wall
    clock, so the tests run under the mock clock (autojump threshold 0)."""
    a, b = MemSide(A, limits_a), MemSide(B, limits_b)
    b_addr: Addr = ("127.0.0.1", 7946)
    async with trio.open_nursery() as nursery:

        async def listen(stream: trio.StapledStream[Any, Any]) -> None:
            try:
                frame = await read_frame(stream, 1 << 20)
                sender, payload = b.net.opener.open(frame)
                await b.links.accept(MemConn(stream), sender, payload)
            finally:
                await trio.aclose_forcefully(stream)  # as the listener does

        async def connect(addr: Addr) -> Any:
            if addr != b_addr:
                raise OSError("connection refused")
            ours, theirs = trio.testing.memory_stream_pair()
            nursery.start_soon(listen, theirs)
            return MemConn(ours)

        monkeypatch.setattr(links_module, "connect_tcp", connect)
        for s in (a, b):
            await nursery.start(s.links.run)
        yield a, b, b_addr
        nursery.cancel_scope.cancel()


async def test_idle_direct_link_closes(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    limits = LinkLimits(idle_s=30, reap_interval_s=10)
    # b's idle_s is long, so that a is the one to reap it.
    async with mem_pair(monkeypatch, limits, LinkLimits(idle_s=1000)) as (a, b, b_addr):
        a.links.connect(B, b_addr, mesh=False)
        assert a.links.send(B, Ack(1), mesh=False)  # not a mesh message: direct traffic
        assert await b.next() == LinkMessages(A, (Ack(1),))
        t0 = trio.current_time()
        assert await b.next() == LinkLost(A, False)  # a reaped it, b heard the close
        assert 30 <= trio.current_time() - t0 <= 40  # idle, then the next reaper round
        assert a.net.counters["link_idle_closed"] == 1
        assert b.net.counters["link_idle_closed"] == 0
        assert await a.next() == LinkLost(B, False)  # a's runner hears it too
        assert not a.links.has(B)
        await trio.testing.wait_all_tasks_blocked()  # the link's task ends
        assert a.links.open_count == 0 and b.links.open_count == 0


async def test_mesh_link_is_not_reaped(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    limits = LinkLimits(idle_s=30, reap_interval_s=10)
    async with mem_pair(monkeypatch, limits, limits) as (a, b, b_addr):
        a.links.connect(B, b_addr)
        assert a.links.send(B, NeighborReply(True), mesh=True)
        assert await b.next() == LinkMessages(A, (NeighborReply(True),))
        await trio.sleep(100)  # ten reaper rounds, over three times idle_s
        assert a.links.is_up(B) and b.links.is_up(A)
        assert a.net.counters["link_idle_closed"] == 0
        assert b.net.counters["link_idle_closed"] == 0
        assert a.net.receive.statistics().current_buffer_used == 0  # no LinkLost
        assert b.net.receive.statistics().current_buffer_used == 0


@given(st.binary(max_size=200))
@settings(max_examples=300, deadline=None)
def test_split_never_raises(data: bytes) -> None:
    out = _split(data, 0)
    assert out is None or isinstance(out, tuple)


@given(st.lists(st.integers(0, 2**64 - 1), min_size=1, max_size=20), st.integers(0, 30))
@settings(max_examples=100, deadline=None)
def test_split_roundtrip_and_truncation(ids: list[int], cut: int) -> None:
    recs = b"".join(
        struct.pack(">I", len(e)) + e
        for e in (codec.encode(NeighborReply(i % 2 == 0)) for i in ids)
    )
    assert _split(recs, 0) == tuple(NeighborReply(i % 2 == 0) for i in ids)
    if 0 < cut < len(recs):
        # A cut frame is refused, unless it ends on a record boundary.
        out = _split(recs[:-cut], 0)
        full = tuple(NeighborReply(i % 2 == 0) for i in ids)
        assert out is None or full[: len(out)] == out


async def test_bad_hellos_are_counted_drops() -> None:
    async with pair() as (_a, b):
        intruder = Net(b"\x0e" * 16, [KEY])
        for payload in (
            b"\xffjunk",  # not a hello
            b"\xffPDL1H" + b"\x0f" * 16 + B + b"n" * 8,
        ):  # src is not the sealer
            stream = await trio.open_tcp_stream(*b.addr)
            await stream.send_all(encode_frame(intruder.sealer.seal(payload)))
            with trio.fail_after(5):
                assert await stream.receive_some(100) == b""  # closed on us
            await stream.aclose()
        assert b.net.counters["link_drop_bad_hello"] == 2
        assert b.links.open_count == 0


async def test_peer_link_without_a_manager_is_refused() -> None:
    net = Net(B, [KEY])
    listener = trio.SocketListener(
        trio.socket.from_stdlib_socket(open_tcp_listener(("127.0.0.1", 0)))
    )
    tcp = TcpEndpoint(
        listener,
        sealer=net.sealer,
        opener=net.opener,
        inputs=net.send,
        counters=net.counters,
        log=net.log,
        limits=TcpLimits(),
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(tcp.run)
        a = Side(A, [KEY], LinkLimits())
        await nursery.start(a.links.run)
        assert tcp.local_addr is not None
        a.links.connect(B, tcp.local_addr)
        assert await a.next() == LinkLost(B, True)
        assert net.counters["tcp_drop_no_links"] == 1
        nursery.cancel_scope.cancel()


class _Capture:
    def __init__(self) -> None:
        self.data = b""

    async def send_all(self, data: bytes) -> None:
        self.data += data

    async def send_eof(self) -> None:
        pass


async def test_control_is_written_before_queued_user_traffic() -> None:
    from peerd.shell.links import _Link

    net = Net(A, [KEY])
    m = LinkManager(
        A,
        sealer=net.sealer,
        keyring=net.keyring,
        inputs=net.send,
        counters=net.counters,
        log=net.log,
        limits=LinkLimits(batch_bytes=200),
    )
    link = _Link(B, ("127.0.0.1", 1), True, 1, state="up", peer_nonce=b"n" * 8)
    users = [gossip(i) for i in range(20)]
    for g in users:
        m._enqueue(link, codec.encode(g), 3)
    m._enqueue(link, codec.encode(NeighborReply(True)), 0)  # queued last, urgent
    out = _Capture()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(m._writer, link, out, nursery.cancel_scope)
        await until(lambda: link.queued_bytes == 0)
        nursery.cancel_scope.cancel()
    opener = Opener(net.keyring, max_size=1 << 20)
    frames, data = [], out.data
    while data:
        (n,) = struct.unpack(">I", data[:4])
        _sender, payload = opener.open(data[4 : 4 + n])
        assert payload[:8] == b"n" * 8
        frames.append(_split(payload, 8))
        data = data[4 + n :]
    assert len(frames) > 1  # batches of about batch_bytes
    assert frames[0][0] == NeighborReply(True)
    assert [m for f in frames for m in f][1:] == users  # the rest in order


async def test_direct_close_leaves_a_mesh_link_alone() -> None:
    from peerd.shell.links import _Link

    net = Net(A, [KEY])
    m = LinkManager(
        A,
        sealer=net.sealer,
        keyring=net.keyring,
        inputs=net.send,
        counters=net.counters,
        log=net.log,
    )
    link = _Link(B, ("127.0.0.1", 1), True, 1, state="up", mesh=True)
    m.links[B] = link
    m.close(B, mesh=False)
    assert m.links[B] is link and link.state == "up"
    link.direct, link.last_used = True, float("inf")  # direct traffic just now
    m.close(B)  # the mesh's close keeps it for the direct traffic...
    assert m.links[B] is link and not link.mesh
    m.close(B, mesh=False)  # ...until that is done too
    assert B not in m.links and link.state == "closing"
