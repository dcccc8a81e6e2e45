"""Registry over the API: argument parsing and converters (sans-I/O), the
server's batching of quick requests and connection events (stream 0), the
client methods (trio and blocking), and the registry CLI commands, against a
fake backend on a real Unix socket."""

from __future__ import annotations

import datetime
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import pytest
import trio

from peerd import cli
from peerd.api.client import BlockingClient, Client
from peerd.api.protocol import (
    CONNECTION_STREAM,
    ApiError,
    ErrorCode,
    Event,
    encode_frame,
    parse_list_args,
    parse_register_args,
    parse_server_frame,
    parse_target_args,
    parse_update_args,
    reg_entry_to_wire,
    registry_event_to_wire,
)
from peerd.core.events import MemberInfo, RegEventKind, RegistryEvent
from peerd.shell.api_server import ApiServer, Connection
from peerd.wire.messages import RegEntry, RegKind, Status

from .conftest import NODE_ID, FakeBackend, RawConn

TIMEOUT = 10
NODE_B = "ab" * 16

# --- sans-I/O ---------------------------------------------------------------------------


def test_parse_register_args_defaults_and_limits() -> None:
    a = parse_register_args({"name": "db", "meta": {"z": "1", "a": "2"}})
    assert (a.kind, a.scope, a.name, a.meta, a.settle_s) == (
        RegKind.NAME,
        "default",
        "db",
        (("a", "2"), ("z", "1")),
        None,
    )
    g = parse_register_args({"group": "w", "scope": "s", "wait": "settled"}, RegKind.GROUP)
    assert (g.kind, g.scope, g.name, g.settle_s) == (RegKind.GROUP, "s", "w", 5.0)
    assert parse_register_args({"name": "x", "wait": "settled", "timeout_s": 0.5}).settle_s == 0.5
    for bad in [
        {},
        {"name": 3},
        {"name": ""},
        {"name": "x", "scope": ""},
        {"name": "x", "meta": []},
        {"name": "x", "meta": {"k": None}},
        {"name": "x", "wait": "now"},
        {"name": "x", "wait": "settled", "timeout_s": 61},
        {"name": "x", "wait": "settled", "timeout_s": "1"},
    ]:
        with pytest.raises(ApiError) as info:
            parse_register_args(bad)
        assert info.value.code == ErrorCode.BAD_ARGS, bad
    with pytest.raises(ApiError):
        parse_register_args({"name": "x"}, RegKind.GROUP)  # groups use "group"


def test_parse_target_update_and_list_args() -> None:
    t = parse_target_args({"group": "g"}, RegKind.GROUP)
    assert (t.kind, t.scope, t.name) == (RegKind.GROUP, "default", "g")
    u = parse_update_args({"group": "g", "meta": {}})
    assert (u.kind, u.name, u.meta) == (RegKind.GROUP, "g", ())
    for bad in [{"meta": {}}, {"name": "a", "group": "b", "meta": {}}, {"name": "a"}]:
        with pytest.raises(ApiError):
            parse_update_args(bad)
    page = parse_list_args({})
    assert (page.scope, page.prefix, page.after, page.limit) == (None, "", None, 1000)
    page = parse_list_args({"scope": "s", "prefix": "p", "after": ["s", "n"], "limit": 5})
    assert (page.scope, page.prefix, page.after, page.limit) == ("s", "p", ("s", "n"), 5)
    for bad in [
        {"scope": ""},
        {"prefix": 1},
        {"after": "x"},
        {"after": ["a", 1]},
        {"limit": 0},
        {"limit": 10_001},
        {"limit": True},
    ]:
        with pytest.raises(ApiError):
            parse_list_args(bad)


def test_entry_and_event_converters() -> None:
    me, other = bytes.fromhex(NODE_ID), bytes.fromhex(NODE_B)
    member = MemberInfo(me, "alpha", ("10.0.0.1", 7946), Status.ALIVE, 1, 1, ())
    loser = RegEntry(3, RegKind.NAME, "default", "db", 2000, 10, 1000, (("k", "v"),))
    winner = RegEntry(1, RegKind.NAME, "default", "db", 1000, 20, 0, ())
    data = reg_entry_to_wire(me, loser, member)
    assert data == {
        "kind": "name",
        "scope": "default",
        "name": "db",
        "node": NODE_ID,
        "node_name": "alpha",
        "node_addr": "10.0.0.1:7946",
        "pid": 10,
        "uid": 1000,
        "meta": {"k": "v"},
        "claimed_ms": 2000,
    }
    ev = RegistryEvent(RegEventKind.CONFLICT, me, loser, 7, (other, winner))
    name, data = registry_event_to_wire(ev, {me: member}.get)
    assert name == "conflict" and data["node_name"] == "alpha"
    assert data["winner"]["node"] == NODE_B and "node_name" not in data["winner"]
    assert registry_event_to_wire(RegistryEvent(RegEventKind.LEFT, me, loser))[0] == "left"


# --- a fake registry backend ---------------------------------------------------------------


class RegistryBackend(FakeBackend):
    """FakeBackend plus an in-memory registry with batching, and a hook that
    pushes a connection event after a register of a name starting with
    ``lose-`` (as the daemon does when the claim loses a conflict), or, for a
    name starting with ``late-``, when anyone looks it up (a loss while the
    holder runs)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_args: list[dict[str, Any]] = []
        self.conns: dict[int, Connection] = {}
        self.names: dict[tuple[str, str], dict[str, Any]] = {}
        self.groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
        self.batches: list[int] = []
        self.page = 1000

    def _entry(
        self, conn: Connection, kind: str, scope: str, name: str, meta: dict[str, str]
    ) -> dict[str, Any]:
        pid = conn.cred.pid if conn.cred else 0
        return {
            "kind": kind,
            "scope": scope,
            "name": name,
            "node": NODE_ID,
            "node_name": "alpha",
            "node_addr": "10.0.0.1:7946",
            "pid": pid,
            "uid": 0,
            "meta": meta,
            "claimed_ms": 1_700_000_000_000,
            "conn": conn.id,
        }

    def batchable(self, op: str, args: dict[str, Any]) -> bool:
        return op in ("register", "lookup") and "wait" not in args

    async def call_batch(
        self, conn: Connection, requests: Sequence[tuple[str, dict[str, Any]]]
    ) -> list[Any]:
        self.batches.append(len(requests))
        out: list[Any] = []
        for op, args in requests:
            if args.get("name") == "boom":
                raise RuntimeError("batch bug")
            try:
                out.append(await self.call(conn, op, args))
            except ApiError as e:
                out.append(e)
        return out

    async def call(self, conn: Connection, op: str, args: dict[str, Any]) -> Any:
        scope = args.get("scope", "default")
        match op:
            case "register":
                self.register_args.append(dict(args))
                self.conns[conn.id] = conn
                key = (scope, args["name"])
                if key in self.names:
                    raise ApiError(
                        ErrorCode.CONFLICT,
                        f"{scope}/{args['name']} is held by pid {self.names[key]['pid']}",
                    )
                entry = self.names[key] = self._entry(
                    conn, "name", scope, args["name"], args.get("meta", {})
                )
                if args["name"].startswith("lose-"):
                    winner = {**entry, "node": NODE_B, "node_name": "beta", "pid": 99}
                    conn.push_nowait(CONNECTION_STREAM, "conflict", {**entry, "winner": winner})
                return {k: v for k, v in entry.items() if k != "conn"}
            case "unregister":
                if self.names.get((scope, args["name"]), {}).get("conn") != conn.id:
                    raise ApiError(ErrorCode.NOT_FOUND, "not yours")
                del self.names[(scope, args["name"])]
                return {}
            case "lookup":
                entry = self.names.get((scope, args["name"]))
                if entry is None:
                    raise ApiError(ErrorCode.NOT_FOUND, f"no name {args['name']!r}")
                owner = self.conns.get(entry["conn"])
                if args["name"].startswith("late-") and owner is not None:
                    winner = {**entry, "node": NODE_B, "node_name": "beta", "pid": 99}
                    owner.push_nowait(CONNECTION_STREAM, "conflict", {**entry, "winner": winner})
                return {k: v for k, v in entry.items() if k != "conn"}
            case "list":
                items = sorted(self.names.items())
                after = args.get("after")
                if after is not None:
                    items = [(k, v) for k, v in items if k > tuple(after)]
                page = [{k: v for k, v in e.items() if k != "conn"} for _, e in items[: self.page]]
                return {"entries": page, "more": len(items) > self.page}
            case "group.join":
                entry = self._entry(conn, "group", scope, args["group"], args.get("meta", {}))
                self.groups.setdefault((scope, args["group"]), []).append(entry)
                return entry
            case "group.members":
                return {"entries": self.groups.get((scope, args["group"]), []), "more": False}
            case "groups":
                items = sorted(self.groups.items())
                after = args.get("after")
                if after is not None:
                    items = [(k, v) for k, v in items if k > tuple(after)]
                groups = [
                    {"scope": k[0], "group": k[1], "members": len(v)} for k, v in items[: self.page]
                ]
                return {"groups": groups, "more": len(items) > self.page}
        return await super().call(conn, op, args)

    def watch(self, conn: Connection, topics: Sequence[str]) -> Any:
        self.topics = list(topics)
        return super().watch(conn, ["members"])

    def connection_closed(self, conn: Connection) -> None:
        self.names = {k: v for k, v in self.names.items() if v["conn"] != conn.id}
        for members in self.groups.values():
            members[:] = [m for m in members if m["conn"] != conn.id]
        super().connection_closed(conn)


@pytest.fixture
def backend() -> RegistryBackend:
    return RegistryBackend()


# --- the server: batches, stream 0 -----------------------------------------------------------


async def test_quick_requests_in_one_read_are_one_batch_and_one_write(
    server: ApiServer, backend: RegistryBackend, raw: Any
) -> None:
    conn: RawConn = await raw()
    frames = [
        encode_frame({"id": i, "op": "register", "args": {"name": f"n{i}"}}) for i in range(1, 41)
    ]
    frames.insert(5, encode_frame({"id": 100, "op": "status"}))  # not batchable
    frames.append(encode_frame({"id": 3, "op": "register", "args": {"name": "dup"}}))
    await conn.send(b"".join(frames))
    got: dict[int, Any] = {}
    dup_answers = []
    with trio.fail_after(TIMEOUT):
        while len(got) < 41 or not dup_answers:
            f = await conn.frame()
            assert f is not None
            if f["id"] == 3 and 3 in got:
                dup_answers.append(f)
            else:
                got[f["id"]] = f
    assert all(got[i]["ok"] and got[i]["result"]["name"] == f"n{i}" for i in range(1, 41))
    assert got[100]["result"]["name"] == "alpha"
    assert dup_answers[0]["error"]["code"] == "conflict"  # id 3 in use within the read
    assert max(backend.batches) > 1
    assert sum(backend.batches) == 40
    assert not [c for c in backend.calls if c[1] == "register" and c[2]["name"] == "dup"]


async def test_a_failing_batch_answers_internal_for_each(server: ApiServer, raw: Any) -> None:
    conn: RawConn = await raw()
    await conn.send(
        b"".join(
            encode_frame({"id": i, "op": "register", "args": {"name": n}})
            for i, n in [(1, "ok"), (2, "boom")]
        )
    )
    with trio.fail_after(TIMEOUT):
        answers = [await conn.frame(), await conn.frame()]
    assert [(a["id"], a["error"]["code"]) for a in answers if a] == [
        (1, "internal"),
        (2, "internal"),
    ]
    assert server.counters["internal_errors"] == 1


async def test_watch_may_not_use_the_connection_stream_id(server: ApiServer, raw: Any) -> None:
    conn: RawConn = await raw()
    await conn.request({"id": 0, "op": "watch", "args": {"topics": ["members"]}})
    with trio.fail_after(TIMEOUT):
        frame = await conn.frame()
    assert frame is not None and frame["id"] == 0 and frame["error"]["code"] == "bad_args"
    await conn.request({"id": 0, "op": "status"})  # id 0 is fine for other requests
    with trio.fail_after(TIMEOUT):
        frame = await conn.frame()
    assert frame is not None and frame["ok"]


def test_connection_events_parse_as_events() -> None:
    msg = parse_server_frame({"stream": 0, "event": "conflict", "data": {"name": "x"}})
    assert isinstance(msg, Event) and msg.stream == CONNECTION_STREAM


# --- the clients ------------------------------------------------------------------------------


async def test_trio_client_registry_methods(server: ApiServer, backend: RegistryBackend) -> None:
    assert server.path is not None
    backend.page = 2  # make the client page through
    seen: list[Event] = []
    with trio.fail_after(TIMEOUT):
        async with Client(server.path, on_connection_event=seen.append) as c:
            got = await c.register("db", {"port": "1"}, scope="s")
            assert got["pid"] == os.getpid() and got["meta"] == {"port": "1"}
            assert (await c.lookup("db", scope="s"))["name"] == "db"
            assert await c.lookup("db") is None
            for i in range(5):
                await c.register(f"n{i}")
            names = await c.names()
            assert [(e["scope"], e["name"]) for e in names] == [
                ("default", f"n{i}") for i in range(5)
            ] + [("s", "db")]
            for g in ["a", "b", "c"]:
                await c.join_group(g)
            assert [g["group"] for g in await c.groups()] == ["a", "b", "c"]
            assert len(await c.group_members("b")) == 1
            await c.unregister("db", scope="s")
            with pytest.raises(ApiError):
                await c.unregister("db", scope="s")
            await c.register("lose-this")
            async for ev in c.connection_events():
                assert ev.event == "conflict" and ev.data["winner"]["node_name"] == "beta"
                break
            assert [e.event for e in seen] == ["conflict"]
    # The connection's end dropped its entries.
    with trio.fail_after(TIMEOUT):
        await backend.closed_event.wait()
    assert backend.names == {}


async def test_blocking_client_keeps_connection_events(
    server: ApiServer, backend: RegistryBackend
) -> None:
    assert server.path is not None
    path = server.path

    def run() -> None:
        with BlockingClient(path, timeout=TIMEOUT) as c:
            c.register("lose-1")
            c.register("plain")
            assert c.lookup("plain") is not None and c.lookup("zzz") is None
            events = c.connection_events()
            assert [e.event for e in events] == ["conflict"] and c.connection_events() == []
            c.register("lose-2")
            ev = c.wait_connection_event(0)  # already read with the reply
            assert ev is not None and ev.data["name"] == "lose-2"
            assert c.wait_connection_event(0.05) is None
            c.join_group("g")
            assert [g["group"] for g in c.groups()] == ["g"]
            assert c.group_members("g")[0]["kind"] == "group"
            assert [e["name"] for e in c.names()] == ["lose-1", "lose-2", "plain"]
            c.unregister("plain")

    with trio.fail_after(TIMEOUT):
        await trio.to_thread.run_sync(run)


# --- the CLI -----------------------------------------------------------------------------------


async def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    with trio.fail_after(TIMEOUT):
        code = await trio.to_thread.run_sync(cli.main, list(argv), abandon_on_cancel=True)
    out, err = capsys.readouterr()
    return code, out, err


async def hold(path: str, *names: str) -> trio.SocketStream:
    """A connection that registers ``names`` and stays open."""
    stream = await trio.open_unix_socket(path)
    for i, name in enumerate(names, 1):
        await stream.send_all(
            encode_frame({"id": i, "op": "register", "args": {"name": name, "meta": {"k": "v"}}})
        )
    conn = RawConn(stream)
    for _ in names:
        frame = await conn.frame()
        assert frame is not None and frame["ok"]
    return stream


async def test_cli_names_lookup_groups_members_of(
    server: ApiServer, backend: RegistryBackend, capsys: pytest.CaptureFixture[str]
) -> None:
    assert server.path is not None
    sock = ["--api-socket", server.path]
    stream = await hold(server.path, "web", "db")
    code, out, _ = await run_cli(capsys, "names", *sock)
    lines = out.splitlines()
    assert code == 0 and lines[0].split() == ["SCOPE", "NAME", "NODE", "PID", "META"]
    assert lines[1].split() == [
        "default",
        "db",
        "alpha",
        f"({NODE_ID[:8]})",
        str(os.getpid()),
        "k=v",
    ]
    code, out, _ = await run_cli(capsys, "names", "--json", *sock)
    assert [e["name"] for e in json.loads(out)] == ["db", "web"]
    code, out, _ = await run_cli(capsys, "lookup", "web", *sock)
    assert code == 0 and "node     alpha" in out and f"node id  {NODE_ID}" in out
    assert f"pid      {os.getpid()}" in out and "meta     k=v" in out
    assert "claimed  2023-11-14T22:13:20.000Z" in out
    code, out, err = await run_cli(capsys, "lookup", "nope", *sock)
    assert code == 1 and out == "" and "not_found" in err
    code, out, _ = await run_cli(capsys, "lookup", "db", "--json", *sock)
    assert json.loads(out)["name"] == "db"
    backend.groups[("default", "w")] = [
        backend._entry(server.connections[min(server.connections)], "group", "default", "w", {})
    ]
    code, out, _ = await run_cli(capsys, "groups", *sock)
    assert code == 0 and out.splitlines()[1].split() == ["default", "w", "1"]
    code, out, _ = await run_cli(capsys, "members-of", "w", *sock)
    assert code == 0 and out.splitlines()[0].split() == ["NODE", "ADDRESS", "PID", "META"]
    assert "10.0.0.1:7946" in out.splitlines()[1]
    await stream.aclose()


async def test_cli_exec_holds_names_while_the_child_runs(
    server: ApiServer, backend: RegistryBackend, capsys: pytest.CaptureFixture[str]
) -> None:
    assert server.path is not None
    sock = ["--api-socket", server.path]
    # The child checks (through its own client) that the name is held.
    child = (
        "import sys; from peerd.api.client import BlockingClient; "
        f"c = BlockingClient({server.path!r}); "
        "e = c.lookup('job'); sys.exit(3 if e and e['meta'] == {'role': 'x'} else 9)"
    )
    code, out, err = await run_cli(
        capsys,
        "exec",
        "--name",
        "job",
        "--group",
        "workers",
        "--meta",
        "role=x",
        *sock,
        "--",
        sys.executable,
        "-c",
        child,
    )
    assert code == 3, err
    # The CLI's connection is closed; the server notices when it reads the
    # EOF (a busy host may take a moment): poll, bounded.
    with trio.fail_after(TIMEOUT):
        while backend.names or backend.groups[("default", "workers")]:
            await trio.sleep(0.001)
    # A name that is taken: exit 1 and the command does not run.
    stream = await hold(server.path, "taken")
    code, out, err = await run_cli(capsys, "exec", "--name", "taken", *sock, "--", "false")
    assert code == 1 and "cannot register 'taken'" in err and "held by pid" in err
    await stream.aclose()
    code, _, err = await run_cli(capsys, "exec", *sock, "--name", "x", "--", "/nonexistent/command")
    assert code == 127 and "cannot run" in err
    code, _, err = await run_cli(capsys, "exec", *sock, "--", "true")
    assert code == 2 and "--name or --group" in err


async def test_cli_exec_does_not_start_when_the_claim_lost(
    server: ApiServer, backend: RegistryBackend, capsys: pytest.CaptureFixture[str]
) -> None:
    assert server.path is not None
    for extra in ((), ("--no-settle",)):
        code, out, err = await run_cli(
            capsys, "exec", "--name", "lose-me", *extra, "--api-socket", server.path, "--", "echo"
        )
        assert code == 1 and out == "", err
        assert "lost the name default/lose-me to an older claim by pid 99 on node beta" in err
    # Settled by default (--no-settle opts out); the entries take no messages.
    settled, fast = backend.register_args
    assert settled["wait"] == "settled" and settled["timeout_s"] == 5.0
    assert "wait" not in fast
    assert settled["messages"] is False and fast["messages"] is False


# The child looks its own name up (the fake backend then reports the name
# lost) and waits to be stopped (bounded).
LATE_CHILD = (
    "import signal, sys, time; from peerd.api.client import BlockingClient; "
    "ignore = sys.argv[2] == 'ignore'; "
    "ignore and signal.signal(signal.SIGTERM, signal.SIG_IGN); "
    "BlockingClient(sys.argv[1]).lookup('late-job'); time.sleep(20); sys.exit(7)"
)


async def test_cli_exec_stops_the_command_when_a_name_is_lost(
    server: ApiServer, capsys: pytest.CaptureFixture[str]
) -> None:
    assert server.path is not None
    sock = ["--api-socket", server.path]
    child = [sys.executable, "-c", LATE_CHILD, server.path]
    t0 = time.monotonic()
    code, _, err = await run_cli(capsys, "exec", "--name", "late-job", *sock, "--", *child, "")
    assert code == cli.EXIT_NAME_LOST, err
    assert "lost the name default/late-job" in err and "stopping COMMAND" in err
    assert time.monotonic() - t0 < 10  # SIGTERM, not the child's own 20 s
    # A command that ignores SIGTERM is killed after the grace period.
    t0 = time.monotonic()
    code, _, err = await run_cli(
        capsys, "exec", "--name", "late-job", "--grace", "0.3", *sock, "--", *child, "ignore"
    )
    assert code == cli.EXIT_NAME_LOST and "SIGKILL" in err, err
    assert time.monotonic() - t0 < 10
    # --on-lose warn: the command runs on (here to its own end).
    child_quick = [sys.executable, "-c", LATE_CHILD.replace("time.sleep(20)", "0"), server.path]
    code, _, err = await run_cli(
        capsys, "exec", "--name", "late-job", "--on-lose", "warn", *sock, "--", *child_quick, ""
    )
    assert code == 7, err
    code, _, err = await run_cli(
        capsys, "exec", "--name", "x", "--grace", "-1", *sock, "--", "true"
    )
    assert code == 2 and "--grace" in err


async def test_cli_watch_registry_topic(
    server: ApiServer, backend: RegistryBackend, capsys: pytest.CaptureFixture[str]
) -> None:
    entry = {
        "kind": "group",
        "scope": "default",
        "name": "w",
        "node": NODE_ID,
        "node_name": "alpha",
        "pid": 7,
        "meta": {},
    }

    async def feed() -> None:
        await backend.watch_registered.wait()
        backend.emit("joined", entry)
        backend.emit("unregistered", {**entry, "kind": "name", "name": "db"})
        backend.end_watches()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(feed)
        code, out, _ = await run_cli(
            capsys,
            "watch",
            "--topic",
            "registry",
            "--topic",
            "members",
            "--api-socket",
            str(server.path),
        )
    assert code == 0 and backend.topics == ["registry", "members"]
    lines = out.splitlines()
    assert lines[0].split()[1:4] == ["joined", "group", "default/w"]
    assert lines[1].split()[1:4] == ["unregistered", "name", "default/db"]


def test_format_registry_event_and_entry() -> None:
    when = datetime.datetime(2024, 1, 2, 3, 4, 5)
    entry = {
        "kind": "name",
        "scope": "default",
        "name": "db",
        "node": NODE_ID,
        "node_name": "alpha",
        "pid": 7,
        "meta": {"a": "b"},
    }
    line = cli.format_registry_event(Event(1, "registered", entry), when)
    assert line == (
        f"03:04:05 registered    name default/db node=alpha ({NODE_ID[:8]}) pid=7 meta=a=b"
    )
    line = cli.format_registry_event(
        Event(1, "conflict", {**entry, "winner": {**entry, "node_name": "beta", "pid": 8}}), when
    )
    assert line.endswith(f"winner=beta ({NODE_ID[:8]}) pid=8")
    assert "claimed  ?" in cli.format_entry({})
