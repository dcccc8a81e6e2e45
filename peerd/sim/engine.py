"""The engine: one event heap, one virtual clock, and the targets inputs go to.

Theory of operation. Every core is the real :class:`peerd.core.swim.membership.Node`,
driven exactly as the daemon's runner drives it (``handle(now, input)`` and
then carry out each output); only the outputs' effects are simulated. One
heap holds ``(time, seq, target, input)``: ``seq`` makes the order total and
deterministic, ``target`` is either a *host* (an address: a datagram is
delivered to whatever process runs there when it arrives) or a *process*
(timers and stream results die with the process that armed them). Faults
and measurements are entries of the same heap (control targets), so
everything happens in one well-defined order.

Determinism: one ``random.Random(seed)`` drives the network; each node's RNG
is derived from the seed, its index and its generation; nothing iterates a
set or dict keyed by bytes or objects (their order depends on the hash seed).
The same scenario and seed therefore give the same run, byte for byte.

The layers above (measure, network, faults, the workloads and the world that
composes them) extend :class:`Engine`; it calls up into them only through the
hooks it declares (``_open``, ``_undeliverable``, ``_carry_out``).
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable
from typing import Any

from peerd.core.events import Input, LinkDown, MessageIn, PacketIn, Timer, TimerFired
from peerd.core.peer import Peer
from peerd.sim.scenario import Scenario
from peerd.wire import seal as sealmod
from peerd.wire.messages import Addr

PORT = 7950
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
        "flush",
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
        # Called after each input: a compact members table puts the records
        # the core looked up back into its arrays (peerd.sim.compact).
        self.flush: Callable[[], None] | None = None


def _link_input(inp: Any) -> bool:
    """What a CPU-starved process is not slowed on: its peer links (TCP,
    buffered by the kernel) and the mesh's timers; the membership core's
    inputs (and the API's) are."""
    c = inp.__class__
    return c is MessageIn or c is LinkDown or (c is TimerFired and inp.timer.__class__ is not Timer)


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


def node_id_for(seed: int, index: int) -> bytes:
    return random.Random(f"peerd-sim-id:{seed}:{index}").randbytes(16)


def addr_for(index: int) -> Addr:
    i = index + 1
    return (f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}", PORT)


class Engine:
    """The heap and the clock; what a target kind means is decided here."""

    seal: bool  # (the network's) datagrams are really sealed: open them on arrival

    def __init__(
        self, scenario: Scenario, *, progress: Callable[[Any], None] | None = None
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
        # the workloads, when the scenario runs them (set by the world)
        self.reg: Any = None
        self.mesh: Any = None
        self.names: Any = None
        self.names_driver: Any = None
        self.links: Any = None  # peer links (peerd.sim.links), with a mesh or names

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
            if proc.delay and tgt.tkind != T_SERVED and not _link_input(inp):
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
            if proc.flush is not None:
                proc.flush()
            if outs:
                self._carry_out(proc, outs, t)
        self.counts["events"] += events
        self.now = max(self.now, until)

    # --- hooks of the layers above -----------------------------------------------------

    def _open(self, proc: Proc, inp: PacketIn) -> PacketIn | None:
        raise NotImplementedError

    def _undeliverable(self, t: float, tgt: Any, inp: Any) -> None:
        raise NotImplementedError

    def _carry_out(self, proc: Proc, outs: list[Any], t: float) -> None:
        raise NotImplementedError
