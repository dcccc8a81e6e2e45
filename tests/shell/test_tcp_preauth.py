"""What an unauthenticated connection may cost the TCP listener
(peerd.shell.preauth): real loopback sockets, mock clock where time matters."""

from __future__ import annotations

import contextlib
import struct
from pathlib import Path

import pytest
import trio
import trio.testing

from peerd.core.events import StreamFailed, StreamRequest, StreamResponse
from peerd.shell.preauth import STREAM_HELLO, PreauthGate
from peerd.shell.settings import SettingsError, check_config
from peerd.shell.tcp import TcpEndpoint, TcpLimits, encode_frame
from tests.shell.conftest import Net
from tests.shell.test_tcp import client, connect, server, until

KEY = bytes(range(32))
MIB = 1024 * 1024


async def connect_from(ep: TcpEndpoint, source: str) -> trio.SocketStream:
    """A connection to ``ep`` whose source address is ``source`` (any
    127.0.0.0/8 address is local on Linux)."""
    addr = ep.local_addr
    assert addr is not None
    sock = trio.socket.socket()
    await sock.bind((source, 0))
    await sock.connect(addr)
    return trio.SocketStream(sock)


async def read_eof(stream: trio.SocketStream) -> bytes:
    """Everything until the server closes or resets the connection (it
    resets it when it leaves unread bytes behind), bounded."""
    data = b""
    with trio.fail_after(60):
        try:
            while chunk := await stream.receive_some(65536):
                data += chunk
        except trio.BrokenResourceError:
            pass
    return data


async def receive_exactly(stream: trio.SocketStream, n: int) -> bytes:
    data = b""
    with trio.fail_after(5):
        while len(data) < n:
            chunk = await stream.receive_some(n - len(data))
            assert chunk
            data += chunk
    return data


async def test_announcing_a_large_first_frame_is_refused_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # aaa7b78 read (and buffered) up to 8 MiB of it, for up to 10 s.
    ns = Net(b"S" * 16, [KEY], max_size=16 * MIB)
    s = server(ns, TcpLimits())
    async with trio.open_nursery() as nursery:
        await nursery.start(s.run)
        start = trio.current_time()
        # From 8 addresses: one holds at most 8 slots before authentication.
        streams = [await connect_from(s, f"127.0.0.{2 + i % 8}") for i in range(64)]
        for stream in streams:
            await stream.send_all(struct.pack(">I", 8 * MIB) + bytes(1000))
        for stream in streams:
            assert await read_eof(stream) == b""
        assert trio.current_time() - start < 0.5  # not the deadline: at once
        await until(lambda: s.active_in == 0)
        assert ns.counters["tcp_drop_preauth_oversize"] == 64
        assert s.preauth.reserved == 0 and s.preauth.connections == 0
        nursery.cancel_scope.cancel()


async def test_first_frames_share_one_budget(autojump_clock: trio.testing.MockClock) -> None:
    ns = Net(b"S" * 16, [KEY])
    lim = TcpLimits(preauth_max_frame=4096, preauth_budget_bytes=3 * 4096, hello_timeout_s=30)
    s = server(ns, lim)
    async with trio.open_nursery() as nursery:
        await nursery.start(s.run)
        # Three announce a whole frame and send a little of it: the budget is spent.
        held = [await connect(s) for _ in range(3)]
        for stream in held:
            await stream.send_all(struct.pack(">I", 4096) + bytes(100))
        await until(lambda: s.preauth.reserved == 3 * 4096)
        late = await connect(s)
        await late.send_all(struct.pack(">I", 200))
        start = trio.current_time()
        assert await read_eof(late) == b""
        assert trio.current_time() - start < 0.5
        assert ns.counters["tcp_drop_preauth_budget"] == 1
        assert s.preauth.reserved == 3 * 4096  # never more than the budget
        for stream in held:
            await stream.aclose()
        await until(lambda: s.preauth.reserved == 0)
        # Spent budget comes back: a real request goes through again.
        c = client(Net(b"C" * 16, [KEY]), lim)
        await nursery.start(c.run)
        assert s.local_addr is not None
        assert await c.request(s.local_addr, b"\x80") == "eof"  # no reply from the core
        assert isinstance(ns.receive.receive_nowait(), StreamRequest)
        nursery.cancel_scope.cancel()


async def test_first_frame_deadline(autojump_clock: trio.testing.MockClock) -> None:
    ns = Net(b"S" * 16)
    s = server(ns, TcpLimits(hello_timeout_s=3, read_timeout_s=10))
    async with trio.open_nursery() as nursery:
        await nursery.start(s.run)
        silent = await connect(s)
        slow = await connect(s)
        await slow.send_all(struct.pack(">I", 100) + bytes(50))  # half a frame, then nothing
        start = trio.current_time()
        assert await read_eof(silent) == b""
        assert await read_eof(slow) == b""
        assert trio.current_time() - start == pytest.approx(3, abs=0.5)
        assert ns.counters["tcp_drop_preauth_timeout"] == 2
        assert s.preauth.reserved == 0 and s.active_in == 0
        nursery.cancel_scope.cancel()


async def test_one_source_cannot_take_every_slot() -> None:
    # aaa7b78: 64 global slots, so two hosts holding them locked out the rest.
    ns, nc = Net(b"S" * 16, [KEY]), Net(b"C" * 16, [KEY])
    lim = TcpLimits(max_connections=8, max_preauth_per_source=3, hello_timeout_s=30)
    s, c = server(ns, lim), client(nc, lim)
    async with trio.open_nursery() as nursery:
        await nursery.start(s.run)
        await nursery.start(c.run)
        idle = []
        for source in ("127.0.0.2", "127.0.0.3"):
            for _ in range(3):
                idle.append(await connect_from(s, source))
        await until(lambda: s.active_in == 6)
        refused = [await connect_from(s, src) for src in ("127.0.0.2", "127.0.0.3") * 2]
        for stream in refused:
            with trio.fail_after(5):  # closed at once, long before the deadline
                assert await read_eof(stream) == b""
        await until(lambda: ns.counters["tcp_drop_per_source_cap"] == 4)
        assert s.preauth.by_source == {"127.0.0.2": 3, "127.0.0.3": 3}
        # Another host still gets through (from 127.0.0.1).
        assert s.local_addr is not None
        c.open_stream(5, s.local_addr, b"join me")
        with trio.fail_after(5):
            req = await ns.receive.receive()
        assert isinstance(req, StreamRequest) and req.src[0] == "127.0.0.1"
        s.reply(req.stream, b"welcome")
        with trio.fail_after(5):
            assert await nc.receive.receive() == StreamResponse(5, b"welcome")
        # Once its first frame opened, a connection no longer holds a slot of its source.
        assert "127.0.0.1" not in s.preauth.by_source
        for stream in idle:
            await stream.aclose()
        await until(lambda: s.preauth.connections == 0 and s.active_in == 0)
        assert s.preauth.by_source == {}
        nursery.cancel_scope.cancel()


async def test_a_large_request_goes_after_a_stream_hello() -> None:
    ns = Net(b"S" * 16, [KEY], max_size=16 * MIB)
    nc = Net(b"C" * 16, [KEY], max_size=16 * MIB)
    s, c = server(ns, TcpLimits()), client(nc, TcpLimits())
    big = b"\x82" + bytes(2 * MIB)
    async with trio.open_nursery() as nursery:
        await nursery.start(s.run)
        await nursery.start(c.run)
        assert s.local_addr is not None
        c.open_stream(9, s.local_addr, big)
        with trio.fail_after(10):
            req = await ns.receive.receive()
        assert isinstance(req, StreamRequest) and req.data == big
        s.reply(req.stream, big)
        with trio.fail_after(10):
            assert await nc.receive.receive() == StreamResponse(9, big)
        await until(lambda: ns.counters["tcp_in"] == 1)
        assert ns.counters["tcp_drop_preauth_oversize"] == 0
        nursery.cancel_scope.cancel()


async def test_a_small_request_needs_no_hello() -> None:
    # Byte for byte what aaa7b78 sends: one frame, so older listeners still answer.
    ns, nc = Net(b"S" * 16, [KEY]), Net(b"C" * 16, [KEY])
    c = client(nc, TcpLimits())
    async with trio.open_nursery() as nursery:
        await nursery.start(c.run)
        listener = await trio.open_tcp_listeners(0, host="127.0.0.1")
        addr = listener[0].socket.getsockname()[:2]
        c.open_stream(1, addr, b"small")
        conn = await listener[0].accept()
        (length,) = struct.unpack(">I", await receive_exactly(conn, 4))
        assert length < 4096
        _sender, payload = ns.opener.open(await receive_exactly(conn, length))
        assert payload == b"small"
        await conn.aclose()
        nursery.cancel_scope.cancel()


async def test_a_stream_hello_must_be_followed_by_its_senders_request() -> None:
    ns, other = Net(b"S" * 16, [KEY]), Net(b"O" * 16, [KEY])
    s = server(ns, TcpLimits())
    async with trio.open_nursery() as nursery:
        await nursery.start(s.run)
        for second in (
            lambda: other.sealer.seal(b"\x80"),  # another sender's request
            lambda: ns.sealer.seal(b""),  # a watch link
            lambda: ns.sealer.seal(STREAM_HELLO),  # another hello
        ):
            stream = await connect(s)
            hello = encode_frame(ns.sealer.seal(STREAM_HELLO))  # a replayed one is refused
            await stream.send_all(hello + encode_frame(second()))
            assert await read_eof(stream) == b""
        await until(lambda: sum(ns.counters.values()) >= 3)
        assert ns.counters["tcp_drop_bad_stream_hello"] == 3, ns.counters
        assert ns.receive.statistics().current_buffer_used == 0
        # After the hello the full frame limit holds, on the prefix.
        small = server(ns, TcpLimits(max_frame=10_000))
        await nursery.start(small.run)
        stream = await connect(small)
        await stream.send_all(
            encode_frame(ns.sealer.seal(STREAM_HELLO)) + struct.pack(">I", 10_001)
        )
        assert await read_eof(stream) == b""
        await until(lambda: ns.counters["tcp_drop_frame_too_large"] == 1)
        nursery.cancel_scope.cancel()


async def test_an_old_peers_large_request_is_refused_and_counted() -> None:
    # What a release before the stream hello sends for a large push-pull.
    ns, old = Net(b"S" * 16, [KEY], max_size=16 * MIB), Net(b"C" * 16, [KEY])
    s = server(ns, TcpLimits())
    async with trio.open_nursery() as nursery:
        await nursery.start(s.run)
        stream = await connect(s)
        with contextlib.suppress(trio.BrokenResourceError):
            await stream.send_all(encode_frame(old.sealer.seal(bytes(MIB))))
        assert await read_eof(stream) == b""
        await until(lambda: ns.counters["tcp_drop_preauth_oversize"] == 1)
        assert "first frame over the pre-authentication limit" in ns.out.getvalue()
        nursery.cancel_scope.cancel()


def test_gate_counts_in_pairs() -> None:
    gate = PreauthGate(max_per_source=2, budget_bytes=100)
    assert gate.enter("a") and gate.enter("a") and not gate.enter("a") and gate.enter("b")
    assert gate.connections == 3
    gate.leave("a")
    assert gate.enter("a")
    assert gate.reserve(60) and not gate.reserve(41) and gate.reserve(40)
    gate.release(60)
    gate.release(40)
    assert gate.reserved == 0
    for host in ("a", "a", "b"):
        gate.leave(host)
    assert gate.by_source == {} and gate.connections == 0


@pytest.mark.parametrize(("value", "ok"), [(0.1, False), (0.5, True), (3, True), (31, False)])
def test_hello_timeout_setting_has_bounds(tmp_path: Path, value: float, ok: bool) -> None:
    path = tmp_path / "peerd.toml"
    path.write_text(f"[links]\nhello_timeout_s = {value}\n")
    if ok:
        assert check_config(path).links.hello_timeout_s == value
    else:
        with pytest.raises(SettingsError, match="hello_timeout_s"):
            check_config(path)


async def test_client_failure_is_reported_when_the_listener_refuses_the_hello() -> None:
    # A listener with another key cannot open the hello: the stream fails (eof).
    ns, nc = Net(b"S" * 16, [bytes(32)]), Net(b"C" * 16, [KEY])
    s, c = server(ns, TcpLimits()), client(nc, TcpLimits())
    async with trio.open_nursery() as nursery:
        await nursery.start(s.run)
        await nursery.start(c.run)
        assert s.local_addr is not None
        c.open_stream(4, s.local_addr, bytes(100_000))
        with trio.fail_after(10):
            failed = await nc.receive.receive()
        assert isinstance(failed, StreamFailed) and failed.reason in ("eof", "reset")
        await until(lambda: ns.counters["tcp_drop_seal_unknown_key"] == 1)
        nursery.cancel_scope.cancel()
