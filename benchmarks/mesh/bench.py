#!/usr/bin/env python3
"""Partial-mesh benchmark: real daemons on loopback, measured from the outside.

    python benchmarks/mesh/bench.py --out benchmarks/mesh/results.json

Phases (pick with ``--phases``):

throughput
    Two daemons. A receiving client holds the name ``sink`` on daemon B and
    reads its ``message`` events as fast as they come (a thread on a raw
    socket). A sending client on daemon A holds ``src`` and sends small
    messages (``--size`` bytes) to ``sink``: ``sequential`` (blocking
    client, one send at a time: each waits for B's answer) and
    ``pipelined`` (one connection keeping ``--window`` sends in flight).
    Messages per second = messages / (first send to last ok reply); every
    reply must be ok and the receiver must count every message, in order.

latency
    ``--latency-n`` daemons (20). Receivers hold ``echo-k`` on 5 daemons,
    senders on 5 others; each sample is one sequential ``send`` of a small
    message to a random receiver: ``send_rtt`` = the call's round trip (it
    returns once the owner's daemon queued the message), ``delivery`` =
    arrival at the receiving client - the moment the send was written (one
    clock: the same host). p50/p99/max.

broadcast
    ``--broadcast-n`` daemons (30) with an ``events`` watch on each. A user
    event is sent through one daemon; time = the last daemon's watch event -
    the moment the ``event`` call was written. ``--samples`` times, the
    origin rotating.

The code under test is a ``git archive`` of HEAD taken at start (others may
edit the work tree meanwhile). Every process started is stopped by pid
(SIGTERM, then SIGKILL), also on errors. Only 127.0.0.0/8 is used.
"""

from __future__ import annotations

import argparse
import atexit
import collections
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
import struct
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
now = time.monotonic
CLK_TCK = os.sysconf("SC_CLK_TCK")

TARGETS = {
    "msgs_per_s_two_daemons": 20_000,
    "send_p99_ms_at_20": 5.0,
    "broadcast_all_30_ms": 100.0,
}

SRC: Path = REPO


def pin_source(keep: bool) -> dict[str, Any]:
    global SRC
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True,
                          text=True, check=True, timeout=30).stdout.strip()
    dest = Path(tempfile.mkdtemp(prefix=f"meshbench-src-{head[:10]}-"))
    if not keep:
        atexit.register(shutil.rmtree, dest, True)
    data = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", head, "peerd"],
                          capture_output=True, check=True, timeout=60).stdout
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(dest, filter="data")
    SRC = dest
    sys.path.insert(0, str(SRC))
    return {"commit": head, "src": str(dest)}


# --- processes -------------------------------------------------------------------------

_PROCS: list[subprocess.Popen[bytes]] = []


def _kill_all() -> None:
    for p in _PROCS:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGKILL)


atexit.register(_kill_all)

_OCTET = random.SystemRandom().randrange(2, 250)
_hosts = iter(range(1, 60_000))


def _host() -> str:
    n = next(_hosts)
    return f"127.{_OCTET}.{n // 250}.{n % 250 + 1}"


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

    def __enter__(self) -> Fleet:
        seed = self.daemons[0]
        seed.start(self.preset, None)
        wait_for(lambda: seed.api("status"), 30, "the seed's API")
        for d in self.daemons[1:]:
            d.start(self.preset, seed.addr)
        n = len(self.daemons)
        wait_for(lambda: all(d.api("status")["members"]["alive"] == n for d in self.daemons),
                 120, f"{n} daemons to see {n} alive")
        if n > 2:
            wait_for(lambda: all(d.api("status")["gauges"].get("mesh_active", 0) >= 2
                                 for d in self.daemons), 60, "mesh neighbours everywhere")
        return self

    def __exit__(self, *exc: object) -> None:
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


def _cpu(a: Daemon, b: Daemon, cpu0: tuple[float, float], n: int) -> dict[str, float]:
    return {"sender_daemon_cpu_us_per_msg": round((a.cpu_s() - cpu0[0]) / n * 1e6, 1),
            "receiver_daemon_cpu_us_per_msg": round((b.cpu_s() - cpu0[1]) / n * 1e6, 1)}


def _self_cpu() -> float:
    t = os.times()
    return t.user + t.system


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    k = max(0, min(len(s) - 1, round(q / 100 * len(s) + 0.5) - 1))
    return s[k]


def summary_ms(values: list[float]) -> dict[str, Any]:
    ms = [v * 1000 for v in values]
    return {"n": len(ms), "p50_ms": round(pct(ms, 50), 3), "p90_ms": round(pct(ms, 90), 3),
            "p99_ms": round(pct(ms, 99), 3), "max_ms": round(max(ms), 3),
            "mean_ms": round(statistics.fmean(ms), 3)}


# --- raw API connections -----------------------------------------------------------------


class Conn:
    """A raw API connection: requests written as frames, a reader thread
    that answers waiters and records ``message``/``user`` events with their
    arrival time."""

    def __init__(self, path: str) -> None:
        from peerd.api.protocol import FrameDecoder

        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.dec = FrameDecoder()
        self.ids = iter(range(1, 1 << 62))
        self.replies: dict[int, dict[str, Any]] = {}
        self.events: list[tuple[float, dict[str, Any]]] = []
        self.messages = 0
        self.cond = threading.Condition()
        self.stop = False
        self.keep_events = True
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        self.sock.settimeout(0.2)
        while not self.stop:
            try:
                data = self.sock.recv(1 << 20)
            except TimeoutError:
                continue
            except OSError:
                return
            if not data:
                return
            t = now()
            self.dec.feed(data)
            with self.cond:
                while (f := self.dec.next_frame()) is not None:
                    if "event" in f:
                        if f["event"] == "message":
                            self.messages += 1
                        if self.keep_events:
                            self.events.append((t, f))
                    else:
                        self.replies[f["id"]] = f
                self.cond.notify_all()

    def write(self, op: str, args: dict[str, Any]) -> int:
        from peerd.api.protocol import Request, encode_frame

        rid = next(self.ids)
        self.sock.sendall(encode_frame(Request(rid, op, args)))
        return rid

    def wait(self, rid: int, timeout: float = 15.0) -> dict[str, Any]:
        deadline = now() + timeout
        with self.cond:
            while rid not in self.replies:
                left = deadline - now()
                if left <= 0:
                    raise RuntimeError(f"no reply to request {rid}")
                self.cond.wait(left)
            return self.replies.pop(rid)

    def call(self, op: str, **args: Any) -> Any:
        f = self.wait(self.write(op, args))
        if not f.get("ok"):
            raise RuntimeError(f"{op} failed: {f.get('error')}")
        return f.get("result")

    def close(self) -> None:
        self.stop = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.thread.join(2)
        self.sock.close()


# --- throughput --------------------------------------------------------------------------


def phase_throughput(root: Path, args: argparse.Namespace) -> dict[str, Any]:
    from peerd.api.client import BlockingClient
    from peerd.api.protocol import FrameDecoder, Request, encode_frame

    out: dict[str, Any] = {}
    with Fleet(root / "tp", 2, args.preset) as fleet:
        a, b = fleet.daemons
        sink = Conn(b.sock)
        sink.keep_events = False
        sink.call("register", name="sink")
        sender = BlockingClient(a.sock, timeout=30)
        sender.register("src")
        wait_for(lambda: sender.lookup("sink") is not None, 10, "sink visible at A")
        payload = b"x" * args.size
        # warm-up: opens the direct link
        for _ in range(200):
            sender.send("sink", payload)
        wait_for(lambda: sink.messages >= 200, 10, "warm-up at the sink")

        def drained(expect: int) -> None:
            wait_for(lambda: sink.messages >= expect, 30, f"{expect} messages at the sink",
                     poll=0.005)

        # sequential
        base = sink.messages
        n = args.sequential
        cpu0 = (a.cpu_s(), b.cpu_s())
        t0 = now()
        for _ in range(n):
            sender.send("sink", payload)
        took = now() - t0
        drained(base + n)
        out["sequential"] = {"messages": n, "seconds": round(took, 3),
                             "per_s": round(n / took), **_cpu(a, b, cpu0, n)}
        sender.close()
        # pipelined
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(a.sock)
        s.settimeout(30)
        dec = FrameDecoder()
        n = args.pipelined
        frames = [encode_frame(Request(i + 1, "send", {"name": "sink", "payload": payload}))
                  for i in range(n)]
        base = sink.messages
        sent = got = errors = 0
        reasons: collections.Counter[str] = collections.Counter()
        window = args.window
        cpu0 = (a.cpu_s(), b.cpu_s())
        me0 = _self_cpu()
        t0 = now()
        while got < n:
            if sent < n and sent - got < window:
                k = min(n - sent, window - (sent - got))
                s.sendall(b"".join(frames[sent:sent + k]))
                sent += k
            data = s.recv(1 << 20)
            if not data:
                raise RuntimeError("the daemon closed the connection")
            dec.feed(data)
            while (f := dec.next_frame()) is not None:
                got += 1
                if not f.get("ok"):
                    errors += 1
                    reasons[str(f.get("error", {}).get("message", "?"))[:60]] += 1
        took = now() - t0
        drained(base + n - errors)  # an error (mailbox full) was not delivered
        s.close()
        out["pipelined"] = {"messages": n, "window": window, "seconds": round(took, 3),
                            "per_s": round(n / took), "errors": errors,
                            "error_reasons": dict(reasons), **_cpu(a, b, cpu0, n),
                            "bench_process_cpu_us_per_msg": round((_self_cpu() - me0) / n * 1e6, 1)}
        out["delivered_at_sink"] = sink.messages
        sink.close()
    return out


# --- latency -----------------------------------------------------------------------------


def phase_latency(root: Path, args: argparse.Namespace) -> dict[str, Any]:
    n = args.latency_n
    rng = random.Random(7)
    with Fleet(root / "lat", n, args.preset) as fleet:
        ds = fleet.daemons
        receivers = [Conn(ds[i].sock) for i in range(5)]
        for k, r in enumerate(receivers):
            r.call("register", name=f"echo-{k}")
        senders = [Conn(ds[n - 1 - i].sock) for i in range(5)]
        for k, c in enumerate(senders):
            c.call("register", name=f"client-{k}")
        def visible() -> bool:
            try:
                return all(c.call("lookup", name=f"echo-{k}") for c in senders
                           for k in range(5))
            except RuntimeError:  # not_found: not spread yet
                return False

        wait_for(visible, 15, "echo names visible everywhere")
        # warm-up: one message on every (sender, receiver) pair opens the links
        for c in senders:
            for k in range(5):
                c.call("send", name=f"echo-{k}", payload=b"warm")
        rtts: list[float] = []
        delivery: list[float] = []
        for i in range(args.latency_samples):
            c = rng.choice(senders)
            k = rng.randrange(5)
            r = receivers[k]
            before = len(r.events)
            t0 = now()
            rid = c.write("send", {"name": f"echo-{k}", "payload": struct.pack(">Q", i)})
            f = c.wait(rid)
            t1 = now()
            if not f.get("ok"):
                raise RuntimeError(f"send failed: {f}")
            rtts.append(t1 - t0)
            deadline = now() + 5
            while True:
                with r.cond:
                    arrived = [t for t, e in r.events[before:]
                               if e.get("event") == "message"
                               and e["data"]["payload"] == struct.pack(">Q", i)]
                    if arrived:
                        break
                    r.cond.wait(0.01)
                if now() > deadline:
                    raise RuntimeError("message not delivered")
            delivery.append(arrived[0] - t0)
        for c in receivers + senders:
            c.close()
    return {"daemons": n, "send_rtt": summary_ms(rtts), "delivery": summary_ms(delivery)}


# --- broadcast ---------------------------------------------------------------------------


def phase_broadcast(root: Path, args: argparse.Namespace) -> dict[str, Any]:
    n = args.broadcast_n
    with Fleet(root / "bc", n, args.preset) as fleet:
        ds = fleet.daemons
        watchers = [Conn(d.sock) for d in ds]
        for w in watchers:
            w.call("watch", topics=["events"])
        origin_conn = [Conn(d.sock) for d in ds[:5]]
        times: list[float] = []
        per_hop: list[float] = []
        warmup: list[float] = []
        # The first broadcast from each origin forms the tree (every new link
        # starts eager; duplicates prune): measured apart, as "warm-up".
        for i in range(-args.broadcast_warmup, args.samples):
            oc = origin_conn[i % 5]
            name = f"ev-{i}"
            t0 = now()
            result = oc.call("event", name=name, payload=b"x" * 64)
            msg_id = result["id"]

            def arrivals(msg_id: str = msg_id) -> list[float] | None:
                out = []
                for w in watchers:
                    with w.cond:
                        ts = [t for t, e in w.events if e.get("event") == "user"
                              and e["data"].get("id") == msg_id]
                    if not ts:
                        return None
                    out.append(ts[0])
                return out

            got = wait_for(arrivals, 10, f"event {i} everywhere", poll=0.002)
            if i < 0:
                warmup.append(max(got) - t0)
            else:
                times.append(max(got) - t0)
                per_hop.extend(t - t0 for t in got)
            time.sleep(0.05)  # let IHAVE batches and prunes settle between samples
        for w in watchers + origin_conn:
            w.close()
        tree: collections.Counter[str] = collections.Counter()
        for d in ds:
            counters = d.api("status")["counters"]
            tree.update({k: v for k, v in counters.items() if k.startswith("plumtree_")})
    return {"daemons": n, "all_reached": summary_ms(times), "each_daemon": summary_ms(per_hop),
            "warmup_all_reached_ms": [round(t * 1000, 2) for t in warmup],
            "all_reached_ms": [round(t * 1000, 2) for t in times],
            "plumtree_counters_summed": dict(sorted(tree.items()))}


def wait_quiet(max_load: float, max_wait_s: float) -> float:
    """Wait (bounded) until the host's 1-minute load is below ``max_load``."""
    t0 = now()
    while max_load > 0 and os.getloadavg()[0] >= max_load and now() - t0 < max_wait_s:
        time.sleep(5)
    return round(now() - t0, 1)


def machine() -> dict[str, Any]:
    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {"python": platform.python_version(), "cpu": cpu, "cores": os.cpu_count(),
            "kernel": platform.release(), "loadavg_1m_start": os.getloadavg()[0]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--phases", default="throughput,latency,broadcast")
    p.add_argument("--preset", default="lan")
    p.add_argument("--size", type=int, default=16, help="message payload bytes")
    p.add_argument("--sequential", type=int, default=3000)
    p.add_argument("--pipelined", type=int, default=80_000)
    p.add_argument("--window", type=int, default=8000,
                   help="sends in flight (a batch is answered once the owner's daemon "
                        "answered it: keep several batches of ~1000 in flight)")
    p.add_argument("--latency-n", type=int, default=20)
    p.add_argument("--latency-samples", type=int, default=2000)
    p.add_argument("--broadcast-n", type=int, default=30)
    p.add_argument("--samples", type=int, default=50)
    p.add_argument("--broadcast-warmup", type=int, default=5,
                   help="broadcasts (one per origin) before the measured ones")
    p.add_argument("--quiet-load", type=float, default=0.0,
                   help="before each phase, wait until the 1-minute load is below this "
                        "(0: do not wait)")
    p.add_argument("--quiet-wait", type=float, default=600.0,
                   help="longest wait for --quiet-load, seconds")
    p.add_argument("--keep", action="store_true", help="keep the temp dirs")
    p.add_argument("--out", help="write the results (JSON) here")
    args = p.parse_args()
    phases = set(args.phases.split(","))
    results: dict[str, Any] = {"started": datetime.datetime.now(datetime.UTC).isoformat(),
                               "argv": sys.argv[1:], "source": pin_source(args.keep),
                               "machine": machine(), "targets": TARGETS}
    root = Path(tempfile.mkdtemp(prefix="meshbench-"))
    if not args.keep:
        atexit.register(shutil.rmtree, root, True)
    try:
        for name, fn in (("throughput", phase_throughput), ("latency", phase_latency),
                         ("broadcast", phase_broadcast)):
            if name not in phases:
                continue
            waited = wait_quiet(args.quiet_load, args.quiet_wait)
            load0 = os.getloadavg()[0]
            results[name] = fn(root, args)
            results[name]["host"] = {"quiet_wait_s": waited, "loadavg_1m_start": load0,
                                     "loadavg_1m_end": os.getloadavg()[0]}
            print(json.dumps(results[name]), flush=True)
    finally:
        _kill_all()
    results["loadavg_1m_end"] = os.getloadavg()[0]
    text = json.dumps(results, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
