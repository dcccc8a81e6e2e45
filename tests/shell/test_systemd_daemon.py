"""Real daemons under a pretend systemd: the test plays the service manager.

The test owns the NOTIFY_SOCKET datagram socket, sets WATCHDOG_USEC, sends
SIGHUP and SIGTERM, and passes an already-bound API socket through
LISTEN_FDS. Daemons are separate processes on 127.0.0.x loopback addresses
with their own state directories; every wait is a bounded poll.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from peerd.api.client import BlockingClient
from peerd.wire.seal import format_key, key_id

from .test_agent import wait_for
from .test_metrics import parse_exposition

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.proc


def api(sock: Path, op: str, **kw: Any) -> Any:
    with BlockingClient(sock, timeout=5) as c:
        return c.call(op, **kw)


class Daemon:
    """One ``peerd agent`` process; stderr goes to a file the test can read."""

    def __init__(
        self,
        tmp: Path,
        name: str,
        host: str,
        *extra: str,
        env: dict[str, str] | None = None,
        prefix: list[str] | None = None,
        pass_fds: tuple[int, ...] = (),
    ) -> None:
        self.name = name
        self.sock = tmp / f"{name}.sock"
        self.log_path = tmp / f"{name}.log"
        full_env = dict(os.environ, PYTHONPATH=str(ROOT), **(env or {}))
        for key in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "LISTEN_FDS", "JOURNAL_STREAM"):
            if env is None or key not in env:
                full_env.pop(key, None)
        argv = [
            *(prefix or [sys.executable, "-m", "peerd"]),
            "agent",
            "--name",
            name,
            "--bind",
            f"{host}:0",
            "--state-dir",
            str(tmp / name),
            "--api-socket",
            str(self.sock),
            "--preset",
            "local",
            *extra,
        ]
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log,
                env=full_env,
                pass_fds=pass_fds,
            )

    @property
    def log(self) -> str:
        return self.log_path.read_text()

    def signal(self, signum: int) -> None:
        os.kill(self.proc.pid, signum)

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM, wait; SIGKILL (and fail) if it does not exit in time."""
        if self.proc.poll() is None:
            self.signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            raise AssertionError(f"{self.name} did not stop on SIGTERM:\n{self.log}") from None

    def member(self, name: str) -> dict[str, Any] | None:
        return next((m for m in api(self.sock, "members") if m["name"] == name), None)

    def sees(self, name: str, status: str) -> bool:
        m = self.member(name)
        return m is not None and m["status"] == status


@pytest.fixture
def daemons() -> Iterator[list[Daemon]]:
    started: list[Daemon] = []
    yield started
    for d in started:  # stop every process this test started, by pid
        if d.proc.poll() is None:
            os.kill(d.proc.pid, signal.SIGKILL)
            d.proc.wait()


class NotifySocket:
    """The service manager's end of NOTIFY_SOCKET; keeps (time, message) pairs."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)
        self.messages: list[tuple[float, str]] = []

    def drain(self) -> list[tuple[float, str]]:
        while True:
            try:
                data = self.sock.recv(4096)
            except BlockingIOError:
                return self.messages
            self.messages.append((time.monotonic(), data.decode()))

    def wait(
        self, what: str, pred: Callable[[str], bool], after: int = 0, timeout: float = 15.0
    ) -> tuple[int, str]:
        """The first message at index >= ``after`` matching ``pred``."""

        def find() -> tuple[int, str] | None:
            msgs = self.drain()
            for i in range(after, len(msgs)):
                if pred(msgs[i][1]):
                    return i, msgs[i][1]
            return None

        found: tuple[int, str] = wait_for(what, find, timeout)
        return found

    def close(self) -> None:
        self.sock.close()


def fields(message: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in message.split("\n"))


def write_keys(path: Path, *keys: bytes) -> None:
    path.write_text("".join(format_key(k) + "\n" for k in keys))


def key_ids(d: Daemon) -> list[tuple[str, bool]]:
    return [(k["id"], k["primary"]) for k in api(d.sock, "keys.list")]


def test_notify_watchdog_reload_rotation_metrics_and_stop(
    tmp_path: Path, daemons: list[Daemon]
) -> None:
    k1, k2 = os.urandom(32), os.urandom(32)
    id1, id2 = key_id(k1).hex(), key_id(k2).hex()
    for name in ("a", "b"):
        write_keys(tmp_path / f"{name}.keys", k1)
    a = Daemon(tmp_path, "a", "127.0.0.21", "--key-file", str(tmp_path / "a.keys"))
    daemons.append(a)
    a_addr = wait_for("a's API", lambda: api(a.sock, "status"))["addr"]

    config = tmp_path / "b.toml"
    config.write_text(f'key_file = "b.keys"\nlog_level = "info"\njoin = ["{a_addr}"]\n')
    notify = NotifySocket(tmp_path / "notify")
    b = Daemon(
        tmp_path,
        "b",
        "127.0.0.22",
        "--config",
        str(config),
        "--metrics-addr",
        "127.0.0.22:0",
        env={"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "300000"},
    )
    daemons.append(b)
    try:
        # READY=1 once the sockets are bound and the first join has finished.
        i, ready = notify.wait("READY=1", lambda m: "READY=1" in m.split("\n"))
        assert fields(ready)["STATUS"] == (
            "2 members: 2 alive, 0 suspect, 0 dead, 0 left (joined 1 of 1 seeds)"
        )
        assert api(b.sock, "status")["members"]["alive"] == 2  # API already served
        assert a.sees("b", "alive") or wait_for("a to see b", lambda: a.sees("b", "alive"))
        assert "STOPPING=1" not in "".join(m for _, m in notify.messages[:i])

        # WATCHDOG=1 every half of WATCHDOG_USEC (0.15 s), from the runner's loop.
        notify.wait("3 watchdog pings", lambda m: m == "WATCHDOG=1", after=i)
        wait_for(
            "3 watchdog pings", lambda: sum(m == "WATCHDOG=1" for _, m in notify.drain()[i:]) >= 3
        )
        pings = [t for t, m in notify.messages if m == "WATCHDOG=1"]
        gaps = [y - x for x, y in zip(pings, pings[1:], strict=False)]
        assert min(gaps) > 0.05 and sorted(gaps)[len(gaps) // 2] < 0.3, gaps

        before = {"a": a.member("b"), "b": b.member("a")}
        generation = api(b.sock, "status")["generation"]

        # Rotate the cluster key with SIGHUP only: install, use, remove.
        def reload_both(expected: list[tuple[str, bool]]) -> None:
            mark = len(notify.drain())
            for d in (a, b):
                d.signal(signal.SIGHUP)
            for d in (a, b):
                wait_for(f"{d.name}'s keyring {expected}", lambda d=d: key_ids(d) == expected)
            j, _ = notify.wait("RELOADING=1", lambda m: m.startswith("RELOADING=1\n"), mark)
            assert "MONOTONIC_USEC=" in notify.messages[j][1]
            notify.wait("READY=1 after the reload", lambda m: m.startswith("READY=1\n"), j)

        for name in ("a", "b"):
            write_keys(tmp_path / f"{name}.keys", k1, k2)
        reload_both([(id1, True), (id2, False)])
        for name in ("a", "b"):
            write_keys(tmp_path / f"{name}.keys", k2, k1)
        reload_both([(id2, True), (id1, False)])
        for name in ("a", "b"):
            write_keys(tmp_path / f"{name}.keys", k2)
        reload_both([(id2, True)])

        # Membership stayed intact: same lives, still exchanging (now under k2 only),
        # and not one datagram was lost to a key mismatch.
        rx = api(a.sock, "status")["counters"].get("udp_rx", 0)
        wait_for(
            "more traffic from b", lambda: api(a.sock, "status")["counters"]["udp_rx"] >= rx + 3
        )
        assert a.member("b") == before["a"] and b.member("a") == before["b"]
        assert api(b.sock, "status")["generation"] == generation
        for d in (a, b):
            counters = api(d.sock, "status")["counters"]
            assert not {k: v for k, v in counters.items() if "seal" in k}, counters
        assert b.proc.poll() is None and "keyring reloaded" in b.log

        # A config that does not validate: the reload fails, the daemon goes on.
        config.write_text('key_file = "b.keys"\nlog_levle = "debug"\n')
        mark = len(notify.drain())
        b.signal(signal.SIGHUP)
        _, failed = notify.wait(
            "READY=1 after a failed reload", lambda m: m.startswith("READY=1\n"), mark
        )
        assert "reload failed" in fields(failed)["STATUS"]
        assert "log_levle: unknown setting" in fields(failed)["STATUS"]
        assert "reload failed; the running configuration stays" in b.log
        assert api(b.sock, "status")["members"]["alive"] == 2

        # Metrics: the CLI and the HTTP endpoint print the same families.
        cli = subprocess.run(
            [sys.executable, "-m", "peerd", "metrics", "--api-socket", str(b.sock)],
            capture_output=True,
            text=True,
            timeout=20,
            env=dict(os.environ, PYTHONPATH=str(ROOT)),
        )
        assert cli.returncode == 0, cli.stderr
        fams = parse_exposition(cli.stdout)
        assert fams["peerd_members"]["samples"]['status="alive"'] == 2
        sent = fams["peerd_messages_total"]["samples"]
        assert sent['direction="out",type="ping"'] >= 1
        assert sent['direction="in",type="ack"'] >= 1
        assert sent['direction="out",type="pushpull"'] >= 1  # the join
        assert fams["peerd_keys"]["samples"][""] == 1
        assert fams["peerd_api_connections"]["samples"][""] >= 1  # this very call
        port = re.search(r"metrics=127\.0\.0\.22:(\d+)", b.log)
        assert port is not None, b.log
        url = f"http://127.0.0.22:{port.group(1)}/metrics"
        with urllib.request.urlopen(url, timeout=5) as reply:
            assert reply.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            http = parse_exposition(reply.read().decode())
        assert set(http) == set(fams)

        # SIGTERM: STOPPING=1, a graceful leave, exit 0; the peer sees "left".
        mark = len(notify.drain())
        b.signal(signal.SIGTERM)
        _, stopping = notify.wait("STOPPING=1", lambda m: m.startswith("STOPPING=1"), mark)
        assert fields(stopping)["STATUS"] == "leaving the cluster (SIGTERM)"
        assert b.proc.wait(15) == 0, b.log
        wait_for("a to see b left", lambda: a.sees("b", "left"))
        assert "Traceback" not in b.log
    finally:
        notify.close()
    assert a.stop() == 0, a.log


WRAPPER = """\
import os, sys
fd = int(sys.argv[1])
if fd != 3:
    os.dup2(fd, 3)
    os.close(fd)
os.environ["LISTEN_PID"] = str(os.getpid())  # the pid exec keeps
os.execv(sys.executable, [sys.executable, "-m", "peerd", *sys.argv[2:]])
"""


def test_socket_activation_and_journal_priorities(tmp_path: Path, daemons: list[Daemon]) -> None:
    path = tmp_path / "activated.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen()
    fd = listener.fileno()
    # stderr is "the journal": JOURNAL_STREAM names its device and inode.
    (tmp_path / "s.log").write_text("")
    st = os.stat(tmp_path / "s.log")
    d = Daemon(
        tmp_path,
        "s",
        "127.0.0.23",
        env={
            "LISTEN_FDS": "1",
            "LISTEN_FDNAMES": "api",
            "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}",
        },
        prefix=[sys.executable, "-c", WRAPPER, str(fd)],
        pass_fds=(fd,),
    )
    daemons.append(d)
    listener.close()  # the daemon holds it now, as systemd would keep its copy
    status = wait_for("the API on the passed socket", lambda: api(path, "status"))
    assert status["name"] == "s"
    assert not d.sock.exists()  # it did not bind its own --api-socket
    assert f'api="{path} (from systemd)"' in d.log
    assert d.stop() == 0, d.log
    assert path.exists()  # the socket belongs to the service manager: left in place
    lines = d.log.splitlines()
    assert lines[0].startswith("<6>info  peerd starting name=s ")  # priority, no timestamp
    assert all(re.match(r"<[3467]>", line) for line in lines), lines


def run_agent(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "peerd", "agent", *argv],
        capture_output=True,
        text=True,
        timeout=20,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            'bind = "127.0.0.1:0"\nlog-level = "info"\n',
            "log-level: unknown setting (dashes are written as underscores)",
        ),
        ("[swim]\nprobe_intervl_s = 1.0\n", "swim.probe_intervl_s: unknown setting"),
        ('bind = "somewhere"\n', "bind: 'somewhere' is not an IPv4 or IPv6 address"),
        ("[swim]\nprobe_timeout_s = -1\n", "swim.probe_timeout_s: -1 is out of range: must be"),
        (
            'metrics_addr = "127.0.0.1:99999"\n',
            "metrics_addr: '127.0.0.1:99999': port out of range",
        ),
    ],
)
def test_bad_config_refuses_to_start_and_check_config_says_why(
    tmp_path: Path, text: str, message: str
) -> None:
    config = tmp_path / "peerd.toml"
    config.write_text(text)
    started = run_agent(
        "--config",
        str(config),
        "--state-dir",
        str(tmp_path / "state"),
        "--api-socket",
        str(tmp_path / "api.sock"),
    )
    assert started.returncode == 2
    assert f"{config}: {message}" in started.stderr
    assert not (tmp_path / "state").exists()  # refused before touching anything
    checked = run_agent("--check-config", str(config))
    assert checked.returncode == 2 and message in checked.stderr


def test_check_config_accepts_a_valid_file(tmp_path: Path) -> None:
    config = tmp_path / "peerd.toml"
    config.write_text(
        'bind = "127.0.0.1:7950"\nmetrics_addr = "127.0.0.1:7951"\n[swim]\nprobe_interval_s = 2.0\n'
    )
    checked = run_agent("--check-config", str(config))
    assert checked.returncode == 0, checked.stderr
    assert checked.stdout == f"{config}: ok\n"


def _expand_syscall_group(name: str, cache: dict[str, set[str]]) -> set[str]:
    if name not in cache:
        out = subprocess.run(
            ["systemd-analyze", "syscall-filter", name],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        ).stdout
        names: set[str] = set()
        for line in out.splitlines()[1:]:
            line = line.strip()
            if line.startswith("@"):
                names |= _expand_syscall_group(line, cache)
            elif line and not line.startswith("#"):
                names.add(line)
        cache[name] = names
    return cache[name]


def _can_strace() -> bool:
    if not (shutil.which("strace") and shutil.which("systemd-analyze")):
        return False
    probe = subprocess.run(
        ["strace", "-f", "-o", os.devnull, "true"], capture_output=True, timeout=20
    )
    return probe.returncode == 0  # ptrace may be forbidden (containers)


@pytest.mark.skipif(
    not _can_strace(), reason="needs strace (with ptrace allowed) and systemd-analyze"
)
def test_the_daemon_stays_inside_the_units_sandbox(tmp_path: Path, daemons: list[Daemon]) -> None:
    """Every system call and socket family a daemon uses (start, join, API, metrics,
    reload, leave) is allowed by peerd.service's SystemCallFilter= and
    RestrictAddressFamilies=, so the hardening cannot break it."""
    from .test_systemd_units import unit

    svc = unit("peerd.service")
    cache: dict[str, set[str]] = {}
    allowed: set[str] = set()
    for value in svc["SystemCallFilter"]:
        deny = value.startswith("~")
        names: set[str] = set()
        for item in value.lstrip("~").split():
            names |= _expand_syscall_group(item, cache) if item.startswith("@") else {item}
        allowed = allowed - names if deny else allowed | names
    families = set(svc["RestrictAddressFamilies"][-1].split())

    trace = tmp_path / "strace.out"
    notify = NotifySocket(tmp_path / "notify")
    write_keys(tmp_path / "keys", os.urandom(32))
    # -D: strace runs as a detached grandchild, so the pid we signal is the daemon's.
    d = Daemon(
        tmp_path,
        "t",
        "127.0.0.24",
        "--key-file",
        str(tmp_path / "keys"),
        "--join",
        "127.0.0.24:9",
        "--metrics-addr",
        "127.0.0.24:0",
        env={"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "200000"},
        prefix=["strace", "-D", "-f", "-q", "-o", str(trace), sys.executable, "-m", "peerd"],
    )
    daemons.append(d)
    try:
        notify.wait("READY=1", lambda m: m.startswith("READY=1"), timeout=30)
        api(d.sock, "keys.install", key=format_key(os.urandom(32)))
        port = re.search(r"metrics=127\.0\.0\.24:(\d+)", d.log)
        assert port is not None
        with urllib.request.urlopen(f"http://127.0.0.24:{port.group(1)}/metrics", timeout=5):
            pass
        mark = len(notify.drain())
        d.signal(signal.SIGHUP)
        notify.wait("READY=1 after reload", lambda m: m.startswith("READY=1"), mark)
        assert d.stop(30) == 0, d.log
    finally:
        notify.close()
    # strace pads the pid column ("5165  +++" for a 4-digit pid, one space for 5 digits).
    done = re.compile(rf"^{d.proc.pid}\s+\+\+\+ exited with 0 \+\+\+", re.M)
    text = wait_for(
        "strace to finish",
        lambda: trace.exists() and done.search(trace.read_text()) is not None and trace.read_text(),
    )
    used = set(re.findall(r"^\d+\s+([a-z0-9_]+)\(", text, re.M))
    used_families = set(re.findall(r"\bsocket\((AF_\w+)", text))
    assert {"epoll_wait", "sendto", "recvfrom", "accept4"} <= used  # it did trace the daemon
    assert used - allowed == set()
    assert used_families <= families, used_families
