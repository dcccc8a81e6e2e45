"""Faults: applying a scenario's crashes, restarts, joins, leaves, pauses,
slowdowns, partitions, blocks and loss at their virtual times.

Theory of operation. Each fault (and each repetition) draws its targets from
its own RNG, derived from the seed, the fault's index and the repetition, so
adding a fault to a scenario does not change which nodes an earlier one
picks. A fault spread ``over_s`` schedules its targets one by one on the
heap. A process ends through :meth:`Faults._stop`, which is what a crash, a
restart's first half and the exit after a leave have in common: the host's
kernel (unless the whole host died) closes the watch links to it and resets
the streams it served. Every crash, leave, pause and slowdown is recorded for
the detection checks.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

from peerd.core.events import Leave, LinkClosed, StreamFailed, TimerFired
from peerd.sim.engine import Host, Proc
from peerd.sim.measure import CrashRecord, Impairment
from peerd.sim.network import Network
from peerd.sim.scenario import Fault, Scenario, Selection
from peerd.wire.messages import Addr


class Faults(Network):
    def __init__(self, scenario: Scenario, *, progress: Any = None) -> None:
        super().__init__(scenario, progress=progress)
        self._until_heal: list[int] = []  # fault windows that last until a heal

    def _start_proc(
        self,
        host: Host,
        preload: Any = None,
        seeds: tuple[Addr, ...] = (),
        row: bytearray | None = None,
    ) -> Proc:
        raise NotImplementedError  # the world's: it composes the core and the workloads

    def _stop(self, host: Host, *, icmp: bool, reason: str) -> Proc | None:
        """The process on ``host`` ends (crash, or exit after a leave)."""
        proc = host.cur
        if proc is None:
            return None
        t = self.now
        host.peers = proc.node.peer_addrs()[:8]
        if self.links is not None:
            self.links.stop(proc, reset=icmp)
        if self.mesh is not None:
            self.mesh.stop(proc)
        proc.cur = None
        host.cur = None
        host.icmp = icmp
        if self.names is not None:  # the messages its names were sent count from here
            self.names.process_ended(host.index, proc.gen, t)
            self.names_driver.process_ended(host.index, proc.gen, t)
        self._account(t)
        self.running -= 1
        self._observer_off(host.index, t)
        self.count_copies(proc)
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
