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
import contextlib
import datetime
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/fleet.py
from fleet import (  # noqa: E402
    Daemon,
    Fleet,
    cpu_model,
    host_cpu,
    kill_all,
    now,
    pin_source,
    pipeline,
    src_env,
    summary_ms,
    track,
    udp_counters,
    wait_for,
    wait_load_below,
)

TARGETS = {
    "registrations_per_s": 20_000,
    "visible_everywhere_p99_ms_at_20": 50.0,
    "dead_gone_after_declared_s": 0.2,
}


def _source(rev: str, keep: bool) -> dict[str, Any]:
    """Pin the code under test (fleet.pin_source); what the results record of it."""
    info = pin_source(rev, keep, prefix="regbench-src-")
    out = {"rev": rev, "commit": info["commit"]}
    if rev == "worktree":
        out["dirty"] = info["dirty"]
    else:
        out["src"] = info["src"]
    return out


# --- host load ---------------------------------------------------------------------------


def _udp_errors() -> dict[str, int]:
    """Host-wide UDP receive errors (/proc/net/snmp): a datagram dropped on
    loopback shows up here (a full socket buffer: a starved receiver)."""
    table = udp_counters()
    return {k: table.get(k, 0) for k in ("InErrors", "RcvbufErrors")}


class HostLoad:
    def __init__(self) -> None:
        self.start = host_cpu()
        self.load_start = os.getloadavg()[0]
        self.udp = _udp_errors()

    def result(self) -> dict[str, float]:
        busy0, total0 = self.start
        busy1, total1 = host_cpu()
        frac = (busy1 - busy0) / max(1, total1 - total0)
        udp = _udp_errors()
        return {
            "host_cpu_busy_fraction": round(frac, 3),
            "loadavg_1m_start": round(self.load_start, 2),
            "loadavg_1m_end": round(os.getloadavg()[0], 2),
            "udp_receive_errors": sum(udp[k] - self.udp[k] for k in udp),
        }


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
    return {
        "names": len(names),
        "seconds": round(took, 3),
        "per_s": round(len(names) / took),
        "daemon_cpu_us_per_reg": round(cpu / len(names) * 1e6, 1),
    }


def run_pipelined(d: Daemon, names: list[str], window: int) -> dict[str, Any]:
    from peerd.api.protocol import Request, encode_frame

    frames = [encode_frame(Request(i + 1, "register", {"name": n})) for i, n in enumerate(names)]
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(d.sock)
    s.settimeout(30)
    cpu0 = d.cpu_s()
    t0 = now()
    errors = sum(pipeline(s, frames, window).values())
    took = now() - t0
    cpu = d.cpu_s() - cpu0
    s.close()
    return {
        "names": len(names),
        "window": window,
        "seconds": round(took, 3),
        "per_s": round(len(names) / took),
        "errors": errors,
        "daemon_cpu_us_per_reg": round(cpu / len(names) * 1e6, 1),
    }


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
                    print(
                        f"throughput {label} {mode} rep {rep}: {r['per_s']}/s "
                        f"({r['daemon_cpu_us_per_reg']} us CPU each)",
                        flush=True,
                    )
                    # The connection closed: wait until its entries are gone.
                    wait_for(
                        lambda b=base, d=d: (
                            int(d.api("status")["gauges"].get("registry_entries", 0)) <= b
                        ),
                        60,
                        "the run's entries to go",
                    )
            out[label] = {
                mode: {
                    "runs": rs,
                    "best_per_s": max(r["per_s"] for r in rs),
                    "median_per_s": round(statistics.median(r["per_s"] for r in rs)),
                }
                for mode, rs in runs.items()
            }
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


async def _watch(
    i: int, d: Daemon, topics: list[str], seen: Seen, victim_name: str | None, ready: Any
) -> None:
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
    return {
        "samples": samples,
        "complete": len(latencies),
        "visible_everywhere": summary_ms(latencies),
        "per_daemon": summary_ms([max(0.0, x) for x in per_daemon]),
        "register_call": summary_ms(register_s),
        "last_to_see": {ds[i].name: k for i, k in sorted(slowest.items())},
    }


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
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, victim.sock, str(count)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=src_env(),
        cwd=victim.dir,
    )
    track(holder)
    names = {f"doomed-{i}" for i in range(count)} | {"doomed-group"}
    try:
        async with trio.open_nursery() as nursery:
            started = 0

            def ready() -> None:
                nonlocal started
                started += 1

            for i, d in others:
                nursery.start_soon(_watch, i, d, ["registry", "members"], seen, victim.name, ready)
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
        last = max(
            (seen.removed[n][i] for n in names if i in seen.removed.get(n, {})), default=None
        )
        if last is not None and i in seen.dead:
            own.append(last - seen.dead[i])
    return {
        "entries": len(names),
        "observers": len(others),
        "missing_removals": missing,
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
                print(
                    f"visibility N={n}: p50 {v['p50_ms']} ms, p99 {v['p99_ms']} ms, "
                    f"max {v['max_ms']} ms",
                    flush=True,
                )
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
    mem = "?"
    with contextlib.suppress(OSError):
        mem = Path("/proc/meminfo").read_text().splitlines()[0].split(":", 1)[1].strip()
    return {
        "cpu": cpu_model() or "?",
        "cpus": os.cpu_count(),
        "mem": mem,
        "kernel": platform.release(),
        "python": platform.python_version(),
    }


def wait_quiet(max_load: float, max_wait_s: float) -> dict[str, Any]:
    """Wait (bounded) for the host's 1-minute load to drop below ``max_load``
    (fleet.wait_load_below). Returns what was seen."""
    waited = wait_load_below(max_load, max_wait_s)
    return {"max_load": max_load, "waited_s": waited, "loadavg_1m": round(os.getloadavg()[0], 2)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--phases",
        nargs="+",
        default=["throughput", "visibility", "dead"],
        choices=["throughput", "visibility", "dead"],
    )
    p.add_argument("--sizes", nargs="+", type=int, default=[10, 20, 30])
    p.add_argument("--preset", default="lan", choices=["lan", "local", "wan"])
    p.add_argument(
        "--count",
        type=int,
        default=10_000,
        help="names per pipelined run (at most 10000: the per-connection limit)",
    )
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
    p.add_argument(
        "--quiet-load",
        type=float,
        default=0.0,
        help="before each phase, wait (at most --quiet-wait s) until the host's "
        "1-minute load average is below this (0: do not wait)",
    )
    p.add_argument("--quiet-wait", type=float, default=600.0)
    args = p.parse_args()

    source = _source(args.rev, args.keep)
    root = Path(tempfile.mkdtemp(prefix="regbench-"))
    results: dict[str, Any] = {
        "command": " ".join(["python", "benchmarks/registry/bench.py", *sys.argv[1:]]),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "source": source,
        "targets": TARGETS,
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
        kill_all()
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
