"""The simulated world: many cores, one event heap, a virtual clock, a fake network.

Theory of operation. Every core is the real :class:`peerd.core.node.Node`,
driven exactly as the daemon's runner drives it (``handle(now, input)`` and
then carry out each output); only the outputs' effects are simulated. One
heap holds ``(time, seq, target, input)``: ``seq`` makes the order total and
deterministic, ``target`` is either a *host* (an address: a datagram is
delivered to whatever process runs there when it arrives) or a *process*
(timers and stream results die with the process that armed them). Faults
and measurements are entries of the same heap, so everything happens in one
well-defined order.

Determinism: one ``random.Random(seed)`` drives the network; each node's RNG
is derived from the seed, its index and its generation; nothing iterates a
set or dict keyed by bytes or objects (their order depends on the hash seed).
The same scenario and seed therefore give the same run, byte for byte.

The network carries the real encoded datagrams (optionally really sealed and
opened). A datagram to a host whose daemon crashed (host still up) comes back
as an ICMP port-unreachable hint, and the host's kernel closes the watch
links to it; a host crash (``icmp = false``) and a pause produce neither.
Streams (push-pull) are reliable but blocked by partitions; they fail after
the stream timeout when the peer is silent.

What the world measures, it measures from outside the cores: every
``MemberEvent`` updates a byte matrix ``views[observer][subject]`` against
the ground truth (which processes really run), so convergence, detection
times and false positives are exact, not sampled.
"""

from __future__ import annotations

import heapq
import math
import random
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from peerd.core.events import (
    CommandResult,
    EventKind,
    IncarnationChanged,
    Input,
    JoinDone,
    Leave,
    LeaveDone,
    LinkClosed,
    Log,
    MemberEvent,
    MeshCast,
    OpenStream,
    PacketIn,
    RegistryEvent,
    SendPacket,
    SetTimer,
    Start,
    StreamFailed,
    StreamReply,
    StreamRequest,
    StreamResponse,
    TimerFired,
    Unreachable,
    WatchLinks,
)
from peerd.core.peer import Peer
from peerd.sim import store
from peerd.sim.mesh import T_MESH, MeshWorld
from peerd.sim.registry import RegistryWorld
from peerd.sim.scenario import Fault, Scenario, Selection
from peerd.wire import seal as sealmod
from peerd.wire.messages import Addr, MemberState, Status

# View codes in the observer x subject matrix.
V_UNKNOWN, V_ALIVE, V_SUSPECT, V_DEAD, V_LEFT = 0, 1, 2, 3, 4
PORT = 7950
STREAM_FRAME_OVERHEAD = 4  # length prefix of a TCP frame
SOCKET_BACKLOG = 4096  # datagrams a paused process's socket buffers before dropping

# Target kinds: deliver to whatever runs on a host / to one process (through
# its slow queue) / to one process, already served by the slow queue / control.
T_HOST, T_PROC, T_SERVED, T_CTL = 0, 1, 2, 3


class Host:
    """One machine and address: outlives the processes that run on it."""

    __slots__ = (
        "index",
        "addr",
        "node_id",
        "cur",
        "icmp",
        "gen",
        "inc",
        "started",
        "tkind",
        "watchers",
        "peers",
    )

    def __init__(self, index: int, addr: Addr, node_id: bytes) -> None:
        self.index = index
        self.addr = addr
        self.node_id = node_id
        self.cur: Proc | None = None  # the running process, if any
        self.icmp = True  # process down but host up: closed port is reported
        self.gen = 0  # generation of the latest process
        self.inc = 0  # persisted incarnation (the state directory)
        self.started = False
        self.tkind = T_HOST
        # watch links held *to* this host: watcher host index -> process
        self.watchers: dict[int, Proc] = {}
        self.peers: list[Addr] = []  # remembered peers (state directory)


class Proc:
    """One daemon process (a core plus its shell state) on a host."""

    __slots__ = (
        "host",
        "node",
        "gen",
        "cur",
        "tkind",
        "paused",
        "backlog",
        "delay",
        "busy_until",
        "served",
        "watching",
        "sealer",
        "opener",
        "leaving",
        "mesh",
        "mesh_target",
    )

    def __init__(self, host: Host, node: Peer, gen: int) -> None:
        self.host = host
        self.node = node
        self.gen = gen
        self.cur: Proc | None = self
        self.tkind = T_PROC
        self.paused = False
        self.backlog: list[tuple[float, int, Any, Input]] = []
        self.delay = 0.0
        self.busy_until = 0.0
        self.served = _Served(self)
        self.watching: tuple[Addr, ...] = ()
        self.sealer: sealmod.Sealer | None = None
        self.opener: sealmod.Opener | None = None
        self.leaving = False
        self.mesh: Any = None  # peerd.core.mesh.mesh.Mesh, when the mesh runs
        self.mesh_target: Any = None


class _Served:
    __slots__ = ("proc", "tkind")

    def __init__(self, proc: Proc) -> None:
        self.proc = proc
        self.tkind = T_SERVED

    @property
    def cur(self) -> Proc | None:
        return self.proc.cur


class _Ctl:
    __slots__ = ("cur", "tkind")

    def __init__(self) -> None:
        self.cur = None
        self.tkind = T_CTL


@dataclass(slots=True)
class CrashRecord:
    node: int
    at: float
    gen: int
    first_s: float | None = None  # first observer to declare it dead
    all_s: float | None = None  # last running observer to stop seeing it live


@dataclass(slots=True)
class Impairment:
    """A pause or a slowdown of one node."""

    node: int
    kind: str
    start: float
    end: float | None = None
    gen: int = 0
    suspected_at: float | None = None
    cleared_s: float | None = None  # after end: everyone sees it alive again


@dataclass(slots=True)
class Stream:
    opener: Proc
    stream: int
    server: Proc
    done: bool = False


@dataclass
class Record:
    """Everything a run measured; checks and the report read it."""

    nodes: int = 0
    virtual_s: float = 0.0
    crashes: list[CrashRecord] = field(default_factory=list)
    leaves: list[CrashRecord] = field(default_factory=list)
    impairments: list[Impairment] = field(default_factory=list)
    false_positive_times: dict[int, float] = field(default_factory=dict)
    false_suspicion_times: list[float] = field(default_factory=list)
    first_false_suspicion: dict[int, float] = field(default_factory=dict)
    # (time, converged?) at every change of "every running node's view is exact"
    convergence: list[tuple[float, bool]] = field(default_factory=list)
    fault_windows: list[tuple[float, float, str]] = field(default_factory=list)
    timeline: list[tuple[float, ...]] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    node_seconds: float = 0.0
    # per whole second of virtual time: [datagrams, datagram bytes, frames, frame bytes]
    per_second: list[list[int]] = field(default_factory=list)
    core_counters: dict[str, int] = field(default_factory=dict)
    running_per_second: list[float] = field(default_factory=list)
    # with a registry workload: its summary, its convergence series (like
    # ``convergence``) and the values of its checks, by expectation index
    registry: dict[str, Any] | None = None
    mesh: dict[str, Any] | None = None
    mesh_records: list[Any] = field(default_factory=list)
    registry_convergence: list[tuple[float, bool]] = field(default_factory=list)
    registry_evals: dict[int, Any] = field(default_factory=dict)

    def first_converged_at(self, after: float) -> float | None:
        return first_true_at(self.convergence, after)

    def converged_at_end(self) -> float | None:
        """When the cluster last became converged, if it is converged at the end."""
        if not self.convergence or not self.convergence[-1][1]:
            return None
        return self.convergence[-1][0]

    def traffic(self, start: float = 0.0, end: float | None = None) -> dict[str, float]:
        end = self.virtual_s if end is None else end
        lo, hi = int(start), int(math.ceil(end))
        rows = self.per_second[lo:hi]
        ns = sum(self.running_per_second[lo:hi]) or 1.0
        dg = sum(r[0] for r in rows)
        db = sum(r[1] for r in rows)
        fr = sum(r[2] for r in rows)
        fb = sum(r[3] for r in rows)
        return {
            "msgs_per_node_s": (dg + fr) / ns,
            "bytes_per_node_s": (db + fb) / ns,
            "datagrams_per_node_s": dg / ns,
            "datagram_bytes_per_node_s": db / ns,
            "stream_frames_per_node_s": fr / ns,
            "stream_bytes_per_node_s": fb / ns,
        }


def first_true_at(series: list[tuple[float, bool]], after: float) -> float | None:
    """The first moment at or after ``after`` when a (time, state) change
    series is true, or None."""
    state = False
    for t, ok in series:
        if t <= after:
            state = ok
            continue
        if state:
            return after
        if ok:
            return t
    return after if state else None


def stats3(values: list[float]) -> dict[str, float | None]:
    """{median, p99, max} (nearest-rank p99), rounded to milliseconds."""
    if not values:
        return {"median": None, "p99": None, "max": None}
    s = sorted(values)
    p99 = s[max(0, math.ceil(0.99 * len(s)) - 1)]
    return {"median": round(statistics.median(s), 3), "p99": round(p99, 3), "max": round(s[-1], 3)}


def node_id_for(seed: int, index: int) -> bytes:
    return random.Random(f"peerd-sim-id:{seed}:{index}").randbytes(16)


def addr_for(index: int) -> Addr:
    i = index + 1
    return (f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}", PORT)


class World:
    def __init__(
        self, scenario: Scenario, *, progress: Callable[[World], None] | None = None
    ) -> None:
        self.sc = scenario
        self.cfg = scenario.config
        self.progress = progress
        n = scenario.nodes
        self.n = n
        self.now = 0.0
        self.rng = random.Random(f"peerd-sim-net:{scenario.seed}")
        self._heap: list[tuple[float, int, Any, Any]] = []
        self._seq = 0
        self._ctl = _Ctl()
        self.hosts = [Host(i, addr_for(i), node_id_for(scenario.seed, i)) for i in range(n)]
        self.by_addr: dict[Addr, Host] = {h.addr: h for h in self.hosts}
        self.index_of: dict[bytes, int] = {h.node_id: h.index for h in self.hosts}
        # network
        net = scenario.network
        self.lat_min = net.latency.min_ms / 1000.0
        self.lat_span = (net.latency.max_ms - net.latency.min_ms) / 1000.0
        self.lat_exp = net.latency.dist == "exponential"
        self.loss = net.loss
        self.dup = net.duplicate
        self.reorder = net.reorder
        self.reorder_s = net.reorder_ms / 1000.0
        self.mtu = net.mtu
        self.seal = net.seal
        self.envelope = sealmod.SEALED_OVERHEAD  # counted even when not really sealing
        self.stream_timeout = net.stream_timeout_s
        self.link_s = net.link_ms / 1000.0
        self._link_salt = random.Random(f"peerd-sim-links:{scenario.seed}").getrandbits(32)
        self.group: list[int] | None = None  # partition group per host
        self.blocks: list[tuple[frozenset[int], frozenset[int]]] = []
        self.node_loss: dict[int, float] = {}
        self.netfaults = False
        self._keyring = (
            sealmod.Keyring([random.Random(f"peerd-sim-key:{scenario.seed}").randbytes(32)])
            if self.seal
            else None
        )
        self.streams: dict[int, Stream] = {}
        self._sid = 0
        # ground truth and views
        self.up = bytearray(n)  # subject's current process runs and has not left
        self.observing = bytearray(n)  # its views count (running, not leaving)
        self.views: list[bytearray | None] = [None] * n
        self.subj_wrong = [0] * n
        self.wrong = 0
        self.alive_n = [0] * n
        self.susp_n = [0] * n
        self.down_n = [0] * n
        self.running = 0
        self._last_ns_t = 0.0
        self.open_crash: dict[int, CrashRecord] = {}
        self.open_leave: dict[int, CrashRecord] = {}
        self.open_impair: dict[int, list[Impairment]] = {}
        self._until_heal: list[int] = []  # fault windows that last until a heal
        self.rec = Record(nodes=n)
        self.rec.convergence.append((0.0, True))
        secs = int(math.ceil(scenario.duration_s)) + 1
        self.rec.per_second = [[0, 0, 0, 0] for _ in range(secs)]
        self.rec.running_per_second = [0.0] * secs
        self.counts: dict[str, int] = dict.fromkeys(
            (
                "events",
                "datagrams",
                "datagrams_delivered",
                "dropped_loss",
                "dropped_partition",
                "dropped_mtu",
                "dropped_unknown_addr",
                "dropped_backlog",
                "duplicated",
                "unreachable_hints",
                "link_closed_hints",
                "streams",
                "streams_failed",
                "seal_rejected",
                "member_events",
                "joins_ok",
                "joins_failed",
                "restarts",
            ),
            0,
        )
        self._cur_sec: list[int] = self.rec.per_second[0]
        self._cur_sec_i = 0
        self.reg = RegistryWorld(self, scenario.registry) if scenario.registry else None
        self.mesh = MeshWorld(self, scenario.mesh) if scenario.mesh.enabled else None

    # --- heap -----------------------------------------------------------------------

    def _push(self, t: float, target: Any, inp: Any) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (t, self._seq, target, inp))

    def at(self, t: float, fn: Callable[[], None]) -> None:
        """Run ``fn`` at virtual time ``t`` (faults, measurements)."""
        self._push(t, self._ctl, fn)

    def deliver(self, proc: Proc, inp: Input) -> None:
        """Give ``proc`` an input now (an API call of one of its clients)."""
        self._push(self.now, proc, inp)

    def _latency(self) -> float:
        return self.latency_with(self.rng)

    def latency_with(self, rng: random.Random) -> float:
        """One datagram's latency (the network's distribution), drawn from ``rng``."""
        r = rng.random()
        if self.lat_exp:
            lat = self.lat_min - self.lat_span / 3 * math.log(1.0 - r)
            lat = min(lat, self.lat_min + 3 * self.lat_span)
        else:
            lat = self.lat_min + self.lat_span * r
        if self.reorder and rng.random() < self.reorder:
            lat += self.reorder_s
        return lat

    def link_delay(self, a: int, b: int) -> float:
        """The fixed extra delay of the link between hosts ``a`` and ``b``."""
        if not self.link_s:
            return 0.0
        lo, hi = (a, b) if a < b else (b, a)
        h = (lo * 0x9E3779B1 ^ hi * 0x85EBCA77 ^ self._link_salt) & 0xFFFFFFFF
        h = (h ^ (h >> 15)) * 0x2C1B3C6D & 0xFFFFFFFF
        return self.link_s * ((h ^ (h >> 12)) & 0xFFFF) / 0xFFFF

    # --- running ------------------------------------------------------------------------

    def setup(self) -> None:
        sc = self.sc
        k = sc.start_count()
        states = [
            MemberState(h.node_id, f"n{h.index}", h.addr, 0, 1, (), Status.ALIVE)
            for h in self.hosts[:k]
        ]
        snap = store.Snapshot(states)
        row = bytearray(self.n)
        row[:k] = b"\x01" * k  # V_ALIVE
        self.up[:k] = b"\x01" * k  # all of them run from t=0 (no transient wrong views)
        reg = self.reg
        reg_snap: store.SharedState | None = None
        owners: list[dict[int, int]] = []
        if reg is not None and reg.spec.preload:
            reg._quiet = True
            reg_snap, owners = reg.preload(k)
        for h in self.hosts[:k]:
            proc = self._start_proc(h, preload=snap, row=bytearray(row))
            if reg_snap is not None:
                proc.node.registry.preload(reg_snap.tables(h.node_id, proc.gen), owners[h.index])
        if reg is not None:
            reg._quiet = False
            reg._changed(0.0)
            reg.start()
        if self.mesh is not None:
            self.mesh.schedule()
        for f in sc.faults:
            for r in range(f.repeat):
                t = f.at_s + r * f.every_s
                if t <= sc.duration_s:
                    self.at(t, self._fault_fn(f, r, t))
        step = sc.sample_s
        t = 0.0
        while t <= sc.duration_s + 1e-9:
            self.at(t, self._sample)
            t = round(t + step, 9)
        for s in range(1, int(math.ceil(sc.duration_s)) + 1):
            self.at(float(s), self._tick_second)

    def run(self) -> Record:
        self.setup()
        self.run_until(self.sc.duration_s)
        return self.finish()

    def run_until(self, until: float) -> None:
        heap = self._heap
        pop = heapq.heappop
        events = 0
        while heap and heap[0][0] <= until:
            t, _seq, tgt, inp = pop(heap)
            self.now = t
            proc = tgt.cur
            if proc is None:
                self._undeliverable(t, tgt, inp)
                continue
            if proc.paused:
                # Only datagrams overflow the socket buffer; timers, stream and
                # link data (TCP: the sender waits) and API calls are kept.
                if inp.__class__ is PacketIn and len(proc.backlog) >= SOCKET_BACKLOG:
                    self.counts["dropped_backlog"] += 1
                    continue
                proc.backlog.append((t, _seq, tgt, inp))
                continue
            if tgt.tkind == T_MESH:
                # (a slow process's mesh is not slowed: its links are TCP,
                # buffered by the kernel; the membership core's inputs are)
                events += 1
                self.mesh.handle(proc, inp, t)  # type: ignore[union-attr]
                continue
            if proc.delay and tgt.tkind != T_SERVED:
                # CPU-starved: inputs queue and each takes `delay` to process.
                done = max(t, proc.busy_until) + proc.delay
                proc.busy_until = done
                self._push(done, proc.served, inp)
                continue
            if tgt.tkind == T_HOST and inp.__class__ is PacketIn:
                self.counts["datagrams_delivered"] += 1
                if self.seal:
                    inp = self._open(proc, inp)
                    if inp is None:
                        continue
            events += 1
            outs = proc.node.handle(t, inp)
            if outs:
                self._carry_out(proc, outs, t)
        self.counts["events"] += events
        self.now = max(self.now, until)

    def _open(self, proc: Proc, inp: PacketIn) -> PacketIn | None:
        assert proc.opener is not None
        try:
            _sender, payload = proc.opener.open(inp.data)
        except sealmod.SealError:
            self.counts["seal_rejected"] += 1
            return None
        return PacketIn(inp.src, payload)

    def _undeliverable(self, t: float, tgt: Any, inp: Any) -> None:
        kind = tgt.tkind
        if kind == T_CTL:
            inp()
            return
        if kind != T_HOST:
            return  # a timer or stream result of a process that is gone
        host: Host = tgt
        if inp.__class__ is PacketIn:
            # Nothing listens there. A live host answers with ICMP port unreachable.
            src = self.by_addr.get(inp.src)
            if (
                host.icmp
                and host.started
                and src is not None
                and src.cur is not None
                and not self._blocked(host.index, src.index)
            ):
                self.counts["unreachable_hints"] += 1
                self._push(t + self._latency(), src.cur, Unreachable(host.addr))

    # --- outputs ------------------------------------------------------------------------

    def _carry_out(self, proc: Proc, outs: list[Any], t: float) -> None:
        for o in outs:
            c = o.__class__
            if c is SendPacket:
                self._send(proc, o.dst, o.data, t)
            elif c is SetTimer:
                self._seq += 1
                heapq.heappush(self._heap, (o.at, self._seq, proc, TimerFired(o.timer)))
            elif c is MemberEvent:
                self._on_event(proc, o, t)
                if self.mesh is not None:
                    self.mesh.member_event(proc, o)
            elif c is Log:
                continue
            elif c is IncarnationChanged:
                proc.host.inc = o.incarnation
            elif c is OpenStream:
                self._open_stream(proc, o, t)
            elif c is StreamReply:
                self._stream_reply(proc, o, t)
            elif c is WatchLinks:
                self._watch(proc, o.addrs, t)
            elif c is JoinDone:
                self.counts["joins_ok"] += o.ok
                self.counts["joins_failed"] += o.failed
            elif c is LeaveDone:
                self._stop(proc.host, icmp=True, reason="left")
            elif c is RegistryEvent:
                if self.reg is not None:
                    self.reg.on_event(proc, o, t)
            elif c is CommandResult:
                if self.reg is not None:
                    self.reg.on_result(proc, o, t)
            elif c is MeshCast and self.mesh is not None:  # (the last case)
                self.mesh.cast(proc, o.channel, o.payload, t)

    def _send(self, proc: Proc, dst: Addr, data: bytes, t: float) -> None:
        host = self.by_addr.get(dst)
        counts = self.counts
        counts["datagrams"] += 1
        if proc.sealer is not None:
            data = proc.sealer.seal(data)
            size = len(data)
        else:
            size = len(data) + self.envelope
        sec = self._cur_sec
        sec[0] += 1
        sec[1] += size
        if host is None:
            counts["dropped_unknown_addr"] += 1
            return
        if size > self.mtu:
            counts["dropped_mtu"] += 1
            return
        loss = self.loss
        if self.netfaults:
            a, b = proc.host.index, host.index
            if self._blocked(a, b):
                counts["dropped_partition"] += 1
                return
            nl = self.node_loss
            if nl:
                keep = (1.0 - loss) * (1.0 - nl.get(a, 0.0)) * (1.0 - nl.get(b, 0.0))
                loss = 1.0 - keep
        rng = self.rng
        if loss and rng.random() < loss:
            counts["dropped_loss"] += 1
            return
        inp = PacketIn(proc.host.addr, data)
        if self.link_s:
            t += self.link_delay(proc.host.index, host.index)
        self._seq += 1
        heapq.heappush(self._heap, (t + self._latency(), self._seq, host, inp))
        if self.dup and rng.random() < self.dup:
            counts["duplicated"] += 1
            self._seq += 1
            heapq.heappush(self._heap, (t + self._latency(), self._seq, host, inp))

    def _blocked(self, a: int, b: int) -> bool:
        g = self.group
        if g is not None and g[a] != g[b]:
            return True
        return any(a in src and b in dst for src, dst in self.blocks)

    def _open_stream(self, proc: Proc, o: OpenStream, t: float) -> None:
        self.counts["streams"] += 1
        host = self.by_addr.get(o.dst)
        if (
            host is None
            or self._blocked(proc.host.index, host.index)
            or (host.cur is None and not (host.icmp and host.started))
        ):
            # Nobody answers the SYN: the connect times out.
            self.counts["streams_failed"] += 1
            self._push(
                t + min(5.0, self.stream_timeout), proc, StreamFailed(o.stream, "connect_timeout")
            )
            return
        if host.cur is None:
            self.counts["streams_failed"] += 1
            self._push(t + 2 * self._latency(), proc, StreamFailed(o.stream, "refused"))
            return
        # Connected: the request frame goes out.
        sec = self._cur_sec
        sec[2] += 1
        sec[3] += len(o.data) + self.envelope + STREAM_FRAME_OVERHEAD
        self._sid += 1
        sid = self._sid
        self.streams[sid] = Stream(proc, o.stream, host.cur)
        # SYN, SYN-ACK, then the request frame.
        self._push(t + 3 * self._latency(), host.cur, StreamRequest(sid, proc.host.addr, o.data))
        self.at(t + self.stream_timeout, lambda: self._stream_timeout(sid))

    def _stream_timeout(self, sid: int) -> None:
        st = self.streams.pop(sid, None)
        if st is None:
            return
        self.counts["streams_failed"] += 1
        if st.opener.cur is not None:
            self._push(self.now, st.opener, StreamFailed(st.stream, "timeout"))

    def _stream_reply(self, proc: Proc, o: StreamReply, t: float) -> None:
        st = self.streams.get(o.stream)
        if st is None or st.server is not proc:
            return
        if o.data is not None:
            sec = self._cur_sec
            sec[2] += 1
            sec[3] += len(o.data) + self.envelope + STREAM_FRAME_OVERHEAD
        if st.opener.cur is None or self._blocked(proc.host.index, st.opener.host.index):
            return  # the opener's timeout fails it
        del self.streams[o.stream]
        if o.data is None:
            self.counts["streams_failed"] += 1
            self._push(t + self._latency(), st.opener, StreamFailed(st.stream, "closed"))
        else:
            self._push(t + self._latency(), st.opener, StreamResponse(st.stream, o.data))

    def _watch(self, proc: Proc, addrs: tuple[Addr, ...], t: float) -> None:
        me = proc.host.index
        for a in proc.watching:
            h = self.by_addr.get(a)
            if h is not None and h.watchers.get(me) is proc:
                del h.watchers[me]
        proc.watching = addrs
        for a in addrs:
            h = self.by_addr.get(a)
            if h is None:
                continue
            h.watchers[me] = proc
            if h.cur is None and h.icmp and h.started and not self._blocked(me, h.index):
                # Connect refused: nothing listens there any more.
                self.counts["link_closed_hints"] += 1
                self._push(t + 2 * self._latency(), proc, LinkClosed(a))

    # --- views ------------------------------------------------------------------------

    def _on_event(self, proc: Proc, ev: MemberEvent, t: float) -> None:
        self.counts["member_events"] += 1
        obs = proc.host.index
        if not self.observing[obs]:
            return
        subj = self.index_of.get(ev.member.node)
        if subj is None or subj == obs:
            return
        kind = ev.kind
        if kind is EventKind.NAME_CONFLICT:
            return
        new = V_UNKNOWN if kind is EventKind.REAPED else int(ev.member.status) + 1
        row = self.views[obs]
        assert row is not None
        old = row[subj]
        host = self.hosts[subj]
        current = ev.member.generation >= host.gen
        if new == V_DEAD:
            if self.up[subj] and current:
                self.rec.false_positive_times.setdefault(subj, t)
            else:
                cr = self.open_crash.get(subj)
                if cr is not None and cr.first_s is None:
                    cr.first_s = t - cr.at
        elif new == V_SUSPECT and self.up[subj] and current:
            self.rec.false_suspicion_times.append(t)
            self.rec.first_false_suspicion.setdefault(subj, t)
            for imp in self.open_impair.get(subj, ()):
                if imp.suspected_at is None:
                    imp.suspected_at = t
        if old == new:
            return
        row[subj] = new
        self._count_view(obs, old, -1)
        self._count_view(obs, new, 1)
        up = self.up[subj]
        w_old = (old != V_ALIVE) if up else (old in (V_ALIVE, V_SUSPECT))
        w_new = (new != V_ALIVE) if up else (new in (V_ALIVE, V_SUSPECT))
        if w_old != w_new:
            self._adjust_wrong(subj, 1 if w_new else -1, t)

    def _count_view(self, obs: int, v: int, d: int) -> None:
        if v == V_ALIVE:
            self.alive_n[obs] += d
        elif v == V_SUSPECT:
            self.susp_n[obs] += d
        elif v != V_UNKNOWN:
            self.down_n[obs] += d

    def _adjust_wrong(self, subj: int, d: int, t: float) -> None:
        before = self.wrong
        self.wrong += d
        sw = self.subj_wrong[subj] + d
        self.subj_wrong[subj] = sw
        if (before == 0) != (self.wrong == 0):
            self.rec.convergence.append((t, self.wrong == 0))
        if sw == 0:
            self._subject_settled(subj, t)

    def _subject_settled(self, subj: int, t: float) -> None:
        """Every running observer's view of ``subj`` matches the truth."""
        if self.up[subj]:
            for imp in self.open_impair.get(subj, ()):
                if imp.end is not None and imp.cleared_s is None and t >= imp.end:
                    imp.cleared_s = t - imp.end
        else:
            cr = self.open_crash.get(subj)
            if cr is not None and cr.all_s is None:
                cr.all_s = t - cr.at
            lv = self.open_leave.get(subj)
            if lv is not None and lv.all_s is None:
                lv.all_s = t - lv.at

    def _set_truth(self, subj: int, up: bool, t: float) -> None:
        if bool(self.up[subj]) == up:
            return
        self.up[subj] = 1 if up else 0
        d_total = 0
        sw = 0
        views = self.views
        observing = self.observing
        for i in range(self.n):
            if i == subj or not observing[i]:
                continue
            row = views[i]
            assert row is not None
            v = row[subj]
            was = (v in (V_ALIVE, V_SUSPECT)) if up else (v != V_ALIVE)
            now = (v != V_ALIVE) if up else (v in (V_ALIVE, V_SUSPECT))
            if was != now:
                d_total += 1 if now else -1
            if now:
                sw += 1
        before = self.wrong
        self.wrong += d_total
        self.subj_wrong[subj] = sw
        if (before == 0) != (self.wrong == 0):
            self.rec.convergence.append((t, self.wrong == 0))
        if sw == 0:
            self._subject_settled(subj, t)

    def _observer_on(self, i: int, row: bytearray, t: float, exact_alive: int = -1) -> None:
        """Start counting ``i``'s views (``row``) against the truth.
        ``exact_alive``: the caller knows the row matches the truth and holds
        that many others alive (a preloaded start: no O(N) scan)."""
        self.views[i] = row
        self.observing[i] = 1
        if exact_alive >= 0:
            self.alive_n[i], self.susp_n[i], self.down_n[i] = exact_alive, 0, 0
            return
        up = self.up
        d = 0
        a = s = dn = 0
        for j, v in enumerate(row):
            if j == i:
                continue
            if v == V_ALIVE:
                a += 1
            elif v == V_SUSPECT:
                s += 1
            elif v != V_UNKNOWN:
                dn += 1
            w = (v != V_ALIVE) if up[j] else (v in (V_ALIVE, V_SUSPECT))
            if w:
                d += 1
                self.subj_wrong[j] += 1
        self.alive_n[i], self.susp_n[i], self.down_n[i] = a, s, dn
        before = self.wrong
        self.wrong += d
        if (before == 0) != (self.wrong == 0):
            self.rec.convergence.append((t, self.wrong == 0))

    def _observer_off(self, i: int, t: float) -> None:
        if not self.observing[i]:
            return
        if self.reg is not None:
            self.reg.observer_off(i, t)
        self.observing[i] = 0
        row = self.views[i]
        assert row is not None
        up = self.up
        d = 0
        for j, v in enumerate(row):
            if j == i:
                continue
            w = (v != V_ALIVE) if up[j] else (v in (V_ALIVE, V_SUSPECT))
            if w:
                d += 1
                self.subj_wrong[j] -= 1
                if self.subj_wrong[j] == 0:
                    self._subject_settled(j, t)
        self.views[i] = None
        self.alive_n[i] = self.susp_n[i] = self.down_n[i] = 0
        before = self.wrong
        self.wrong -= d
        if (before == 0) != (self.wrong == 0):
            self.rec.convergence.append((t, self.wrong == 0))

    # --- processes ---------------------------------------------------------------------

    def _account(self, t: float) -> None:
        """Add running-node seconds up to ``t`` (call before ``running`` changes)."""
        pos = self._last_ns_t
        if t <= pos:
            return
        rps = self.rec.running_per_second
        while pos < t:
            s = int(pos)
            if s >= len(rps):
                break
            nxt = min(t, s + 1.0)
            rps[s] += self.running * (nxt - pos)
            pos = nxt
        self._last_ns_t = t

    def _start_proc(
        self,
        host: Host,
        preload: store.Snapshot | None = None,
        seeds: tuple[Addr, ...] = (),
        row: bytearray | None = None,
    ) -> Proc:
        t = self.now
        host.gen += 1
        gen = host.gen
        node = Peer(
            node_id=host.node_id,
            name=f"n{host.index}",
            addr=host.addr,
            config=self.cfg,
            rng=random.Random(f"peerd-sim-node:{self.sc.seed}:{host.index}:{gen}"),
            incarnation=host.inc,
            generation=gen,
            store=None if preload is None else preload.tables,
        )
        if row is None:
            row = bytearray(self.n)
        row[host.index] = V_ALIVE
        proc = Proc(host, node, gen)
        if self.seal:
            assert self._keyring is not None
            nonce_rng = random.Random(f"peerd-sim-nonce:{self.sc.seed}:{host.index}:{gen}")
            proc.sealer = sealmod.Sealer(
                self._keyring, host.node_id, gen, nonce_source=nonce_rng.randbytes
            )
            proc.opener = sealmod.Opener(self._keyring)
        host.cur = proc
        host.started = True
        host.icmp = True
        self._account(t)
        self.running += 1
        self._set_truth(host.index, True, t)
        self._observer_on(
            host.index, row, t, exact_alive=self.sc.start_count() - 1 if preload is not None else -1
        )
        if self.reg is not None:
            self.reg.observer_on(host.index, preload is not None and self.reg.spec.preload, t)
        if self.mesh is not None:
            self.mesh.start(proc, preloaded=preload is not None)
        self._push(t, proc, Start(seeds))
        return proc

    def _stop(self, host: Host, *, icmp: bool, reason: str) -> Proc | None:
        """The process on ``host`` ends (crash, or exit after a leave)."""
        proc = host.cur
        if proc is None:
            return None
        t = self.now
        host.peers = proc.node.peer_addrs()[:8]
        if self.mesh is not None and proc.mesh is not None:
            self.mesh.stop(proc, reset=icmp)
        proc.cur = None
        host.cur = None
        host.icmp = icmp
        self._account(t)
        self.running -= 1
        self._observer_off(host.index, t)
        self._set_truth(host.index, False, t)
        me = host.index
        for a in proc.watching:
            h = self.by_addr.get(a)
            if h is not None and h.watchers.get(me) is proc:
                del h.watchers[me]
        if icmp:
            # The host's kernel closes every watch link held to the dead process.
            for widx, wproc in list(host.watchers.items()):
                if wproc.cur is not None and not self._blocked(me, widx):
                    self.counts["link_closed_hints"] += 1
                    self._push(t + self._latency(), wproc, LinkClosed(host.addr))
            # Streams it was serving are reset.
            for sid, st in list(self.streams.items()):
                if st.server is proc:
                    del self.streams[sid]
                    self.counts["streams_failed"] += 1
                    if st.opener.cur is not None:
                        self._push(t + self._latency(), st.opener, StreamFailed(st.stream, "reset"))
        return proc

    # --- faults -------------------------------------------------------------------------

    def _fault_rng(self, f: Fault, rep: int) -> random.Random:
        return random.Random(f"peerd-sim-fault:{self.sc.seed}:{f.index}:{rep}")

    def select(self, sel: Selection | None, pool: list[int], rng: random.Random) -> list[int]:
        """Resolve a node selection among ``pool`` (indices), deterministically."""
        if sel is None or sel == "all":
            return list(pool)
        if isinstance(sel, tuple):
            allowed = set(pool)
            return [i for i in sel if i in allowed]
        k = max(1, round(sel * self.n)) if isinstance(sel, float) else int(sel)
        k = min(k, len(pool))
        return sorted(rng.sample(pool, k))

    def _running(self) -> list[int]:
        return [h.index for h in self.hosts if h.cur is not None and not h.cur.leaving]

    running_indices = _running

    def _fault_fn(self, f: Fault, rep: int, t: float) -> Callable[[], None]:
        return lambda: self._apply_fault(f, rep, t)

    def _spread(
        self, f: Fault, rng: random.Random, targets: list[int], fn: Callable[[int], None]
    ) -> None:
        if f.over_s and len(targets) > 1:
            order = list(targets)
            rng.shuffle(order)
            step = f.over_s / len(order)
            for k, i in enumerate(order):
                self.at(self.now + k * step, (lambda i=i: fn(i)))  # type: ignore[misc]
        else:
            for i in targets:
                fn(i)

    def _apply_fault(self, f: Fault, rep: int, t: float) -> None:
        rng = self._fault_rng(f, rep)
        kind = f.kind
        end = t + (f.duration_s or 0.0)
        self.rec.fault_windows.append((t, end if f.duration_s else t + (f.over_s or 0.0), kind))
        if kind in ("partition", "block") and not f.duration_s:
            self._until_heal.append(len(self.rec.fault_windows) - 1)
        elif kind == "heal":
            for w in self._until_heal:  # shade open partitions and blocks up to the heal
                start, _end, k = self.rec.fault_windows[w]
                self.rec.fault_windows[w] = (start, t, k)
            self._until_heal = []
        if kind == "crash":
            targets = self.select(f.nodes, self._running(), rng)
            self._spread(f, rng, targets, lambda i: self._crash(i, f.icmp))
        elif kind == "restart":
            targets = self.select(f.nodes, self._running(), rng)
            self._spread(f, rng, targets, lambda i: self._restart(i, f.down_s))
        elif kind == "leave":
            targets = self.select(f.nodes, self._running(), rng)
            self._spread(f, rng, targets, self._leave)
        elif kind == "join":
            pending = [h.index for h in self.hosts if not h.started]
            targets = self.select(f.nodes, pending, rng)
            self._spread(f, rng, targets, self._join)
        elif kind == "pause":
            assert f.duration_s is not None
            for i in self.select(f.nodes, self._running(), rng):
                self._pause(i, f.duration_s)
        elif kind == "slow":
            for i in self.select(f.nodes, self._running(), rng):
                self._slow(i, f.delay_ms / 1000.0, f.duration_s)
        elif kind == "partition":
            order = list(range(self.n))
            rng.shuffle(order)
            group = [0] * self.n
            start = 0
            for g, frac in enumerate(f.groups):
                stop = self.n if g == len(f.groups) - 1 else start + round(frac * self.n)
                for i in order[start:stop]:
                    group[i] = g
                start = stop
            self.group = group
            self._netfaults()
            if f.duration_s:
                self.at(end, self._heal_partition)
        elif kind == "heal":
            self.group = None
            self.blocks = []
            self._netfaults()
        elif kind == "register":
            assert self.reg is not None  # the scenario parser demands a workload
            self.reg.fault(f, self.select(f.nodes, self._running(), rng))
        elif kind == "block":
            src = frozenset(self.select(f.src, list(range(self.n)), rng))
            dst = frozenset(self.select(f.dst, list(range(self.n)), rng))
            added = [(src, dst)] + ([(dst, src)] if f.symmetric else [])
            self.blocks.extend(added)
            self._netfaults()
            if f.duration_s:
                self.at(end, lambda: self._unblock(added))
        elif kind == "loss":
            if f.nodes is None:
                before = self.loss
                self.loss = f.loss
                if f.duration_s:
                    self.at(end, lambda: setattr(self, "loss", before))
            else:
                chosen = self.select(f.nodes, self._running(), rng)
                for i in chosen:
                    self.node_loss[i] = f.loss
                self._netfaults()
                if f.duration_s:
                    self.at(end, lambda: self._clear_node_loss(chosen))

    def _netfaults(self) -> None:
        self.netfaults = bool(self.group is not None or self.blocks or self.node_loss)

    def _heal_partition(self) -> None:
        self.group = None
        self._netfaults()

    def _unblock(self, added: list[tuple[frozenset[int], frozenset[int]]]) -> None:
        for b in added:
            if b in self.blocks:
                self.blocks.remove(b)
        self._netfaults()

    def _clear_node_loss(self, chosen: list[int]) -> None:
        for i in chosen:
            self.node_loss.pop(i, None)
        self._netfaults()

    def _crash(self, i: int, icmp: bool, record: bool = True) -> None:
        host = self.hosts[i]
        if host.cur is None:
            return
        proc = self._stop(host, icmp=icmp, reason="crash")
        assert proc is not None
        if not record:  # a restart: not a failure to detect
            self.counts["restarts"] += 1
            return
        cr = CrashRecord(i, self.now, proc.gen)
        self.rec.crashes.append(cr)
        self.open_crash[i] = cr
        if self.subj_wrong[i] == 0:
            cr.first_s = cr.first_s if cr.first_s is not None else 0.0
            cr.all_s = 0.0

    def _restart(self, i: int, down_s: float) -> None:
        host = self.hosts[i]
        if host.cur is None:
            return
        self._crash(i, True, record=False)
        self.at(self.now + down_s, lambda: self._restart_up(i))

    def _restart_up(self, i: int) -> None:
        host = self.hosts[i]
        if host.cur is not None:
            return
        self.open_crash.pop(i, None)
        seeds = tuple(self.hosts[s].addr for s in self.sc.seeds if s != i)
        seeds += tuple(a for a in host.peers if a not in seeds)[:3]
        self._start_proc(host, seeds=seeds)

    def _join(self, i: int) -> None:
        host = self.hosts[i]
        if host.started:
            return
        seeds = tuple(self.hosts[s].addr for s in self.sc.seeds if s != i)
        self._start_proc(host, seeds=seeds)

    def _leave(self, i: int) -> None:
        host = self.hosts[i]
        proc = host.cur
        if proc is None or proc.leaving:
            return
        proc.leaving = True
        t = self.now
        self._observer_off(i, t)
        self._set_truth(i, False, t)
        lv = CrashRecord(i, t, proc.gen)
        self.rec.leaves.append(lv)
        self.open_leave[i] = lv
        self._push(t, proc, Leave())
        if self.mesh is not None:
            self.mesh.leave(proc)

    def _pause(self, i: int, duration: float) -> None:
        proc = self.hosts[i].cur
        if proc is None or proc.paused:
            return
        proc.paused = True
        imp = Impairment(i, "pause", self.now, self.now + duration, proc.gen)
        self.rec.impairments.append(imp)
        self.open_impair.setdefault(i, []).append(imp)
        self.at(self.now + duration, lambda: self._resume(proc))

    def _resume(self, proc: Proc) -> None:
        proc.paused = False
        backlog, proc.backlog = proc.backlog, []
        # Like the daemon's runner after SIGCONT: every due timer fires first,
        # then the buffered datagrams and stream data in arrival order.
        timers = [e for e in backlog if e[3].__class__ is TimerFired]
        others = [e for e in backlog if e[3].__class__ is not TimerFired]
        for _t, _s, tgt, inp in timers + others:
            self._push(self.now, tgt, inp)
        if proc.cur is not None and self.subj_wrong[proc.host.index] == 0:
            for imp in self.open_impair.get(proc.host.index, ()):
                if imp.cleared_s is None and imp.end is not None:
                    imp.cleared_s = 0.0

    def _slow(self, i: int, delay: float, duration: float | None) -> None:
        proc = self.hosts[i].cur
        if proc is None:
            return
        proc.delay = delay
        end = self.now + duration if duration else None
        imp = Impairment(i, "slow", self.now, end, proc.gen)
        self.rec.impairments.append(imp)
        self.open_impair.setdefault(i, []).append(imp)
        if end is not None:

            def done() -> None:
                proc.delay = 0.0
                if proc.cur is not None and self.subj_wrong[i] == 0 and imp.cleared_s is None:
                    imp.cleared_s = 0.0

            self.at(end, done)

    # --- measuring ----------------------------------------------------------------------

    def _tick_second(self) -> None:
        s = int(round(self.now))
        if s < len(self.rec.per_second):
            self._cur_sec = self.rec.per_second[s]
            self._cur_sec_i = s

    def _sample(self) -> None:
        obs = [i for i in range(self.n) if self.observing[i]]
        k = len(obs) or 1
        an = [self.alive_n[i] for i in obs] or [0]
        sn = [self.susp_n[i] for i in obs] or [0]
        dn = [self.down_n[i] for i in obs] or [0]
        # self is not in the views: +1 so that "alive" counts the observer too
        self.rec.timeline.append(
            (
                round(self.now, 6),
                self.running,
                self.wrong,
                sum(an) / k + 1,
                min(an) + 1,
                max(an) + 1,
                sum(sn) / k,
                min(sn),
                max(sn),
                sum(dn) / k,
                min(dn),
                max(dn),
            )
        )
        if self.progress is not None:
            self.progress(self)

    def finish(self) -> Record:
        rec = self.rec
        rec.virtual_s = self.sc.duration_s
        self._account(self.sc.duration_s)
        rec.node_seconds = sum(rec.running_per_second)
        rec.counts = dict(self.counts)
        totals: dict[str, int] = {}
        for h in self.hosts:
            if h.cur is not None:
                for k, v in h.cur.node.counters.items():
                    totals[k] = totals.get(k, 0) + v
        rec.core_counters = dict(sorted(totals.items()))
        if self.mesh is not None:
            rec.mesh = self.mesh.summary()
            rec.mesh_records = list(self.mesh.broadcasts)
        if self.reg is not None:
            rec.registry = self.reg.finish()
            rec.registry_convergence = list(self.reg.convergence)
            rec.registry_evals = dict(self.reg.evals)
        return rec
