"""The systemd protocols one at a time, in process (no daemon, no systemd)."""

from __future__ import annotations

import io
import os
import socket
from pathlib import Path

import pytest
import trio

from peerd.core.events import (
    EventKind,
    JoinDone,
    LogLevel,
    MemberEvent,
    SetTimer,
    Start,
    TimerFired,
    TimerKind,
)
from peerd.core.timers import membership_timer
from peerd.shell.logs import Logger
from peerd.shell.systemd import (
    ActivationError,
    Notifier,
    PassedFd,
    SystemdLifecycle,
    listen_fds,
    notify_address,
    status_line,
    stderr_is_journal,
    take_api_socket,
    watchdog_interval,
)
from tests.shell.test_runner import PEER, FakeCore, make_runner


@pytest.fixture
def notify_socket(tmp_path: Path):  # type: ignore[no-untyped-def]
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = tmp_path / "notify"
    sock.bind(str(path))
    sock.setblocking(False)
    yield sock, str(path)
    sock.close()


def received(sock: socket.socket) -> list[str]:
    out = []
    while True:
        try:
            out.append(sock.recv(4096).decode())
        except BlockingIOError:
            return out


def test_notify_address_forms() -> None:
    assert notify_address("/run/systemd/notify") == "/run/systemd/notify"
    assert notify_address("@abstract/name") == b"\0abstract/name"
    assert notify_address("") is None
    assert notify_address(None) is None
    assert notify_address("vsock:2:1234") is None
    assert notify_address("@") is None


def test_notifier_sends_one_datagram_per_message(notify_socket) -> None:  # type: ignore[no-untyped-def]
    sock, path = notify_socket
    n = Notifier({"NOTIFY_SOCKET": path})
    assert n.enabled
    assert n.notify("READY=1", status_line("3 members:\n 3 alive"))
    assert received(sock) == ["READY=1\nSTATUS=3 members: 3 alive"]
    n.close()


def test_notifier_abstract_socket() -> None:
    name = f"peerd-test-{os.getpid()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(b"\0" + name.encode())
    sock.setblocking(False)
    try:
        n = Notifier({"NOTIFY_SOCKET": "@" + name})
        assert n.notify("WATCHDOG=1")
        assert received(sock) == ["WATCHDOG=1"]
    finally:
        sock.close()


def test_notifier_without_socket_is_a_no_op() -> None:
    n = Notifier({})
    assert not n.enabled
    assert not n.notify("READY=1")
    assert n.sent == [] and n.errors == 0


def test_notifier_never_raises_when_nobody_listens(tmp_path: Path) -> None:
    out = io.StringIO()
    n = Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone")}, logger=Logger(stream=out))
    assert not n.notify("READY=1")
    assert not n.notify("WATCHDOG=1")
    assert n.errors == 2
    assert out.getvalue().count("cannot notify systemd") == 1  # once, not per datagram


def test_watchdog_interval_is_half_of_watchdog_usec() -> None:
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "400000", "WATCHDOG_PID": "42"}, pid=42) == 0.2
    assert watchdog_interval({"WATCHDOG_USEC": "400000", "WATCHDOG_PID": "41"}, pid=42) is None
    assert watchdog_interval({}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "0"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "soon"}) is None


def test_listen_fds_checks_the_pid_and_unsets_the_variables() -> None:
    env = {"LISTEN_PID": "42", "LISTEN_FDS": "2", "LISTEN_FDNAMES": "api:other"}
    assert listen_fds(env, pid=42) == [PassedFd(3, "api"), PassedFd(4, "other")]
    assert env == {}
    env = {"LISTEN_PID": "41", "LISTEN_FDS": "1"}
    assert listen_fds(env, pid=42) == []  # inherited from a parent: not ours
    assert env == {}
    assert listen_fds({"LISTEN_FDS": "1"}, pid=42) == []  # no LISTEN_PID: not ours
    assert listen_fds({"LISTEN_PID": "42", "LISTEN_FDS": "x"}, pid=42) == []
    assert listen_fds({"LISTEN_PID": "42", "LISTEN_FDS": "1"}, pid=42) == [PassedFd(3, "unknown")]


def _listening_unix(tmp_path: Path, name: str = "api.sock") -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(tmp_path / name))
    s.listen()
    return s


def test_take_api_socket_picks_the_one_named_api(tmp_path: Path) -> None:
    api = _listening_unix(tmp_path)
    other = _listening_unix(tmp_path, "other.sock")
    out = io.StringIO()
    sock = take_api_socket(
        [PassedFd(os.dup(other.fileno()), "metrics"), PassedFd(os.dup(api.fileno()), "api")],
        Logger(stream=out),
    )
    assert sock is not None
    assert sock.getsockname() == str(tmp_path / "api.sock")
    assert "ignoring a socket passed by systemd" in out.getvalue()
    sock.close()
    api.close()
    other.close()


def test_take_api_socket_takes_a_single_unnamed_one(tmp_path: Path) -> None:
    api = _listening_unix(tmp_path)
    sock = take_api_socket([PassedFd(os.dup(api.fileno()), "peerd.socket")])
    assert sock is not None and sock.family == socket.AF_UNIX
    sock.close()
    api.close()
    assert take_api_socket([]) is None


def test_take_api_socket_refuses_what_cannot_serve_the_api(tmp_path: Path) -> None:
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with pytest.raises(ActivationError, match="listening Unix stream socket"):
        take_api_socket([PassedFd(os.dup(udp.fileno()), "api")])
    udp.close()
    unbound = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with pytest.raises(ActivationError, match="not listening"):
        take_api_socket([PassedFd(os.dup(unbound.fileno()), "api")])
    unbound.close()
    a, b = _listening_unix(tmp_path, "a"), _listening_unix(tmp_path, "b")
    with pytest.raises(ActivationError, match="none is named 'api'"):
        take_api_socket([PassedFd(os.dup(a.fileno()), "x"), PassedFd(os.dup(b.fileno()), "y")])
    a.close()
    b.close()


def test_stderr_is_journal_matches_device_and_inode(tmp_path: Path) -> None:
    path = tmp_path / "stream"
    path.write_text("")
    with open(path, "w") as f:
        st = os.fstat(f.fileno())
        assert stderr_is_journal({"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}, f.fileno())
        assert not stderr_is_journal({"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino + 1}"}, f.fileno())
        assert not stderr_is_journal({}, f.fileno())
        assert not stderr_is_journal({"JOURNAL_STREAM": "garbage"}, f.fileno())


def test_journal_lines_carry_syslog_priorities() -> None:
    out = io.StringIO()
    log = Logger(LogLevel.DEBUG, out, clock=lambda: 0.0, journal=True)
    log.debug("d")
    log.info("member joined", name="web1")
    log.warning("member suspect", name="web2")
    log.error("boom")
    try:
        raise ValueError("bad")
    except ValueError as e:
        log.exception("core failed", e)
    lines = out.getvalue().splitlines()
    assert lines[:4] == [
        "<7>debug d",
        "<6>info  member joined name=web1",
        "<4>warn  member suspect name=web2",
        "<3>error boom",
    ]
    assert lines[4] == '<3>error core failed error="ValueError: bad"'
    assert all(line.startswith("<3>    ") for line in lines[5:])  # one entry per line
    plain = io.StringIO()
    Logger(LogLevel.INFO, plain, clock=lambda: 0.0).info("x")
    assert plain.getvalue() == "1970-01-01T00:00:00Z info  x\n"


class _Recorder(Notifier):
    def __init__(self) -> None:
        super().__init__({})
        self.messages: list[str] = []

    def notify(self, *assignments: str) -> bool:
        self.messages.append("\n".join(assignments))
        return True


def test_lifecycle_ready_status_watchdog_and_stopping() -> None:
    counts = {"alive": 1}
    rec = _Recorder()
    lc = SystemdLifecycle(rec, lambda: counts, watchdog_s=0.5, status_interval_s=1.0)
    assert lc.deadline == 0.0  # the first ping is due at once
    lc.tick(0.0)
    assert rec.messages == ["WATCHDOG=1"] and lc.deadline == 0.5
    lc.members_changed(0.1)  # before READY: nothing
    lc.started(0.2, ok=1, failed=1)
    assert rec.messages[-1] == (
        "READY=1\nSTATUS=1 members: 1 alive, 0 suspect, 0 dead, 0 left (joined 1 of 2 seeds)"
    )
    counts = {"alive": 2}
    lc.members_changed(0.3)  # within a second of the last STATUS: coalesced
    assert rec.messages[-1].startswith("READY=1")
    assert lc.deadline == 0.5
    lc.tick(0.5)
    assert rec.messages[-1] == "WATCHDOG=1"
    assert lc.deadline == pytest.approx(1.0)  # min(next ping 1.0, status due 1.2)
    lc.tick(1.2)
    assert rec.messages[-2:] == [
        "WATCHDOG=1",
        "STATUS=2 members: 2 alive, 0 suspect, 0 dead, 0 left",
    ]
    lc.reloading()
    assert rec.messages[-1].startswith("RELOADING=1\nMONOTONIC_USEC=")
    lc.reloaded("swim.x: unknown setting")
    assert rec.messages[-1] == (
        "READY=1\nSTATUS=2 members: 2 alive, 0 suspect, 0 dead, 0 left "
        "(reload failed: swim.x: unknown setting)"
    )
    lc.leaving("SIGTERM")
    assert rec.messages[-1] == "STOPPING=1\nSTATUS=leaving the cluster (SIGTERM)"
    lc.leaving("again")
    lc.members_changed(5.0)
    lc.reloading()
    assert rec.messages[-1] == "STOPPING=1\nSTATUS=leaving the cluster (SIGTERM)"
    lc.tick(5.0)
    assert rec.messages[-1] == "WATCHDOG=1"  # pings go on while leaving


def test_lifecycle_without_watchdog_never_ticks_for_nothing() -> None:
    lc = SystemdLifecycle(_Recorder(), lambda: {}, watchdog_s=None)
    assert lc.deadline == float("inf")


# --- the lifecycle driven by the runner (fake core, virtual clock) -----------------


async def test_runner_sends_ready_after_the_first_join_and_pings_from_its_loop(
    autojump_clock,
) -> None:  # type: ignore[no-untyped-def]
    t0 = trio.current_time()
    join_timer = membership_timer(TimerKind.PROBE, 1)

    class SlowJoinCore(FakeCore):
        def handle(self, now, inp):  # type: ignore[no-untyped-def]
            self.seen.append((now, inp))
            match inp:
                case Start():
                    return [SetTimer(t0 + 3, join_timer)]  # the seeds answer later
                case TimerFired(t) if t == join_timer:
                    return [JoinDone(1, 0)]
            return super().handle(now, inp)

    rec = _Recorder()
    stamps: list[tuple[float, str]] = []
    original = rec.notify

    def notify(*assignments: str) -> bool:
        stamps.append((trio.current_time() - t0, assignments[0]))
        return original(*assignments)

    rec.notify = notify  # type: ignore[method-assign]
    core = SlowJoinCore()
    lc = SystemdLifecycle(rec, lambda: {"alive": 2}, watchdog_s=0.5)
    runner, _ports, _out = make_runner(core, lifecycle=lc)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(runner.run)
        await trio.sleep(5.2)
        await runner.shutdown("SIGTERM")
    ready = [t for t, what in stamps if what == "READY=1"]
    assert ready == [pytest.approx(3.0)]  # not before the first join finished
    pings = [t for t, what in stamps if what == "WATCHDOG=1"]
    # Every half interval, although nothing else woke the loop in between.
    assert pings[:11] == [pytest.approx(0.5 * i) for i in range(11)]
    stopping = [t for t, what in stamps if what == "STOPPING=1"]
    assert stopping == [pytest.approx(5.2)]
    count = len(pings)
    await trio.sleep(5)
    assert len([1 for _t, what in stamps if what == "WATCHDOG=1"]) == count  # loop gone: none


async def test_member_events_update_status(autojump_clock) -> None:  # type: ignore[no-untyped-def]
    t0 = trio.current_time()
    counts = {"alive": 1}

    def script(now, inp):  # type: ignore[no-untyped-def]
        match inp:
            case Start():
                return [SetTimer(t0 + 2, membership_timer(TimerKind.PROBE, 1))]
            case TimerFired():
                counts["alive"] = 2
                return [MemberEvent(EventKind.JOINED, PEER)]
        return []

    rec = _Recorder()
    lc = SystemdLifecycle(rec, lambda: counts, watchdog_s=None)
    runner, _ports, _out = make_runner(FakeCore(script), lifecycle=lc)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(runner.run)
        await trio.sleep(3)
        await runner.shutdown("SIGTERM")
    assert rec.messages[0].startswith("READY=1\nSTATUS=1 members: 1 alive")
    assert rec.messages[1] == "STATUS=2 members: 2 alive, 0 suspect, 0 dead, 0 left"
    assert rec.messages[2].startswith("STOPPING=1")
