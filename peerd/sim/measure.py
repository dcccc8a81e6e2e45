"""Measurement from outside the cores: views against the ground truth.

Theory of operation. Every ``MemberEvent`` a core emits updates a byte matrix
``views[observer][subject]`` against the ground truth (which processes really
run), and per-subject counts of wrong views are kept incrementally, so
convergence ("every running node's view is exact"), detection times and false
positives are exact, not sampled: an O(1) update per event, O(N) only when a
process starts or stops. Traffic is counted per whole second of virtual time
and divided by the node-seconds actually run; the timeline is a periodic
sample for the report's plot.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any

from peerd.core.events import EventKind, MemberEvent
from peerd.sim.engine import Engine, Proc
from peerd.sim.scenario import Scenario

# View codes in the observer x subject matrix.
V_UNKNOWN, V_ALIVE, V_SUSPECT, V_DEAD, V_LEFT = 0, 1, 2, 3, 4


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
    # with a names workload: its summary, and its totals by check cutoff (after_s)
    names: dict[str, Any] | None = None
    names_at: dict[tuple[float, float | None], Any] = field(default_factory=dict)
    # Membership update copies received and how many of them were news, over
    # every process that ran (see Measure.count_copies)
    update_copies: int = 0
    update_news: int = 0

    def copies_per_update(self) -> float | None:
        """Copies of a membership update a node received per (node, update)
        it learnt from one: 1.0 when every copy was news. None without news."""
        if not self.update_news:
            return None
        return round(self.update_copies / self.update_news, 3)

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


class Measure(Engine):
    def __init__(self, scenario: Scenario, *, progress: Any = None) -> None:
        super().__init__(scenario, progress=progress)
        n = self.n
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
        self.rec = Record(nodes=n)
        self.rec.convergence.append((0.0, True))
        secs = int(math.ceil(scenario.duration_s)) + 1
        self.rec.per_second = [[0, 0, 0, 0] for _ in range(secs)]
        self.rec.running_per_second = [0.0] * secs
        self._cur_sec: list[int] = self.rec.per_second[0]
        self._cur_sec_i = 0

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

    # --- measuring ----------------------------------------------------------------------

    def count_copies(self, proc: Proc) -> None:
        """Add a process's counts of membership update copies received (and
        of those that were news) to the run's; once per process, when it
        stops or at the end. Exactness: a copy is news when it changed the
        receiver's record of the member, so copies arriving after the
        receiver learnt the update another way (its own detection, a
        push-pull) count as copies of no news, and a copy superseded before
        it arrived (an older incarnation) too: the ratio is an upper bound
        of the mean copies per (node, update) pair, exact when every node
        learns every update from gossip. O(1) per update, no table."""
        c = proc.node.counters
        self.rec.update_copies += c["update_copies_in"]
        self.rec.update_news += c["update_news_in"]

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
