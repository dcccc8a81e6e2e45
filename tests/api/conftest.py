"""A fake Backend and a real API server on a Unix socket in a short temp dir."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

import pytest
import trio

from peerd.api.protocol import (
    ApiError,
    ErrorCode,
    FrameDecoder,
    encode_frame,
    parse_join_args,
    parse_key_args,
    parse_set_tags_args,
)
from peerd.shell.api_server import ApiServer, Connection, EventItem, serve_api

NODE_ID = "00112233445566778899aabbccddeeff"

MEMBERS: list[dict[str, Any]] = [
    {
        "name": "alpha",
        "id": NODE_ID,
        "addr": "10.0.0.1:7946",
        "status": "alive",
        "incarnation": 3,
        "generation": 1,
        "tags": {"role": "db", "dc": "eu"},
    },
    {
        "name": "beta",
        "id": "ff" * 16,
        "addr": "[fd00::2]:7946",
        "status": "suspect",
        "incarnation": 1,
        "generation": 4,
        "tags": {},
    },
]


class FakeBackend:
    """Implements the Backend protocol with canned data, plus test hooks:
    ``slow`` waits for ``release``; ``boom`` raises; ``emit`` feeds watchers."""

    def __init__(self) -> None:
        self.tags: dict[str, str] = {"role": "db", "dc": "eu"}
        self.keys = [{"id": "k1", "primary": True}]
        self.release = trio.Event()
        self.slow_started = trio.Event()
        self.watchers: list[trio.MemorySendChannel[EventItem]] = []
        self.watch_registered = trio.Event()
        self.closed: list[int] = []
        self.closed_event = trio.Event()
        self.calls: list[tuple[Connection, str, dict[str, Any]]] = []
        self.left = False

    async def call(self, conn: Connection, op: str, args: dict[str, Any]) -> Any:
        self.calls.append((conn, op, args))
        match op:
            case "status":
                return {
                    "name": "alpha",
                    "id": NODE_ID,
                    "addr": "10.0.0.1:7946",
                    "incarnation": 3,
                    "generation": 1,
                    "health": 0,
                    "members": {"alive": 1, "suspect": 1, "dead": 0, "left": 0},
                    "version": "0.1.0",
                }
            case "members":
                return MEMBERS
            case "set-tags":
                self.tags = parse_set_tags_args(args).apply(self.tags)
                return self.tags
            case "leave":
                self.left = True
                return {}
            case "join":
                addrs = parse_join_args(args)
                ok = sum(1 for a in addrs if a[0] != "192.0.2.1")  # TEST-NET: "unreachable"
                return {"ok": ok, "failed": len(addrs) - ok}
            case "keys.list":
                return self.keys
            case "keys.install":
                self.keys.append({"id": parse_key_args(args), "primary": False})
                return {}
            case "keys.use" | "keys.remove":
                key = parse_key_args(args)
                if not any(k["id"] == key for k in self.keys):
                    raise ApiError(ErrorCode.NOT_FOUND, f"no key {key}")
                return {}
            case "echo":
                return args
            case "whoami":
                assert conn.cred is not None
                return {"pid": conn.cred.pid, "uid": conn.cred.uid, "conn": conn.id}
            case "slow":
                self.slow_started.set()
                await self.release.wait()
                return "slow done"
            case "boom":
                raise RuntimeError("kaboom")
            case "unencodable":
                return object()
            case "huge":
                return "x" * 2_000_000
        raise ApiError(ErrorCode.UNKNOWN_OP, f"unknown op {op!r}")

    def watch(
        self, conn: Connection, topics: Sequence[str]
    ) -> trio.MemoryReceiveChannel[EventItem]:
        for topic in topics:
            if topic != "members":
                raise ApiError(ErrorCode.BAD_ARGS, f"unknown topic {topic!r}")
        send, receive = trio.open_memory_channel[EventItem](100)
        self.watchers.append(send)
        self.watch_registered.set()
        return receive

    def emit(self, event: str, data: dict[str, Any]) -> int:
        """Send to every live watcher; returns how many took it."""
        delivered = 0
        for send in list(self.watchers):
            try:
                send.send_nowait((event, data))
                delivered += 1
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self.watchers.remove(send)
        return delivered

    def end_watches(self) -> None:
        for send in self.watchers:
            send.close()
        self.watchers.clear()

    def connection_closed(self, conn: Connection) -> None:
        self.closed.append(conn.id)
        self.closed_event.set()


@pytest.fixture
def sock_dir() -> Iterator[str]:
    # pytest's tmp_path can exceed the 107-byte limit of a Unix socket path.
    path = tempfile.mkdtemp(prefix="pdapi-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def sock_path(sock_dir: str) -> str:
    return os.path.join(sock_dir, "run", "peerd.sock")  # parent missing on purpose


@pytest.fixture
def backend() -> FakeBackend:
    return FakeBackend()


@pytest.fixture
async def server(nursery: trio.Nursery, sock_path: str, backend: FakeBackend) -> ApiServer:
    srv: ApiServer = await nursery.start(serve_api, sock_path, backend)
    return srv


class RawConn:
    """A bare socket connection for byte-level tests."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.decoder = FrameDecoder()

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def request(self, frame: dict[str, Any]) -> None:
        await self.send(encode_frame(frame))

    async def frame(self) -> dict[Any, Any] | None:
        """The next frame, or None at EOF."""
        while True:
            frame = self.decoder.next_frame()
            if frame is not None:
                return frame
            data = await self.stream.receive_some(65536)
            if not data:
                return None
            self.decoder.feed(data)

    async def frames_until_eof(self) -> list[dict[Any, Any]]:
        out = []
        while (frame := await self.frame()) is not None:
            out.append(frame)
        return out


@pytest.fixture
async def raw(server: ApiServer) -> AsyncIterator[Any]:
    """A factory of raw connections to the test server."""
    conns: list[RawConn] = []

    async def connect() -> RawConn:
        assert server.path is not None
        conn = RawConn(await trio.open_unix_socket(server.path))
        conns.append(conn)
        return conn

    yield connect
    for conn in conns:
        await trio.aclose_forcefully(conn.stream)
