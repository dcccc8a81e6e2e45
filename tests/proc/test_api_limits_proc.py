"""The API socket under hostile local clients (issue 16), against a real daemon.

Before: 256 idle connections of any user locked out every local client,
`peerd status` included, for good; 250 stalled partial frames held +262 MiB
for good; mailboxes were bounded per connection only. The user-switching
test needs root (CI runs as root): a forked child drops to uid 65534
(nobody) to act as an ordinary local user, and stays until killed by pid.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import struct
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from peerd.api.client import BlockingClient
from peerd.api.protocol import ApiError, ErrorCode

from .harness import Cluster, Daemon, wait_until

NOBODY = 65534
OTHER_USER = 65533


class AsUser:
    """A forked child that drops to ``uid`` and runs ``fn`` (which must not
    return before it has reported; it reports one line through a pipe).
    Ended by pid: SIGKILL, then reaped."""

    def __init__(self, uid: int, fn: Callable[[Callable[[str], None]], None]) -> None:
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: no return from here
            code = 0
            try:
                os.close(read_fd)
                os.setgroups([])
                os.setgid(uid)
                os.setuid(uid)
                fn(lambda line: os.write(write_fd, line.encode() + b"\n") and None)
            except BaseException as e:
                os.write(write_fd, f"error {e!r}\n".encode())
                code = 1
            finally:
                os._exit(code)
        os.close(write_fd)
        self.pid = pid
        self.out = os.fdopen(read_fd)

    def line(self) -> str:
        return self.out.readline().strip()

    def end(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)
        os.waitpid(self.pid, 0)
        self.out.close()


def hog(path: Path, n: int) -> Callable[[Callable[[str], None]], None]:
    """Open ``n`` connections and hold them (until killed)."""

    def run(report: Callable[[str], None]) -> None:
        held = []
        for _ in range(n):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(str(path))
            held.append(s)
        report(str(len(held)))
        signal.pause()

    return run


def status_call(path: Path) -> Callable[[Callable[[str], None]], None]:
    """One `status` request; reports "ok" or the error."""

    def run(report: Callable[[str], None]) -> None:
        with BlockingClient(path, timeout=5) as c:
            try:
                report("ok" if c.call("status")["name"] else "no name")
            except ApiError as e:
                report(f"refused {e.code}: {e.message}")

    return run


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A socket directory other users can reach (pytest's tmp_path is 0700)."""
    path = Path(tempfile.mkdtemp(prefix="pdlim-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def start(cluster: Cluster, sock_dir: Path, config: str | None = None) -> Daemon:
    d = cluster.new("a")
    d.sock = sock_dir / "a.sock"
    extra: list[str] = []
    if config is not None:
        path = cluster.tmp / "peerd.toml"
        path.write_text(config)
        extra = ["--config", str(path)]
    cluster.start(d, extra=extra)
    d.wait_ready()
    return d


def gauge(d: Daemon, name: str) -> int:
    value: int = d.status().get("gauges", {}).get(name, 0)
    return value


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.mark.skipif(
    os.getuid() != 0,
    reason="acting as other users needs root (a child drops to uid 65534); CI runs as root",
)
def test_one_user_cannot_lock_out_root_or_other_users(cluster: Cluster, open_dir: Path) -> None:
    d = start(cluster, open_dir)
    os.chmod(d.sock, 0o666)  # this test's stand-in for the peerd-clients group
    hogs = AsUser(NOBODY, hog(d.sock, 300))  # more than the global cap (256)
    try:
        assert hogs.line() == "300"
        # The daemon accepted its share (64) and refused the rest, each counted.
        wait_until(
            lambda: d.counters().get("api_refused.uid_limit") == 300 - 64,
            20.0,
            "the per-uid refusals",
        )
        assert gauge(d, "api_connections") == 64 + 1  # + this status call
        # `peerd status` as root answers, and so does another ordinary user.
        assert d.status()["name"] == "a"
        other = AsUser(OTHER_USER, status_call(d.sock))
        try:
            assert other.line() == "ok"
        finally:
            other.end()
    finally:
        hogs.end()
    wait_until(lambda: gauge(d, "api_connections") == 1, 10.0, "the hog's slots freed")


def test_stalled_partial_frames_are_closed_and_their_memory_freed(
    cluster: Cluster, open_dir: Path
) -> None:
    d = start(cluster, open_dir)
    before = rss_kib(d.pid)
    body = (1 << 20) - 1
    held = []
    try:
        for _ in range(64):  # 1 MiB - 1 announced, all but one byte sent, then nothing
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(str(d.sock))
            s.sendall(struct.pack(">I", body) + b"\xa0" + b"x" * (body - 2))
            held.append(s)
        wait_until(
            lambda: gauge(d, "api_connections") == 64 + 1, 10.0, "the 64 connections accepted"
        )
        peak = rss_kib(d.pid)
        # Each is closed once the read timeout (10 s) passed, with a counted reason.
        wait_until(
            lambda: d.counters().get("api_refused.read_timeout") == 64,
            30.0,
            "the stalled frames closed",
        )
        for s in held:
            s.settimeout(5)
            assert s.recv(65536), "the server says why it closes"
        after = rss_kib(d.pid)
    finally:
        for s in held:
            s.close()
    print(f"RSS KiB before {before}, with 64 stalled frames {peak}, after {after}")
    assert peak - before > 32 * 1024  # the frames were buffered...
    assert after - before < 16 * 1024  # ...and are not any more


def test_all_mailboxes_share_one_budget_and_senders_hear_mailbox_full(
    cluster: Cluster, open_dir: Path
) -> None:
    config = "[messages]\nmailbox_bytes = 1048576\nmailbox_total_bytes = 1572864\n"
    d = start(cluster, open_dir, config)
    payload = b"p" * 65536
    with (
        BlockingClient(d.sock, timeout=10) as a,
        BlockingClient(d.sock, timeout=10) as b,
        BlockingClient(d.sock, timeout=10) as sender,
    ):
        a.register("owner-a")
        b.register("owner-b")  # neither reads its messages from now on

        def flood(name: str) -> tuple[int, ApiError]:
            for n in range(200):
                try:
                    sender.send(name, payload)
                except ApiError as e:
                    return n, e
            raise AssertionError(f"{name}: 200 messages of 64 KiB were all taken")

        to_a, full_a = flood("owner-a")
        to_b, full_b = flood("owner-b")
        assert full_a.code == full_b.code == ErrorCode.MAILBOX_FULL
        counters = d.counters()
        assert counters.get("api_refused.mailbox_full") == 1  # a's own bound
        assert counters.get("api_refused.mailbox_budget") == 1  # the daemon's, for b
        assert to_b < to_a
        assert gauge(d, "api_mailbox_bytes") <= 1572864
