"""TCP streams and watch links on real loopback sockets; timeouts under a mock clock."""

from __future__ import annotations

import struct
from collections.abc import Callable

import pytest
import trio
import trio.testing

from peerd.core.events import LinkClosed, StreamFailed, StreamRequest, StreamResponse
from peerd.shell.tcp import TcpEndpoint, TcpLimits, encode_frame, open_tcp_listener
from tests.shell.conftest import Net, closed_tcp_port, needs_ipv6

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))


def server(net: Net, limits: TcpLimits, host: str = "127.0.0.1") -> TcpEndpoint:
    listener = trio.SocketListener(trio.socket.from_stdlib_socket(open_tcp_listener((host, 0))))
    return TcpEndpoint(
        listener,
        sealer=net.sealer,
        opener=net.opener,
        inputs=net.send,
        counters=net.counters,
        log=net.log,
        limits=limits,
    )


def client(net: Net, limits: TcpLimits) -> TcpEndpoint:
    return TcpEndpoint(
        None,
        sealer=net.sealer,
        opener=net.opener,
        inputs=net.send,
        counters=net.counters,
        log=net.log,
        limits=limits,
    )


async def until(cond: Callable[[], bool]) -> None:
    """Bounded poll for socket-driven state that has no event to wait on."""
    with trio.fail_after(5):
        while not cond():
            await trio.sleep(0.001)


async def connect(ep: TcpEndpoint) -> trio.SocketStream:
    addr = ep.local_addr
    assert addr is not None
    return await trio.open_tcp_stream(*addr)


async def read_eof(stream: trio.SocketStream) -> bytes:
    """Everything until the server closes (bounded)."""
    data = b""
    with trio.fail_after(60):
        while chunk := await stream.receive_some(65536):
            data += chunk
    return data


@pytest.mark.parametrize("host", ["127.0.0.1", pytest.param("::1", marks=needs_ipv6)])
async def test_request_response(host: str) -> None:
    ns, nc = Net(b"S" * 16, [KEY]), Net(b"C" * 16, [KEY])
    s, c = server(ns, TcpLimits(), host), client(nc, TcpLimits())
    async with trio.open_nursery() as nursery:
        await nursery.start(s.run)
        await nursery.start(c.run)
        assert s.local_addr is not None
        c.open_stream(7, s.local_addr, b"push-pull request")
        with trio.fail_after(5):
            req = await ns.receive.receive()
        assert isinstance(req, StreamRequest)
        assert req.data == b"push-pull request"
        assert req.src[0] == host
        s.reply(req.stream, b"push-pull reply")
        with trio.fail_after(5):
            assert await nc.receive.receive() == StreamResponse(7, b"push-pull reply")
        await until(lambda: ns.counters["tcp_in"] == 1)
        assert nc.counters["tcp_out"] == 1
        nursery.cancel_scope.cancel()


async def test_no_reply_data_closes_and_fails_the_stream() -> None:
    ns, nc = Net(b"S" * 16), Net(b"C" * 16)
    s, c = server(ns, TcpLimits()), client(nc, TcpLimits())
    async with trio.open_nursery() as nursery:
        await nursery.start(s.run)
        await nursery.start(c.run)
        assert s.local_addr is not None
        c.open_stream(1, s.local_addr, b"req")
        with trio.fail_after(5):
            req = await ns.receive.receive()
            assert isinstance(req, StreamRequest)
            s.reply(req.stream, None)
            assert await nc.receive.receive() == StreamFailed(1, "eof")
        nursery.cancel_scope.cancel()


async def test_connect_refused() -> None:
    nc = Net(b"C" * 16)
    c = client(nc, TcpLimits())
    async with trio.open_nursery() as nursery:
        await nursery.start(c.run)
        c.open_stream(3, ("127.0.0.1", closed_tcp_port()), b"req")
        with trio.fail_after(5):
            assert await nc.receive.receive() == StreamFailed(3, "refused")
        assert nc.counters["tcp_fail_refused"] == 1
        nursery.cancel_scope.cancel()


async def test_reply_sealed_with_unknown_key_fails_the_stream() -> None:
    ns, nc = Net(b"S" * 16, [KEY]), Net(b"C" * 16, [KEY])
    s, c = server(ns, TcpLimits()), client(nc, TcpLimits())
    async with trio.open_nursery() as nursery:
        await nursery.start(s.run)
        await nursery.start(c.run)
        assert s.local_addr is not None
        c.open_stream(1, s.local_addr, b"req")
        with trio.fail_after(5):
            req = await ns.receive.receive()
            assert isinstance(req, StreamRequest)
            ns.keyring.install(OTHER_KEY)
            ns.keyring.use(OTHER_KEY)
            s.reply(req.stream, b"reply")
            assert await nc.receive.receive() == StreamFailed(1, "seal_unknown_key")
        nursery.cancel_scope.cancel()


async def test_oversized_frame_rejected_on_its_length_prefix() -> None:
    ns = Net(b"S" * 16)
    s = server(ns, TcpLimits(max_frame=1000))
    async with trio.open_nursery() as nursery:
        await nursery.start(s.run)
        stream = await connect(s)
        # Only the header: the server must not wait for (or buffer) the body.
        await stream.send_all(struct.pack(">I", 1001))
        assert await read_eof(stream) == b""
        # A first frame: the pre-authentication limit (min(4096, max_frame)).
        await until(lambda: ns.counters["tcp_drop_preauth_oversize"] == 1)
        assert s.active_in == 0
        nursery.cancel_scope.cancel()


async def test_bad_seal_and_empty_frame_are_dropped() -> None:
    ns, stranger = Net(b"S" * 16, [KEY]), Net(b"X" * 16, [OTHER_KEY])
    s = server(ns, TcpLimits())
    async with trio.open_nursery() as nursery:
        await nursery.start(s.run)
        stream = await connect(s)
        await stream.send_all(encode_frame(stranger.sealer.seal(b"hello")))
        assert await read_eof(stream) == b""
        stream = await connect(s)
        await stream.send_all(struct.pack(">I", 0))
        assert await read_eof(stream) == b""
        await until(lambda: ns.counters["tcp_drop_empty_frame"] == 1)
        assert ns.counters["tcp_drop_seal_unknown_key"] == 1
        assert ns.receive.statistics().current_buffer_used == 0
        nursery.cancel_scope.cancel()


async def test_concurrent_connection_cap() -> None:
    ns = Net(b"S" * 16)
    s = server(ns, TcpLimits(max_connections=2, hello_timeout_s=60))
    async with trio.open_nursery() as nursery:
        await nursery.start(s.run)
        idle = [await connect(s), await connect(s)]
        await until(lambda: s.active_in == 2)
        extra = await connect(s)
        with trio.fail_after(5):  # closed at once, long before the read timeout
            assert await extra.receive_some(10) == b""
        assert ns.counters["tcp_drop_busy"] == 1
        for stream in idle:
            await stream.aclose()
        await until(lambda: s.active_in == 0)
        nursery.cancel_scope.cancel()


async def test_idle_connection_times_out(autojump_clock: trio.testing.MockClock) -> None:
    ns = Net(b"S" * 16)
    s = server(ns, TcpLimits(hello_timeout_s=10))
    async with trio.open_nursery() as nursery:
        await nursery.start(s.run)
        silent = await connect(s)
        slow = await connect(s)
        await slow.send_all(b"\x00\x00")  # half a length prefix, then nothing
        start = trio.current_time()
        assert await read_eof(silent) == b""
        assert await read_eof(slow) == b""
        assert trio.current_time() - start == pytest.approx(10, abs=0.5)
        assert ns.counters["tcp_drop_preauth_timeout"] == 2
        nursery.cancel_scope.cancel()


async def test_core_that_never_replies(autojump_clock: trio.testing.MockClock) -> None:
    ns = Net(b"S" * 16)
    s = server(ns, TcpLimits(reply_timeout_s=5))
    async with trio.open_nursery() as nursery:
        await nursery.start(s.run)
        stream = await connect(s)
        await stream.send_all(encode_frame(ns.sealer.seal(b"request")))
        assert await read_eof(stream) == b""
        assert ns.counters["tcp_drop_no_reply"] == 1
        req = ns.receive.receive_nowait()
        assert isinstance(req, StreamRequest)
        s.reply(req.stream, b"too late")  # ignored, counted
        assert ns.counters["tcp_drop_late_reply"] == 1
        nursery.cancel_scope.cancel()


async def test_watch_link_reports_the_peer_going_away() -> None:
    ns, nc = Net(b"S" * 16, [KEY]), Net(b"C" * 16, [KEY])
    c = client(nc, TcpLimits())
    s = server(ns, TcpLimits())
    addr = s.local_addr
    assert addr is not None
    async with trio.open_nursery() as nursery:
        await nursery.start(c.run)
        async with trio.open_nursery() as server_nursery:
            await server_nursery.start(s.run)
            c.set_watch_links((addr,))
            await until(lambda: nc.counters["tcp_link_up"] == 1)
            assert ns.counters["tcp_links_accepted"] == 1
            assert s.links_in == 1 and s.active_in == 0  # not in the pre-auth pool
            server_nursery.cancel_scope.cancel()  # the peer process dies
        with trio.fail_after(5):
            assert await nc.receive.receive() == LinkClosed(addr)
        assert c.watch_links == (addr,)
        c.set_watch_links(())
        assert c.watch_links == ()
        nursery.cancel_scope.cancel()


async def test_watch_link_refused_is_reported_once(autojump_clock: trio.testing.MockClock) -> None:
    nc = Net(b"C" * 16)
    c = client(nc, TcpLimits(link_retry_s=1, link_retry_max_s=4))
    addr = ("127.0.0.1", closed_tcp_port())
    async with trio.open_nursery() as nursery:
        await nursery.start(c.run)
        c.set_watch_links((addr,))
        assert await nc.receive.receive() == LinkClosed(addr)
        await trio.sleep(30)  # several retries, all refused
        assert nc.counters["tcp_link_refused"] == 1
        assert nc.receive.statistics().current_buffer_used == 0
        nursery.cancel_scope.cancel()


async def test_watch_link_turned_away_is_not_a_death() -> None:
    ns, nc = Net(b"S" * 16), Net(b"C" * 16)
    s = server(ns, TcpLimits(max_watch_links=0))
    c = client(nc, TcpLimits(link_retry_s=60))
    async with trio.open_nursery() as nursery:
        await nursery.start(s.run)
        await nursery.start(c.run)
        assert s.local_addr is not None
        c.set_watch_links((s.local_addr,))
        await until(lambda: nc.counters["tcp_link_failed"] == 1)
        assert ns.counters["tcp_drop_links_busy"] == 1
        assert nc.receive.statistics().current_buffer_used == 0
        nursery.cancel_scope.cancel()
