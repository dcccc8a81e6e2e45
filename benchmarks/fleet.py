"""What the benchmarks share: the pinned code under test, real daemons on
loopback addresses, bounded waits, percentiles, the machine and its load.

Used by ``benchmarks/mesh/bench.py`` and ``benchmarks/registry/bench.py``
(a :class:`Fleet` of ``python -m peerd agent`` processes), by
``benchmarks/membership/bench.py`` (:func:`pin_source` and the host's
figures) and by ``tests/proc/harness.py`` (:func:`fresh_host`,
:func:`free_port`). The scripts are run as files (``python
benchmarks/mesh/bench.py``) and import this module by putting its folder on
``sys.path``; nothing here imports ``peerd`` at module level, so
:func:`pin_source` decides where it comes from.

Every daemon started here is remembered and stopped by pid: :meth:`Fleet.stop`
(SIGTERM, a bounded wait, SIGKILL), and :func:`kill_all` (SIGKILL to any
survivor), which the scripts call in a ``finally`` and which also runs at
exit. Only 127.0.0.0/8 is used.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import io
import itertools
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

REPO = Path(__file__).resolve().parents[1]
CLK_TCK = os.sysconf("SC_CLK_TCK")
now = time.monotonic

# The PYTHONPATH entry of the code under test (daemons and the bench's own
# client): the work tree until pin_source() says otherwise. Read it as
# ``fleet.SRC`` or through src_env() (``from fleet import SRC`` keeps the old value).
SRC: Path = REPO


def pin_source(rev: str = "HEAD", keep: bool = False, prefix: str = "bench-src-") -> dict[str, Any]:
    """Run daemons and the client from a ``git archive`` of ``rev`` (others may
    commit to the work tree during a run); ``rev == "worktree"`` runs the work
    tree as it is. Sets :data:`SRC`, puts it first on ``sys.path`` and returns
    ``{"rev", "commit", "dirty", "src"}``; the archive is removed at exit
    unless ``keep``."""
    global SRC
    info: dict[str, Any] = {"rev": rev}
    if rev == "worktree":
        dirty = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "peerd"],
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout.strip()
        head = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout.strip()
        SRC = REPO
        info.update(commit=head, dirty=bool(dirty), src=str(REPO))
    else:
        sha = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--verify", f"{rev}^{{commit}}"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout.strip()
        dest = Path(tempfile.mkdtemp(prefix=f"{prefix}{sha[:10]}-"))
        if not keep:
            atexit.register(shutil.rmtree, dest, True)
        data = subprocess.run(
            ["git", "-C", str(REPO), "archive", "--format=tar", sha, "peerd"],
            capture_output=True,
            timeout=60,
            check=True,
        ).stdout
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            tar.extractall(dest, filter="data")
        SRC = dest
        info.update(commit=sha, dirty=False, src=str(dest))
    sys.path.insert(0, str(SRC))
    return info


def src_env() -> dict[str, str]:
    """The environment of a process that runs the code under test (start it
    outside the repo: ``python -m``/``-c`` put the cwd ahead of PYTHONPATH)."""
    return {**os.environ, "PYTHONPATH": str(SRC)}


# --- processes ---------------------------------------------------------------------------

_PROCS: list[subprocess.Popen[bytes]] = []


def track(proc: subprocess.Popen[Any]) -> None:
    """Have :func:`kill_all` stop ``proc`` (a process started by the caller)."""
    _PROCS.append(proc)


def kill_all() -> None:
    """SIGKILL every tracked process still running (the last resort)."""
    for p in _PROCS:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGKILL)


atexit.register(kill_all)

# One random 127.N.0.0/16 per process: parallel runs pick different ones, and
# within a run every daemon gets its own address.
_OCTET = random.SystemRandom().randrange(2, 255)
_host_numbers = itertools.count(1)


def fresh_host() -> str:
    """A loopback address no other daemon of this process uses."""
    n = next(_host_numbers)
    assert n < 250 * 250, "out of loopback addresses"
    return f"127.{_OCTET}.{n // 250}.{n % 250 + 1}"


def free_port(host: str) -> int:
    """A port free for both UDP and TCP on ``host`` (the daemon binds both)."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind((host, 0))
            port = int(udp.getsockname()[1])
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
                try:
                    tcp.bind((host, port))
                except OSError:
                    continue
                return port
    raise RuntimeError(f"no free UDP+TCP port on {host}")


@dataclass(eq=False)
class Daemon:
    name: str
    host: str
    port: int
    dir: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def addr(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def sock(self) -> str:
        return str(self.dir / "api.sock")

    def start(self, preset: str, join: str | None) -> None:
        argv = [
            sys.executable,
            "-m",
            "peerd",
            "agent",
            "--name",
            self.name,
            "--bind",
            self.addr,
            "--api-socket",
            self.sock,
            "--state-dir",
            str(self.dir / "state"),
            "--preset",
            preset,
            "--log-level",
            "warning",
        ]
        if join:
            argv += ["--join", join]
        # cwd: `python -m` puts the cwd first on sys.path, ahead of PYTHONPATH
        # (from the repo root, the work tree's peerd would run, not SRC's).
        with open(self.dir / "stderr", "ab") as log:
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=src_env(),
                cwd=self.dir,
                start_new_session=True,
            )
        track(self.proc)

    def api(self, op: str, **args: Any) -> Any:
        from peerd.api.client import BlockingClient

        with BlockingClient(self.sock, timeout=10) as c:
            return c.call(op, **args)

    def cpu_s(self) -> float:
        assert self.proc is not None
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


def wait_for(pred: Any, timeout: float, what: str, poll: float = 0.05) -> Any:
    """Poll ``pred`` until it returns something truthy (returned); connection
    errors count as "not yet". Raises RuntimeError after ``timeout`` s."""
    deadline = now() + timeout
    last: Any = None
    while True:
        try:
            last = pred()
            if last:
                return last
        except (ConnectionError, OSError, TimeoutError) as e:
            last = e
        if now() > deadline:
            raise RuntimeError(f"timed out after {timeout} s waiting for {what}; last {last!r}")
        time.sleep(poll)


class Fleet:
    """``n`` daemons on their own loopback addresses, under ``root``: the first
    is the seed the others join. ``start()``/``stop()``, or ``with``: the
    daemons are stopped on leaving the block, and if starting them fails."""

    def __init__(self, root: Path, n: int, preset: str) -> None:
        self.daemons: list[Daemon] = []
        for i in range(n):
            host = fresh_host()
            d = Daemon(f"d{i:02d}", host, free_port(host), root / f"d{i:02d}")
            d.dir.mkdir(parents=True)
            self.daemons.append(d)
        self.preset = preset

    def start(self, timeout: float = 120.0) -> float:
        """Start them all; wait (at most ``timeout`` s) until every daemon sees
        every one alive. Returns the seconds it took."""
        t0 = now()
        seed = self.daemons[0]
        seed.start(self.preset, None)
        wait_for(lambda: seed.api("status"), 30, "the seed's API")
        for d in self.daemons[1:]:
            d.start(self.preset, seed.addr)
        n = len(self.daemons)
        wait_for(
            lambda: all(int(d.api("status")["members"]["alive"]) == n for d in self.daemons),
            timeout,
            f"{n} daemons to see {n} alive",
        )
        return now() - t0

    def stop(self) -> None:
        """SIGTERM every running daemon, wait (bounded) for each, SIGKILL the rest."""
        for d in self.daemons:
            if d.proc is not None and d.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(d.proc.pid, signal.SIGTERM)
        for d in self.daemons:
            if d.proc is not None:
                try:
                    d.proc.wait(20)
                except subprocess.TimeoutExpired:
                    os.kill(d.proc.pid, signal.SIGKILL)
                    d.proc.wait(10)

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def pipeline(s: socket.socket, frames: list[bytes], window: int) -> collections.Counter[str]:
    """Write the request ``frames`` on the API connection ``s``, at most
    ``window`` unanswered at a time, and read a reply to each. Returns the
    failed requests by reason (the error message's first 60 characters)."""
    from peerd.api.protocol import FrameDecoder

    dec = FrameDecoder()
    n = len(frames)
    sent = got = 0
    reasons: collections.Counter[str] = collections.Counter()
    while got < n:
        if sent < n and sent - got < window:
            k = min(n - sent, window - (sent - got))
            s.sendall(b"".join(frames[sent : sent + k]))
            sent += k
        data = s.recv(1 << 20)
        if not data:
            raise RuntimeError("the daemon closed the connection")
        dec.feed(data)
        while (f := dec.next_frame()) is not None:
            got += 1
            if not f.get("ok"):
                reasons[str(f.get("error", {}).get("message", "?"))[:60]] += 1
    return reasons


# --- figures and the host ----------------------------------------------------------------


def pct(values: list[float], q: float) -> float:
    """The ``q``-th percentile: the value at rank ``round(q/100 * n + 0.5)`` of
    the sorted values (Python's rounding, half to even); NaN for no values."""
    if not values:
        return float("nan")
    s = sorted(values)
    k = max(0, min(len(s) - 1, round(q / 100 * len(s) + 0.5) - 1))
    return s[k]


def summary_ms(values: list[float], digits: int = 2) -> dict[str, Any]:
    """n, p50/p90/p99/max/mean of ``values`` (seconds) in milliseconds."""
    ms = [v * 1000 for v in values]
    return {
        "n": len(ms),
        "p50_ms": round(pct(ms, 50), digits),
        "p90_ms": round(pct(ms, 90), digits),
        "p99_ms": round(pct(ms, 99), digits),
        "max_ms": round(max(ms), digits) if ms else None,
        "mean_ms": round(statistics.fmean(ms), digits) if ms else None,
    }


def wait_load_below(max_load: float, max_wait_s: float) -> float:
    """Wait (at most ``max_wait_s``) until the host's 1-minute load average is
    below ``max_load`` (0: do not wait): other work on a shared machine starves
    the daemons and shows up as latency. Returns the seconds waited."""
    t0 = now()
    while max_load > 0 and os.getloadavg()[0] >= max_load and now() - t0 < max_wait_s:
        time.sleep(5)
    return round(now() - t0, 1)


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo ("" if not found)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return ""


def host_cpu() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs (/proc/stat), to see how loaded the host was."""
    parts = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = parts[3] + parts[4]
    return sum(parts) - idle, sum(parts)


def udp_counters() -> dict[str, int]:
    """The host's UDP counters (the ``Udp:`` lines of /proc/net/snmp)."""
    lines = [
        ln.split()
        for ln in Path("/proc/net/snmp").read_text().splitlines()
        if ln.startswith("Udp:")
    ]
    return dict(zip(lines[0][1:], (int(x) for x in lines[1][1:]), strict=True))
