#!/usr/bin/env python3
"""Membership benchmark: N real daemons on loopback, timed from the outside.

    python benchmarks/membership/bench.py --sizes 10 30 60 --reps 3 \
        --out benchmarks/membership/results.json [--with-serf]

Each run starts N daemons (``peerd agent --preset lan``; with ``--with-serf``
also HashiCorp Serf agents, ``-profile=lan``) on distinct loopback addresses
with temporary state directories and sockets, and goes through these phases:

join
    The seed (node 0) is spawned and waited for; then the N-1 others are
    spawned back to back, each joining the seed. ``ready`` for a daemon is the
    first moment its API answered (peerd: a ``status`` reply on the Unix
    socket; Serf: its RPC port accepts a TCP connection). One monitor per
    daemon holds a watch stream (peerd: API ``watch members``, opened before
    a ``members`` snapshot; Serf: the agent's own log lines, read as they are
    written) and timestamps each membership event when it arrives. A daemon's
    view is complete when it lists N members alive; the cluster has converged
    at the first moment every daemon's view is complete.

    join_after_ready_s  = converged - (last daemon ready)
    join_from_spawn_s   = converged - (first of the N-1 joiners spawned)
    startup_s           = (last daemon ready) - (first joiner spawned)

    The views are then cross-checked with one API call per daemon (peerd
    ``members``, ``serf members -format=json``).

idle
    After ``--settle`` seconds, a quiet window of ``--idle`` seconds: CPU
    (utime+stime from /proc/PID/stat), wake-ups (voluntary context switches of
    all threads), memory (VmRSS; also its anonymous part and PSS), and per
    daemon datagrams sent and received (peerd: ``packets_out``/``packets_in``
    of the status counters; Serf: memberlist's udp.sent/udp.received metric
    counts, dumped on SIGUSR1, over the 10 s metric intervals that lie wholly
    inside the window). The namespace-wide UDP counters of /proc/net/snmp
    divided by N are kept in the JSON as a cross-check; they are only
    meaningful when nothing else on the host sends UDP.

crash (kill -9)
    Node N//3 is SIGKILLed. Times from the kill to the first ``suspect``,
    first ``dead`` and last ``dead`` event about it on the other daemons.

freeze (SIGSTOP)
    Node 2N//3 is SIGSTOPped: same times. Then SIGCONT: time until every
    other daemon reports it ``alive`` again (it must refute).

leave
    Node N-1 is asked to leave (peerd API ``leave``; ``serf leave``): time
    from the request to the first and last ``left`` event on the others.

Every wait has a deadline; a daemon that never reports something before its
deadline is counted in ``*_missing`` and the time is left null. Every process
started is stopped by pid (SIGCONT, SIGTERM, then SIGKILL after a timeout),
also on errors and on Ctrl-C (and an atexit hook SIGKILLs any survivor).
No address outside 127.0.0.0/8 is used.

The code under test is pinned: by default the daemons (and the client used
here) run from a ``git archive`` of HEAD taken at start, so that commits made
to the work tree during a long run cannot change what is measured
(``--peerd-rev REV`` picks another revision, ``--peerd-rev worktree`` runs
the work tree as it is). The results record the commit.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import datetime
import json
import os
import platform
import re
import shlex
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
from typing import TYPE_CHECKING, Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/fleet.py
from fleet import cpu_model, host_cpu, pin_source, udp_counters  # noqa: E402

if TYPE_CHECKING:
    from peerd.api.client import Client
else:
    Client = None  # imported by _load_peerd() from the code under test

now = time.monotonic
CLK_TCK = os.sysconf("SC_CLK_TCK")
REPO = Path(__file__).resolve().parents[2]

# Where the daemons' code comes from (see --peerd-rev): a PYTHONPATH entry.
PEERD_SRC: Path = REPO


def _load_peerd(rev: str, keep: bool) -> dict[str, Any]:
    """Pin the code under test (fleet.pin_source). Others may commit to the
    work tree during a long run; with a revision, daemons (and our client) run
    from a ``git archive`` of it instead, so every run measures the same code."""
    global PEERD_SRC, Client
    info = pin_source(rev, keep)
    PEERD_SRC = Path(info["src"])
    import peerd.api.client

    if Path(peerd.api.client.__file__).resolve().parents[2] != PEERD_SRC.resolve():
        raise SystemExit(f"peerd imported from {peerd.api.client.__file__}, not {PEERD_SRC}")
    Client = peerd.api.client.Client  # type: ignore[misc]
    return info


def daemon_env() -> dict[str, str]:
    pp = os.environ.get("PYTHONPATH")
    return dict(os.environ, PYTHONPATH=str(PEERD_SRC) + (os.pathsep + pp if pp else ""))


# Every pid we started, for the last-resort atexit hook.
_ALL_PIDS: set[int] = set()


def _kill_survivors() -> None:
    for pid in list(_ALL_PIDS):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGCONT)
            os.kill(pid, signal.SIGKILL)


atexit.register(_kill_survivors)

ALIVE_KINDS = ("joined", "alive")


# --- one daemon as seen from the bench ----------------------------------------------


@dataclass
class Node:
    idx: int
    name: str
    host: str
    proc: trio.Process | None = None
    spawned_t: float | None = None
    ready_t: float | None = None
    addr: str | None = None  # advertised gossip address once known
    gone: bool = False  # killed / left: not an observer any more
    view: dict[str, str] = field(default_factory=dict)
    full_since: float | None = None  # since when the view lists N alive
    events: list[tuple[float, str, str]] = field(default_factory=list)  # (t, kind, about)
    client: Client | None = None
    monitor_error: str | None = None
    # Serf: in-memory metrics dumped on SIGUSR1, {(interval start, metric): count}
    metrics: dict[tuple[float, str], int] = field(default_factory=dict)


class Cluster:
    """The shared bookkeeping: nodes, views, convergence."""

    impl = "?"

    def __init__(self, n: int, tmp: Path, args: argparse.Namespace) -> None:
        self.n = n
        self.tmp = tmp
        self.args = args
        self.nodes = [Node(i, f"n{i:02d}", self.host(i)) for i in range(n)]
        self.by_name = {nd.name: nd for nd in self.nodes}
        self.nursery: trio.Nursery | None = None
        self.converged_t: float | None = None

    def host(self, i: int) -> str:
        raise NotImplementedError

    # views --------------------------------------------------------------------------

    def record(self, node: Node, t: float, kind: str, about: str, status: str | None) -> None:
        node.events.append((t, kind, about))
        if status is not None:
            node.view[about] = status
        self._update_full(node, t)

    def _update_full(self, node: Node, t: float) -> None:
        full = sum(1 for s in node.view.values() if s == "alive") == self.n
        if full and node.full_since is None:
            node.full_since = t
        elif not full:
            node.full_since = None
        if self.converged_t is None and all(nd.full_since is not None for nd in self.nodes):
            self.converged_t = t

    def first_times(
        self, observers: list[Node], about: str, kinds: tuple[str, ...], after: float
    ) -> dict[str, float | None]:
        out: dict[str, float | None] = {}
        for nd in observers:
            out[nd.name] = next(
                (t for t, k, a in nd.events if a == about and k in kinds and t >= after), None
            )
        return out

    def observers(self, *excluded: Node) -> list[Node]:
        return [nd for nd in self.nodes if not nd.gone and nd not in excluded]

    def pids(self) -> list[int]:
        return [nd.proc.pid for nd in self.nodes if nd.proc is not None]

    # backend hooks --------------------------------------------------------------------

    async def spawn(self, node: Node, join: str | None) -> None:
        raise NotImplementedError

    async def watch(self, node: Node, deadline: float) -> None:
        """Become ready, then record membership events until cancelled."""
        raise NotImplementedError

    async def members(self, node: Node) -> dict[str, str]:
        raise NotImplementedError

    async def counters(self, node: Node) -> dict[str, int] | None:
        return None

    async def leave(self, node: Node) -> None:
        raise NotImplementedError

    async def datagram_rates(self, w0: float, w1: float) -> dict[str, tuple[float, float]] | None:
        """{name: (out/s, in/s)} over wall-clock window [w0, w1], if the
        daemon counts datagrams by some other means than status counters."""
        return None

    def seed_join_addr(self) -> str:
        raise NotImplementedError

    # processes ------------------------------------------------------------------------

    async def _open(self, node: Node, argv: list[str], **kw: Any) -> None:
        node.spawned_t = now()
        node.proc = await trio.lowlevel.open_process(argv, start_new_session=True, **kw)
        _ALL_PIDS.add(node.proc.pid)

    async def stop_all(self) -> dict[str, int]:
        """SIGCONT+SIGTERM every live process, wait, SIGKILL the rest."""
        procs = [nd.proc for nd in self.nodes if nd.proc is not None]
        for p in procs:
            if p.returncode is None:
                with contextlib.suppress(OSError):
                    p.send_signal(signal.SIGCONT)
                    p.send_signal(signal.SIGTERM)
        killed = 0
        with trio.move_on_after(self.args.stop_timeout):
            for p in procs:
                await p.wait()
        for p in procs:
            if p.returncode is None:
                killed += 1
                with contextlib.suppress(OSError):
                    p.kill()
        with trio.move_on_after(10):
            for p in procs:
                await p.wait()
        for p in procs:
            if p.returncode is not None:
                _ALL_PIDS.discard(p.pid)
        return {"stopped": len(procs), "sigkilled_after_timeout": killed}


class PeerdCluster(Cluster):
    impl = "peerd"

    def host(self, i: int) -> str:
        return f"127.0.0.{10 + i}"

    async def spawn(self, node: Node, join: str | None) -> None:
        d = self.tmp / node.name
        argv = [
            sys.executable,
            "-m",
            "peerd",
            "agent",
            "--name",
            node.name,
            "--bind",
            f"{node.host}:0",
            "--api-socket",
            str(self.tmp / f"{node.name}.sock"),
            "--state-dir",
            str(d),
            "--preset",
            "lan",
        ]
        if join:
            argv += ["--join", join]
        log = open(self.tmp / f"{node.name}.log", "ab")  # noqa: SIM115 (handed to the child)
        try:
            # cwd outside the repo: `python -m` puts the cwd first on sys.path.
            await self._open(
                node,
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=daemon_env(),
                cwd=str(self.tmp),
            )
        finally:
            log.close()

    def seed_join_addr(self) -> str:
        addr = self.nodes[0].addr
        assert addr is not None
        return addr

    async def watch(self, node: Node, deadline: float) -> None:
        path = str(self.tmp / f"{node.name}.sock")
        client: Client | None = None
        while client is None:
            if node.proc is not None and node.proc.returncode is not None:
                tail = _tail(self.tmp / f"{node.name}.log")
                node.monitor_error = (
                    f"exited with {node.proc.returncode} before its API answered: {tail}"
                )
                return
            if now() > deadline:
                node.monitor_error = "API never answered"
                return
            if os.path.exists(path):
                c = Client(path)
                try:
                    await c.__aenter__()
                except ConnectionError:
                    await trio.sleep(0.02)
                    continue
                try:
                    status = await c.call("status")
                except ConnectionError:
                    await c.__aexit__(None, None, None)
                    await trio.sleep(0.02)
                    continue
                node.ready_t = now()
                node.addr = status["addr"]
                client = c
            else:
                await trio.sleep(0.02)
        node.client = client
        try:
            async with client.watch(["members"]) as events:
                snap = await client.call("members")
                t = now()
                node.view = {m["name"]: m["status"] for m in snap}
                self._update_full(node, t)
                # Events buffered meanwhile are newer than or as new as the
                # snapshot: applying them in order on top of it is exact.
                async for ev in events:
                    t = now()
                    data = ev.data
                    self.record(node, t, ev.event, str(data.get("name")), data.get("status"))
        except ConnectionError as e:
            if not node.gone:
                node.monitor_error = f"watch lost: {e}"
        finally:
            node.client = None
            with trio.CancelScope(shield=True), contextlib.suppress(Exception):
                await client.__aexit__(None, None, None)

    async def members(self, node: Node) -> dict[str, str]:
        assert node.client is not None
        with trio.fail_after(10):
            return {m["name"]: m["status"] for m in await node.client.call("members")}

    async def counters(self, node: Node) -> dict[str, int] | None:
        if node.client is None:
            return None
        with trio.fail_after(10):
            st = await node.client.call("status")
        c = dict(st.get("counters") or {})
        out = {
            "packets_out": c.get("packets_out", c.get("udp_tx", 0)),
            "packets_in": c.get("packets_in", c.get("udp_rx", 0)),
            "tcp_out": c.get("tcp_out", 0),
            "tcp_in": c.get("tcp_in", 0),
            "health": int(st.get("health", 0)),
        }
        return out

    async def leave(self, node: Node) -> None:
        async with Client(str(self.tmp / f"{node.name}.sock")) as c:
            with trio.fail_after(30):
                await c.call("leave")


class SerfCluster(Cluster):
    """HashiCorp Serf agents, for a side-by-side reference (no Serf code here:
    we only run the ``serf`` binary and read its log lines)."""

    impl = "serf"
    PORT = 7946
    RPC_PORT = 7373
    _EVENTS = [
        (re.compile(r"serf: EventMemberJoin: (\S+) "), "joined", "alive"),
        (re.compile(r"serf: EventMemberFailed: (\S+) "), "dead", "dead"),
        (re.compile(r"serf: EventMemberLeave: (\S+) "), "left", "left"),
        (re.compile(r"serf: EventMemberReap: (\S+)"), "reaped", None),
        (re.compile(r"memberlist: Suspect (\S+) has failed"), "suspect", None),
    ]

    _METRIC = re.compile(
        r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) \+0000 UTC\]\[C\] "
        r"'serf-agent\.memberlist\.udp\.(sent|received)': Count: (\d+)"
    )

    def host(self, i: int) -> str:
        return f"127.1.0.{10 + i}"

    def seed_join_addr(self) -> str:
        return f"{self.nodes[0].host}:{self.PORT}"

    def rpc(self, node: Node) -> str:
        return f"{node.host}:{self.RPC_PORT}"

    async def spawn(self, node: Node, join: str | None) -> None:
        argv = [
            self.args.serf,
            "agent",
            f"-node={node.name}",
            f"-bind={node.host}:{self.PORT}",
            f"-rpc-addr={self.rpc(node)}",
            "-profile=lan",
            "-log-level=info",
        ]
        if join:
            argv.append(f"-join={join}")
        node.addr = f"{node.host}:{self.PORT}"
        await self._open(
            node, argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )

    async def _ready(self, node: Node, deadline: float) -> None:
        while now() < deadline:
            if node.proc is not None and node.proc.returncode is not None:
                node.monitor_error = f"exited with {node.proc.returncode}"
                return
            try:
                s = await trio.open_tcp_stream(node.host, self.RPC_PORT)
            except OSError:
                await trio.sleep(0.02)
                continue
            node.ready_t = now()
            await s.aclose()
            node.view.setdefault(node.name, "alive")
            return
        node.monitor_error = "RPC never answered"

    async def watch(self, node: Node, deadline: float) -> None:
        assert node.proc is not None and node.proc.stdout is not None
        stdout = node.proc.stdout
        log = open(self.tmp / f"{node.name}.log", "ab")  # noqa: SIM115
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._ready, node, deadline)
                buf = b""
                while True:
                    chunk = await stdout.receive_some(65536)
                    if not chunk:
                        break
                    t = now()
                    log.write(chunk)
                    buf += chunk
                    *lines, buf = buf.split(b"\n")
                    for raw in lines:
                        line = raw.decode("utf-8", "replace")
                        mm = self._METRIC.match(line)
                        if mm:
                            start = (
                                datetime.datetime.strptime(mm.group(1), "%Y-%m-%d %H:%M:%S")
                                .replace(tzinfo=datetime.UTC)
                                .timestamp()
                            )
                            node.metrics[(start, mm.group(2))] = int(mm.group(3))
                            continue
                        for rx, kind, status in self._EVENTS:
                            m = rx.search(line)
                            if m:
                                self.record(node, t, kind, m.group(1), status)
                                break
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            log.close()

    async def _serf(self, *argv: str, timeout: float = 15) -> bytes:
        with trio.fail_after(timeout):
            r = await trio.run_process(
                [self.args.serf, *argv], capture_stdout=True, capture_stderr=True, check=False
            )
        if r.returncode != 0:
            raise RuntimeError(f"serf {argv[0]} failed: {r.stderr.decode(errors='replace')}")
        out: bytes = r.stdout
        return out

    async def members(self, node: Node) -> dict[str, str]:
        out = json.loads(await self._serf("members", "-format=json", f"-rpc-addr={self.rpc(node)}"))
        return {
            m["name"]: ("dead" if m["status"] == "failed" else m["status"]) for m in out["members"]
        }

    async def leave(self, node: Node) -> None:
        await self._serf("leave", f"-rpc-addr={self.rpc(node)}", timeout=30)

    async def datagram_rates(self, w0: float, w1: float) -> dict[str, tuple[float, float]] | None:
        # Serf keeps 10 s metric intervals for a minute and dumps them on
        # SIGUSR1; memberlist counts one udp.sent sample per datagram. Only
        # intervals wholly inside the window are used.
        live = [nd for nd in self.observers() if nd.proc is not None]
        for nd in live:
            nd.metrics.clear()
            with contextlib.suppress(OSError):
                nd.proc.send_signal(signal.SIGUSR1)  # type: ignore[union-attr]
        await trio.sleep(1.0)
        out = {}
        for nd in live:
            starts = sorted({st for st, _ in nd.metrics if st >= w0 and st + 10 <= w1})
            if not starts:
                continue
            span = 10.0 * len(starts)
            out[nd.name] = (
                sum(nd.metrics.get((st, "sent"), 0) for st in starts) / span,
                sum(nd.metrics.get((st, "received"), 0) for st in starts) / span,
            )
        return out or None


def _tail(path: Path) -> str:
    with contextlib.suppress(OSError):
        lines = path.read_text(errors="replace").strip().splitlines()
        return lines[-1] if lines else ""
    return ""


# --- /proc ----------------------------------------------------------------------------


def proc_cpu_s(pid: int) -> float:
    data = Path(f"/proc/{pid}/stat").read_text()
    rest = data[data.rindex(")") + 2 :].split()
    return (int(rest[11]) + int(rest[12])) / CLK_TCK  # fields 14 utime, 15 stime


def proc_mem_mib(pid: int) -> dict[str, float]:
    """VmRSS (what the target means), its peak, its private (anonymous) and
    file-backed parts, and PSS (shared library pages split between sharers)."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key = line.split(":", 1)[0]
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            out[key] = int(line.split()[1]) / 1024
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                out["Pss"] = int(line.split()[1]) / 1024
    return out


def proc_wakeups(pid: int) -> int:
    """Voluntary context switches of all the process's threads: roughly how
    often it went to sleep and was woken (timers, packets, API)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            for line in (task / "status").read_text().splitlines():
                if line.startswith("voluntary_ctxt_switches:"):
                    total += int(line.split()[1])
    return total


# --- the phases -------------------------------------------------------------------------


def log(msg: str) -> None:
    print(f"[{datetime.datetime.now().strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


async def wait_until(pred: Any, deadline: float, poll: float = 0.01) -> bool:
    while True:
        if pred():
            return True
        if now() >= deadline:
            return False
        await trio.sleep(poll)


def spread(times: dict[str, float | None], t0: float) -> dict[str, Any]:
    got = [t - t0 for t in times.values() if t is not None]
    return {
        "first_s": min(got) if got else None,
        "last_s": max(got) if len(got) == len(times) and got else None,
        "seen_by": len(got),
        "observers": len(times),
        "missing": len(times) - len(got),
        "by": {name: None if t is None else round(t - t0, 4) for name, t in times.items()},
    }


async def phase_join(cl: Cluster, res: dict[str, Any]) -> None:
    a = cl.args
    assert cl.nursery is not None
    seed = cl.nodes[0]
    t_seed = now()
    await cl.spawn(seed, None)
    cl.nursery.start_soon(cl.watch, seed, t_seed + a.start_timeout)
    if (
        not await wait_until(
            lambda: seed.ready_t is not None or seed.monitor_error, t_seed + a.start_timeout, 0.005
        )
        or seed.ready_t is None
    ):
        raise RuntimeError(f"seed did not start: {seed.monitor_error}")
    res["seed_ready_s"] = seed.ready_t - t_seed
    join = cl.seed_join_addr()
    t_spawn = now()
    deadline = t_spawn + a.start_timeout + 0.5 * cl.n
    for nd in cl.nodes[1:]:
        await cl.spawn(nd, join)
        cl.nursery.start_soon(cl.watch, nd, deadline)
    res["spawn_all_s"] = now() - t_spawn
    if not await wait_until(
        lambda: all(nd.ready_t or nd.monitor_error for nd in cl.nodes), deadline, 0.01
    ):
        pass
    bad = [f"{nd.name}: {nd.monitor_error}" for nd in cl.nodes if nd.ready_t is None]
    if bad:
        raise RuntimeError("daemons did not start: " + "; ".join(bad[:5]))
    t_ready = max(nd.ready_t for nd in cl.nodes if nd.ready_t is not None)
    ok = await wait_until(lambda: cl.converged_t is not None, now() + a.converge_timeout, 0.005)
    res["startup_s"] = t_ready - t_spawn
    if not ok or cl.converged_t is None:
        res["converged"] = False
        counts = sorted(sum(1 for s in nd.view.values() if s == "alive") for nd in cl.nodes)
        res["alive_counts_at_timeout"] = counts
        # Ask the incomplete daemons themselves: a view built from events
        # could in principle miss an event the daemon did act on.
        own = {}
        for nd in cl.nodes:
            if nd.full_since is None:
                with contextlib.suppress(Exception):
                    got = await cl.members(nd)
                    own[nd.name] = {
                        "alive": sum(1 for x in got.values() if x == "alive"),
                        "missing": sorted(
                            set(cl.by_name) - {k for k, x in got.items() if x == "alive"}
                        ),
                    }
        res["incomplete_views_by_api"] = own
        raise RuntimeError(f"no convergence within {a.converge_timeout} s: {counts}")
    res["converged"] = True
    res["join_after_ready_s"] = max(0.0, cl.converged_t - t_ready)
    res["join_from_spawn_s"] = cl.converged_t - t_spawn
    res["join_from_seed_spawn_s"] = cl.converged_t - t_seed
    # Cross-check the event-built views with the daemons' own lists.
    mismatch = []
    for nd in cl.nodes:
        got = await cl.members(nd)
        n_alive = sum(1 for s in got.values() if s == "alive")
        if n_alive != cl.n:
            mismatch.append(f"{nd.name}:{n_alive}")
    res["members_check"] = "ok" if not mismatch else "mismatch " + " ".join(mismatch)
    log(
        f"  join: startup {res['startup_s']:.2f} s, converged {res['join_after_ready_s']:.3f} s "
        f"after last ready ({res['join_from_spawn_s']:.2f} s from spawn); "
        f"members check {res['members_check']}"
    )


async def sample(cl: Cluster) -> dict[str, Any]:
    out: dict[str, Any] = {
        "t": now(),
        "wall": time.time(),
        "snmp": udp_counters(),
        "busy": host_cpu(),
        "nodes": {},
    }
    for nd in cl.observers():
        assert nd.proc is not None
        with contextlib.suppress(OSError):
            c = await cl.counters(nd)
            out["nodes"][nd.name] = {
                "t": now(),
                "cpu": proc_cpu_s(nd.proc.pid),
                "wakeups": proc_wakeups(nd.proc.pid),
                "mem": proc_mem_mib(nd.proc.pid),
                "counters": c,
            }
    return out


def suspicions(cl: Cluster, after: float, before: float) -> int:
    return sum(
        1
        for nd in cl.nodes
        for t, k, _ in nd.events
        if after <= t <= before and k in ("suspect", "dead")
    )


async def phase_idle(cl: Cluster, res: dict[str, Any]) -> None:
    a = cl.args
    await trio.sleep(a.settle)
    t0 = now()
    s0 = await sample(cl)
    await trio.sleep(a.idle)
    s1 = await sample(cl)
    window = s1["t"] - s0["t"]
    cpu, tx, rx, tcp, wake = [], [], [], [], []
    mem: dict[str, list[float]] = {}
    for name, b in s1["nodes"].items():
        x = s0["nodes"].get(name)
        if x is None:
            continue
        dt = b["t"] - x["t"]
        cpu.append((b["cpu"] - x["cpu"]) / dt * 60)
        wake.append((b["wakeups"] - x["wakeups"]) / dt)
        for key, v in b["mem"].items():
            mem.setdefault(key, []).append(v)
        if b["counters"] and x["counters"]:
            tx.append((b["counters"]["packets_out"] - x["counters"]["packets_out"]) / dt)
            rx.append((b["counters"]["packets_in"] - x["counters"]["packets_in"]) / dt)
            tcp.append((b["counters"]["tcp_out"] - x["counters"]["tcp_out"]) / dt * 60)
    k = len(s1["nodes"])
    health = [
        b["counters"]["health"]
        for b in s1["nodes"].values()
        if b["counters"] and "health" in b["counters"]
    ]
    if health:
        res["health_max_at_idle_end"] = max(health)
        res["health_nonzero_at_idle_end"] = sum(1 for h in health if h)
    other = await cl.datagram_rates(s0["wall"], s1["wall"])
    if other:
        tx = [v[0] for v in other.values()]
        rx = [v[1] for v in other.values()]
    busy = (s1["busy"][0] - s0["busy"][0]) / max(1, s1["busy"][1] - s0["busy"][1])
    res["idle_window_s"] = window
    res["host_cpu_busy_fraction"] = busy
    res["loadavg"] = Path("/proc/loadavg").read_text().split()[:3]
    res["idle_cpu_s_per_min"] = statistics.median(cpu)
    res["idle_cpu_s_per_min_max"] = max(cpu)
    res["idle_cpu_s_per_min_total"] = sum(cpu)
    res["idle_wakeups_per_s"] = statistics.median(wake)
    rss = mem["VmRSS"]
    res["rss_mib"] = statistics.median(rss)
    res["rss_mib_max"] = max(rss)
    res["rss_hwm_mib_max"] = max(mem.get("VmHWM", rss))
    for key, name in (("RssAnon", "rss_anon_mib"), ("RssFile", "rss_file_mib"), ("Pss", "pss_mib")):
        if key in mem:
            res[name] = statistics.median(mem[key])
    res["dgrams_out_per_s"] = statistics.median(tx) if tx else None
    res["dgrams_out_per_s_max"] = max(tx) if tx else None
    res["dgrams_in_per_s"] = statistics.median(rx) if rx else None
    res["tcp_streams_out_per_min"] = statistics.median(tcp) if tcp else None
    res["snmp_udp_out_per_s_per_daemon"] = (
        (s1["snmp"]["OutDatagrams"] - s0["snmp"]["OutDatagrams"]) / window / k
    )
    res["snmp_udp_in_per_s_per_daemon"] = (
        (s1["snmp"]["InDatagrams"] - s0["snmp"]["InDatagrams"]) / window / k
    )
    res["false_suspicions_until_idle_end"] = suspicions(cl, 0, now())
    res["views_complete_at_idle_end"] = sum(1 for nd in cl.nodes if nd.full_since is not None)
    dg = res["dgrams_out_per_s"]
    log(
        f"  idle {window:.0f} s: cpu {res['idle_cpu_s_per_min']:.3f} s/min (median), "
        f"rss {res['rss_mib']:.1f}/{res['rss_mib_max']:.1f} MiB, "
        f"dgrams out {'-' if dg is None else f'{dg:.2f}'}/s (snmp "
        f"{res['snmp_udp_out_per_s_per_daemon']:.2f}/s), "
        f"suspicions so far {res['false_suspicions_until_idle_end']}, host busy {busy:.0%}"
    )
    _ = t0


async def health_scores(cl: Cluster, nodes: list[Node]) -> list[int] | None:
    """Lifeguard local health of each daemon (peerd ``status``), sorted."""
    out = []
    for nd in nodes:
        c = None
        with contextlib.suppress(Exception):
            c = await cl.counters(nd)
        if c is None or "health" not in c:
            return None
        out.append(c["health"])
    return sorted(out)


async def phase_crash(cl: Cluster, res: dict[str, Any], victim: Node) -> None:
    a = cl.args
    obs = cl.observers(victim)
    assert victim.proc is not None
    res["health_before_crash"] = await health_scores(cl, obs)
    t0 = now()
    victim.gone = True
    victim.proc.send_signal(signal.SIGKILL)
    await wait_until(
        lambda: all(
            t is not None for t in cl.first_times(obs, victim.name, ("dead",), t0).values()
        ),
        t0 + a.detect_timeout,
    )
    dead = spread(cl.first_times(obs, victim.name, ("dead",), t0), t0)
    sus = spread(cl.first_times(obs, victim.name, ("suspect", "dead"), t0), t0)
    res["crash_first_suspect_s"] = sus["first_s"]
    res["crash_first_dead_s"] = dead["first_s"]
    res["crash_all_dead_s"] = dead["last_s"]
    res["crash_missing"] = dead["missing"]
    res["crash_detail"] = {"victim": victim.name, "dead": dead["by"]}
    with trio.move_on_after(10):
        await victim.proc.wait()
    log(
        f"  kill -9 {victim.name}: suspect {_f(sus['first_s'])}, dead first {_f(dead['first_s'])} "
        f"last {_f(dead['last_s'])} ({dead['seen_by']}/{dead['observers']})"
    )


async def phase_freeze(cl: Cluster, res: dict[str, Any], victim: Node) -> None:
    a = cl.args
    obs = cl.observers(victim)
    assert victim.proc is not None
    res["health_before_freeze"] = await health_scores(cl, obs)
    t0 = now()
    victim.proc.send_signal(signal.SIGSTOP)
    try:
        await wait_until(
            lambda: all(
                t is not None for t in cl.first_times(obs, victim.name, ("dead",), t0).values()
            ),
            t0 + a.detect_timeout,
        )
    finally:
        t1 = now()
        victim.proc.send_signal(signal.SIGCONT)
    dead = spread(cl.first_times(obs, victim.name, ("dead",), t0), t0)
    sus = spread(cl.first_times(obs, victim.name, ("suspect", "dead"), t0), t0)
    res["freeze_first_suspect_s"] = sus["first_s"]
    res["freeze_first_dead_s"] = dead["first_s"]
    res["freeze_all_dead_s"] = dead["last_s"]
    res["freeze_missing"] = dead["missing"]
    await wait_until(
        lambda: all(
            t is not None for t in cl.first_times(obs, victim.name, ALIVE_KINDS, t1).values()
        ),
        t1 + a.detect_timeout,
    )
    back = spread(cl.first_times(obs, victim.name, ALIVE_KINDS, t1), t1)
    res["resume_first_alive_s"] = back["first_s"]
    res["resume_all_alive_s"] = back["last_s"]
    res["resume_missing"] = back["missing"]
    res["freeze_detail"] = {"victim": victim.name, "dead": dead["by"], "alive_again": back["by"]}
    # and the resumed node itself lists the others as they are
    if victim.proc.returncode is None and (cl.impl != "peerd" or victim.client is not None):
        with contextlib.suppress(Exception):
            own = await cl.members(victim)
            res["resumed_node_sees_alive"] = sum(1 for s in own.values() if s == "alive")
    log(
        f"  SIGSTOP {victim.name}: suspect {_f(sus['first_s'])}, dead first "
        f"{_f(dead['first_s'])} last {_f(dead['last_s'])} ({dead['seen_by']}/{dead['observers']});"
        f" SIGCONT: alive first {_f(back['first_s'])} last {_f(back['last_s'])} "
        f"({back['seen_by']}/{back['observers']})"
    )


async def phase_leave(cl: Cluster, res: dict[str, Any], victim: Node) -> None:
    a = cl.args
    obs = cl.observers(victim)
    assert victim.proc is not None and cl.nursery is not None
    res["health_before_leave"] = await health_scores(cl, obs)
    call: dict[str, Any] = {}

    async def do_leave() -> None:
        try:
            await cl.leave(victim)
            call["s"] = now() - t0
        except Exception as e:  # noqa: BLE001 (recorded, not fatal)
            call["error"] = repr(e)

    t0 = now()
    victim.gone = True
    cl.nursery.start_soon(do_leave)
    await wait_until(
        lambda: all(
            t is not None for t in cl.first_times(obs, victim.name, ("left",), t0).values()
        ),
        t0 + a.detect_timeout,
    )
    left = spread(cl.first_times(obs, victim.name, ("left",), t0), t0)
    res["leave_first_s"] = left["first_s"]
    res["leave_all_s"] = left["last_s"]
    res["leave_missing"] = left["missing"]
    # Serf may record a leaver as failed when the death outruns the leave
    # intent: count "gone either way" too.
    gone = spread(cl.first_times(obs, victim.name, ("left", "dead"), t0), t0)
    res["leave_all_gone_s"] = gone["last_s"]
    res["leave_seen_as_dead"] = sum(
        1 for nd in obs for t, k, a in nd.events if a == victim.name and k == "dead" and t >= t0
    )
    res["leave_detail"] = {"victim": victim.name, "left": left["by"]}
    with trio.move_on_after(30):
        await victim.proc.wait()
    await wait_until(lambda: call, now() + 5)
    res["leave_call_s"] = call.get("s")
    res["leave_call_error"] = call.get("error")
    res["leave_exit_code"] = victim.proc.returncode
    res["leave_exit_s"] = now() - t0 if victim.proc.returncode is not None else None
    log(
        f"  leave {victim.name}: left first {_f(left['first_s'])} last {_f(left['last_s'])} "
        f"({left['seen_by']}/{left['observers']}), call {_f(call.get('s'))}, "
        f"exit {victim.proc.returncode}"
    )


def _f(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}s"


async def run_once(
    cls: type[Cluster], n: int, rep: int, args: argparse.Namespace
) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix=f"bench-{cls.impl}-{n}-"))
    cl = cls(n, tmp, args)
    res: dict[str, Any] = {"impl": cls.impl, "n": n, "rep": rep}
    log(f"{cls.impl} N={n} rep {rep + 1}/{args.reps} (logs in {tmp})")
    try:
        async with trio.open_nursery() as nursery:
            cl.nursery = nursery
            try:
                await phase_join(cl, res)
                if args.idle > 0:
                    await phase_idle(cl, res)
                k, f, lv = cl.nodes[n // 3], cl.nodes[2 * n // 3], cl.nodes[n - 1]
                await phase_crash(cl, res, k)
                await trio.sleep(args.pause)
                await phase_freeze(cl, res, f)
                await trio.sleep(args.pause)
                await phase_leave(cl, res, lv)
                res["false_suspicions_total"] = sum(
                    1
                    for nd in cl.nodes
                    for t, kd, about in nd.events
                    if kd in ("suspect", "dead") and about not in (k.name, f.name, lv.name)
                )
            except Exception as e:  # noqa: BLE001 (recorded; the run goes on)
                res["error"] = f"{type(e).__name__}: {e}"
                log(f"  ERROR {res['error']}")
            finally:
                res["monitor_errors"] = {
                    nd.name: nd.monitor_error for nd in cl.nodes if nd.monitor_error
                }
                nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            res["teardown"] = await cl.stop_all()
        if not args.keep and "error" not in res:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            res["logs"] = str(tmp)
    return res


# --- aggregation and report -------------------------------------------------------------

METRICS = [
    # key, label, unit
    ("join_after_ready_s", "join: all ready -> all list N alive", "s"),
    ("join_from_spawn_s", "join: first joiner spawned -> all list N alive", "s"),
    ("startup_s", "startup: first joiner spawned -> last API answers", "s"),
    ("crash_first_dead_s", "kill -9: first peer marks dead", "s"),
    ("crash_all_dead_s", "kill -9: all peers mark dead", "s"),
    ("freeze_first_dead_s", "SIGSTOP: first peer marks dead", "s"),
    ("freeze_all_dead_s", "SIGSTOP: all peers mark dead", "s"),
    ("resume_all_alive_s", "SIGCONT: all peers see it alive again", "s"),
    ("leave_first_s", "leave: first peer sees left", "s"),
    ("leave_all_s", "leave: all peers see left", "s"),
    ("leave_missing", "leave: peers that never reported left (deadline)", ""),
    ("leave_all_gone_s", "leave: all peers see it left or dead", "s"),
    ("idle_cpu_s_per_min", "idle CPU per daemon (median)", "s/min"),
    ("idle_wakeups_per_s", "idle wake-ups per daemon (voluntary context switches)", "/s"),
    ("rss_mib", "RSS per daemon (median)", "MiB"),
    ("rss_mib_max", "RSS per daemon (max)", "MiB"),
    ("rss_anon_mib", "RSS: private (anon) part (median)", "MiB"),
    ("pss_mib", "PSS per daemon (median)", "MiB"),
    (
        "dgrams_out_per_s",
        "datagrams out per daemon (peerd: status counters; Serf: its memberlist metrics)",
        "/s",
    ),
    ("dgrams_in_per_s", "datagrams in per daemon (same sources)", "/s"),
    ("false_suspicions_total", "suspect/dead events about healthy nodes", ""),
    ("host_cpu_busy_fraction", "whole host CPU busy during the idle window (0-1)", ""),
]

# Targets from the issue. Serf's LAN profile, measured on the same 2-core
# machine, and peerd's own limits. (lo, hi) ranges; None = not given.
SERF_REF: dict[str, Any] = {
    "join": {10: (0.2, 0.4), 30: (0.6, 0.7), 60: (1.1, 1.1)},
    "crash_all_dead": {10: (5.0, 6.0), 30: (7.4, 8.6), 60: (8.8, 8.8)},
    "leave_all": (0.8, 1.2),
    "idle_cpu": (0.10, 0.15),
    "rss": 15.0,
    "dgrams": 2.0,
}
PEERD_LIMITS = {
    "crash_all_dead_s": 1.5,
    "idle_cpu_s_per_min": 0.12,
    "rss_mib_max": 30.0,
    "dgrams_out_per_s": 2.0,
}


def aggregate(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault((r["impl"], r["n"]), []).append(r)
    for (impl, n), rs in sorted(groups.items()):
        agg: dict[str, Any] = {"runs": len(rs), "errors": sum(1 for r in rs if "error" in r)}
        for key, _, _ in METRICS:
            vals = [r[key] for r in rs if r.get(key) is not None]
            agg[key] = (
                {
                    "min": min(vals),
                    "median": statistics.median(vals),
                    "max": max(vals),
                    "n": len(vals),
                }
                if vals
                else None
            )
        out.setdefault(impl, {})[str(n)] = agg
    return out


# Datagram rates over a 60 s window move by a datagram or so either way (a
# push-pull or one gossip packet): "no more than Serf" allows 1 %.
DGRAM_TOLERANCE = 1.01


def targets(
    impl_agg: dict[str, Any], serf_agg: dict[str, Any] | None = None
) -> list[dict[str, Any]]:
    """Median of each measure against its target; met = True/False/None.
    ``serf_agg``: Serf measured in the same run, shown beside the reference."""
    rows = []

    def med(n: str, key: str, agg: dict[str, Any] | None = impl_agg) -> float | None:
        v = (agg or {}).get(n, {}).get(key)
        return None if v is None else v["median"]

    for n in impl_agg:
        ni = int(n)
        join_ref = SERF_REF["join"].get(ni)
        crash_ref = SERF_REF["crash_all_dead"].get(ni)

        def row(
            what: str, key: str, limit: float | None, ref: str, n: str = n, ni: int = ni
        ) -> None:
            v = med(n, key)
            rows.append(
                {
                    "n": ni,
                    "what": what,
                    "key": key,
                    "median": v,
                    "limit": limit,
                    "ref": ref,
                    "serf_here": med(n, key, serf_agg),
                    "met": None if v is None or limit is None else v <= limit,
                }
            )

        row(
            "join (after all ready) <= Serf",
            "join_after_ready_s",
            join_ref[1] if join_ref else None,
            _rng(join_ref),
        )
        row(
            "join (from spawn) <= Serf",
            "join_from_spawn_s",
            join_ref[1] if join_ref else None,
            _rng(join_ref),
        )
        row("kill -9 dead everywhere <= 1.5 s", "crash_all_dead_s", 1.5, _rng(crash_ref))
        row(
            "SIGSTOP dead everywhere <= Serf crash",
            "freeze_all_dead_s",
            crash_ref[1] if crash_ref else None,
            _rng(crash_ref),
        )
        row(
            "leave seen by all <= Serf",
            "leave_all_s",
            SERF_REF["leave_all"][1],
            _rng(SERF_REF["leave_all"]),
        )
        row("idle CPU <= 0.12 s/min", "idle_cpu_s_per_min", 0.12, _rng(SERF_REF["idle_cpu"]))
        row("RSS (max) <= 30 MiB", "rss_mib_max", 30.0, "15 MiB")
        row("datagrams/s <= Serf (2.0, +1 %)", "dgrams_out_per_s", 2.0 * DGRAM_TOLERANCE, "2.0/s")
    return rows


def _rng(r: tuple[float, float] | None) -> str:
    if r is None:
        return "-"
    return f"{r[0]:g}" if r[0] == r[1] else f"{r[0]:g}-{r[1]:g}"


def markdown(agg: dict[str, Any]) -> str:
    lines = []
    for impl, by_n in agg.items():
        sizes = sorted(by_n, key=int)
        lines.append(f"### {impl}: min / **median** / max over runs\n")
        lines.append("| measure | unit | " + " | ".join(f"N={n}" for n in sizes) + " |")
        lines.append("|---|---|" + "---|" * len(sizes))
        for key, label, unit in METRICS:
            cells = []
            for n in sizes:
                v = by_n[n].get(key)
                cells.append(
                    "-" if v is None else f"{_g(v['min'])} / **{_g(v['median'])}** / {_g(v['max'])}"
                )
            if all(c == "-" for c in cells):
                continue
            lines.append(f"| {label} | {unit} | " + " | ".join(cells) + " |")
        lines.append("")
    if "peerd" in agg:
        lines.append("### peerd against the targets (medians)\n")
        lines.append(
            "| N | target | Serf reference (issue) | Serf measured here | peerd median | met |"
        )
        lines.append("|---|---|---|---|---|---|")
        for r in targets(agg["peerd"], agg.get("serf")):
            met = {True: "yes", False: "**no**", None: "n/a"}[r["met"]]
            lines.append(
                f"| {r['n']} | {r['what']} | {r['ref']} | {_g(r['serf_here'])} "
                f"| {_g(r['median'])} | {met} |"
            )
        lines.append("")
    return "\n".join(lines)


def _g(x: float | None) -> str:
    if x is None:
        return "-"
    if isinstance(x, int) or float(x).is_integer():
        return str(int(x))
    return f"{x:.3f}" if abs(x) < 10 else f"{x:.1f}"


def machine(code: dict[str, Any]) -> dict[str, Any]:
    cpu = cpu_model()
    serf = ""
    with contextlib.suppress(Exception):
        serf = subprocess.run(
            ["serf", "version"], capture_output=True, text=True, timeout=10
        ).stdout.splitlines()[0]
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "python": platform.python_version(),
        "kernel": platform.release(),
        "peerd": code,
        "serf": serf,
        "mem_total_mib": _meminfo_mib("MemTotal"),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


# --- main -------------------------------------------------------------------------------


def _meminfo_mib(key: str) -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) // 1024
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--sizes", type=int, nargs="+", default=[10, 30, 60])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--idle", type=float, default=60.0, help="idle window, seconds (0 skips)")
    p.add_argument(
        "--settle", type=float, default=5.0, help="wait after convergence before the idle window"
    )
    p.add_argument("--pause", type=float, default=2.0, help="pause between fault phases")
    p.add_argument("--start-timeout", type=float, default=30.0)
    p.add_argument("--converge-timeout", type=float, default=120.0)
    p.add_argument("--detect-timeout", type=float, default=60.0)
    p.add_argument(
        "--stop-timeout", type=float, default=15.0, help="SIGTERM grace before SIGKILL at teardown"
    )
    p.add_argument("--with-serf", action="store_true", help="also run HashiCorp Serf")
    p.add_argument("--serf-only", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--serf", default="serf", help="serf binary")
    p.add_argument(
        "--peerd-rev",
        default="HEAD",
        metavar="REV|worktree",
        help="run the daemons from `git archive REV` (default HEAD), so that "
        "commits made during the run cannot change the code under test; "
        "'worktree' runs the work tree as it is",
    )
    p.add_argument("--keep", action="store_true", help="keep the temporary dirs and logs")
    p.add_argument("--out", type=Path, help="write results JSON here")
    p.add_argument(
        "--report",
        type=Path,
        metavar="RESULTS.json",
        help="run nothing: print (with --markdown write) the tables of a results "
        "file; with --out, write it back with its summary recomputed",
    )
    p.add_argument(
        "--merge",
        type=Path,
        metavar="RESULTS.json",
        help="also report the runs of an earlier results file, except those of "
        "an (implementation, N) measured again now",
    )
    p.add_argument("--markdown", type=Path, help="write the result tables (markdown) here")
    a = p.parse_args(argv)
    if min(a.sizes) < 4:
        p.error("sizes must be >= 4 (seed, crash, freeze and leave victims)")
    if max(a.sizes) > 200:
        p.error("sizes above 200 are not supported (127.0.0.10-209)")
    return a


async def main_async(args: argparse.Namespace) -> list[dict[str, Any]]:
    impls: list[type[Cluster]] = [] if args.serf_only else [PeerdCluster]
    if args.with_serf or args.serf_only:
        if shutil.which(args.serf) is None:
            raise SystemExit(f"--with-serf: no {args.serf!r} binary (apt-get install -y serf)")
        impls.append(SerfCluster)
    runs = []
    for n in args.sizes:
        for rep in range(args.reps):
            for cls in impls:
                runs.append(await run_once(cls, n, rep, args))
    return runs


def _check_loopback_aliases() -> None:
    # 127.0.0.0/8 is all local on Linux: binding 127.0.0.x needs no setup.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.10", 0))


def _on_sigterm(*_: object) -> None:
    _kill_survivors()
    os._exit(143)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.report:
        doc = json.loads(args.report.read_text())
        agg = aggregate(doc["runs"])
        md = markdown(agg)
        if args.out:  # refresh the derived parts (e.g. after a change of targets)
            doc["summary"] = agg
            doc["targets"] = (
                {"peerd": targets(agg["peerd"], agg.get("serf"))} if ("peerd" in agg) else {}
            )
            args.out.write_text(json.dumps(doc, indent=1, default=str) + "\n")
        if args.markdown:
            args.markdown.write_text(md + "\n")
        print(md)
        return 0
    code = _load_peerd(args.peerd_rev, args.keep)
    _check_loopback_aliases()
    started = now()
    signal.signal(signal.SIGTERM, _on_sigterm)
    runs = trio.run(main_async, args)
    commands: list[dict[str, Any]] = []
    if args.merge:
        old = json.loads(args.merge.read_text())
        fresh = {(r["impl"], r["n"]) for r in runs}
        kept = [r for r in old["runs"] if (r["impl"], r["n"]) not in fresh]
        runs = kept + runs
        commands = old.get("merged_from") or []
        commands.append(
            {
                "command": old["command"],
                "date": old["machine"]["date"],
                "peerd": old["machine"]["peerd"],
            }
        )
    agg = aggregate(runs)
    doc = {
        "command": "python benchmarks/membership/bench.py "
        + shlex.join(sys.argv[1:] if argv is None else argv),
        "machine": machine(code),
        "merged_from": commands,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "wall_s": round(now() - started, 1),
        "definitions": {key: f"{label} ({unit})" for key, label, unit in METRICS},
        "summary": agg,
        "targets": {"peerd": targets(agg["peerd"], agg.get("serf"))} if "peerd" in agg else {},
        "runs": runs,
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    md = markdown(agg)
    if args.markdown:
        args.markdown.write_text(md + "\n")
    print(md)
    errors = [r for r in runs if "error" in r]
    for r in errors:
        print(
            f"run {r['impl']} N={r['n']} rep {r['rep']}: {r['error']} (logs {r.get('logs')})",
            file=sys.stderr,
        )
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
