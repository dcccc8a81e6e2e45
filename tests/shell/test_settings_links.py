"""The [links] and [messages] settings: parsing, validation, and that they
reach the link manager, the names core and the API server."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import trio
import trio.testing

from peerd.api.client import BlockingClient
from peerd.api.protocol import ApiError
from peerd.shell import agent
from peerd.shell.links import LinkLimits, LinkLost
from peerd.shell.messaging import MessageLimits
from peerd.shell.settings import SettingsError, check_config, resolve
from peerd.shell.tags import NodeTags
from peerd.wire.messages import Ack
from tests.shell.test_agent import api, start, stop, wait_for
from tests.shell.test_links_supersede import A, side_b
from tests.shell.test_runner import make_runner
from tests.shell.test_runner_mesh import FakeLinks
from tests.shell.test_settings import parse_args, write


def test_defaults_are_todays_values(tmp_path: Path) -> None:
    s = check_config(write(tmp_path, ""))
    assert s.links == LinkLimits() and s.messages == MessageLimits()
    assert (s.links.idle_s, s.links.max_direct_links, s.links.connect_timeout_s) == (60, 32, 5)
    assert (s.messages.send_timeout_s, s.messages.mailbox_messages, s.messages.mailbox_bytes) == (
        10,
        16384,
        16 * 1024 * 1024,
    )


def test_tables_set_their_fields(tmp_path: Path) -> None:
    s = check_config(
        write(
            tmp_path,
            """
[links]
max_links = 64
max_direct_links = 8
idle_s = 4
connect_timeout_s = 1.5
handshake_timeout_s = 2
write_timeout_s = 20
drain_timeout_s = 3

[messages]
send_timeout_s = 2.5
mailbox_messages = 100
mailbox_bytes = 1048576
""",
        )
    )
    assert s.links == dataclasses.replace(
        LinkLimits(),
        max_links=64,
        max_direct_links=8,
        idle_s=4.0,
        connect_timeout_s=1.5,
        handshake_timeout_s=2.0,
        write_timeout_s=20.0,
        drain_timeout_s=3.0,
        reap_interval_s=2.0,
    )  # idle links are looked for twice per idle_s
    assert s.messages == MessageLimits(
        send_timeout_s=2.5, mailbox_messages=100, mailbox_bytes=1048576
    )
    assert isinstance(s.links.idle_s, float)


@pytest.mark.parametrize(
    "table",
    [
        "write_timeout_s = 4\n",  # the default drain_timeout_s is 5
        "write_timeout_s = 3\ndrain_timeout_s = 3\n",
    ],
)
def test_drain_timeout_must_stay_below_write_timeout(tmp_path: Path, table: str) -> None:
    # The new link is not read while the old one drains: the peer's writes
    # on it must not reach write_timeout_s.
    with pytest.raises(SettingsError) as info:
        check_config(write(tmp_path, "[links]\n" + table))
    assert info.value.key == "links.drain_timeout_s"
    assert "below links.write_timeout_s" in str(info.value)
    s = check_config(write(tmp_path, "[links]\nwrite_timeout_s = 3\ndrain_timeout_s = 2.9\n"))
    assert (s.links.write_timeout_s, s.links.drain_timeout_s) == (3, 2.9)


def test_agent_refuses_a_bad_table_with_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, "[links]\nidle_time = 5\n")
    assert agent.run(parse_args("--config", str(path))) == 2
    assert "links.idle_time: unknown setting" in capsys.readouterr().err
    assert agent.run(parse_args("--check-config", str(path))) == 2


async def test_idle_s_from_the_file_closes_an_idle_direct_link(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    # Memory streams under the mock clock (tests.shell.test_links_supersede):
    # no sockets, so nothing here depends on how busy the host is.
    limits = resolve(parse_args("--config", str(write(tmp_path, "[links]\nidle_s = 4\n")))).links
    async with side_b(queue=16, limits=limits) as b:
        peer = await b.open()
        assert b.links.send(A, Ack(1), mesh=False)  # direct traffic
        assert await peer.receive() == (Ack(1),)
        t0 = trio.current_time()
        assert await b.next() == LinkLost(A, False)
        assert 4 <= trio.current_time() - t0 <= 6  # 4 s idle, then a reaper round (2 s)
        assert b.net.counters["link_idle_closed"] == 1
        assert await peer.receive() is None  # and closed on the peer


def test_send_timeout_s_reaches_the_names_core_and_the_api_texts(tmp_path: Path) -> None:
    s = check_config(write(tmp_path, "[messages]\nsend_timeout_s = 2.5\n"))
    peer = agent.make_peer(s, b"\x01" * 16, ("127.0.0.1", 7950), 0, 1, NodeTags({}))
    assert peer.names is not None and peer.names.config.send_timeout_s == 2.5
    assert peer.mesh is not None
    runner, _, _ = make_runner(peer, links=FakeLinks())  # type: ignore[arg-type]
    assert runner.sends is not None and runner.sends.send_timeout_s == 2.5


@pytest.mark.proc
def test_mailbox_messages_from_the_file_reach_the_api_server(tmp_path: Path) -> None:
    # With the default mailbox (16,384 messages, 16 MiB) 40 messages of
    # 256 KiB to a process that does not read all fit; with one, they do not.
    config = write(tmp_path, "[messages]\nmailbox_messages = 1\n")
    proc = start(tmp_path, "a", "127.0.0.1", "--config", str(config))
    try:
        wait_for("a's API", lambda: api(tmp_path / "a.sock", "status"))
        with (
            BlockingClient(tmp_path / "a.sock", timeout=10) as holder,
            BlockingClient(tmp_path / "a.sock", timeout=10) as sender,
        ):
            holder.register("db")  # and then reads nothing
            error = None
            for _ in range(40):
                try:
                    sender.send("db", b"x" * 256 * 1024)
                except ApiError as e:
                    error = e
                    break
            assert error is not None and "mailbox full" in error.message
    finally:
        code, err = stop(proc)
    assert code == 0, err
