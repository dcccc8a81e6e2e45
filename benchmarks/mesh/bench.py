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
import json
import os
import platform
import random
import shutil
import socket
import struct
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/fleet.py
from fleet import (  # noqa: E402
    Daemon,
    Fleet,
    cpu_model,
    kill_all,
    now,
    pin_source,
    pipeline,
    wait_for,
    wait_load_below,
)
from fleet import summary_ms as _summary_ms  # noqa: E402

TARGETS = {
    "msgs_per_s_two_daemons": 20_000,
    "send_p99_ms_at_20": 5.0,
    "broadcast_all_30_ms": 100.0,
}


class MeshFleet(Fleet):
    """A fleet whose start also waits until every daemon has mesh neighbours."""

    def start(self, timeout: float = 120.0) -> float:
        t0 = now()
        super().start(timeout)
        if len(self.daemons) > 2:
            wait_for(
                lambda: all(
                    d.api("status")["gauges"].get("mesh_active", 0) >= 2 for d in self.daemons
                ),
                60,
                "mesh neighbours everywhere",
            )
        return now() - t0


def _cpu(a: Daemon, b: Daemon, cpu0: tuple[float, float], n: int) -> dict[str, float]:
    return {
        "sender_daemon_cpu_us_per_msg": round((a.cpu_s() - cpu0[0]) / n * 1e6, 1),
        "receiver_daemon_cpu_us_per_msg": round((b.cpu_s() - cpu0[1]) / n * 1e6, 1),
    }


def _self_cpu() -> float:
    t = os.times()
    return t.user + t.system


def summary_ms(values: list[float]) -> dict[str, Any]:
    return _summary_ms(values, digits=3)


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
    from peerd.api.protocol import Request, encode_frame

    out: dict[str, Any] = {}
    with MeshFleet(root / "tp", 2, args.preset) as fleet:
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
            wait_for(
                lambda: sink.messages >= expect, 30, f"{expect} messages at the sink", poll=0.005
            )

        # sequential
        base = sink.messages
        n = args.sequential
        cpu0 = (a.cpu_s(), b.cpu_s())
        t0 = now()
        for _ in range(n):
            sender.send("sink", payload)
        took = now() - t0
        drained(base + n)
        out["sequential"] = {
            "messages": n,
            "seconds": round(took, 3),
            "per_s": round(n / took),
            **_cpu(a, b, cpu0, n),
        }
        sender.close()
        # pipelined
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(a.sock)
        s.settimeout(30)
        n = args.pipelined
        frames = [
            encode_frame(Request(i + 1, "send", {"name": "sink", "payload": payload}))
            for i in range(n)
        ]
        base = sink.messages
        window = args.window
        cpu0 = (a.cpu_s(), b.cpu_s())
        me0 = _self_cpu()
        t0 = now()
        reasons = pipeline(s, frames, window)
        took = now() - t0
        errors = sum(reasons.values())
        drained(base + n - errors)  # an error (mailbox full) was not delivered
        s.close()
        out["pipelined"] = {
            "messages": n,
            "window": window,
            "seconds": round(took, 3),
            "per_s": round(n / took),
            "errors": errors,
            "error_reasons": dict(reasons),
            **_cpu(a, b, cpu0, n),
            "bench_process_cpu_us_per_msg": round((_self_cpu() - me0) / n * 1e6, 1),
        }
        out["delivered_at_sink"] = sink.messages
        sink.close()
    return out


# --- latency -----------------------------------------------------------------------------


def phase_latency(root: Path, args: argparse.Namespace) -> dict[str, Any]:
    n = args.latency_n
    rng = random.Random(7)
    with MeshFleet(root / "lat", n, args.preset) as fleet:
        ds = fleet.daemons
        receivers = [Conn(ds[i].sock) for i in range(5)]
        for k, r in enumerate(receivers):
            r.call("register", name=f"echo-{k}")
        senders = [Conn(ds[n - 1 - i].sock) for i in range(5)]
        for k, c in enumerate(senders):
            c.call("register", name=f"client-{k}")

        def visible() -> bool:
            try:
                return all(c.call("lookup", name=f"echo-{k}") for c in senders for k in range(5))
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
                    arrived = [
                        t
                        for t, e in r.events[before:]
                        if e.get("event") == "message"
                        and e["data"]["payload"] == struct.pack(">Q", i)
                    ]
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
    with MeshFleet(root / "bc", n, args.preset) as fleet:
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
                        ts = [
                            t
                            for t, e in w.events
                            if e.get("event") == "user" and e["data"].get("id") == msg_id
                        ]
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
    return {
        "daemons": n,
        "all_reached": summary_ms(times),
        "each_daemon": summary_ms(per_hop),
        "warmup_all_reached_ms": [round(t * 1000, 2) for t in warmup],
        "all_reached_ms": [round(t * 1000, 2) for t in times],
        "plumtree_counters_summed": dict(sorted(tree.items())),
    }


def _source(keep: bool) -> dict[str, Any]:
    info = pin_source("HEAD", keep, prefix="meshbench-src-")
    return {"commit": info["commit"], "src": info["src"]}


def machine() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "cpu": cpu_model() or "?",
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "loadavg_1m_start": os.getloadavg()[0],
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--phases", default="throughput,latency,broadcast")
    p.add_argument("--preset", default="lan")
    p.add_argument("--size", type=int, default=16, help="message payload bytes")
    p.add_argument("--sequential", type=int, default=3000)
    p.add_argument("--pipelined", type=int, default=80_000)
    p.add_argument(
        "--window",
        type=int,
        default=8000,
        help="sends in flight (a batch is answered once the owner's daemon "
        "answered it: keep several batches of ~1000 in flight)",
    )
    p.add_argument("--latency-n", type=int, default=20)
    p.add_argument("--latency-samples", type=int, default=2000)
    p.add_argument("--broadcast-n", type=int, default=30)
    p.add_argument("--samples", type=int, default=50)
    p.add_argument(
        "--broadcast-warmup",
        type=int,
        default=5,
        help="broadcasts (one per origin) before the measured ones",
    )
    p.add_argument(
        "--quiet-load",
        type=float,
        default=0.0,
        help="before each phase, wait until the 1-minute load is below this (0: do not wait)",
    )
    p.add_argument(
        "--quiet-wait", type=float, default=600.0, help="longest wait for --quiet-load, seconds"
    )
    p.add_argument("--keep", action="store_true", help="keep the temp dirs")
    p.add_argument("--out", help="write the results (JSON) here")
    args = p.parse_args()
    phases = set(args.phases.split(","))
    results: dict[str, Any] = {
        "started": datetime.datetime.now(datetime.UTC).isoformat(),
        "argv": sys.argv[1:],
        "source": _source(args.keep),
        "machine": machine(),
        "targets": TARGETS,
    }
    root = Path(tempfile.mkdtemp(prefix="meshbench-"))
    if not args.keep:
        atexit.register(shutil.rmtree, root, True)
    try:
        for name, fn in (
            ("throughput", phase_throughput),
            ("latency", phase_latency),
            ("broadcast", phase_broadcast),
        ):
            if name not in phases:
                continue
            waited = wait_load_below(args.quiet_load, args.quiet_wait)
            load0 = os.getloadavg()[0]
            results[name] = fn(root, args)
            results[name]["host"] = {
                "quiet_wait_s": waited,
                "loadavg_1m_start": load0,
                "loadavg_1m_end": os.getloadavg()[0],
            }
            print(json.dumps(results[name]), flush=True)
    finally:
        kill_all()
    results["loadavg_1m_end"] = os.getloadavg()[0]
    text = json.dumps(results, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
