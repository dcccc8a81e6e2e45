"""API server over real Unix sockets with a fake backend."""

from __future__ import annotations

import os
import socket
import stat
import struct
from collections.abc import Awaitable, Callable
from typing import Any

import cbor2
import pytest
import trio
import trio.testing

from peerd.api.client import Client
from peerd.api.protocol import ApiError, encode_frame
from peerd.shell.api_server import ApiServer, ApiSocketError, serve_api

from .conftest import MEMBERS, FakeBackend, RawConn

Connect = Callable[[], Awaitable[RawConn]]
TIMEOUT = 10


async def test_request_response(server: ApiServer, raw: Connect) -> None:
    with trio.fail_after(TIMEOUT):
        conn = await raw()
        await conn.request({"id": 1, "op": "members"})
        assert await conn.frame() == {"id": 1, "ok": True, "result": MEMBERS}
        await conn.request({"id": 2, "op": "echo", "args": {"a": [1, 2]}, "future": "ignored"})
        assert await conn.frame() == {"id": 2, "ok": True, "result": {"a": [1, 2]}}


@pytest.mark.parametrize(
    ("op", "args", "code"),
    [
        ("nope", {}, "unknown_op"),
        ("join", {"addrs": "1.2.3.4:5"}, "bad_args"),
        ("keys.use", {"key": "missing"}, "not_found"),
        ("boom", {}, "internal"),
        ("unencodable", {}, "internal"),
        ("huge", {}, "internal"),
        ("unwatch", {"stream": 99}, "not_found"),
        ("watch", {"topics": ["nope"]}, "bad_args"),
        ("watch", {}, "bad_args"),
    ],
)
async def test_error_responses(
    server: ApiServer, raw: Connect, op: str, args: dict[str, Any], code: str
) -> None:
    with trio.fail_after(TIMEOUT):
        conn = await raw()
        await conn.request({"id": 7, "op": op, "args": args})
        frame = await conn.frame()
        assert frame is not None
        assert (frame["id"], frame["ok"], frame["error"]["code"]) == (7, False, code)
        assert isinstance(frame["error"]["message"], str) and frame["error"]["message"]
        # The connection stays usable after an error response.
        await conn.request({"id": 8, "op": "status"})
        frame = await conn.frame()
        assert frame is not None and frame["id"] == 8 and frame["ok"]


async def test_pipelined_requests_answered_out_of_order(
    server: ApiServer, raw: Connect, backend: FakeBackend
) -> None:
    with trio.fail_after(TIMEOUT):
        conn = await raw()
        await conn.send(
            encode_frame({"id": 10, "op": "slow"}) + encode_frame({"id": 11, "op": "status"})
        )
        first = await conn.frame()
        assert first is not None and first["id"] == 11
        await backend.slow_started.wait()
        backend.release.set()
        second = await conn.frame()
        assert second == {"id": 10, "ok": True, "result": "slow done"}


async def test_reused_pending_id_is_a_conflict(
    server: ApiServer, raw: Connect, backend: FakeBackend
) -> None:
    with trio.fail_after(TIMEOUT):
        conn = await raw()
        await conn.send(
            encode_frame({"id": 1, "op": "slow"}) + encode_frame({"id": 1, "op": "status"})
        )
        frame = await conn.frame()
        assert frame is not None and frame["error"]["code"] == "conflict"
        backend.release.set()
        assert await conn.frame() == {"id": 1, "ok": True, "result": "slow done"}
        # Once answered, the id is free again.
        await conn.request({"id": 1, "op": "status"})
        frame = await conn.frame()
        assert frame is not None and frame["ok"]


async def test_watch_events_and_unwatch(
    server: ApiServer, raw: Connect, backend: FakeBackend
) -> None:
    with trio.fail_after(TIMEOUT):
        conn = await raw()
        await conn.request({"id": 5, "op": "watch", "args": {"topics": ["members"]}})
        assert await conn.frame() == {"id": 5, "ok": True, "result": {}}
        assert backend.emit("joined", MEMBERS[0]) == 1
        assert await conn.frame() == {"stream": 5, "event": "joined", "data": MEMBERS[0]}
        backend.emit("suspect", MEMBERS[1])
        await conn.request({"id": 6, "op": "unwatch", "args": {"stream": 5}})
        frames = [await conn.frame(), await conn.frame()]
        assert frames == [
            {"stream": 5, "event": "suspect", "data": MEMBERS[1]},
            {"id": 6, "ok": True, "result": {}},
        ]
        # Nothing of stream 5 after the unwatch reply; the backend learns it is closed.
        backend.emit("dead", MEMBERS[1])
        await conn.request({"id": 7, "op": "status"})
        frame = await conn.frame()
        assert frame is not None and frame["id"] == 7
        await trio.testing.wait_all_tasks_blocked()
        assert backend.emit("dead", MEMBERS[1]) == 0
        assert backend.watchers == []
        # The stream id is free again.
        await conn.request({"id": 5, "op": "status"})
        frame = await conn.frame()
        assert frame is not None and frame["ok"]


async def test_backend_ending_a_watch_sends_end(
    server: ApiServer, raw: Connect, backend: FakeBackend
) -> None:
    with trio.fail_after(TIMEOUT):
        conn = await raw()
        await conn.request({"id": 1, "op": "watch", "args": {"topics": ["members"]}})
        await conn.request({"id": 2, "op": "watch", "args": {"topics": ["members"]}})
        assert {(await conn.frame() or {})["id"] for _ in range(2)} == {1, 2}
        assert backend.emit("end", {"code": "unavailable", "message": "too slow"}) == 2
        got = [await conn.frame(), await conn.frame()]
        assert sorted(f["stream"] for f in got if f) == [1, 2]
        assert all(f and f["data"]["code"] == "unavailable" for f in got)
        await conn.request({"id": 3, "op": "watch", "args": {"topics": ["members"]}})
        assert (await conn.frame() or {})["id"] == 3
        backend.end_watches()
        assert await conn.frame() == {"stream": 3, "event": "end", "data": {}}


async def test_malformed_backend_event_is_dropped(
    server: ApiServer, raw: Connect, backend: FakeBackend
) -> None:
    with trio.fail_after(TIMEOUT):
        conn = await raw()
        await conn.request({"id": 1, "op": "watch", "args": {"topics": ["members"]}})
        await conn.frame()
        backend.watchers[0].send_nowait("not a pair")
        backend.emit("joined", {"ok": object()})  # unencodable
        backend.emit("left", {"name": "x"})
        assert await conn.frame() == {"stream": 1, "event": "left", "data": {"name": "x"}}
        assert server.counters["internal_errors"] == 2


GARBAGE = {
    "not_cbor": struct.pack(">I", 3) + b"\xff\xff\xff",
    "cbor_array": encode_frame({"x": 1})[:0] + struct.pack(">I", 3) + cbor2.dumps([1, 2]),
    "oversized": struct.pack(">I", (1 << 20) + 1),
    "zero_length": struct.pack(">I", 0),
    "id_is_text": encode_frame({"id": "1", "op": "status"}),
    "op_missing": encode_frame({"id": 1}),
    "args_not_map": encode_frame({"id": 1, "op": "status", "args": [1]}),
}


@pytest.mark.parametrize("kind", sorted(GARBAGE))
async def test_garbage_gets_error_frame_and_close(
    server: ApiServer, raw: Connect, backend: FakeBackend, kind: str
) -> None:
    with trio.fail_after(TIMEOUT):
        good = await raw()
        await good.request({"id": 1, "op": "status"})
        assert (await good.frame() or {})["ok"]
        bad = await raw()
        await bad.send(GARBAGE[kind])
        frames = await bad.frames_until_eof()
        assert len(frames) == 1
        assert frames[0]["id"] is None and frames[0]["ok"] is False
        assert frames[0]["error"]["code"] == "bad_frame"
        assert len(backend.closed) == 1  # reported before the socket was closed
        # The other client is unaffected.
        await good.request({"id": 2, "op": "members"})
        assert (await good.frame() or {})["result"] == MEMBERS
        assert server.counters["bad_frames"] == 1


async def test_garbage_after_good_requests(server: ApiServer, raw: Connect) -> None:
    with trio.fail_after(TIMEOUT):
        conn = await raw()
        await conn.send(encode_frame({"id": 1, "op": "status"}) + GARBAGE["not_cbor"])
        frames = await conn.frames_until_eof()
        assert frames[-1]["error"]["code"] == "bad_frame"
        assert len(frames) <= 2


async def test_connection_limit(
    nursery: trio.Nursery, sock_path: str, backend: FakeBackend
) -> None:
    with trio.fail_after(TIMEOUT):
        server: ApiServer = await nursery.start(
            lambda task_status: serve_api(
                sock_path, backend, max_connections=2, task_status=task_status
            )
        )
        async with Client(sock_path) as c1, Client(sock_path) as c2:
            assert (await c1.call("status"))["name"] == "alpha"
            await c2.call("status")
            conn = RawConn(await trio.open_unix_socket(sock_path))
            frames = await conn.frames_until_eof()
            assert len(frames) == 1 and frames[0]["id"] is None
            assert frames[0]["error"]["code"] == "unavailable"
            assert "too many" in frames[0]["error"]["message"]
            async with Client(sock_path) as c3:
                with pytest.raises(ApiError) as info:
                    await c3.call("status")
                assert info.value.code == "unavailable"
            assert await c1.call("echo", a=1) == {"a": 1}
        await trio.testing.wait_all_tasks_blocked()
        assert server.connections == {}
        async with Client(sock_path) as c4:
            await c4.call("status")


async def test_peer_credentials_recorded(server: ApiServer) -> None:
    with trio.fail_after(TIMEOUT):
        async with Client(server.path) as client:
            who = await client.call("whoami")
        assert who["pid"] == os.getpid() and who["uid"] == os.getuid()


async def test_connection_closed_called_once_per_connection(
    server: ApiServer, backend: FakeBackend
) -> None:
    with trio.fail_after(TIMEOUT):
        async with Client(server.path) as client:
            conn_id = (await client.call("whoami"))["conn"]
            assert server.connections.keys() == {conn_id}
        await backend.closed_event.wait()
        assert backend.closed == [conn_id]
        assert server.connections == {}


async def test_eof_lets_pending_calls_answer(
    server: ApiServer, raw: Connect, backend: FakeBackend
) -> None:
    with trio.fail_after(TIMEOUT):
        conn = await raw()
        await conn.request({"id": 1, "op": "watch", "args": {"topics": ["members"]}})
        await conn.request({"id": 2, "op": "slow"})
        assert (await conn.frame() or {})["id"] == 1
        await backend.slow_started.wait()
        await conn.stream.send_eof()
        backend.release.set()
        frames = await conn.frames_until_eof()
        assert frames == [{"id": 2, "ok": True, "result": "slow done"}]


async def test_socket_setup_and_cleanup(
    nursery: trio.Nursery, sock_path: str, backend: FakeBackend
) -> None:
    with trio.fail_after(TIMEOUT):
        with trio.CancelScope() as scope:
            done = trio.Event()

            async def run(task_status: trio.TaskStatus[ApiServer]) -> None:
                try:
                    await serve_api(sock_path, backend, task_status=task_status)
                finally:
                    done.set()

            await nursery.start(run)
            parent = os.path.dirname(sock_path)
            assert stat.S_IMODE(os.stat(parent).st_mode) == 0o750
            assert stat.S_IMODE(os.stat(sock_path).st_mode) == 0o660
            # A second daemon on the same path refuses to start.
            with pytest.raises(ApiSocketError, match="already listening"):
                await serve_api(sock_path, backend)
            scope.cancel()
        nursery.cancel_scope.cancel()
        await done.wait()
    assert not os.path.exists(sock_path)


async def test_stale_socket_is_replaced(
    nursery: trio.Nursery, sock_dir: str, backend: FakeBackend
) -> None:
    path = os.path.join(sock_dir, "stale.sock")
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(path)
    dead.close()  # the file stays; connecting to it is refused
    with trio.fail_after(TIMEOUT):
        await nursery.start(serve_api, path, backend)
        async with Client(path) as client:
            assert (await client.call("status"))["name"] == "alpha"


async def test_refuses_to_replace_a_regular_file(sock_dir: str, backend: FakeBackend) -> None:
    path = os.path.join(sock_dir, "file")
    with open(path, "w") as f:
        f.write("precious")
    with pytest.raises(ApiSocketError, match="not a socket"):
        await serve_api(path, backend)
    with open(path) as f:
        assert f.read() == "precious"


async def test_prebound_socket(nursery: trio.Nursery, sock_dir: str, backend: FakeBackend) -> None:
    # What systemd socket activation hands over: bound and listening.
    path = os.path.join(sock_dir, "activated.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    sock.listen()
    with trio.fail_after(TIMEOUT):
        server: ApiServer = await nursery.start(serve_api, sock, backend)
        assert server.path is None
        async with Client(path) as client:
            assert await client.call("echo", x="y") == {"x": "y"}


class MemoryListener(trio.abc.Listener[trio.abc.Stream]):
    """Connections over in-memory streams: exercises the Listener path."""

    def __init__(self) -> None:
        self.send, self.receive = trio.open_memory_channel[trio.abc.Stream](0)

    async def connect(self) -> trio.abc.Stream:
        client, server = trio.testing.memory_stream_pair()
        await self.send.send(server)
        return client

    async def accept(self) -> trio.abc.Stream:
        stream: trio.abc.Stream = await self.receive.receive()
        return stream

    async def aclose(self) -> None:
        self.receive.close()


async def test_memory_listener(nursery: trio.Nursery, backend: FakeBackend) -> None:
    listener = MemoryListener()
    with trio.fail_after(TIMEOUT):
        server: ApiServer = await nursery.start(serve_api, listener, backend)
        async with Client(stream=await listener.connect()) as client:
            assert await client.call("echo", n=1) == {"n": 1}
            (conn,) = server.connections.values()
            assert conn.cred is None


async def test_backend_push_to_connection(server: ApiServer, raw: Connect) -> None:
    with trio.fail_after(TIMEOUT):
        conn = await raw()
        await conn.request({"id": 1, "op": "whoami"})
        conn_id = (await conn.frame() or {})["result"]["conn"]
        target = server.connections[conn_id]
        assert target.push_nowait(1, "conflict", {"name": "svc"})
        assert await conn.frame() == {"stream": 1, "event": "conflict", "data": {"name": "svc"}}
        assert await target.push(1, "conflict", {"name": "svc2"})
        assert (await conn.frame() or {})["data"] == {"name": "svc2"}
        with pytest.raises(ValueError):
            target.push_nowait(1, "x", {"bad": object()})
        target.close()
        assert await conn.frames_until_eof() == []
        assert target.closed
        assert not target.push_nowait(1, "late", {})


async def test_inflight_limit_pauses_reading(
    nursery: trio.Nursery, sock_path: str, backend: FakeBackend
) -> None:
    with trio.fail_after(TIMEOUT):
        server = ApiServer(backend, max_inflight=1)
        await nursery.start(server.serve, sock_path)
        conn = RawConn(await trio.open_unix_socket(sock_path))
        await conn.send(
            encode_frame({"id": 1, "op": "slow"}) + encode_frame({"id": 2, "op": "status"})
        )
        await backend.slow_started.wait()
        await trio.testing.wait_all_tasks_blocked()
        assert [op for _, op, _ in backend.calls] == ["slow"]  # "status" not even read yet
        backend.release.set()
        assert [(await conn.frame() or {})["id"] for _ in range(2)] == [1, 2]
        await trio.aclose_forcefully(conn.stream)


class OverlapBackend(FakeBackend):
    """Batches start in order; the first one's results wait for a release."""

    def __init__(self) -> None:
        super().__init__()
        self.begun: list[list[int]] = []
        self.gate = trio.Event()

    def batchable(self, op: str, args: dict[str, Any]) -> bool:
        return op == "q"

    async def begin_batch(self, conn: Any, requests: list[tuple[str, dict[str, Any]]]) -> Any:
        ns = [int(args["n"]) for _op, args in requests]
        first = not self.begun
        self.begun.append(ns)

        async def finish() -> list[Any]:
            if first:
                await self.gate.wait()
            return [{"n": n} for n in ns]

        return finish


async def test_a_waiting_batch_does_not_stop_the_next_one(
    nursery: trio.Nursery, sock_path: str
) -> None:
    backend = OverlapBackend()
    with trio.fail_after(TIMEOUT):
        await nursery.start(
            lambda task_status: serve_api(sock_path, backend, task_status=task_status)
        )
        conn = RawConn(await trio.open_unix_socket(sock_path))
        await conn.send(
            b"".join(encode_frame({"id": i, "op": "q", "args": {"n": i}}) for i in (1, 2))
        )
        while sum(map(len, backend.begun)) < 2:
            await trio.sleep(0.001)
        await conn.send(encode_frame({"id": 3, "op": "q", "args": {"n": 3}}))
        # The second batch started and was answered while the first waits.
        frame = await conn.frame()
        assert frame == {"id": 3, "ok": True, "result": {"n": 3}}
        assert [n for b in backend.begun for n in b] == [1, 2, 3]  # started in order
        backend.gate.set()
        rest = [await conn.frame(), await conn.frame()]
        assert sorted(f["id"] for f in rest if f) == [1, 2]
