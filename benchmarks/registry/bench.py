#!/usr/bin/env python3
"""Registry benchmark: real daemons on loopback, measured from the outside.

    python benchmarks/registry/bench.py --out benchmarks/registry/results.json

Three phases (each can be picked with ``--phases``):

throughput
    One daemon, alone and as one of a 3-daemon cluster (its peers receive
    and relay every delta). ``sequential``: one connection, one
    ``register`` at a time (the blocking client: send, wait for the reply).
    ``pipelined``: one connection that keeps ``--window`` requests in
    flight (frames encoded beforehand, written in bursts, replies read as
    they come). Registrations per second = names / (first send to last
    reply); also the daemon's CPU seconds per registration (utime+stime of
    /proc/PID/stat). Each run uses fresh names on a fresh connection, and
    waits for the previous connection's entries to be gone.

visibility
    N daemons (``--sizes``, LAN preset). The bench holds a ``registry``
    watch on every daemon and timestamps each event as it arrives. One
    client registers a name through daemon 0 (``--samples`` times, one at a
    time, a short pause between): latency = (last daemon's ``registered``
    event for the name) - (the moment ``register`` returned). p50/p99/max
    over the samples; ``per_daemon`` is the same from each daemon's own
    event. The registering daemon rotates over the first 5 daemons.

dead
    In each N-daemon cluster, a client process on one daemon registers
    ``--dead-names`` names and joins a group; once every daemon sees them,
    that daemon is ``kill -9``ed. Watches (members + registry) on every
    other daemon give: ``declared`` = the first ``dead`` event about it on
    any daemon; ``gone_everywhere`` = the last ``unregistered``/``left`` of
    its entries on any daemon; ``gone_after_declared_s`` = their
    difference (the target), and per daemon the time from its own ``dead``
    event to its last removal (removal is part of marking the node dead, so
    this is about 0).

The code under test is pinned to a ``git archive`` of HEAD taken at start
(``--rev worktree`` runs the work tree as it is); the results record the
commit, the machine, the host's load and CPU use during each phase. Every
process started is stopped by pid (SIGTERM, then SIGKILL), also on errors.
Only 127.0.0.0/8 is used.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import datetime
import io
import json
import os
import platform
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
CLK_TCK = os.sysconf("SC_CLK_TCK")
now = time.monotonic

TARGETS = {
    "registrations_per_s": 20_000,
    "visible_everywhere_p99_ms_at_20": 50.0,
    "dead_gone_after_declared_s": 0.2,
}

SRC: Path = REPO  # PYTHONPATH entry of the code under test (see --rev)


def pin_source(rev: str, keep: bool) -> dict[str, Any]:
    """Run daemons and the client from a git archive of ``rev`` (others may
    commit to the work tree during a run)."""
    global SRC
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD" if rev == "worktree"
                           else rev], capture_output=True, text=True, check=True,
                          timeout=30).stdout.strip()
    info: dict[str, Any] = {"rev": rev, "commit": head}
    if rev == "worktree":
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "peerd"],
                               capture_output=True, text=True, timeout=30).stdout.strip()
        info["dirty"] = bool(dirty)
        SRC = REPO
    else:
        dest = Path(tempfile.mkdtemp(prefix=f"regbench-src-{head[:10]}-"))
        if not keep:
            atexit.register(shutil.rmtree, dest, True)
        data = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", head,
                               "peerd"], capture_output=True, check=True, timeout=60).stdout
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            tar.extractall(dest, filter="data")
        SRC = dest
        info["src"] = str(dest)
    sys.path.insert(0, str(SRC))
    return info


# --- processes ---------------------------------------------------------------------------

_PROCS: list[subprocess.Popen[bytes]] = []


def _kill_all() -> None:
    for p in _PROCS:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGKILL)


atexit.register(_kill_all)


def _free_port(host: str) -> int:
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
    raise RuntimeError(f"no free port on {host}")


_OCTET = random.SystemRandom().randrange(2, 250)
_hosts = iter(range(1, 60_000))


def _host() -> str:
    n = next(_hosts)
    return f"127.{_OCTET}.{n // 250}.{n % 250 + 1}"


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
        argv = [sys.executable, "-m", "peerd", "agent", "--name", self.name, "--bind",
                self.addr, "--api-socket", self.sock, "--state-dir", str(self.dir / "state"),
                "--preset", preset, "--log-level", "warning"]
        if join:
            argv += ["--join", join]
        env = {**os.environ, "PYTHONPATH": str(SRC)}
        with open(self.dir / "stderr", "ab") as log:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                         env=env, start_new_session=True)
        _PROCS.append(self.proc)

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
    def __init__(self, root: Path, n: int, preset: str) -> None:
        self.daemons: list[Daemon] = []
        for i in range(n):
            host = _host()
            d = Daemon(f"d{i:02d}", host, _free_port(host), root / f"d{i:02d}")
            d.dir.mkdir(parents=True)
            self.daemons.append(d)
        self.preset = preset

    def start(self, timeout: float = 120.0) -> float:
        t0 = now()
        seed = self.daemons[0]
        seed.start(self.preset, None)
        wait_for(lambda: seed.api("status"), 30, "the seed's API")
        for d in self.daemons[1:]:
            d.start(self.preset, seed.addr)
        n = len(self.daemons)
        wait_for(lambda: all(_alive_count(d) == n for d in self.daemons), timeout,
                 f"{n} daemons to see {n} alive")
        return now() - t0

    def stop(self) -> None:
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


def _alive_count(d: Daemon) -> int:
    return int(d.api("status")["members"]["alive"])


# --- host load ---------------------------------------------------------------------------


def _host_cpu() -> tuple[int, int]:
    parts = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = parts[3] + parts[4]
    return sum(parts) - idle, sum(parts)


def _udp_errors() -> dict[str, int]:
    """Host-wide UDP receive errors (/proc/net/snmp): a datagram dropped on
    loopback shows up here (a full socket buffer: a starved receiver)."""
    lines = [ln.split() for ln in Path("/proc/net/snmp").read_text().splitlines()
             if ln.startswith("Udp:")]
    table = dict(zip(lines[0][1:], (int(x) for x in lines[1][1:]), strict=True))
    return {k: table.get(k, 0) for k in ("InErrors", "RcvbufErrors")}


class HostLoad:
    def __init__(self) -> None:
        self.start = _host_cpu()
        self.load_start = os.getloadavg()[0]
        self.udp = _udp_errors()

    def result(self) -> dict[str, float]:
        busy0, total0 = self.start
        busy1, total1 = _host_cpu()
        frac = (busy1 - busy0) / max(1, total1 - total0)
        udp = _udp_errors()
        return {"host_cpu_busy_fraction": round(frac, 3),
                "loadavg_1m_start": round(self.load_start, 2),
                "loadavg_1m_end": round(os.getloadavg()[0], 2),
                "udp_receive_errors": sum(udp[k] - self.udp[k] for k in udp)}


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    k = max(0, min(len(s) - 1, round(q / 100 * len(s) + 0.5) - 1))
    return s[k]


def summary_ms(values: list[float]) -> dict[str, Any]:
    ms = [v * 1000 for v in values]
    return {"n": len(ms), "p50_ms": round(pct(ms, 50), 2), "p90_ms": round(pct(ms, 90), 2),
            "p99_ms": round(pct(ms, 99), 2), "max_ms": round(max(ms), 2) if ms else None,
            "mean_ms": round(statistics.fmean(ms), 2) if ms else None}


# --- throughput --------------------------------------------------------------------------


def run_sequential(d: Daemon, names: list[str]) -> dict[str, Any]:
    from peerd.api.client import BlockingClient

    c = BlockingClient(d.sock, timeout=30)
    cpu0 = d.cpu_s()
    t0 = now()
    for name in names:
        c.register(name)
    took = now() - t0
    cpu = d.cpu_s() - cpu0
    c.close()
    return {"names": len(names), "seconds": round(took, 3),
            "per_s": round(len(names) / took), "daemon_cpu_us_per_reg":
            round(cpu / len(names) * 1e6, 1)}


def run_pipelined(d: Daemon, names: list[str], window: int) -> dict[str, Any]:
    from peerd.api.protocol import FrameDecoder, Request, encode_frame

    frames = [encode_frame(Request(i + 1, "register", {"name": n})) for i, n in enumerate(names)]
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(d.sock)
    s.settimeout(30)
    dec = FrameDecoder()
    sent = got = errors = 0
    cpu0 = d.cpu_s()
    t0 = now()
    while got < len(frames):
        if sent < len(frames) and sent - got < window:
            k = min(len(frames) - sent, window - (sent - got))
            s.sendall(b"".join(frames[sent:sent + k]))
            sent += k
        data = s.recv(1 << 20)
        if not data:
            raise RuntimeError("the daemon closed the connection")
        dec.feed(data)
        while (f := dec.next_frame()) is not None:
            got += 1
            errors += not f.get("ok")
    took = now() - t0
    cpu = d.cpu_s() - cpu0
    s.close()
    return {"names": len(names), "window": window, "seconds": round(took, 3),
            "per_s": round(len(names) / took), "errors": errors,
            "daemon_cpu_us_per_reg": round(cpu / len(names) * 1e6, 1)}


def phase_throughput(root: Path, args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for label, size in [("alone", 1), ("in_3_daemon_cluster", 3)]:
        fleet = Fleet(root / f"tp-{label}", size, "lan")
        try:
            fleet.start()
            d = fleet.daemons[0]
            runs: dict[str, list[dict[str, Any]]] = {"sequential": [], "pipelined": []}
            load = HostLoad()
            for rep in range(args.reps):
                for mode in ("sequential", "pipelined"):
                    count = args.seq_count if mode == "sequential" else args.count
                    names = [f"{mode[0]}{rep}-{i}" for i in range(count)]
                    base = int(d.api("status")["gauges"].get("registry_entries", 0))
                    if mode == "sequential":
                        r = run_sequential(d, names)
                    else:
                        r = run_pipelined(d, names, args.window)
                    runs[mode].append(r)
                    print(f"throughput {label} {mode} rep {rep}: {r['per_s']}/s "
                          f"({r['daemon_cpu_us_per_reg']} us CPU each)", flush=True)
                    # The connection closed: wait until its entries are gone.
                    wait_for(lambda b=base, d=d: int(d.api("status")["gauges"].get(
                        "registry_entries", 0)) <= b, 60, "the run's entries to go")
            out[label] = {
                mode: {"runs": rs, "best_per_s": max(r["per_s"] for r in rs),
                       "median_per_s": round(statistics.median(r["per_s"] for r in rs))}
                for mode, rs in runs.items()}
            out[label]["host"] = load.result()
        finally:
            fleet.stop()
    return out


# --- visibility and dead ------------------------------------------------------------------


@dataclass
class Seen:
    """Arrival times of registry/member events, per daemon."""

    registered: dict[str, dict[int, float]] = field(default_factory=dict)  # name -> i -> t
    removed: dict[str, dict[int, float]] = field(default_factory=dict)
    dead: dict[int, float] = field(default_factory=dict)  # daemon i -> its first dead event
    ended: list[str] = field(default_factory=list)


async def _watch(i: int, d: Daemon, topics: list[str], seen: Seen, victim_name: str | None,
                 ready: Any) -> None:
    from peerd.api.client import Client

    async with Client(d.sock) as c, c.watch(topics) as events:
        ready()
        async for ev in events:
            t = now()
            data = ev.data
            if ev.event in ("registered", "joined") and "kind" in data:
                seen.registered.setdefault(data["name"], {}).setdefault(i, t)
            elif ev.event in ("unregistered", "left") and "kind" in data:
                seen.removed.setdefault(data["name"], {})[i] = t
            elif ev.event == "dead" and data.get("name") == victim_name:
                seen.dead.setdefault(i, t)
    seen.ended.append(d.name)


async def _visibility(fleet: Fleet, samples: int, gap_s: float) -> dict[str, Any]:
    import trio

    from peerd.api.client import Client

    ds = fleet.daemons
    seen = Seen()
    latencies: list[float] = []
    per_daemon: list[float] = []
    register_s: list[float] = []
    slowest: dict[int, int] = {}  # daemon index -> samples where it was the last to see
    async with trio.open_nursery() as nursery:
        started = 0

        def ready() -> None:
            nonlocal started
            started += 1

        for i, d in enumerate(ds):
            nursery.start_soon(_watch, i, d, ["registry"], seen, None, ready)
        while started < len(ds):
            await trio.sleep(0.01)
        registrars = ds[:5]
        clients = []
        async with contextlib.AsyncExitStack() as stack:
            for d in registrars:
                clients.append(await stack.enter_async_context(Client(d.sock)))
            for k in range(samples):
                name = f"vis-{k}"
                c = clients[k % len(clients)]
                t0 = now()
                await c.register(name)
                t_ret = now()
                register_s.append(t_ret - t0)
                with trio.move_on_after(10):
                    while len(seen.registered.get(name, {})) < len(ds):
                        await trio.sleep(0.0005)
                got = seen.registered.get(name, {})
                if len(got) < len(ds):
                    print(f"  {name}: seen by {len(got)}/{len(ds)} within 10 s", flush=True)
                    continue
                latencies.append(max(got.values()) - t_ret)
                last = max(got, key=lambda i: got[i])
                slowest[last] = slowest.get(last, 0) + 1
                per_daemon += [t - t_ret for t in got.values()]
                await trio.sleep(gap_s)
        nursery.cancel_scope.cancel()
    return {"samples": samples, "complete": len(latencies),
            "visible_everywhere": summary_ms(latencies),
            "per_daemon": summary_ms([max(0.0, x) for x in per_daemon]),
            "register_call": summary_ms(register_s),
            "last_to_see": {ds[i].name: k for i, k in sorted(slowest.items())}}


HOLDER = """
import sys
from peerd.api.client import BlockingClient
c = BlockingClient(sys.argv[1], timeout=30)
for i in range(int(sys.argv[2])):
    c.register(f"doomed-{i}")
c.join_group("doomed-group")
print("ready", flush=True)
sys.stdin.read()
"""


async def _dead(fleet: Fleet, count: int) -> dict[str, Any]:
    import trio

    ds = fleet.daemons
    victim_i = len(ds) // 2
    victim = ds[victim_i]
    others = [(i, d) for i, d in enumerate(ds) if i != victim_i]
    seen = Seen()
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, victim.sock, str(count)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              env={**os.environ, "PYTHONPATH": str(SRC)})
    _PROCS.append(holder)  # type: ignore[arg-type]
    names = {f"doomed-{i}" for i in range(count)} | {"doomed-group"}
    try:
        async with trio.open_nursery() as nursery:
            started = 0

            def ready() -> None:
                nonlocal started
                started += 1

            for i, d in others:
                nursery.start_soon(_watch, i, d, ["registry", "members"], seen, victim.name,
                                   ready)
            while started < len(others):
                await trio.sleep(0.01)
            assert holder.stdout is not None
            line = await trio.to_thread.run_sync(holder.stdout.readline)
            assert line.strip() == b"ready", line
            with trio.fail_after(30):
                while not all(len(seen.registered.get(n, {})) == len(others) for n in names):
                    await trio.sleep(0.01)
            assert victim.proc is not None
            killed = now()
            os.kill(victim.proc.pid, signal.SIGKILL)
            with trio.move_on_after(30):
                while not all(len(seen.removed.get(n, {})) == len(others) for n in names):
                    await trio.sleep(0.005)
            await trio.sleep(0.1)
            nursery.cancel_scope.cancel()
    finally:
        holder.kill()
        holder.wait(10)
        victim.proc.wait(10) if victim.proc else None
    missing = sum(len(others) - len(seen.removed.get(n, {})) for n in names)
    if not seen.dead:
        return {"error": "no dead event seen", "missing_removals": missing}
    declared = min(seen.dead.values())
    gone = max(t for n in names for t in seen.removed.get(n, {}).values())
    own = []
    for i, _ in others:
        last = max((seen.removed[n][i] for n in names if i in seen.removed.get(n, {})),
                   default=None)
        if last is not None and i in seen.dead:
            own.append(last - seen.dead[i])
    return {
        "entries": len(names), "observers": len(others), "missing_removals": missing,
        "kill_to_declared_dead_s": round(declared - killed, 3),
        "kill_to_gone_everywhere_s": round(gone - killed, 3),
        "gone_after_declared_s": round(gone - declared, 3),
        "declared_spread_s": round(max(seen.dead.values()) - declared, 3),
        "own_dead_to_own_removal": summary_ms(own),
    }


def phase_cluster(root: Path, args: argparse.Namespace, phases: set[str]) -> dict[str, Any]:
    import trio

    out: dict[str, Any] = {}
    for n in args.sizes:
        quiet = wait_quiet(args.quiet_load, args.quiet_wait) if args.quiet_load else None
        fleet = Fleet(root / f"n{n}", n, args.preset)
        try:
            started = fleet.start()
            res: dict[str, Any] = {"start_s": round(started, 2), "quiet": quiet}
            time.sleep(args.settle)
            if "visibility" in phases:
                load = HostLoad()
                res["visibility"] = trio.run(_visibility, fleet, args.samples, args.gap)
                res["visibility"]["host"] = load.result()
                v = res["visibility"]["visible_everywhere"]
                print(f"visibility N={n}: p50 {v['p50_ms']} ms, p99 {v['p99_ms']} ms, "
                      f"max {v['max_ms']} ms", flush=True)
            if "dead" in phases:
                load = HostLoad()
                res["dead"] = trio.run(_dead, fleet, args.dead_names)
                res["dead"]["host"] = load.result()
                print(f"dead N={n}: {res['dead']}", flush=True)
            out[str(n)] = res
        finally:
            fleet.stop()
    return out


def machine() -> dict[str, Any]:
    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = "?"
    with contextlib.suppress(OSError):
        mem = Path("/proc/meminfo").read_text().splitlines()[0].split(":", 1)[1].strip()
    return {"cpu": cpu, "cpus": os.cpu_count(), "mem": mem, "kernel": platform.release(),
            "python": platform.python_version()}


def wait_quiet(max_load: float, max_wait_s: float) -> dict[str, Any]:
    """Wait (bounded) for the host's 1-minute load to drop below ``max_load``:
    other work on a shared machine starves the daemons and shows up as
    latency. Returns what was seen."""
    t0 = now()
    while os.getloadavg()[0] > max_load and now() - t0 < max_wait_s:
        time.sleep(5)
    return {"max_load": max_load, "waited_s": round(now() - t0, 1),
            "loadavg_1m": round(os.getloadavg()[0], 2)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--phases", nargs="+", default=["throughput", "visibility", "dead"],
                   choices=["throughput", "visibility", "dead"])
    p.add_argument("--sizes", nargs="+", type=int, default=[10, 20, 30])
    p.add_argument("--preset", default="lan", choices=["lan", "local", "wan"])
    p.add_argument("--count", type=int, default=10_000, help="names per pipelined run "
                   "(at most 10000: the per-connection limit)")
    p.add_argument("--seq-count", type=int, default=3000, help="names per sequential run")
    p.add_argument("--window", type=int, default=256, help="pipelined requests in flight")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--samples", type=int, default=200)
    p.add_argument("--gap", type=float, default=0.02, help="pause between visibility samples")
    p.add_argument("--dead-names", type=int, default=100)
    p.add_argument("--settle", type=float, default=2.0)
    p.add_argument("--rev", default="HEAD", help="git revision to run, or 'worktree'")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    p.add_argument("--out", help="write the results here (JSON)")
    p.add_argument("--quiet-load", type=float, default=0.0,
                   help="before each phase, wait (at most --quiet-wait s) until the host's "
                        "1-minute load average is below this (0: do not wait)")
    p.add_argument("--quiet-wait", type=float, default=600.0)
    args = p.parse_args()

    source = pin_source(args.rev, args.keep)
    root = Path(tempfile.mkdtemp(prefix="regbench-"))
    results: dict[str, Any] = {
        "command": " ".join(["python", "benchmarks/registry/bench.py", *sys.argv[1:]]),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": machine(), "source": source, "targets": TARGETS,
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "keep")},
    }
    ok = False
    try:
        if "throughput" in args.phases:
            if args.quiet_load:
                results["quiet_throughput"] = wait_quiet(args.quiet_load, args.quiet_wait)
            results["throughput"] = phase_throughput(root, args)
        cluster = {"visibility", "dead"} & set(args.phases)
        if cluster:
            results["clusters"] = phase_cluster(root, args, cluster)
        ok = True
    finally:
        _kill_all()
        if ok and not args.keep:
            shutil.rmtree(root, ignore_errors=True)
        else:
            print(f"temporary directory kept: {root}", file=sys.stderr)
    text = json.dumps(results, indent=2, sort_keys=False)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
