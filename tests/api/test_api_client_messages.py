"""Messages to names in the clients: unread ones never hold up the answers
to calls, stay in order, are never dropped, and are bounded explicitly.

The daemon's side is played by hand over a memory stream (async client,
mock clock) or a Unix socket pair (blocking client)."""

from __future__ import annotations

import os
import socket
import tempfile
from collections.abc import Iterator
from typing import Any

import pytest
import trio
import trio.testing

from peerd.api.client import MESSAGE_OVERHEAD, BlockingClient, Client, MessagesNotRead
from peerd.api.protocol import (
    Event,
    FrameDecoder,
    Request,
    Response,
    encode_frame,
    parse_request,
)

TIMEOUT = 30  # virtual seconds (mock clock)


def message(i: int, size: int = 1) -> bytes:
    payload = bytes([i % 256]) * size
    return encode_frame(
        Event(
            0,
            "message",
            {
                "from": str(i),
                "from_node": "00" * 16,
                "kind": "name",
                "scope": "default",
                "name": "db",
                "payload": payload,
            },
        )
    )


def counted(*frames: bytes) -> int:
    """What these messages count against max_message_bytes."""
    return sum(len(f) + MESSAGE_OVERHEAD for f in frames)


class Daemon:
    """The daemon's end of a client connection, written by hand."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.decoder = FrameDecoder()

    async def request(self) -> Request:
        with trio.fail_after(TIMEOUT):
            while (frame := self.decoder.next_frame()) is None:
                self.decoder.feed(await self.stream.receive_some(65536))
        return parse_request(frame)

    async def answer(self, result: Any = None) -> Request:
        req = await self.request()
        await self.stream.send_all(encode_frame(Response.success(req.id, result or {"ok": 1})))
        return req


async def payloads(client: Client, n: int) -> list[int]:
    with trio.fail_after(TIMEOUT):
        return [(await client.receive_message()).data["payload"][0] for _ in range(n)]


async def test_unread_messages_do_not_hold_up_answers(
    autojump_clock: trio.testing.MockClock,
) -> None:
    ours, theirs = trio.testing.memory_stream_pair()
    daemon = Daemon(theirs)
    async with Client(stream=ours, max_messages=2) as client:
        for i in range(10):  # the application reads none of them yet
            await theirs.send_all(message(i))
        await trio.testing.wait_all_tasks_blocked()
        results: list[Any] = []

        async def call() -> None:
            results.append(await client.call("status"))

        with trio.fail_after(TIMEOUT):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(call)
                await theirs.send_all(message(10))  # more, between request and answer
                await daemon.answer({"name": "alpha"})
        assert results == [{"name": "alpha"}]
        assert await payloads(client, 11) == list(range(11))  # all kept, in order


async def test_past_max_messages_an_idle_client_stops_reading(
    autojump_clock: trio.testing.MockClock,
) -> None:
    ours, theirs = trio.testing.memory_stream_pair()
    async with Client(stream=ours, max_messages=3) as client:
        await theirs.send_all(b"".join(message(i) for i in range(4)))
        await trio.testing.wait_all_tasks_blocked()
        await theirs.send_all(message(4))
        await trio.testing.wait_all_tasks_blocked()
        assert client._unread == 4  # the fifth waits in the socket: the daemon's mailbox fills
        assert await payloads(client, 2) == [0, 1]
        await trio.testing.wait_all_tasks_blocked()
        assert client._unread == 3  # two read, so it read on
        assert await payloads(client, 3) == [2, 3, 4]


async def test_past_max_message_bytes_calls_fail_until_messages_are_read(
    autojump_clock: trio.testing.MockClock,
) -> None:
    ours, theirs = trio.testing.memory_stream_pair()
    daemon = Daemon(theirs)
    bound = counted(message(0, 60)) + 1  # one message fits, two do not
    async with Client(stream=ours, max_messages=1, max_message_bytes=bound) as client:
        failed: list[BaseException] = []

        async def call() -> None:
            with pytest.raises(MessagesNotRead) as info:
                await client.call("status")
            failed.append(info.value)

        with trio.fail_after(TIMEOUT):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(call)
                await daemon.request()  # not answered yet...
                await theirs.send_all(message(0, 60) + message(1, 60))  # ...past the bound
        assert failed[0].code == "unavailable" and "2 unread messages" in str(failed[0])
        with pytest.raises(MessagesNotRead):  # new calls fail at once, nothing is sent
            await client.call("status")
        await theirs.send_all(encode_frame(Response.success(1, "late")))  # the first answer
        assert await payloads(client, 2) == [0, 1]  # nothing was dropped
        with trio.fail_after(TIMEOUT):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(daemon.answer, {"name": "alpha"})
                assert await client.call("status") == {"name": "alpha"}


async def test_a_watch_keeps_the_client_reading_up_to_the_byte_bound(
    autojump_clock: trio.testing.MockClock,
) -> None:
    ours, theirs = trio.testing.memory_stream_pair()
    daemon = Daemon(theirs)
    bound = counted(message(0, 10), message(1, 10)) + 1
    async with Client(stream=ours, max_messages=1, max_message_bytes=bound) as client:
        with trio.fail_after(TIMEOUT):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(daemon.answer)
                watch = client.watch(["members"])
                await watch.start()
        stream = watch.stream
        assert stream is not None
        await theirs.send_all(message(0, 10) + message(1, 10))
        await theirs.send_all(encode_frame(Event(stream, "alive", {"name": "b"})))
        with trio.fail_after(TIMEOUT):
            assert (await watch.__anext__()).data == {"name": "b"}  # past max_messages
            await theirs.send_all(message(2, 90))
            with pytest.raises(MessagesNotRead):  # past max_message_bytes: ended, clearly
                await watch.__anext__()
        assert await payloads(client, 3) == [0, 1, 2]


@pytest.fixture
def unix_pair() -> Iterator[tuple[str, socket.socket]]:
    with tempfile.TemporaryDirectory(prefix="peerd-test-") as d:
        path = os.path.join(d, "s.sock")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(path)
        listener.listen(1)
        try:
            yield path, listener
        finally:
            listener.close()


def test_blocking_client_bounds_unread_messages(unix_pair: tuple[str, socket.socket]) -> None:
    path, listener = unix_pair
    bound = counted(message(0, 60)) + 1
    with BlockingClient(path, timeout=TIMEOUT, max_message_bytes=bound) as client:
        daemon, _ = listener.accept()
        with daemon:
            daemon.settimeout(TIMEOUT)
            daemon.sendall(
                message(0, 60) + message(1, 60) + encode_frame(Response.success(1, "status"))
            )
            with pytest.raises(MessagesNotRead):  # the answer waits behind them, unread
                client.call("status")
            with pytest.raises(MessagesNotRead):
                client.call("status")
            assert [
                client.receive_message(0).data["payload"][0]  # type: ignore[union-attr]
                for _ in range(2)
            ] == [0, 1]
            daemon.sendall(encode_frame(Response.success(2, "second")))
            assert client.call("status") == "second"  # the late first answer is skipped


async def test_many_empty_messages_with_a_watch_open_reach_the_bound(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Only payload bytes were counted, and a watch keeps the client reading
    # past max_messages: 20,000 empty messages were buffered without bound
    # and never raised MessagesNotRead (the daemon's mailbox never filled).
    ours, theirs = trio.testing.memory_stream_pair()
    daemon = Daemon(theirs)
    bound = 1 << 20
    async with Client(stream=ours, max_message_bytes=bound) as client:
        with trio.fail_after(TIMEOUT):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(daemon.answer)
                watch = client.watch(["members"])
                await watch.start()
        await theirs.send_all(b"".join(message(i, 0) for i in range(20_000)))
        with trio.fail_after(TIMEOUT), pytest.raises(MessagesNotRead):
            await watch.__anext__()
        # It stopped reading near the bound (one read's worth past it at most).
        assert bound <= client._unread_bytes <= bound + counted(*[message(0, 0)] * 1000)
        assert client._unread < 2_000
        with trio.fail_after(TIMEOUT):  # all of them still come, in order
            got = [(await client.receive_message()).data["from"] for _ in range(20_000)]
        assert got == [str(i) for i in range(20_000)]


def test_a_blocking_watch_counts_empty_messages_too(unix_pair: tuple[str, socket.socket]) -> None:
    path, listener = unix_pair
    frames = [message(i, 0) for i in range(200)]
    bound = counted(*frames[:50])
    with BlockingClient(path, timeout=TIMEOUT, max_message_bytes=bound) as client:
        daemon, _ = listener.accept()
        with daemon:
            daemon.sendall(encode_frame(Response.success(1, {})) + b"".join(frames))
            daemon.shutdown(socket.SHUT_WR)  # before the fix: read all, then ConnectionLost
            with pytest.raises(MessagesNotRead):
                for _ in client.watch(["members"]):
                    pass
            with pytest.raises(MessagesNotRead):
                client.wait_connection_event(0)
            got = [client.receive_message(TIMEOUT) for _ in range(200)]
            assert [m.data["from"] for m in got if m is not None] == [str(i) for i in range(200)]


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_both_clients_check_their_bounds_alike(bad: object) -> None:
    ours, _theirs = trio.testing.memory_stream_pair()
    with pytest.raises(ValueError, match="max_message_bytes"):
        Client(stream=ours, max_message_bytes=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_message_bytes"):  # before connecting
        BlockingClient("/nonexistent/peerd.sock", max_message_bytes=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_messages"):
        Client(stream=ours, max_messages=bad)  # type: ignore[arg-type]
