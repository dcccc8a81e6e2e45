"""Attacks on the mesh/TCP port before authentication, against real daemons.

Two attacks, each against a fresh daemon on a loopback address:

* ``flood``: 64 connections (from 8 loopback source addresses, 8 each) each
  announce an 8 MiB first frame and send all of it, at once. A daemon that
  buffers first frames before it can check them holds it all; one that
  bounds unauthenticated input refuses them on the length prefix. Reported:
  the daemon's RSS before, its peak (``VmHWM``) and after (2 s after the
  last connection closed), the time the attack took, refusals by reason.
* ``loris``: two hosts keep 36 connections each open (more than the 64
  slots), each announcing a 4000-byte frame and sending nothing, reopening
  0.2 s after the daemon closes one; meanwhile a second daemon joins through
  the attacked one (3 tries). Reported: whether it joined, refusals by reason.

Run from the repository root; ``--src`` picks the code under test (the
daemons and this script's client), e.g. a checkout of an older commit::

    python benchmarks/attacks/preauth_flood.py --src /work/wt-base   # before
    python benchmarks/attacks/preauth_flood.py                       # this tree

Only 127.0.0.0/8 is used; every daemon is stopped by pid (fleet.py).
"""

from __future__ import annotations

import argparse
import collections
import json
import socket
import struct
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import fleet  # noqa: E402

MIB = 1024 * 1024


def proc_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def drops(d: fleet.Daemon) -> dict[str, int]:
    counters = d.api("status").get("counters", {})
    return {k[len("tcp_drop_") :]: v for k, v in sorted(counters.items()) if "tcp_drop_" in k}


def start_daemon(root: Path, name: str) -> fleet.Daemon:
    host = fleet.fresh_host()
    d = fleet.Daemon(name, host, fleet.free_port(host), root / name)
    d.dir.mkdir(parents=True)
    d.start("lan", None)
    fleet.wait_for(lambda: d.api("status"), 30, f"{name}'s API")
    return d


def flood(root: Path, conns: int, sources: int, frame: int) -> dict[str, Any]:
    d = start_daemon(root, "flooded")
    assert d.proc is not None
    pid = d.proc.pid
    before = proc_kib(pid, "VmRSS")
    target = (d.host, d.port)
    body = bytes(frame)
    srcs = [fleet.fresh_host() for _ in range(sources)]
    outcome: collections.Counter[str] = collections.Counter()
    lock = threading.Lock()

    def one(src: str) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.settimeout(30)
        result = "held"
        try:
            sock.bind((src, 0))
            sock.connect(target)
            sock.sendall(struct.pack(">I", frame) + body)
            result = "sent"
            while sock.recv(65536):
                pass
        except OSError:
            result = "refused" if result == "held" else result
        finally:
            sock.close()
        with lock:
            outcome[result] += 1

    threads = [threading.Thread(target=one, args=(srcs[i % sources],)) for i in range(conns)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    took = time.monotonic() - t0
    time.sleep(2.0)  # let the daemon free what it held (a measurement, not a protocol wait)
    out = {
        "attack": f"flood: {conns} x {frame // MIB} MiB first frames from {sources} hosts",
        "rss_before_mib": round(before / 1024, 1),
        "rss_peak_mib": round(proc_kib(pid, "VmHWM") / 1024, 1),
        "rss_after_mib": round(proc_kib(pid, "VmRSS") / 1024, 1),
        "took_s": round(took, 2),
        "clients": dict(outcome),
        "drops": drops(d),
        "alive": d.proc.poll() is None,
    }
    d.stop()
    return out


def loris(root: Path, per_source: int, tries: int) -> dict[str, Any]:
    seed = start_daemon(root, "seed")
    joiner = start_daemon(root, "joiner")
    assert seed.proc is not None
    pid = seed.proc.pid
    before = proc_kib(pid, "VmRSS")
    stop = threading.Event()
    target = (seed.host, seed.port)

    def worker(src: str) -> None:
        while not stop.is_set():
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.settimeout(0.5)
            try:
                sock.bind((src, 0))
                sock.connect(target)
                sock.sendall(struct.pack(">I", 4000))
                while not stop.is_set():
                    try:
                        if not sock.recv(1):
                            break
                    except TimeoutError:
                        continue
            except OSError:
                pass
            finally:
                sock.close()
            stop.wait(0.2)

    srcs = [fleet.fresh_host(), fleet.fresh_host()]
    threads = [threading.Thread(target=worker, args=(s,)) for s in srcs for _ in range(per_source)]
    for t in threads:
        t.start()
    results: list[dict[str, int]] = []
    try:
        fleet.wait_for(
            lambda: sum(v for k, v in drops(seed).items() if k in ("busy", "per_source_cap")),
            15,
            "the seed refusing connections",
        )
        for _ in range(tries):
            results.append(joiner.api("join", addrs=[seed.addr]))
            if results[-1]["ok"]:
                break
    finally:
        stop.set()
        for t in threads:
            t.join(5)
    out = {
        "attack": f"loris: 2 hosts x {per_source} idle connections, reopened every 0.2 s",
        "joined": bool(results and results[-1]["ok"]),
        "join_tries": results,
        "rss_before_mib": round(before / 1024, 1),
        "rss_peak_mib": round(proc_kib(pid, "VmHWM") / 1024, 1),
        "rss_after_mib": round(proc_kib(pid, "VmRSS") / 1024, 1),
        "drops": drops(seed),
    }
    joiner.stop()
    seed.stop()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--src", type=Path, help="the code under test (default: this tree)")
    ap.add_argument("--conns", type=int, default=64)
    ap.add_argument("--sources", type=int, default=8)
    ap.add_argument("--frame-mib", type=int, default=8)
    ap.add_argument("--only", choices=("flood", "loris"))
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    if args.src is not None:
        fleet.SRC = args.src.resolve()
    sys.path.insert(0, str(fleet.SRC))
    rows = []
    try:
        with tempfile.TemporaryDirectory(prefix="peerd-attack-") as tmp:
            if args.only in (None, "flood"):
                rows.append(
                    flood(Path(tmp) / "flood", args.conns, args.sources, args.frame_mib * MIB)
                )
            if args.only in (None, "loris"):
                rows.append(loris(Path(tmp) / "loris", 36, 3))
    finally:
        fleet.kill_all()
    for row in rows:
        print(json.dumps(row))
    if args.json is not None:
        args.json.write_text(json.dumps({"src": str(fleet.SRC), "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
