"""The names workload: messages from random processes to random registered
names, measured from outside the cores.

Theory of operation. Applications mostly talk to names, so what a scenario
must be able to say is whether a message to a name reaches the process that
owns it while faults run, how fast, and whether any message can vanish
without the sender being told. The driver (the simulated application
processes) reports
each message's life to a :class:`NameRecorder`: ``sent``, then any of
``delivered`` (at the owner), ``failed`` (the error the sender got),
``replied``; the world reports each process end (``process_ended``). The
driver, :class:`NamesWorld`, is the simulated application: it feeds each
Peer the API's :class:`SendToName` and :class:`ReplyToSender` and takes what
the Peer pushes on its connections.

Each message is judged ``settle_s`` after it was sent (``settle_s`` >= 1 s):

- *eligible*: its name's owner was live at send time and its process did not
  end within the next second (a message racing its owner's crash may
  legitimately fail; ``name_delivery`` is the fraction of eligible messages
  that reached that owner);
- *lost*: neither delivered nor failed by then: it vanished and the sender
  was not told (``lost_messages`` must be 0);
- its delivery latency goes into a histogram of 0.1 ms buckets
  (``name_latency`` is its p99).

Built for 10,000 nodes: per-message work is O(1) (a dict lookup by message
id, an append to a queue ordered by send time, and a pop when it is judged);
only messages younger than ``settle_s`` are held, so memory is bounded by the
send rate times ``settle_s``, and what is kept afterwards is counts and a
histogram (at most one bucket per 0.1 ms of latency seen). Each ``after_s``
of a names check gets its own aggregate (a message counts in those whose
cutoff is at or before its send time), so checks need no per-message record.
"""

from __future__ import annotations

import collections
import math
import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from peerd.core import events as nev
from peerd.wire.messages import RegKind

if TYPE_CHECKING:
    from peerd.sim.engine import Proc
    from peerd.sim.faults import Faults as World
    from peerd.sim.scenario import NamesSpec

NAMES_CHECKS = ("name_delivery", "name_latency", "lost_messages")
OWNER_WINDOW_S = 1.0  # the owner must live this long after the send to be eligible
_BUCKET_S = 1e-4  # latency histogram resolution: 0.1 ms


@dataclass(slots=True)
class NameRecord:
    """One message to a name, while it is open (younger than settle_s)."""

    id: int
    sent_at: float
    sender: int  # host index
    name: str
    owner: int  # host index of the name's owner at send time, -1: none
    owner_gen: int  # generation of the owner's process at send time
    owner_live: bool  # the owner's process ran (and was not leaving) at send time
    delivered_at: float | None = None
    delivered_to: int = -1
    error: str | None = None
    reply_at: float | None = None


@dataclass(slots=True)
class _Totals:
    """What remains of the messages sent at or after one cutoff."""

    sent: int = 0
    delivered: int = 0
    failed: int = 0
    lost: int = 0
    eligible: int = 0
    eligible_delivered: int = 0
    owner_died: int = 0  # owner live at send, its process ended within the window
    replies: int = 0
    replies_missing: int = 0  # a reply was asked for, delivered, never came, no error
    errors: dict[str, int] = field(default_factory=dict)
    latency: dict[int, int] = field(default_factory=dict)  # 0.1 ms bucket -> count
    rtt: dict[int, int] = field(default_factory=dict)

    def delivery(self) -> float | None:
        return round(self.eligible_delivered / self.eligible, 6) if self.eligible else None

    def summary(self) -> dict[str, Any]:
        return {
            "sent": self.sent,
            "delivered": self.delivered,
            "failed": self.failed,
            "lost": self.lost,
            "eligible": self.eligible,
            "eligible_delivered": self.eligible_delivered,
            "owner_died": self.owner_died,
            "name_delivery": self.delivery(),
            "latency_ms": _hist_stats(self.latency),
            "replies": self.replies,
            "replies_missing": self.replies_missing,
            "reply_rtt_ms": _hist_stats(self.rtt),
            "errors": dict(sorted(self.errors.items())),
        }


class NameRecorder:
    """Records the messages of a names workload; see the module docstring."""

    def __init__(
        self,
        settle_s: float,
        reply: bool,
        windows: Iterable[tuple[float, float | None]] = (),
    ) -> None:
        if settle_s < OWNER_WINDOW_S:
            raise ValueError("settle_s must be at least the owner window (1 s)")
        self.settle_s = settle_s
        self.reply = reply
        self._open: dict[int, NameRecord] = {}
        self._queue: collections.deque[NameRecord] = collections.deque()  # by sent_at
        # when each (host, generation) process ended: what "owner live for the
        # next second" is judged against (one entry per process end)
        self._ended: dict[tuple[int, int], float] = {}
        # per window [after_s, until_s) of send times (until None: no end),
        # in order of after_s; (0.0, None) is the whole run
        self.totals = {
            w: _Totals()
            for w in sorted({(0.0, None), *windows}, key=lambda w: (w[0], w[1] or math.inf))
        }
        self.late = 0  # events for a message already judged (or never sent)

    # --- events from the driver and the world --------------------------------------

    def sent(
        self,
        msg: int,
        t: float,
        sender: int,
        name: str,
        owner: int,
        owner_gen: int,
        owner_live: bool,
    ) -> None:
        self.judge(t)
        rec = NameRecord(msg, t, sender, name, owner, owner_gen, owner_live)
        self._open[msg] = rec
        self._queue.append(rec)

    def delivered(self, msg: int, t: float, node: int) -> None:
        self.judge(t)
        rec = self._get(msg, t)
        if rec is not None and rec.delivered_at is None:
            rec.delivered_at = t
            rec.delivered_to = node

    def failed(self, msg: int, t: float, error: str) -> None:
        self.judge(t)
        rec = self._get(msg, t)
        if rec is not None and rec.error is None:
            rec.error = error

    def replied(self, msg: int, t: float) -> None:
        self.judge(t)
        rec = self._get(msg, t)
        if rec is not None and rec.reply_at is None:
            rec.reply_at = t

    def process_ended(self, host: int, gen: int, t: float) -> None:
        self.judge(t)
        self._ended[(host, gen)] = t

    # --- judging ---------------------------------------------------------------------

    def judge(self, now: float) -> None:
        """Judge every message sent at or before ``now - settle_s``."""
        q = self._queue
        limit = now - self.settle_s
        while q and q[0].sent_at <= limit + 1e-9:
            rec = q.popleft()
            del self._open[rec.id]
            self._judge(rec)

    def finish(self, end: float | None = None) -> dict[str, Any]:
        """Judge what is due at ``end`` (None: every message still open, as
        if its settle time had passed) and return the summary ("names")."""
        self.judge(math.inf if end is None else end)
        out = self.totals[(0.0, None)].summary()
        out["open_at_end"] = len(self._open)
        out["late_events"] = self.late
        return out

    def window(self, after_s: float, until_s: float | None = None) -> _Totals:
        return self.totals[(after_s, until_s)]

    def _get(self, msg: int, t: float) -> NameRecord | None:
        rec = self._open.get(msg)
        if rec is None:
            self.late += 1
        return rec

    def _judge(self, rec: NameRecord) -> None:
        died_at = self._ended.get((rec.owner, rec.owner_gen))
        window_ok = died_at is None or died_at > rec.sent_at + OWNER_WINDOW_S
        eligible = rec.owner >= 0 and rec.owner_live and window_ok
        owner_died = rec.owner >= 0 and rec.owner_live and not window_ok
        reached = rec.delivered_at is not None and rec.delivered_to == rec.owner
        for (after, until), tot in self.totals.items():
            if rec.sent_at < after:
                break  # (totals are in order of after_s)
            if until is not None and rec.sent_at >= until:
                continue
            tot.sent += 1
            if rec.delivered_at is not None:
                tot.delivered += 1
                _add(tot.latency, rec.delivered_at - rec.sent_at)
            if rec.error is not None:
                tot.failed += 1
                tot.errors[rec.error] = tot.errors.get(rec.error, 0) + 1
            elif rec.delivered_at is None:
                tot.lost += 1
            if eligible:
                tot.eligible += 1
                tot.eligible_delivered += reached
            tot.owner_died += owner_died
            if self.reply and rec.delivered_at is not None:
                if rec.reply_at is not None:
                    tot.replies += 1
                    _add(tot.rtt, rec.reply_at - rec.sent_at)
                elif rec.error is None:
                    tot.replies_missing += 1


def _add(hist: dict[int, int], seconds: float) -> None:
    b = max(0, round(seconds / _BUCKET_S))
    hist[b] = hist.get(b, 0) + 1


def hist_pct(hist: dict[int, int], q: float) -> float | None:
    """The nearest-rank ``q`` quantile of a histogram, in milliseconds."""
    total = sum(hist.values())
    if not total:
        return None
    rank = max(1, math.ceil(q * total))
    seen = 0
    for b in sorted(hist):
        seen += hist[b]
        if seen >= rank:
            return round(b * _BUCKET_S * 1000.0, 1)
    raise AssertionError("unreachable")


def _hist_stats(hist: dict[int, int]) -> dict[str, float | None]:
    return {
        "median": hist_pct(hist, 0.5),
        "p99": hist_pct(hist, 0.99),
        "max": round(max(hist) * _BUCKET_S * 1000.0, 1) if hist else None,
    }


# --- the driver ------------------------------------------------------------------------


class Pool:
    """A set of ints with an O(1) uniform random pick (swap-remove list)."""

    __slots__ = ("items", "pos")

    def __init__(self) -> None:
        self.items: list[int] = []
        self.pos: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self.items)

    def add(self, x: int) -> None:
        if x not in self.pos:
            self.pos[x] = len(self.items)
            self.items.append(x)

    def discard(self, x: int) -> None:
        i = self.pos.pop(x, None)
        if i is None:
            return
        last = self.items.pop()
        if i < len(self.items):
            self.items[i] = last
            self.pos[last] = i

    def pick(self, rng: random.Random) -> int:
        return self.items[rng.randrange(len(self.items))]


@dataclass(slots=True)
class _Call:
    msg: int  # the message (the send's call id) it is about
    host: int  # the calling process: host index and generation
    gen: int
    at: float
    reply: bool  # a ReplyToSender (else a SendToName)
    owner_conn: int = 0


class NamesWorld:
    """The simulated application processes of a names workload.

    Every ``send_every_s`` a random live registry process (an API connection
    of the [registry] workload on a running node) sends ``payload_bytes`` to
    a random registered name; both picks are O(1) (:class:`Pool` of the
    registry's ground truth). The payload carries the message id, so the
    receiving process knows which message it got; with ``reply`` it answers
    through :class:`ReplyToSender` with the ``reply_to`` it was given. Every
    API call's :class:`SendResult` is accounted: a call that has none when
    the run ends, past its deadline, is counted in ``no_result`` (and fails
    ``lost_messages``); calls of a process that ended first died with it
    (``sender_gone``)."""

    def __init__(self, world: World, spec: NamesSpec, rec: NameRecorder, timeout_s: float) -> None:
        self.w = world
        self.spec = spec
        self.rec = rec
        self.rng = random.Random(f"peerd-sim-names:{world.sc.seed}")
        self.timeout = timeout_s  # the Peers' send timeout
        self._call = 0
        self.calls: dict[int, _Call] = {}
        self.by_proc: dict[tuple[int, int], set[int]] = {}
        self.counts = dict.fromkeys(
            (
                "calls",
                "results",
                "results_unknown",
                "reply_calls",
                "replies_failed",
                "sender_gone",
                "wrong_receiver",
            ),
            0,
        )
        self.no_result = 0
        self.reply_errors: dict[str, int] = {}

    def schedule(self) -> None:
        s = self.spec
        end = s.send_until_s if s.send_until_s is not None else self.w.sc.duration_s - s.settle_s
        self._end = end
        if s.send_from_s <= end:
            self.w.at(s.send_from_s, self._tick)

    def _tick(self) -> None:
        w = self.w
        t = w.now
        nxt = round(t + self.spec.send_every_s, 9)
        if nxt <= self._end + 1e-9:
            w.at(nxt, self._tick)
        reg = w.reg
        if not reg.live_procs or not reg.live_names:
            return
        sender = reg.entries[reg.live_procs.pick(self.rng)]
        target = reg.entries[reg.live_names.pick(self.rng)]
        proc = w.hosts[sender.host].cur
        assert proc is not None and proc.gen == sender.gen
        owner = w.hosts[target.host].cur
        live = owner is not None and owner.gen == target.gen and not owner.leaving
        call = self._new(_Call(0, sender.host, sender.gen, t, False, target.conn))
        self.calls[call].msg = call
        self.rec.sent(call, t, sender.host, target.name, target.host, target.gen, live)
        payload = call.to_bytes(8, "big") + bytes(max(0, self.spec.payload_bytes - 8))
        w._push(
            t,
            proc,
            nev.SendToName(call, sender.conn, RegKind.NAME, reg.scope, target.name, payload),
        )

    def _new(self, c: _Call) -> int:
        self._call += 1
        self.calls[self._call] = c
        self.by_proc.setdefault((c.host, c.gen), set()).add(self._call)
        self.counts["reply_calls" if c.reply else "calls"] += 1
        return self._call

    def _close(self, call: int) -> _Call | None:
        c = self.calls.pop(call, None)
        if c is not None:
            self.by_proc[(c.host, c.gen)].discard(call)
        return c

    # --- what the processes get ----------------------------------------------------------

    def output(self, proc: Proc, o: Any, t: float) -> None:
        w = self.w
        if o.__class__ is nev.SendResult:
            self._result(o, t)
            return
        # a message (or a reply) pushed on one of this process's connections:
        # a live process takes it (a closed one was told by ConnClosed); one
        # from another daemon carries its answer (the world sends it)
        if o.answer is None:
            w._push(t, proc, nev.Offered(o.token, nev.OfferOutcome.OK))
        msg = int.from_bytes(o.payload[:8], "big")
        i = proc.host.index
        if o.kind is None:
            self.rec.replied(msg, t)
            return
        c = self.calls.get(msg)
        right = c is None or c.owner_conn == o.conn
        if not right:
            self.counts["wrong_receiver"] += 1
        self.rec.delivered(msg, t, i if right else -1)
        if self.spec.reply and o.reply_to is not None:
            call = self._new(_Call(msg, i, proc.gen, t, True))
            w._push(t, proc, nev.ReplyToSender(call, o.conn, o.reply_to, o.payload[:8]))

    def _result(self, o: nev.SendResult, t: float) -> None:
        c = self._close(o.call)
        if c is None:
            self.counts["results_unknown"] += 1
            return
        self.counts["results"] += 1
        if o.error is None:
            return
        why = f"{o.error.error.value}:{o.error.why.value}"
        if c.reply:
            self.counts["replies_failed"] += 1
            self.reply_errors[why] = self.reply_errors.get(why, 0) + 1
        else:
            self.rec.failed(c.msg, t, why)

    def process_ended(self, host: int, gen: int, t: float) -> None:
        """Its calls die with it: nobody is left to be told."""
        for call in sorted(self.by_proc.pop((host, gen), ())):
            c = self.calls.pop(call)
            self.counts["sender_gone"] += 1
            if not c.reply:
                self.rec.failed(c.msg, t, "sender_gone")

    def finish(self) -> None:
        end = self.w.sc.duration_s
        self.no_result = sum(1 for c in self.calls.values() if c.at + self.timeout < end)

    def summary(self) -> dict[str, Any]:
        return {
            "calls": dict(self.counts),
            "calls_open_at_end": len(self.calls),
            "no_result": self.no_result,
            "reply_errors": dict(sorted(self.reply_errors.items())),
        }
