"""The registry in a simulated run: a workload of processes that register
names and join groups, and the ground truth their replicas are checked against.

Workload (``[registry]`` in a scenario, :class:`peerd.sim.scenario.RegistrySpec`).
Every entry belongs to its own simulated process, i.e. its own API connection
on its node: the world feeds the node's core the same :class:`Register` and
:class:`ConnClosed` inputs the daemon's runner gives it (with a world-unique
pid, so an entry is known by its pid everywhere). Churn is a Poisson process:
a random entry's process exits and a new process registers a fresh name (or
joins the same group). A ``register`` fault makes processes on the chosen
nodes claim the same names (``<prefix>-<k>``), which is how a scenario makes
both sides of a partition claim a name.

Ground truth. An entry is *live* from the moment its process asked for it
until the process exits, its node crashes, restarts or leaves, or it lost a
name conflict (its node's core reports ``conflict``); a rejected register is
never live. What each running node *holds* is read from the core's own
:class:`RegistryEvent` outputs (registered/joined add an entry, unregistered/
left remove it), exactly like the member views. From that the tracker keeps,
in O(1) per event:

``wrong = live entries x running nodes - holdings of live entries
+ holdings of dead entries``

which is 0 exactly when every running node holds exactly the live entries
(registry converged), and, per entry, when it became visible on every running
node and when the last copy of a dead one went. Holdings are bit arrays (a bit per entry) of
differences from a default, so 10,000 nodes that all start with the same
100,000 entries (a preloaded, converged registry shared copy-on-write, like
the member tables) cost nothing per node until something changes.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from peerd.core.events import CommandResult, ConnClosed, RegEventKind, Register, RegistryEvent
from peerd.sim.measure import stats3
from peerd.sim.store import SharedState
from peerd.sim.workloads.names import Pool
from peerd.wire.messages import RegEntry, RegKind

if TYPE_CHECKING:
    from peerd.sim.engine import Proc
    from peerd.sim.faults import Faults as World
    from peerd.sim.scenario import Expect, Fault, RegistrySpec

UID = 1000

CHECKS = ("registry_converged", "lost_live_entries", "stale_entries", "duplicates_after_heal")


@dataclass(slots=True)
class TEntry:
    """One registration as the world knows it."""

    host: int
    gen: int
    conn: int
    pid: int
    kind: RegKind
    name: str
    born: float
    returned: float | None = None  # the register call returned ok
    died: float | None = None
    cause: str = ""  # why it died: exit | node_down | conflict | rejected
    visible_s: float | None = None  # returned -> held by every running node
    removed_s: float | None = None  # died -> held by none


def _bits(b: bytearray) -> list[int]:
    """The positions of the set bits of ``b``, ascending."""
    out: list[int] = []
    for j, byte in enumerate(b):
        if byte:
            base = j << 3
            out.extend(base + k for k in range(8) if byte >> k & 1)
    return out


class RegistryWorld:
    def __init__(self, world: World, spec: RegistrySpec) -> None:
        self.w = world
        self.spec = spec
        self.scope = spec.scope
        self.rng = random.Random(f"peerd-sim-registry:{world.sc.seed}")
        self.entries: list[TEntry] = []
        self.by_pid: dict[int, int] = {}  # pid -> entry index
        self.holders: list[int] = []  # per entry: running nodes holding it
        self.host_live: list[set[int]] = [set() for _ in range(world.n)]
        self.default: dict[int, bool] = {}  # observer -> holds the base entries
        # observer -> entries held unlike its default, a bit per entry (a set
        # of ints costs ~40 B an element: 12 GB at 10,000 x 30,000)
        self.flip: dict[int, bytearray] = {}
        self.base_n = 0  # entries [0, base_n) were preloaded
        self.refs: dict[int, int] = {}  # register ref -> entry index
        self.name_claims: dict[str, int] = {}  # unique name -> entries ever claiming it
        self.seq = [0] * world.n  # next fresh name number per host
        self.live = 0
        self.h_live = 0
        self.h_dead = 0
        self.obs = 0
        self._quiet = False
        self._next = 0  # refs, conns and pids
        self.convergence: list[tuple[float, bool]] = [(0.0, True)]
        self.unseen: set[int] = set()  # live entries not yet held everywhere
        # for the names workload, O(1) random picks: live entries (each one a
        # process, i.e. an API connection, on a running node) and the live
        # names whose register returned ok
        self.live_procs = Pool()
        self.live_names = Pool()
        self.evals: dict[int, Any] = {}
        self.counts = dict.fromkeys(
            ("registered", "rejected", "exits", "node_down", "conflicts", "churn"), 0
        )

    # --- the workload ---------------------------------------------------------------

    def _id(self) -> int:
        self._next += 1
        return self._next

    def workload(self, i: int) -> list[tuple[RegKind, str]]:
        s = self.spec
        out = [(RegKind.NAME, f"n{i}.{k}") for k in range(s.names_per_node)]
        out += [
            (RegKind.GROUP, f"g{(i * s.joins_per_node + k) % s.groups}")
            for k in range(s.joins_per_node)
        ]
        self.seq[i] = s.names_per_node
        return out

    def preload(self, k: int) -> tuple[SharedState, list[dict[int, int]]]:
        """Entries of the ``k`` nodes that run at t=0, as if registered and
        replicated before the run: the shared state and, per node, eid -> conn."""
        parts = []
        owners: list[dict[int, int]] = []
        for i in range(k):
            host = self.w.hosts[i]
            mine: dict[int, int] = {}
            entries = []
            for eid, (kind, name) in enumerate(self.workload(i), start=1):
                conn, pid = self._id(), self._id()
                idx = self._add(
                    TEntry(i, 1, conn, pid, kind, name, 0.0, returned=0.0, visible_s=0.0)
                )
                self.host_live[i].add(idx)
                self.live_procs.add(idx)
                if kind is RegKind.NAME:
                    self.live_names.add(idx)
                entries.append(RegEntry(eid, kind, self.scope, name, 0, pid, UID, ()))
                mine[eid] = conn
            parts.append((host.node_id, 1, entries))
            owners.append(mine)
        self.base_n = len(self.entries)
        for idx in range(self.base_n):
            self.holders[idx] = k
        self.live = self.base_n
        self.h_live = self.base_n * k
        return SharedState(parts), owners

    def start(self) -> None:
        """Schedule the run-time part of the workload (registrations, churn)."""
        s = self.spec
        w = self.w
        if not s.preload and (s.names_per_node or s.joins_per_node):
            k = w.sc.start_count()
            step = s.over_s / k if s.over_s else 0.0
            for i in range(k):
                w.at(s.start_s + i * step, lambda i=i: self._register_all(i))  # type: ignore[misc]
        if s.churn_per_node_s:
            w.at(s.churn_from_s, self._churn)
        for e in w.sc.expects:
            if e.check in CHECKS and e.check != "registry_converged":
                at = e.after_s + (e.within_s or 0.0)
                if at <= w.sc.duration_s:
                    w.at(at, lambda e=e: self._evaluate(e))  # type: ignore[misc]

    def _register_all(self, i: int) -> None:
        for kind, name in self.workload(i):
            self.register(i, kind, name)

    def register(self, i: int, kind: RegKind, name: str) -> None:
        """A new process on host ``i`` registers ``name`` (or joins group ``name``)."""
        w = self.w
        proc = w.hosts[i].cur
        if proc is None or proc.leaving:
            return
        t = w.now
        conn, pid, ref = self._id(), self._id(), self._id()
        idx = self._add(TEntry(i, proc.gen, conn, pid, kind, name, t))
        self.unseen.add(idx)
        self.live += 1
        self.host_live[i].add(idx)
        self.live_procs.add(idx)
        self.refs[ref] = idx
        self._changed(t)
        w.deliver(proc, Register(ref, conn, kind, self.scope, name, (), pid, UID, int(t * 1000)))

    def fault(self, f: Fault, targets: list[int]) -> None:
        """``register`` fault: each target node claims ``<prefix>-0..names-1``."""
        for i in targets:
            for k in range(f.names):
                self.register(i, RegKind.NAME, f"{f.prefix}-{k}")

    def _churn(self) -> None:
        s = self.spec
        w = self.w
        t = w.now
        until = s.churn_until_s if s.churn_until_s is not None else w.sc.duration_s
        if t > until:
            return
        hosts = [i for i in w.running_indices() if self.host_live[i]]
        if hosts:
            i = hosts[self.rng.randrange(len(hosts))]
            mine = sorted(self.host_live[i])
            idx = mine[self.rng.randrange(len(mine))]
            e = self.entries[idx]
            proc = w.hosts[i].cur
            assert proc is not None
            self.counts["churn"] += 1
            self.counts["exits"] += 1
            self._die(idx, t, "exit")
            w.deliver(proc, ConnClosed(e.conn))
            if e.kind is RegKind.NAME:
                self.seq[i] += 1
                self.register(i, RegKind.NAME, f"n{i}.{self.seq[i]}")
            else:
                self.register(i, RegKind.GROUP, e.name)
        rate = s.churn_per_node_s * max(1, w.running)
        w.at(t + self.rng.expovariate(rate), self._churn)

    # --- what the cores report --------------------------------------------------------

    def on_result(self, proc: Proc, res: CommandResult, t: float) -> None:
        idx = self.refs.pop(res.ref, None)
        if idx is None:
            return
        e = self.entries[idx]
        if res.error is not None:
            self.counts["rejected"] += 1
            self._die(idx, t, "rejected")
            return
        self.counts["registered"] += 1
        e.returned = t
        if e.kind is RegKind.NAME and e.died is None:
            self.live_names.add(idx)
        self._check_visible(idx, t)

    def on_event(self, proc: Proc, ev: RegistryEvent, t: float) -> None:
        i = proc.host.index
        if not self.w.observing[i] or proc.host.cur is not proc:
            return
        kind = ev.kind
        idx = self.by_pid.get(ev.entry.pid)
        if idx is None or kind is RegEventKind.UPDATED:
            return
        if kind is RegEventKind.CONFLICT:
            if ev.origin == proc.host.node_id and self.entries[idx].host == i:
                self.counts["conflicts"] += 1
                self._die(idx, t, "conflict")
            return
        self._hold(i, idx, kind is RegEventKind.REGISTERED or kind is RegEventKind.JOINED, t)

    # --- processes ----------------------------------------------------------------------

    def observer_on(self, i: int, preloaded: bool, t: float) -> None:
        self.obs += 1
        self.default[i] = preloaded
        self.flip[i] = bytearray()
        self._changed(t)
        delay = self.spec.on_start_s
        if delay is not None and t > 0:  # a node that joins or restarts: its applications start
            gen = self.w.hosts[i].gen
            self.w.at(t + delay, lambda: self._register_started(i, gen))

    def _register_started(self, i: int, gen: int) -> None:
        cur = self.w.hosts[i].cur
        if cur is not None and cur.gen == gen:  # not restarted again, not gone
            self._register_all(i)

    def observer_off(self, i: int, t: float) -> None:
        """Host ``i``'s process stops counting (crash, restart, leave): its
        entries are dead, and what it held no longer counts."""
        if i not in self.default:
            return
        for idx in sorted(self.host_live[i]):
            self.counts["node_down"] += 1
            self._die(idx, t, "node_down")
        held = self._held_set(i)
        del self.default[i]
        del self.flip[i]
        self.obs -= 1
        for idx in held:
            self._unhold_counts(idx, t)
        # the last node that lacked an entry may be the one that went
        for idx in sorted(self.unseen):
            self._check_visible(idx, t)
        self._changed(t)

    def _held_set(self, i: int) -> list[int]:
        flipped = _bits(self.flip[i])
        if self.default[i]:
            skip = set(flipped)
            base = [idx for idx in range(self.base_n) if idx not in skip]
            return base + [idx for idx in flipped if idx >= self.base_n]
        return flipped

    # --- bookkeeping -----------------------------------------------------------------

    def _add(self, e: TEntry) -> int:
        idx = len(self.entries)
        self.entries.append(e)
        self.holders.append(0)
        self.by_pid[e.pid] = idx
        if e.kind is RegKind.NAME:
            self.name_claims[e.name] = self.name_claims.get(e.name, 0) + 1
        return idx

    def _held(self, i: int, idx: int) -> bool:
        flip = self.flip[i]
        j = idx >> 3
        flipped = j < len(flip) and flip[j] >> (idx & 7) & 1
        return (idx < self.base_n and self.default[i]) != bool(flipped)

    def _hold(self, i: int, idx: int, add: bool, t: float) -> None:
        if self._held(i, idx) == add:
            return
        flip = self.flip[i]
        j = idx >> 3
        if j >= len(flip):
            flip.extend(bytes(j + 1 - len(flip) + (len(flip) >> 3)))
        flip[j] ^= 1 << (idx & 7)
        e = self.entries[idx]
        if add:
            self.holders[idx] += 1
            if e.died is None:
                self.h_live += 1
                self._check_visible(idx, t)
            else:
                self.h_dead += 1
        else:
            self._unhold_counts(idx, t)
        self._changed(t)

    def _check_visible(self, idx: int, t: float) -> None:
        e = self.entries[idx]
        if (
            e.died is None
            and e.visible_s is None
            and e.returned is not None
            and self.holders[idx] >= self.obs
        ):
            e.visible_s = round(t - e.returned, 6)
            self.unseen.discard(idx)

    def _unhold_counts(self, idx: int, t: float) -> None:
        e = self.entries[idx]
        self.holders[idx] -= 1
        if e.died is None:
            self.h_live -= 1
        else:
            self.h_dead -= 1
            if self.holders[idx] == 0 and e.removed_s is None:
                e.removed_s = round(t - e.died, 6)

    def _die(self, idx: int, t: float, cause: str) -> None:
        e = self.entries[idx]
        if e.died is not None:
            return
        e.died = t
        e.cause = cause
        self.unseen.discard(idx)
        self.live -= 1
        h = self.holders[idx]
        self.h_live -= h
        self.h_dead += h
        self.host_live[e.host].discard(idx)
        self.live_procs.discard(idx)
        self.live_names.discard(idx)
        if h == 0:
            e.removed_s = 0.0
        self._changed(t)

    @property
    def wrong(self) -> int:
        return self.live * self.obs - self.h_live + self.h_dead

    def _changed(self, t: float) -> None:
        if self._quiet:
            return
        ok = self.wrong == 0
        if ok != self.convergence[-1][1]:
            self.convergence.append((t, ok))

    # --- checks and the summary -------------------------------------------------------

    def lost(self, cutoff: float) -> int:
        """(running node, entry) pairs missing: the entry is live and was
        asked for at or before ``cutoff``."""
        return sum(
            self.obs - self.holders[idx]
            for idx, e in enumerate(self.entries)
            if e.died is None and e.born <= cutoff
        )

    def stale(self, cutoff: float) -> int:
        """(running node, entry) pairs still held of entries dead at or before ``cutoff``."""
        return sum(
            self.holders[idx]
            for idx, e in enumerate(self.entries)
            if e.died is not None and e.died <= cutoff
        )

    def duplicates(self) -> int:
        """(running node, name) pairs where the node holds more than one
        claim of a unique name."""
        names = sorted(n for n, c in self.name_claims.items() if c > 1)
        if not names:
            return 0
        n = 0
        for i in self.w.running_indices():
            proc = self.w.hosts[i].cur
            assert proc is not None
            state = proc.node.registry.state
            n += sum(1 for name in names if len(state.claims(self.scope, name)) > 1)
        return n

    def _evaluate(self, e: Expect) -> None:
        if e.index in self.evals:
            return
        if e.check == "lost_live_entries":
            self.evals[e.index] = self.lost(e.after_s)
        elif e.check == "stale_entries":
            self.evals[e.index] = self.stale(e.after_s)
        elif e.check == "duplicates_after_heal":
            self.evals[e.index] = self.duplicates()

    def finish(self) -> dict[str, Any]:
        """Evaluate what was due after the end, and summarize."""

        for e in self.w.sc.expects:
            if e.check in CHECKS and e.check != "registry_converged":
                self._evaluate(e)
        real = [e for e in self.entries if e.cause != "rejected"]
        asked = real[self.base_n :]  # registered during the run (not preloaded)
        conv_end = self.convergence[-1][0] if self.convergence[-1][1] else None
        return {
            "entries": len(real),
            "live_at_end": self.live,
            "preloaded": self.base_n,
            **self.counts,
            "converged_at_end": conv_end is not None,
            "converged_s": None if conv_end is None else round(conv_end, 3),
            # register returned -> held by every running node (run-time entries)
            "visible_all_s": stats3([e.visible_s for e in asked if e.visible_s is not None]),
            "not_visible_all": sum(1 for e in asked if e.died is None and e.visible_s is None),
            # died -> held nowhere: after the process exited (or lost a
            # conflict), and after its node crashed or left (detection included)
            "removed_all_s": stats3(
                [e.removed_s for e in real if e.removed_s is not None and e.cause != "node_down"]
            ),
            "removed_with_node_s": stats3(
                [e.removed_s for e in real if e.removed_s is not None and e.cause == "node_down"]
            ),
            "missing_at_end": self.live * self.obs - self.h_live,
            "stale_at_end": self.h_dead,
            "duplicates_at_end": self.duplicates(),
        }
