"""The ``peerd`` CLI: formatting functions, and main() run in a worker thread
against the real API server with the fake backend."""

from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import socket
import types
from typing import Any

import pytest
import trio

from peerd import cli
from peerd.api.protocol import Event
from peerd.shell.api_server import ApiServer

from .conftest import MEMBERS, NODE_ID, FakeBackend

TIMEOUT = 10


async def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """main(argv) in a thread (it blocks on its socket) with a bounded wait."""
    with trio.fail_after(TIMEOUT):
        code = await trio.to_thread.run_sync(cli.main, list(argv), abandon_on_cancel=True)
    out, err = capsys.readouterr()
    return code, out, err


# --- formatting -----------------------------------------------------------------------


def test_format_members_table() -> None:
    lines = cli.format_members(list(reversed(MEMBERS))).splitlines()
    assert lines[0].split() == ["NAME", "ID", "ADDRESS", "STATUS", "INC", "TAGS"]
    assert lines[1].split() == [
        "alpha",
        NODE_ID[:8],
        "10.0.0.1:7946",
        "alive",
        "3",
        "dc=eu,role=db",
    ]
    assert lines[2].split() == ["beta", "ffffffff", "[fd00::2]:7946", "suspect", "1", "-"]
    # Columns line up: every row has its address at the same offset.
    assert (
        len(
            {
                line.index(cell)
                for line, cell in zip(lines, ["ADDRESS", "10.0", "[fd00"], strict=True)
            }
        )
        == 1
    )


def test_format_status() -> None:
    text = cli.format_status(
        {
            "name": "a",
            "id": NODE_ID,
            "addr": "1.2.3.4:5",
            "incarnation": 2,
            "generation": 7,
            "health": 0,
            "version": "1",
            "members": {"alive": 3, "dead": 1},
        }
    )
    assert "members      3 alive, 0 suspect, 1 dead, 0 left" in text
    assert "health       0 (healthy)" in text
    assert "leaving" not in text
    assert "leaving" in cli.format_status({"health": 2, "leaving": True})


def test_format_event() -> None:
    when = datetime.datetime(2024, 1, 2, 3, 4, 5)
    ev = Event(1, "name_conflict", {**MEMBERS[0], "other": MEMBERS[1]})
    line = cli.format_event(ev, when)
    assert line.startswith("03:04:05 name_conflict alpha 00112233 10.0.0.1:7946 alive inc=3")
    assert line.endswith("other=beta ffffffff [fd00::2]:7946")
    record = json.loads(cli.event_json(Event(1, "dead", MEMBERS[1]), when))
    assert record["event"] == "dead" and record["data"] == MEMBERS[1]


def test_tag_assignment_parsing() -> None:
    assert cli.parse_tag_assignment("a=b=c") == ("a", "b=c")
    assert cli.parse_tag_assignment("a=") == ("a", "")
    for bad in ["a", "=b"]:
        with pytest.raises(argparse.ArgumentTypeError):
            cli.parse_tag_assignment(bad)


def test_resolve_join_addrs() -> None:
    def resolver(host: str, port: int | None, **kw: Any) -> list[tuple[Any, ...]]:
        assert host == "db.example" and kw["type"] == socket.SOCK_DGRAM
        return [
            (socket.AF_INET, 0, 0, "", ("10.0.0.5", port or 0)),
            (socket.AF_INET6, 0, 0, "", ("fd00::5", port or 0, 0, 0)),
            (socket.AF_INET, 0, 0, "", ("10.0.0.5", port or 0)),
        ]

    assert cli.resolve_join_addrs(["1.2.3.4:5", "[::1]:6", "10.0.0.9", "::2"], resolver) == [
        "1.2.3.4:5",
        "[::1]:6",
        "10.0.0.9",
        "::2",
    ]
    assert cli.resolve_join_addrs(["db.example:7950"], resolver) == [
        "10.0.0.5:7950",
        "[fd00::5]:7950",
    ]
    assert cli.resolve_join_addrs(["db.example"], resolver) == ["10.0.0.5", "[fd00::5]"]
    for bad in ["db.example:x", "[::1", "1.2.3.4:99999"]:
        with pytest.raises(cli.CliError) as info:
            cli.resolve_join_addrs([bad], resolver)
        assert info.value.exit_code == cli.EXIT_USAGE

    def failing(host: str, port: int | None, **kw: Any) -> list[tuple[Any, ...]]:
        raise socket.gaierror(-2, "Name or service not known")

    with pytest.raises(cli.CliError, match="cannot resolve 'nowhere'") as info:
        cli.resolve_join_addrs(["nowhere:1"], failing)
    assert info.value.exit_code == cli.EXIT_FAILED


# --- commands against a server ------------------------------------------------------------


async def test_members(server: ApiServer, capsys: pytest.CaptureFixture[str]) -> None:
    sock = ["--api-socket", str(server.path)]
    code, out, err = await run_cli(capsys, "members", *sock)
    assert (code, err) == (0, "")
    assert [line.split()[0] for line in out.splitlines()] == ["NAME", "alpha", "beta"]
    code, out, _ = await run_cli(capsys, "members", "--json", *sock)
    listed = json.loads(out)
    assert code == 0 and listed == MEMBERS
    assert {"name", "id", "addr", "status", "incarnation", "tags"} <= listed[0].keys()
    code, out, _ = await run_cli(capsys, "members", "--status", "suspect", "--json", *sock)
    assert [m["name"] for m in json.loads(out)] == ["beta"]


async def test_status(server: ApiServer, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = await run_cli(capsys, "status", "--api-socket", str(server.path))
    assert code == 0 and out.startswith("name         alpha\n")
    code, out, _ = await run_cli(capsys, "status", "--json", "--api-socket", str(server.path))
    assert code == 0 and json.loads(out)["members"]["suspect"] == 1


async def test_tags(
    server: ApiServer, backend: FakeBackend, capsys: pytest.CaptureFixture[str]
) -> None:
    sock = ["--api-socket", str(server.path)]
    code, out, _ = await run_cli(capsys, "tags", "set", "zone=b", "role=web", *sock)
    assert code == 0 and out == "dc=eu\nrole=web\nzone=b\n"
    code, out, _ = await run_cli(capsys, "tags", "delete", "dc", "missing", *sock)
    assert code == 0 and out == "role=web\nzone=b\n"
    code, out, _ = await run_cli(capsys, "tags", "set", "--replace", "only=1", *sock)
    assert code == 0 and backend.tags == {"only": "1"}
    code, _, err = await run_cli(capsys, "tags", "set", "novalue", *sock)
    assert code == 2 and "KEY=VALUE" in err
    code, _, err = await run_cli(capsys, "tags", "set", "k" * 100 + "=v", *sock)
    assert code == 1 and err.count("\n") == 1 and "(bad_args)" in err


async def test_join_and_leave(
    server: ApiServer, backend: FakeBackend, capsys: pytest.CaptureFixture[str]
) -> None:
    sock = ["--api-socket", str(server.path)]
    code, out, _ = await run_cli(capsys, "join", "10.0.0.2:7950", "192.0.2.1:7950", *sock)
    assert code == 0 and out == "joined: 1 answered, 1 failed\n"
    code, _, err = await run_cli(capsys, "join", "192.0.2.1:7950", *sock)
    assert code == 1 and "no address answered" in err
    code, _, err = await run_cli(capsys, "join", "[::1", *sock)
    assert code == 2 and "missing ']'" in err
    code, out, _ = await run_cli(capsys, "leave", *sock)
    assert code == 0 and backend.left


async def test_keys(
    server: ApiServer,
    backend: FakeBackend,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sock = ["--api-socket", str(server.path)]
    code, out, _ = await run_cli(capsys, "keys", "list", *sock)
    assert code == 0 and out.splitlines()[1].split() == ["k1", "primary"]
    monkeypatch.setattr("sys.stdin", io.StringIO("k2\n"))
    code, out, _ = await run_cli(capsys, "keys", "install", "-", *sock)
    assert code == 0 and backend.keys[-1] == {"id": "k2", "primary": False}
    code, out, _ = await run_cli(capsys, "keys", "list", "--json", *sock)
    assert [k["id"] for k in json.loads(out)] == ["k1", "k2"]
    code, _, err = await run_cli(capsys, "keys", "use", "k9", *sock)
    assert code == 1 and err == "peerd keys: no key k9 (not_found)\n"


def test_keys_generate(capsys: pytest.CaptureFixture[str]) -> None:
    seal = pytest.importorskip("peerd.wire.seal")
    assert cli.main(["keys", "generate"]) == 0
    line = capsys.readouterr().out
    assert line.count("\n") == 1 and len(line) > 20
    seal.parse_key(line)  # what install accepts


async def test_watch(
    server: ApiServer, backend: FakeBackend, capsys: pytest.CaptureFixture[str]
) -> None:
    async def feed() -> None:
        await backend.watch_registered.wait()
        backend.emit("joined", MEMBERS[1])
        backend.emit("name_conflict", {**MEMBERS[0], "other": MEMBERS[1]})
        backend.end_watches()

    for flag in ([], ["--json"]):
        backend.watch_registered = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(feed)
            code, out, err = await run_cli(capsys, "watch", *flag, "--api-socket", str(server.path))
        lines = out.splitlines()
        assert code == 0 and len(lines) == 2 and "ended the stream" in err
        if flag:
            assert [json.loads(line)["event"] for line in lines] == ["joined", "name_conflict"]
        else:
            assert lines[0].split()[1:4] == ["joined", "beta", "ffffffff"]


async def test_daemon_unreachable(sock_dir: str, capsys: pytest.CaptureFixture[str]) -> None:
    path = os.path.join(sock_dir, "none.sock")
    code, out, err = await run_cli(capsys, "members", "--api-socket", path)
    assert code == 3 and out == ""
    assert err == (
        f"peerd members: peerd is not running at {path}? (connect: No such file or directory)\n"
    )


async def test_socket_from_environment(
    server: ApiServer, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PEERD_API_SOCKET", str(server.path))
    code, out, _ = await run_cli(capsys, "status", "--json")
    assert code == 0 and json.loads(out)["name"] == "alpha"


def test_usage_help_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([]) == 2
    assert "COMMAND" in capsys.readouterr().err
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip().startswith("peerd ")
    assert cli.main(["--help"]) == 0
    assert "exit codes" in capsys.readouterr().out
    assert cli.main(["nope"]) == 2
    assert cli.main(["keys"]) == 2
    for command in ["status", "members", "watch", "join", "leave", "tags", "keys"]:
        assert cli.main([command, "--help"]) == 0
        assert "usage: peerd" in capsys.readouterr().out


def test_agent_is_loaded_lazily(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}

    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--bind")

    def run(args: argparse.Namespace) -> int:
        seen["bind"] = args.bind
        return 7

    fake = types.SimpleNamespace(add_arguments=add_arguments, run=run)
    loads: list[int] = []

    def import_agent() -> Any:
        loads.append(1)
        return fake

    monkeypatch.setattr(cli.parser, "_import_agent", import_agent)
    assert cli.main(["members", "--help"]) == 0
    assert loads == []  # client commands never import the agent
    assert cli.main(["agent", "--bind", "1.2.3.4:5"]) == 7
    assert seen == {"bind": "1.2.3.4:5"}


def test_agent_missing(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(cli.parser, "_import_agent", lambda: None)
    assert cli.main(["agent"]) == 1
    assert "not available" in capsys.readouterr().err
