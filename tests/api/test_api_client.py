"""Async and blocking clients against the real server with a fake backend."""

from __future__ import annotations

import os

import pytest
import trio
import trio.testing

from peerd.api.client import (
    BlockingClient,
    Client,
    ConnectionLost,
    DaemonUnavailable,
    default_socket_path,
)
from peerd.api.protocol import ApiError, Event
from peerd.shell.api_server import ApiServer, serve_api

from .conftest import MEMBERS, FakeBackend

TIMEOUT = 10


async def test_call_and_errors(server: ApiServer) -> None:
    with trio.fail_after(TIMEOUT):
        async with Client(server.path) as client:
            assert await client.call("members") == MEMBERS
            assert await client.call("set-tags", tags={"dc": None, "x": "1"}) == {
                "role": "db",
                "x": "1",
            }
            assert await client.request("join", {"addrs": ["10.0.0.2:7946", "192.0.2.1:1"]}) == {
                "ok": 1,
                "failed": 1,
            }
            with pytest.raises(ApiError) as info:
                await client.call("nope")
            assert info.value.code == "unknown_op"
            with pytest.raises(ApiError) as info:
                await client.call("boom")
            assert info.value.code == "internal" and "kaboom" in info.value.message


async def test_concurrent_calls_share_one_connection(
    server: ApiServer, backend: FakeBackend
) -> None:
    with trio.fail_after(TIMEOUT):
        async with Client(server.path) as client:
            results: list[str] = []

            async def slow() -> None:
                results.append(await client.call("slow"))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(slow)
                await backend.slow_started.wait()
                assert (await client.call("status"))["name"] == "alpha"
                results.append("status")
                backend.release.set()
            assert results == ["status", "slow done"]
            assert len(server.connections) == 1


async def test_watch_iterates_and_unwatches_on_exit(
    server: ApiServer, backend: FakeBackend
) -> None:
    with trio.fail_after(TIMEOUT):
        async with Client(server.path) as client:
            async with client.watch(["members"]) as events:
                assert backend.emit("joined", MEMBERS[0]) == 1
                backend.emit("dead", MEMBERS[1])
                got = [await events.__anext__(), await events.__anext__()]
                assert got == [
                    Event(events.stream or 0, "joined", MEMBERS[0]),
                    Event(events.stream or 0, "dead", MEMBERS[1]),
                ]
            await client.call("status")  # the unwatch went out before this
            await trio.testing.wait_all_tasks_blocked()
            assert backend.emit("left", MEMBERS[0]) == 0
            # Calls still work after the watch.
            assert await client.call("echo", k="v") == {"k": "v"}


async def test_watch_ends_when_daemon_ends_it(server: ApiServer, backend: FakeBackend) -> None:
    with trio.fail_after(TIMEOUT):
        async with Client(server.path) as client:
            events = client.watch()
            await events.start()
            backend.emit("joined", MEMBERS[0])
            backend.end_watches()
            assert [ev.event async for ev in events] == ["joined"]

            async with client.watch() as events:
                backend.emit("end", {"code": "unavailable", "message": "fell behind"})
                with pytest.raises(ApiError) as info:
                    await events.__anext__()
                assert info.value.code == "unavailable"


async def test_watch_bad_topic(server: ApiServer) -> None:
    with trio.fail_after(TIMEOUT):
        async with Client(server.path) as client:
            with pytest.raises(ApiError) as info:
                async with client.watch(["nope"]):
                    pass
            assert info.value.code == "bad_args"
            assert client._streams == {}


async def test_slow_watcher_overflows_without_blocking_calls(
    server: ApiServer, backend: FakeBackend
) -> None:
    with trio.fail_after(TIMEOUT):
        async with Client(server.path, watch_buffer=2) as client, client.watch() as events:
            for i in range(5):
                backend.emit("updated", {"n": i})
            await trio.testing.wait_all_tasks_blocked()
            assert await client.call("echo", still="working") == {"still": "working"}
            got = [await events.__anext__(), await events.__anext__()]
            assert [ev.data["n"] for ev in got] == [0, 1]
            with pytest.raises(ConnectionLost, match="fell behind"):
                await events.__anext__()


async def test_connection_lost_wakes_pending_calls(
    nursery: trio.Nursery, sock_path: str, backend: FakeBackend
) -> None:
    with trio.fail_after(TIMEOUT):
        server_scope = trio.CancelScope()

        async def run(task_status: trio.TaskStatus[ApiServer]) -> None:
            with server_scope:
                await serve_api(sock_path, backend, task_status=task_status)

        await nursery.start(run)
        async with Client(sock_path) as client:
            watch = client.watch()
            await watch.start()

            async def stop_server() -> None:
                await backend.slow_started.wait()
                server_scope.cancel()

            nursery.start_soon(stop_server)
            with pytest.raises(ConnectionLost):
                await client.call("slow")
            with pytest.raises(ConnectionLost):
                await watch.__anext__()
            with pytest.raises(ConnectionLost):
                await client.call("status")


async def test_daemon_not_running(sock_dir: str) -> None:
    path = os.path.join(sock_dir, "absent.sock")
    with pytest.raises(DaemonUnavailable, match=f"peerd is not running at {path}\\?"):
        async with Client(path):
            pass
    with pytest.raises(DaemonUnavailable, match="connect: No such file"):
        BlockingClient(path)


def test_default_socket_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PEERD_API_SOCKET", "/x/y.sock")
    assert default_socket_path() == "/x/y.sock"
    monkeypatch.delenv("PEERD_API_SOCKET")
    monkeypatch.setattr(os, "getuid", lambda: 0)
    assert default_socket_path() == "/run/peerd/peerd.sock"
    monkeypatch.setattr(os, "getuid", lambda: 1000)
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/1000")
    assert default_socket_path() == "/run/user/1000/peerd/peerd.sock"
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    assert default_socket_path() == "/tmp/peerd-1000/peerd.sock"


async def test_blocking_client(server: ApiServer, backend: FakeBackend) -> None:
    path = server.path

    def scenario() -> list[str]:
        with BlockingClient(path, timeout=TIMEOUT) as client:
            assert client.call("status")["name"] == "alpha"
            with pytest.raises(ApiError) as info:
                client.call("keys.remove", key="nope")
            assert info.value.code == "not_found"
            names = [f"{ev.event}:{ev.data['name']}" for ev in client.watch(["members"])]
            # The connection stays usable after a watch ended.
            assert client.call("echo", a=1) == {"a": 1}
            return names

    async def feed() -> None:
        await backend.watch_registered.wait()
        backend.emit("joined", MEMBERS[0])
        backend.emit("suspect", MEMBERS[1])
        backend.end_watches()

    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(feed)
            names = await trio.to_thread.run_sync(scenario, abandon_on_cancel=True)
    assert names == ["joined:alpha", "suspect:beta"]


async def test_blocking_client_watch_error_and_close(
    server: ApiServer, backend: FakeBackend
) -> None:
    path = server.path

    def scenario() -> str:
        with BlockingClient(path, timeout=TIMEOUT) as client:
            events = client.watch()
            first = next(events)
            events.close()  # unwatches
            with pytest.raises(ApiError) as info:
                list(client.watch(["nope"]))
            assert info.value.code == "bad_args"
            return first.event

    async def feed() -> None:
        await backend.watch_registered.wait()
        backend.emit("joined", MEMBERS[0])

    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(feed)
            assert await trio.to_thread.run_sync(scenario, abandon_on_cancel=True) == "joined"
    await trio.testing.wait_all_tasks_blocked()
    assert backend.emit("x", {}) == 0
