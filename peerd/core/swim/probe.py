"""Failure detection: probing, indirect probes and Lifeguard's local health.

Theory of operation (SWIM 4.3; Lifeguard IV-A, IV-C): every protocol period
a node pings the next member in a shuffled round-robin order, so every member
is probed within a bounded time (a member that joins is inserted at a random
place among the positions not reached yet). No ack within ``probe_timeout``
starts an indirect probe: ``k`` random helpers ping the target for us and
forward its ack, or a nack when they got none, which tells us the helper
itself is alive. No ack by the end of the period makes the target *suspect*
(:mod:`peerd.core.swim.suspicion`).

*Local health* (Lifeguard IV-A): a node that misses acks, misses nacks from
its helpers, or has to refute suspicions about itself raises a health score
that stretches its own probe interval and timeouts, because the likely
culprit is its own slowness. *Buddy* (IV-C): a ping to a suspect carries the
suspicion, so a live suspect refutes at once.

*Closed-port hints*: when the OS reports that a datagram to a member hit a
closed port, the member is suspected with a short timer and pinged with the
suspicion attached: a live node refutes within a round trip, a crashed daemon
is declared dead quickly. A hint alone never kills: it only starts a
suspicion the node can answer.
"""

from __future__ import annotations

from peerd.core.events import (
    LogLevel,
)
from peerd.core.swim import formulas
from peerd.core.swim.base import (
    LIVE,
    NACK_AFTER,
    NodeBase,
    Probe,
    Relay,
    _fmt,
    addr_problem,
)
from peerd.core.swim.members import (
    Member,
)
from peerd.core.timers import IndirectTimeout, ProbeTick, ProbeTimeout
from peerd.wire import codec
from peerd.wire.messages import (
    Ack,
    Addr,
    Died,
    Nack,
    Ping,
    PingReq,
    Status,
    Suspect,
)


class Probing(NodeBase):
    """Probing, indirect probes, local health. See the module docs."""

    def _adjust_health(self, delta: int) -> None:
        self._health = max(0, min(self.config.awareness_max - 1, self._health + delta))

    def _finish_probe(self) -> None:
        probe = self._probe
        self._probe = None
        if probe is None or probe.acked:
            return
        m = self._members.get(probe.target)
        if m is None or m.status not in LIVE:
            return  # declared down by others meanwhile: not our fault
        # Lifeguard IV-A: missing nacks mean *our* messages or processing are
        # the problem, so they count against our own health.
        if probe.expected_nacks:
            # never below zero: duplicate or stray nacks must not make a
            # failed probe improve our health
            self._adjust_health(max(0, probe.expected_nacks - probe.nacks))
        else:
            self._adjust_health(1)
        self.counters["probe_failures"] += 1
        self._log(LogLevel.INFO, f"probe failed name={m.name} addr={_fmt(m.addr)}")
        self._suspect(m, m.incarnation, self._me.node)

    def _next_target(self) -> Member | None:
        for _ in range(2):
            while self._probe_index < len(self._probe_order):
                node = self._probe_order[self._probe_index]
                self._probe_index += 1
                if node in self._live:
                    return self._peek(node)
            # End of a round: reshuffle (SWIM 4.3 round-robin with random order
            # bounds the time until any member is probed).
            self._probe_order = list(self._live)
            self.rng.shuffle(self._probe_order)
            self._probe_index = 0
        return None

    def _probe_tick(self) -> None:
        self._finish_probe()
        cfg = self.config
        self._arm(ProbeTick, formulas.scaled(cfg.probe_interval_s, self._health))
        if self._leaving:
            return
        target = self._next_target()
        if target is None:
            return
        self.counters["probes"] += 1
        probe = Probe(self._next_seq(), target.node)
        self._probe = probe
        self._send_ping(target, probe.seq)
        self._arm(ProbeTimeout, formulas.scaled(cfg.probe_timeout_s, self._health), probe.seq)

    def _send_ping(self, target: Member, seq: int) -> None:
        before: tuple[bytes, ...] = ()
        if target.status is Status.SUSPECT:
            # Lifeguard buddy system: the suspect hears of it now, not after
            # gossip happens to reach it, and can refute at once. The
            # suspicion goes before the ping so that the refutation it causes
            # is queued in time to ride on the ack.
            before = (codec.encode(Suspect(target.node, target.incarnation, self._me.node)),)
        self._send(target.addr, Ping(seq, target.node), before)

    def _probe_timeout(self, seq: object) -> None:
        probe = self._probe
        if probe is None or probe.seq != seq or probe.acked:
            return
        target = self._members.get(probe.target)
        if target is None or target.status not in LIVE:
            return
        helpers = self._live.sample(self.rng, self.config.indirect_checks, (probe.target,))
        probe.expected_nacks = len(helpers)
        for h in helpers:
            self.counters["indirect_probes"] += 1
            self._send(self._peek(h).addr, PingReq(probe.seq, target.node, target.addr, True))

    def _on_ack(self, src: Addr, seq: int) -> None:
        probe = self._probe
        if probe is not None and probe.seq == seq:
            if not probe.acked:
                probe.acked = True
                self._adjust_health(-1)
            return
        relay = self._relays.pop(seq, None)
        if relay is not None:
            self._send(relay.requester, Ack(relay.seq))
            return
        if self._checks.pop(seq, None) is not None:
            return
        self.counters["drop.stale_ack"] += 1

    def _on_nack(self, seq: int) -> None:
        probe = self._probe
        if probe is not None and probe.seq == seq:
            probe.nacks += 1

    def _on_ping(self, src: Addr, msg: Ping) -> None:
        if msg.target != self._me.node:
            # The address now belongs to someone else (or the sender is
            # confused): acking would vouch for the wrong node.
            self._drop("misdirected_ping", _fmt(src))
            return
        before: tuple[bytes, ...] = ()
        sender = self._peek(self._by_addr.get(src, b""))  # may be None: unknown sender
        if sender is not None and sender.status is Status.DEAD:
            # A node we hold dead is talking to us (a healed partition): tell
            # it, so it refutes and its refutation spreads on both sides.
            before = (codec.encode(Died(sender.node, sender.incarnation)),)
        self._send(src, Ack(msg.seq), before)

    def _on_ping_req(self, src: Addr, msg: PingReq) -> None:
        if msg.target == self._me.node:
            self._send(src, Ack(msg.seq))
            return
        if addr_problem(msg.target_addr):
            self._drop("bad_addr", "ping-req target")
            return
        seq = self._next_seq()
        self._relays[seq] = Relay(src, msg.seq, msg.nack)
        target = self._members.get(msg.target)
        if target is not None and target.status is Status.SUSPECT:
            self._send_ping(target, seq)
        else:
            self._send(msg.target_addr, Ping(seq, msg.target))
        # Our nack must reach the requester before its probe period ends (it
        # sent the ping-req one probe timeout into the period), or Lifeguard
        # would count our answer as missing and blame the requester's health.
        cfg = self.config
        self._arm(
            IndirectTimeout,
            formulas.nack_delay(cfg.probe_timeout_s, cfg.probe_interval_s, NACK_AFTER),
            seq,
        )

    def _relay_timeout(self, seq: object) -> None:
        assert isinstance(seq, int)
        relay = self._relays.pop(seq, None)
        if relay is not None and relay.nack:
            self._send(relay.requester, Nack(relay.seq))

    def _on_unreachable(self, addr: Addr) -> None:
        node = self._by_addr.get(addr)
        if node is None or node == self._me.node:
            return
        m = self._members[node]
        if m.status not in LIVE:
            # No process there to tell that it was declared dead: stop
            # spending gossip packets on it (a restart on this address makes
            # it talk to us, and we tell it then: see _on_ping).
            self._recently_dead.pop(node, None)
            return
        self.counters["unreachable_hints"] += 1
        cap = self.config.refused_suspicion_timeout_s
        if m.status is Status.ALIVE:
            self._log(LogLevel.INFO, f"closed port name={m.name} addr={_fmt(addr)}: suspecting")
            # Not gossiped: the one node that must hear of this suspicion is
            # the suspect, and we ask it directly, carrying the suspicion. If
            # it is alive after all (restarted on the same port) it refutes in
            # one round trip; if not, we declare it dead when the short timer
            # expires, and only that is spread. A burst of crashes then costs
            # the cluster one rumour per death, not two.
            self._suspect(m, m.incarnation, self._me.node, cap=cap, gossip=False)
            self._start_check(m)
        elif m.suspicion is not None and m.suspicion.cap is None:
            m.suspicion.verified = True  # the hint is our own evidence
            m.suspicion.cap = cap
            self._rearm_suspicion(m)
