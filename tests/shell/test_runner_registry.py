"""The runner's registry ops with a real core: commands bound to connections,
reads of the replica, events to watchers and to the owning connection,
batches, and the API server + client on a real Unix socket."""

from __future__ import annotations

import io
import os
import random
import shutil
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import trio

from peerd.api.client import Client
from peerd.api.protocol import CONNECTION_STREAM, ApiError
from peerd.core.events import ConnClosed, LogLevel, PacketIn
from peerd.core.peer import Peer
from peerd.shell.api_server import ApiServer, PeerCred, serve_api
from peerd.shell.logs import Logger
from peerd.shell.runner import Runner
from peerd.wire import codec
from peerd.wire.messages import Alive, RegChange, RegDelta, RegEntry, RegKind
from tests.core.util import addr, cfg, name, nid

from .test_runner import FakePorts

OTHER = b"\x09" * 16  # a node id that is not ours


class FakeConn:
    """What the runner uses of an API connection."""

    def __init__(self, cid: int, pid: int = 4321, uid: int = 1000) -> None:
        self.id = cid
        self.cred = PeerCred(pid, uid, uid)
        self.closed = False
        self.pushed: list[tuple[int, str, dict[str, Any]]] = []

    def push_nowait(self, stream: int, event: str, data: dict[str, Any]) -> bool:
        self.pushed.append((stream, event, dict(data)))
        return True


def make(**kw: Any) -> tuple[Runner, Peer, io.StringIO]:
    # membership with the registry beside it (no mesh, no names)
    node = Peer(node_id=nid(1), name=name(1), addr=addr(1), config=cfg(), rng=random.Random(7))
    ports = FakePorts()
    out = io.StringIO()
    runner = Runner(node, packets=ports, streams=ports, logger=Logger(LogLevel.DEBUG, out), **kw)
    return runner, node, out


async def run_with(runner: Runner, fn: Callable[[], Awaitable[Any]]) -> Any:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(runner.run)
        try:
            with trio.fail_after(5):
                return await fn()
        finally:
            nursery.cancel_scope.cancel()


def older_claim_packet(name: str, claimed_ms: int, pid: int = 55) -> bytes:
    """A delta from another node claiming ``name`` at ``claimed_ms``."""
    entry = RegEntry(1, RegKind.NAME, "default", name, claimed_ms, pid, 0, (("k", "v"),))
    # The claimant announces itself first: only live members' partitions are kept.
    return codec.pack(
        [
            codec.encode(Alive(OTHER, "other", ("127.0.0.9", 7950), 1, 1, ())),
            codec.encode(RegDelta(OTHER, 1, 0, 1, (RegChange(1, 1, entry),))),
        ]
    )


async def barrier(runner: Runner) -> None:
    """Every input queued before this has been handled."""
    await runner.call(None, "status", {})


async def test_register_lookup_list_update_unregister() -> None:
    runner, node, _ = make()
    a, b = FakeConn(1, pid=111), FakeConn(2, pid=222)

    async def go() -> None:
        got = await runner.call(a, "register", {"name": "db", "meta": {"port": "5432"}})
        assert got["name"] == "db" and got["scope"] == "default" and got["kind"] == "name"
        assert (got["pid"], got["uid"]) == (111, 1000)
        assert got["node"] == node.node_id.hex() and got["node_name"] == "n1"
        host, port = node.local_member().addr
        assert got["node_addr"] == f"{host}:{port}"
        assert got["meta"] == {"port": "5432"} and isinstance(got["claimed_ms"], int)
        assert await runner.call(b, "lookup", {"name": "db"}) == got
        # Taken: the message names the holder.
        with pytest.raises(ApiError) as info:
            await runner.call(b, "register", {"name": "db"})
        assert info.value.code == "conflict" and "pid 111 on node n1" in info.value.message
        await runner.call(b, "register", {"name": "db", "scope": "other"})
        page = await runner.call(b, "list", {})
        assert [(e["scope"], e["name"]) for e in page["entries"]] == [
            ("default", "db"),
            ("other", "db"),
        ]
        assert page["more"] is False
        page = await runner.call(b, "list", {"scope": "other", "prefix": "d"})
        assert [e["pid"] for e in page["entries"]] == [222]
        # Only the owning connection may change or remove an entry.
        for op, args in [("unregister", {"name": "db"}), ("update", {"name": "db", "meta": {}})]:
            with pytest.raises(ApiError) as info:
                await runner.call(b, op, args)
            assert info.value.code == "not_found"
        updated = await runner.call(a, "update", {"name": "db", "meta": {"port": "1"}})
        assert updated["meta"] == {"port": "1"}
        assert await runner.call(a, "unregister", {"name": "db"}) == {}
        with pytest.raises(ApiError) as info:
            await runner.call(a, "lookup", {"name": "db"})
        assert info.value.code == "not_found"
        assert runner.gauges()["registry_entries"] == 1

    await run_with(runner, go)


async def test_groups_members_and_paging() -> None:
    runner, _, _ = make()
    conns = [FakeConn(i, pid=100 + i) for i in range(1, 4)]

    async def go() -> None:
        for c in conns:
            await runner.call(c, "group.join", {"group": "workers", "meta": {"i": str(c.id)}})
        await runner.call(conns[0], "group.join", {"group": "cache"})
        with pytest.raises(ApiError) as info:  # a connection joins a group once
            await runner.call(conns[0], "group.join", {"group": "cache"})
        assert info.value.code == "conflict"
        members = await runner.call(None, "group.members", {"group": "workers"})
        assert [e["pid"] for e in members["entries"]] == [101, 102, 103]
        assert members["more"] is False
        assert (await runner.call(None, "group.members", {"group": "workers", "limit": 2}))[
            "more"
        ] is True
        groups = await runner.call(None, "groups", {})
        assert groups == {
            "groups": [
                {"scope": "default", "group": "cache", "members": 1},
                {"scope": "default", "group": "workers", "members": 3},
            ],
            "more": False,
        }
        page = await runner.call(None, "groups", {"limit": 1})
        assert page["more"] and page["groups"][0]["group"] == "cache"
        page = await runner.call(None, "groups", {"after": ["default", "cache"]})
        assert [g["group"] for g in page["groups"]] == ["workers"]
        await runner.call(conns[1], "update", {"group": "workers", "meta": {"x": "y"}})
        await runner.call(conns[1], "group.leave", {"group": "workers"})
        members = await runner.call(None, "group.members", {"group": "workers"})
        assert [e["pid"] for e in members["entries"]] == [101, 103]
        with pytest.raises(ApiError):
            await runner.call(conns[1], "group.leave", {"group": "workers"})
        for i in range(5):
            await runner.call(conns[2], "register", {"name": f"n{i}"})
        first = await runner.call(None, "list", {"limit": 2})
        assert [e["name"] for e in first["entries"]] == ["n0", "n1"] and first["more"]
        rest = await runner.call(None, "list", {"after": ["default", "n1"]})
        assert [e["name"] for e in rest["entries"]] == ["n2", "n3", "n4"]

    await run_with(runner, go)


async def test_bad_args_are_refused_before_the_core() -> None:
    runner, _, _ = make()
    conn = FakeConn(1)

    async def go() -> None:
        for op, args in [
            ("register", {}),
            ("register", {"name": ""}),
            ("register", {"name": "x", "meta": {"k": 1}}),
            ("register", {"name": "x", "wait": "forever"}),
            ("register", {"name": "x", "wait": "settled", "timeout_s": 0}),
            ("register", {"name": "x", "wait": "settled", "timeout_s": True}),
            ("register", {"name": "x", "scope": ""}),
            ("register", {"name": "x" * 300}),  # the core's limit
            ("register", {"name": "x", "meta": {"k": "v" * 600}}),
            ("update", {"name": "x", "group": "y", "meta": {}}),
            ("update", {"name": "x"}),
            ("list", {"limit": 0}),
            ("list", {"after": ["only-scope"]}),
            ("group.members", {}),
        ]:
            with pytest.raises(ApiError) as info:
                await runner.call(conn, op, args)
            assert info.value.code == "bad_args", (op, args)
        assert (await runner.call(conn, "list", {}))["entries"] == []

    await run_with(runner, go)


async def test_closed_connection_drops_its_entries_and_watchers_see_it() -> None:
    runner, _, _ = make()
    a, b = FakeConn(1), FakeConn(2)
    events = runner.watch(b, ["registry"])
    members_only = runner.watch(b, ["members"])

    async def go() -> None:
        await runner.call(a, "register", {"name": "svc"})
        await runner.call(a, "group.join", {"group": "g"})
        await runner.call(b, "register", {"name": "other"})
        a.closed = True
        runner.connection_closed(a)
        await barrier(runner)
        page = await runner.call(None, "list", {})
        assert [e["name"] for e in page["entries"]] == ["other"]
        assert (await runner.call(None, "groups", {}))["groups"] == []
        # A command of the closed connection still queued is refused.
        with pytest.raises(ApiError) as info:
            await runner.call(a, "register", {"name": "late"})
        assert info.value.code == "unavailable"

    await run_with(runner, go)
    seen = []
    while True:
        try:
            seen.append(events.receive_nowait())
        except (trio.WouldBlock, trio.EndOfChannel):
            break
    assert [(ev, d["name"]) for ev, d in seen] == [
        ("registered", "svc"),
        ("joined", "g"),
        ("registered", "other"),
        ("unregistered", "svc"),
        ("left", "g"),
    ]
    assert seen[0][1]["node_name"] == "n1" and seen[0][1]["pid"] == 4321
    with pytest.raises((trio.WouldBlock, trio.EndOfChannel)):
        members_only.receive_nowait()


async def test_connection_closed_never_blocks_when_the_input_channel_is_full() -> None:
    runner, node, _ = make()
    conn = FakeConn(1)

    async def go() -> None:
        await runner.call(conn, "register", {"name": "svc"})

    await run_with(runner, go)  # the loop stops; the next one takes the deferred input
    while True:  # fill the input channel
        try:
            runner.send_channel.send_nowait(ConnClosed(999))
        except trio.WouldBlock:
            break
    conn.closed = True
    runner.connection_closed(conn)
    assert runner.counters["conn_closed_deferred"] == 1
    await run_with(runner, lambda: barrier(runner))
    assert node.registry.state.lookup("default", "svc") is None


async def test_conflict_goes_to_the_owner_connection_and_to_watchers() -> None:
    runner, _, log = make()
    owner, watcher = FakeConn(1), FakeConn(2)
    events = runner.watch(watcher, ["registry"])

    async def go() -> dict[str, Any]:
        mine = await runner.call(owner, "register", {"name": "db"})
        # Another node's older claim of the same name arrives.
        await runner.send_channel.send(
            PacketIn(("127.0.0.9", 7950), older_claim_packet("db", mine["claimed_ms"] - 1))
        )
        await barrier(runner)
        got: dict[str, Any] = await runner.call(watcher, "lookup", {"name": "db"})
        return got

    holder = await run_with(runner, go)
    assert holder["node"] == OTHER.hex() and holder["pid"] == 55
    assert holder["node_name"] == "other"  # a member we know (it announced itself)
    assert holder["node_addr"] == "127.0.0.9:7950"
    assert len(owner.pushed) == 1 and not watcher.pushed
    stream, event, data = owner.pushed[0]
    assert (stream, event) == (CONNECTION_STREAM, "conflict")
    assert data["name"] == "db" and data["pid"] == 4321
    assert data["winner"]["pid"] == 55 and data["winner"]["node"] == OTHER.hex()
    names = []
    while True:
        try:
            names.append(events.receive_nowait()[0])
        except (trio.WouldBlock, trio.EndOfChannel):
            break
    assert "conflict" in names and names.index("conflict") < names.index("unregistered")
    assert "registry conflict: a local claim lost its name" in log.getvalue()


async def test_settled_wait_alone_and_leaving() -> None:
    runner, _, _ = make()
    conn = FakeConn(1)

    async def go() -> None:
        got = await runner.call(conn, "register", {"name": "x", "wait": "settled", "timeout_s": 1})
        assert got["settled"] is True and got["won"] is True  # nobody else to ask
        runner._begin_leave()
        with pytest.raises(ApiError) as info:
            await runner.call(conn, "register", {"name": "y"})
        assert info.value.code == "unavailable"

    await run_with(runner, go)


async def test_call_batch_answers_in_order_with_errors_in_place() -> None:
    runner, _, _ = make()
    conn = FakeConn(1)
    assert runner.batchable("register", {"name": "x"})
    assert not runner.batchable("register", {"name": "x", "wait": "settled"})
    assert not runner.batchable("list", {}) and not runner.batchable("status", {})

    async def go() -> list[Any]:
        out: list[Any] = await runner.call_batch(
            conn,
            [
                ("register", {"name": "a"}),
                ("register", {"name": "a"}),
                ("register", {"nom": "b"}),
                ("lookup", {"name": "a"}),
                ("lookup", {"name": "zz"}),
                ("group.join", {"group": "g"}),
                ("update", {"name": "a", "meta": {"m": "1"}}),
                ("unregister", {"name": "a"}),
                ("group.leave", {"group": "g"}),
            ],
        )
        return out

    out = await run_with(runner, go)
    assert out[0]["name"] == "a" and out[0]["node_name"] == "n1"
    assert [type(r).__name__ for r in out] == [
        "dict",
        "ApiError",
        "ApiError",
        "dict",
        "ApiError",
        "dict",
        "dict",
        "dict",
        "dict",
    ]
    assert [r.code for r in out if isinstance(r, ApiError)] == ["conflict", "bad_args", "not_found"]
    assert out[3]["pid"] == 4321 and out[6]["meta"] == {"m": "1"} and out[7] == {}


async def test_unknown_topic_still_refused_and_registry_accepted() -> None:
    runner, _, _ = make()
    runner.watch("c", ["registry", "members"])
    with pytest.raises(ApiError) as info:
        runner.watch("c", ["messages"])
    assert info.value.code == "bad_args"


# --- through the API server and the client ----------------------------------------------


@pytest.fixture
async def daemon(nursery: trio.Nursery) -> AsyncIterator[tuple[Runner, ApiServer, str]]:
    path = os.path.join(tempfile.mkdtemp(prefix="pdreg-"), "peerd.sock")
    runner, _, _ = make()
    nursery.start_soon(runner.run)
    server: ApiServer = await nursery.start(serve_api, path, runner)
    yield runner, server, path
    shutil.rmtree(os.path.dirname(path), ignore_errors=True)


async def test_client_pipelines_registrations_bound_to_its_connection(
    daemon: tuple[Runner, ApiServer, str],
) -> None:
    runner, _, path = daemon
    with trio.fail_after(10):
        async with Client(path) as a, Client(path) as b:
            results: dict[int, dict[str, Any]] = {}

            async def reg(i: int) -> None:
                results[i] = await a.register(f"svc-{i:03d}", {"i": str(i)})

            async with trio.open_nursery() as n:
                for i in range(300):
                    n.start_soon(reg, i)
            assert all(r["pid"] == os.getpid() for r in results.values())  # SO_PEERCRED
            assert len(await b.names(prefix="svc-")) == 300
            assert (await b.lookup("svc-007"))["meta"] == {"i": "7"}
            assert await b.lookup("nope") is None
            with pytest.raises(ApiError) as info:
                await b.register("svc-001")
            assert info.value.code == "conflict"
            await b.join_group("g", {"x": "1"})
            assert [g["members"] for g in await a.groups()] == [1]
            assert (await a.group_members("g"))[0]["meta"] == {"x": "1"}
            assert (await b.update("g", {"x": "2"}, group=True))["meta"] == {"x": "2"}
            await b.leave_group("g")
            assert await a.group_members("g") == []
        # Both connections are closed: their entries go.
        for _ in range(200):
            if runner.gauges()["registry_entries"] == 0:
                break
            await trio.sleep(0.01)
        assert runner.gauges()["registry_entries"] == 0


async def test_client_receives_conflicts_as_connection_events(
    daemon: tuple[Runner, ApiServer, str],
) -> None:
    runner, _, path = daemon
    seen: list[str] = []
    with trio.fail_after(10):
        async with Client(path, on_connection_event=lambda ev: seen.append(ev.event)) as c:
            mine = await c.register("db")
            await runner.send_channel.send(
                PacketIn(
                    ("127.0.0.9", 7950), older_claim_packet("db", mine["claimed_ms"] - 5, pid=77)
                )
            )
            async for ev in c.connection_events():
                assert ev.stream == CONNECTION_STREAM and ev.event == "conflict"
                assert ev.data["name"] == "db" and ev.data["winner"]["pid"] == 77
                break
            assert seen == ["conflict"]
            assert (await c.lookup("db"))["pid"] == 77
