"""Real daemons as separate OS processes on loopback addresses.

A :class:`Cluster` (the ``cluster`` fixture in conftest.py) starts
``python -m peerd agent`` processes, each on its own 127.x.y.z address (so a
dead daemon's closed port makes the kernel answer with ICMP port-unreachable,
which the peers use as a hint) and a port found free on that address, with its
state directory, API socket and stderr file in the test's ``tmp_path``.
:meth:`Cluster.stop_all` (the fixture's finalizer) stops everything it
started, by pid: SIGTERM, a bounded wait, then SIGKILL, even when the test
failed. A daemon that logged a traceback, exited 70 (its "this is a bug"
code), exited non-zero on SIGTERM or did not stop makes the test error at
teardown. When a test fails, the daemons' stderr is attached to the report.

Nothing here sleeps to wait for protocol behaviour: :func:`wait_until` polls
(every 50 ms, bounded in time and count) and :func:`hold_for` checks that a
condition stays true over a bounded window.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.fleet import free_port, fresh_host  # one address and port picker
from peerd.api.client import BlockingClient
from peerd.api.protocol import (
    Event,
    FrameDecoder,
    FrameError,
    Request,
    Response,
    encode_frame,
    parse_server_frame,
)

POLL_S = 0.05
START_TIMEOUT_S = 15.0  # 2 busy cores, several interpreters starting at once
STOP_TIMEOUT_S = 10.0  # > the lan leave bound (2 * leave_propagate_s + 5 s)
API_TIMEOUT_S = 5.0
LOG_TAIL_LINES = 150

# --- helper processes -------------------------------------------------------------


def kill_and_reap(proc: subprocess.Popen[Any]) -> None:
    """End a client process a test started: SIGKILL by pid if it still runs,
    a bounded wait, and its pipes closed."""
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    for f in (proc.stdin, proc.stdout, proc.stderr):
        if f is not None:
            f.close()


# --- polling ---------------------------------------------------------------------


_TRANSIENT = (ConnectionError, TimeoutError, OSError)


def wait_until(pred: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll ``pred`` every 50 ms until it returns something truthy (returned).

    Bounded in time and in the number of polls. Connection errors (a daemon
    still starting) count as "not yet". Raises AssertionError naming ``what``
    and the last value seen."""
    deadline = time.monotonic() + timeout
    last: Any = None
    for _ in range(int(timeout / POLL_S) + 2):
        try:
            last = pred()
        except _TRANSIENT as e:
            last = e
        else:
            if last:
                return last
        if time.monotonic() >= deadline:
            break
        time.sleep(POLL_S)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}; last: {last!r}")


def hold_for(pred: Callable[[], Any], duration: float, what: str) -> int:
    """Check ``pred`` every 50 ms for ``duration`` seconds; fail at once if it is
    ever falsy. Returns how many checks passed."""
    deadline = time.monotonic() + duration
    checks = 0
    for _ in range(int(duration / POLL_S) + 2):
        value = pred()
        assert value, f"{what} stopped holding after {checks} checks: {value!r}"
        checks += 1
        if time.monotonic() >= deadline:
            break
        time.sleep(POLL_S)
    return checks


# --- one daemon ------------------------------------------------------------------


@dataclass(eq=False)
class Daemon:
    """One ``peerd agent`` (possibly over several lives: restarts append to its log)."""

    name: str
    host: str
    port: int
    state_dir: Path
    sock: Path
    log_path: Path
    preset: str = "local"
    key_file: Path | None = None
    proc: subprocess.Popen[bytes] | None = None
    lives: int = 0  # how many times it was started
    exit_codes: list[int] = field(default_factory=list)  # one per life that ended
    expect_failure: bool = False  # a start that is meant to be refused
    ready: bool = False  # this life's API answered (so its signal handlers are set)

    @property
    def addr(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # --- API -----------------------------------------------------------------

    def api(self, op: str, **args: Any) -> Any:
        with BlockingClient(self.sock, timeout=API_TIMEOUT_S) as client:
            return client.call(op, **args)

    def status(self) -> dict[str, Any]:
        result: dict[str, Any] = self.api("status")
        return result

    def members(self) -> dict[str, dict[str, Any]]:
        """This daemon's member list by name (names are unique in these tests)."""
        out: dict[str, dict[str, Any]] = {}
        for m in self.api("members"):
            assert m["name"] not in out, f"{self.name} lists two members named {m['name']}"
            out[m["name"]] = m
        return out

    def counters(self) -> dict[str, int]:
        result: dict[str, int] = self.status().get("counters", {})
        return result

    # --- process -----------------------------------------------------------------

    def wait_ready(self, timeout: float = START_TIMEOUT_S) -> dict[str, Any]:
        """Poll ``status`` until the API answers; fails early if the process died."""

        def ready() -> dict[str, Any] | None:
            if not self.running():
                raise AssertionError(
                    f"daemon {self.name} exited with {self.proc and self.proc.returncode} "
                    f"before its API answered:\n{self.log_tail()}"
                )
            return self.status()

        status: dict[str, Any] = wait_until(ready, timeout, f"{self.name}'s API")
        self.ready = True
        return status

    def kill9(self) -> None:
        assert self.proc is not None and self.running()
        os.kill(self.proc.pid, signal.SIGKILL)
        self.wait_exit(STOP_TIMEOUT_S)

    def terminate(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGTERM)

    def wait_exit(self, timeout: float) -> int:
        """Wait for the process to exit by itself; its exit code."""
        assert self.proc is not None
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"daemon {self.name} (pid {self.proc.pid}) did not exit "
                f"within {timeout} s:\n{self.log_tail()}"
            ) from None
        self.record_exit()
        return code

    def record_exit(self) -> None:
        if self.proc is not None and len(self.exit_codes) < self.lives:
            self.exit_codes.append(self.proc.wait())

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        text = self.log().splitlines()
        skipped = f"[... {len(text) - lines} earlier lines]\n" if len(text) > lines else ""
        return skipped + "\n".join(text[-lines:])


# --- a set of daemons ------------------------------------------------------------


class Cluster:
    """Starts daemons for one test and stops every one of them afterwards."""

    def __init__(self, tmp_path: Path, sock_dir: Path) -> None:
        self.tmp = tmp_path
        self.sock_dir = sock_dir
        self.daemons: list[Daemon] = []
        self.problems: list[str] = []

    def new(
        self,
        name: str,
        *,
        preset: str = "local",
        key_file: Path | None = None,
        host: str | None = None,
        port: int | None = None,
    ) -> Daemon:
        """A daemon's identity and paths (not started)."""
        host = host or fresh_host()
        d = Daemon(
            name=name,
            host=host,
            port=port if port is not None else free_port(host),
            state_dir=self.tmp / f"state-{name}",
            sock=self.sock_dir / f"{name}.sock",
            log_path=self.tmp / f"{name}.stderr",
            preset=preset,
            key_file=key_file,
        )
        self.daemons.append(d)
        return d

    def argv(
        self,
        d: Daemon,
        *,
        join: Iterable[str] = (),
        bind: str | None = None,
        extra: Sequence[str] = (),
    ) -> list[str]:
        argv = [
            sys.executable,
            "-m",
            "peerd",
            "agent",
            "--name",
            d.name,
            "--bind",
            bind or d.addr,
            "--api-socket",
            str(d.sock),
            "--state-dir",
            str(d.state_dir),
            "--preset",
            d.preset,
        ]
        if d.key_file is not None:
            argv += ["--key-file", str(d.key_file)]
        for addr in join:
            argv += ["--join", addr]
        return argv + list(extra)

    def start(
        self,
        d: Daemon,
        *,
        join: Iterable[str] = (),
        bind: str | None = None,
        extra: Sequence[str] = (),
    ) -> Daemon:
        """Start (or restart) ``d`` without waiting for it."""
        assert not d.running(), f"{d.name} is already running"
        d.record_exit()
        d.lives += 1
        d.ready = False
        with open(d.log_path, "ab") as log:
            log.write(f"=== test harness: life {d.lives} of {d.name} ===\n".encode())
            log.flush()
            d.proc = subprocess.Popen(
                self.argv(d, join=join, bind=bind, extra=extra),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        return d

    def spawn(
        self, name: str, *, join: Iterable[str] = (), extra: Sequence[str] = (), **kw: Any
    ) -> Daemon:
        return self.start(self.new(name, **kw), join=join, extra=extra)

    def start_cluster(
        self, names: Sequence[str], *, converge: bool = True, **kw: Any
    ) -> list[Daemon]:
        """The first daemon is the seed; the others join it, started together."""
        seed = self.spawn(names[0], **kw)
        others = [self.new(n, **kw) for n in names[1:]]
        seed.wait_ready()
        for d in others:
            self.start(d, join=[seed.addr])
        for d in others:
            d.wait_ready()
        daemons = [seed, *others]
        if converge:
            wait_converged(daemons)
        return daemons

    def stop_all(self) -> None:
        """SIGTERM everything still running, wait (bounded), then SIGKILL."""
        running = [d for d in self.daemons if d.running()]
        for d in running:
            with contextlib.suppress(ProcessLookupError):
                os.kill(d.pid, signal.SIGCONT)  # in case a test left it stopped
                os.kill(d.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for d in running:
            assert d.proc is not None
            try:
                d.proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.problems.append(
                    f"{d.name} (pid {d.pid}) did not stop within "
                    f"{STOP_TIMEOUT_S} s of SIGTERM; killed"
                )
                with contextlib.suppress(ProcessLookupError):
                    os.kill(d.pid, signal.SIGKILL)
                d.proc.wait(STOP_TIMEOUT_S)
            else:
                # Before its API answered, a daemon may not handle signals yet.
                if d.proc.returncode != 0 and d.ready:
                    self.problems.append(f"{d.name} exited {d.proc.returncode} on SIGTERM")
        for d in self.daemons:
            d.record_exit()

    def check_logs(self) -> None:
        for d in self.daemons:
            if "Traceback" in d.log() and not d.expect_failure:
                self.problems.append(f"{d.name} logged a traceback")
            if 70 in d.exit_codes:
                self.problems.append(f"{d.name} exited 70 (internal error)")


def view(d: Daemon) -> dict[str, tuple[str, str]]:
    """``{name: (status, addr)}`` as ``d`` sees the cluster."""
    return {name: (m["status"], m["addr"]) for name, m in d.members().items()}


def converged(daemons: Sequence[Daemon]) -> bool:
    want = {d.name: ("alive", d.addr) for d in daemons}
    return all(view(d) == want for d in daemons)


def wait_converged(daemons: Sequence[Daemon], timeout: float = 15.0) -> None:
    want = {d.name: ("alive", d.addr) for d in daemons}
    wait_until(lambda: converged(daemons), timeout, f"every daemon to list exactly {want}")


def status_everywhere(observers: Sequence[Daemon], name: str, status: str) -> bool:
    """True once every observer lists ``name`` with ``status``."""
    for d in observers:
        m = d.members().get(name)
        if m is None or m["status"] != status:
            return False
    return True


# --- watching membership events --------------------------------------------------


class Watcher:
    """A ``watch`` on one daemon's ``members`` topic (or ``topics``), read by a thread.

    Each event is kept as ``(monotonic time received, event name, data)``.
    Closing is bounded (the socket is shut down, the thread joined with a
    timeout)."""

    def __init__(self, daemon: Daemon, topics: Sequence[str] = ("members",)) -> None:
        self.daemon = daemon
        self.events: list[tuple[float, str, dict[str, Any]]] = []
        self.ended: str | None = None
        self._stop = threading.Event()
        self._decoder = FrameDecoder()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(API_TIMEOUT_S)
        self._sock.connect(str(daemon.sock))
        self._sock.sendall(encode_frame(Request(1, "watch", {"topics": list(topics)})))
        deadline = time.monotonic() + API_TIMEOUT_S
        while time.monotonic() < deadline:
            msg = self._read_one()
            if isinstance(msg, Response) and msg.id == 1:
                msg.unwrap()
                break
        else:
            raise AssertionError(f"watch on {daemon.name} not acknowledged")
        self._sock.settimeout(0.1)
        self._thread = threading.Thread(target=self._run, name=f"watch-{daemon.name}", daemon=True)
        self._thread.start()

    def _read_one(self) -> Response | Event | None:
        while True:
            frame = self._decoder.next_frame()
            if frame is not None:
                msg = parse_server_frame(frame)
                if isinstance(msg, Event):
                    if msg.event == "end":
                        self.ended = repr(msg.data)
                    else:
                        self.events.append((time.monotonic(), msg.event, msg.data))
                return msg
            data = self._sock.recv(65536)
            if not data:
                raise ConnectionError("watch connection closed by the daemon")
            self._decoder.feed(data)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._read_one()
            except TimeoutError:
                continue
            except (OSError, FrameError) as e:
                if not self._stop.is_set():
                    self.ended = f"connection: {e}"
                return

    def about(self, name: str) -> list[tuple[float, str]]:
        """``(time, event)`` for every event about member ``name``."""
        return [(t, ev) for t, ev, data in list(self.events) if data.get("name") == name]

    def close(self) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._thread.join(2.0)
        self._sock.close()
