"""Suspicion: timers, dogpile confirmations, refutation, death and leave.

Theory of operation (SWIM 4.2; Lifeguard IV-B): a suspect is declared dead
only after a timeout, which gives it time to hear the suspicion and *refute*
it by gossiping an ``Alive`` with a higher incarnation number. Only the node
itself ever raises its incarnation, so a refutation always beats the
suspicion it answers. The timer starts long and shrinks with every
independent confirmation (Lifeguard's *dogpile*: ``k`` other suspecters bring
it from ``high`` down to ``low``, logarithmically), so a node many saw fail
dies fast and one suspected by a single slow peer has time to answer.

In a large cluster a refutation reaches every node only with high
probability, and the node that misses it must not kill a live member: from
``LAST_CHECK_MIN_NODES`` live nodes on, a suspicion we only heard of is
checked by us (one ping) before our own timer declares the suspect dead.
A closed-port suspicion is not gossiped at all: only the suspect hears of it,
and the cluster only of the death. Final news (``Dead``, ``Left``) is
applied once, with the higher incarnation winning, and handed to
dissemination.
"""

from __future__ import annotations

from peerd.core.events import (
    DeathDeclared,
    EventKind,
    IncarnationChanged,
    LogLevel,
    NodeDown,
)
from peerd.core.swim import formulas
from peerd.core.swim.base import (
    LAST_CHECK_MIN_NODES,
    LIVE,
    VERDICT,
    NodeBase,
)
from peerd.core.swim.members import (
    Member,
    Suspicion,
)
from peerd.core.timers import ConfirmTimeout, SuspicionTimeout
from peerd.wire import codec
from peerd.wire.codec import (
    MAX_U64,
)
from peerd.wire.messages import (
    Addr,
    Alive,
    Left,
    NodeId,
    Status,
    Suspect,
)


class Suspicions(NodeBase):
    """Suspicion timers, confirmations, refutation, deaths and leaves. See the module docs."""

    def _bump_incarnation(self, value: int) -> None:
        self._dig(self._me)
        self._me.incarnation = value
        self._dig(self._me)
        self._out.append(IncarnationChanged(value))

    def _alive_about_me(self, msg: Alive) -> None:
        me = self._me
        if msg.incarnation < me.incarnation:
            return
        if msg.incarnation == me.incarnation and msg == self._alive_msg():
            return
        if self._leaving:
            return
        # Someone spreads a view of us that is as new as ours but wrong (an
        # old address or tags from before a restart): outbid it.
        self._refute(msg.incarnation)

    def _refute(self, accused_incarnation: int) -> None:
        if max(self._me.incarnation, accused_incarnation) >= MAX_U64:
            # Nobody can outbid this accusation (only a broken or hostile peer
            # gets here): keep our incarnation rather than overflow the wire.
            self._drop("incarnation_exhausted")
            return
        self.counters["refutations"] += 1
        self._adjust_health(1)
        self._bump_incarnation(max(self._me.incarnation, accused_incarnation) + 1)
        self._log(LogLevel.INFO, f"refuting incarnation={self._me.incarnation}")
        self._broadcast(self._me.node, self._alive_msg())

    def _suspect(
        self,
        m: Member,
        incarnation: int,
        sender: NodeId,
        cap: float | None = None,
        gossip: bool = True,
    ) -> None:
        """Start (or confirm) a suspicion of ``m`` at ``incarnation``;
        ``gossip=False`` keeps a new suspicion to ourselves."""
        if m.suspicion is not None:
            self._confirm(m, sender)
            return
        cfg = self.config
        n = self.live_count()
        low, high = formulas.suspicion_bounds(
            cfg.suspicion_mult, cfg.suspicion_max_timeout_mult, n, cfg.probe_interval_s
        )
        k = formulas.expected_confirmations(cfg.suspicion_mult, n)
        self.counters["suspicions"] += 1
        self._set_status(m, Status.SUSPECT)
        self._set_incarnation(m, incarnation)
        susp = Suspicion(
            incarnation,
            sender,
            self._now,
            low,
            high,
            k,
            set(),
            0,
            0.0,
            cap,
            verified=sender == self._me.node,
        )
        m.suspicion = susp
        self._rearm_suspicion(m)
        self._event(EventKind.SUSPECT, m)
        if gossip:
            self._broadcast(m.node, Suspect(m.node, incarnation, sender))

    def _confirm(self, m: Member, sender: NodeId) -> None:
        susp = m.suspicion
        assert susp is not None
        if sender == self._me.node:
            susp.verified = True
        if sender == susp.origin or sender in susp.confirmers:
            return
        if len(susp.confirmers) >= susp.k:
            return
        susp.confirmers.add(sender)
        self.counters["confirmations"] += 1
        self._rearm_suspicion(m)
        # Pass the confirmation on: others' timers shrink too (dogpile).
        self._broadcast(m.node, Suspect(m.node, susp.incarnation, sender))

    def _rearm_suspicion(self, m: Member) -> None:
        susp = m.suspicion
        assert susp is not None
        timeout = formulas.suspicion_timeout(susp.low, susp.high, susp.k, len(susp.confirmers))
        deadline = susp.started + timeout
        if susp.cap is not None:
            deadline = min(deadline, self._now + susp.cap)
        if susp.token and deadline >= susp.deadline:
            return
        if susp.token:
            self._disarm(susp.token)
        susp.deadline = deadline
        susp.token = self._arm(
            SuspicionTimeout, max(0.0, deadline - self._now), m.node, susp.incarnation
        )

    def _clear_suspicion(self, m: Member) -> None:
        if m.suspicion is not None:
            self._disarm(m.suspicion.token)
            m.suspicion = None

    def _suspicion_expired(self, ctx: object) -> None:
        assert isinstance(ctx, tuple)
        node, incarnation = ctx
        m = self._members.get(node)
        if m is None or m.status is not Status.SUSPECT or m.incarnation != incarnation:
            return
        susp = m.suspicion
        if (
            susp is not None
            and not susp.verified
            and not self._leaving
            and self.live_count() >= LAST_CHECK_MIN_NODES
        ):
            # Heard of, never seen: ask the suspect once (the ping carries the
            # suspicion, so a live one refutes), then decide.
            susp.verified = True
            self.counters["suspicion_last_checks"] += 1
            self._start_check(m)
            wait = formulas.scaled(self.config.probe_timeout_s, self._health)
            susp.deadline = self._now + wait
            susp.token = self._arm(SuspicionTimeout, wait, m.node, susp.incarnation)
            return
        m.suspicion = None
        self._log(LogLevel.INFO, f"suspicion expired name={m.name}: declaring dead")
        self._mark_down(m, Status.DEAD, incarnation)
        if susp is not None and susp.origin != self._me.node:
            # Our verdict on another's suspicion: on the mesh's tree, its
            # origin's broadcast is the one (see peerd.core.swim.treecast).
            self._tc.ctx = VERDICT
        self._broadcast_death(m.node, incarnation)
        if self.news:
            # The registry may tell every peer at once (a node that held
            # entries: they must vanish everywhere now).
            self._out.append(DeathDeclared(m.node, incarnation))

    def _mark_down(self, m: Member, status: Status, incarnation: int) -> None:
        was_down = m.status not in LIVE
        since = m.changed_at
        self._clear_suspicion(m)
        self._set_incarnation(m, incarnation)
        self._set_status(m, status)
        if was_down:
            # Dead, then left (or the other way): one death, one reclaim
            # clock; news from a peer must not start it again.
            m.changed_at = since
        self._set_live(m.node, False)
        if self.news:
            self._out.append(NodeDown(m.node, m.generation))
        self._recently_dead[m.node] = self._now
        if status is Status.DEAD:
            self._dead[m.node] = None
        else:
            self._dead.pop(m.node, None)
        self.counters["dead" if status is Status.DEAD else "left"] += 1
        self._repair_soon()
        self._event(EventKind.DEAD if status is Status.DEAD else EventKind.LEFT, m)
        self._ghost_check(m)

    def _stale_accusation(self, m: Member, src: Addr | None = None) -> None:
        # Someone still holds an older view of us (they missed our
        # refutation, e.g. across a healed partition): spread our current
        # Alive again, without a bump, unless it is queued already.
        if m is self._me:
            if not self._leaving and not self._queue.has(("m", m.node)):
                self.counters["stale_accusations"] += 1
                self._broadcast(m.node, self._alive_msg())
            return
        if src is not None and m.status is Status.ALIVE and not self._queue.has(("m", m.node)):
            # A peer still relays an accusation that was refuted: some nodes
            # missed the refutation (gossip reaches everyone only with high
            # probability), and their own suspicion timers would declare a
            # live node dead. Queue the refutation once more, without arming
            # gossip: it rides on the probe traffic we send anyway (no extra
            # packet), and whoever learns from it gossips it on. This stops by
            # itself: the stale rumour runs out of retransmissions.
            self.counters["stale_rebroadcasts"] += 1
            self._queue.enqueue(
                ("m", m.node),
                codec.encode(Alive(m.node, m.name, m.addr, m.incarnation, m.generation, m.tags)),
            )

    def _on_suspect(self, msg: Suspect, src: Addr | None = None) -> None:
        m = self._members.get(msg.node)
        if m is None:
            return
        if msg.incarnation < m.incarnation:
            self._stale_accusation(m, src)
            return
        if m.status not in LIVE:
            return
        if m is self._me:
            if not self._leaving:
                self._refute(msg.incarnation)
            return
        if m.suspicion is not None and msg.incarnation > m.suspicion.incarnation:
            # A suspicion of a newer life supersedes ours: start over at its
            # incarnation (a refutation of the old one must not clear it).
            self._clear_suspicion(m)
            m.status = Status.ALIVE
        fresh = m.suspicion is None
        self._suspect(m, msg.incarnation, msg.sender)
        if fresh:
            self._maybe_check(m)

    def _maybe_check(self, m: Member) -> None:
        """Check a freshly suspected member ourselves, with a probability that
        gives about 2K checkers cluster-wide whatever N is: their failed pings
        are the independent confirmations that shrink everyone's suspicion
        timer (dogpile) without waiting for round-robin probing to get there,
        and the load on the suspect stays O(1) per suspicion."""
        susp = m.suspicion
        if susp is None or susp.k < 1 or self._leaving:
            return
        if self.rng.random() >= min(1.0, 2 * susp.k / self.live_count()):
            return
        self.counters["confirm_checks"] += 1
        self._start_check(m)

    def _start_check(self, m: Member) -> None:
        seq = self._next_seq()
        self._checks[seq] = m.node
        self._send_ping(m, seq)
        self._arm(
            ConfirmTimeout,
            formulas.scaled(self.config.probe_timeout_s, self._health),
            seq,
        )

    def _check_timeout(self, seq: object) -> None:
        assert isinstance(seq, int)
        node = self._checks.pop(seq, None)
        m = self._members.get(node) if node is not None else None
        if m is None or m.suspicion is None or m.status is not Status.SUSPECT:
            return
        self._suspect(m, m.incarnation, self._me.node)

    def _on_dead(self, node: NodeId, incarnation: int, src: Addr | None = None) -> None:
        m = self._members.get(node)
        if m is None:
            return
        if incarnation < m.incarnation:
            self._stale_accusation(m, src)
            return
        if m is self._me:
            if not self._leaving:
                self._refute(incarnation)
            return
        if m.status not in LIVE:
            if m.status is Status.DEAD and incarnation == m.incarnation:
                self._heard_again(m.node, (Status.DEAD, incarnation))
            return
        self._mark_down(m, Status.DEAD, incarnation)
        self._broadcast_death(m.node, incarnation, src)

    def _on_left(self, msg: Left, src: Addr | None = None) -> None:
        m = self._members.get(msg.node)
        if m is None or msg.incarnation < m.incarnation:
            return
        if m is self._me:
            # Only we announce our own leave; a stale one (from before a
            # restart) is outbid.
            if not self._leaving:
                self._refute(msg.incarnation)
            return
        if m.status is Status.LEFT:
            if msg.incarnation == m.incarnation:
                self._heard_again(m.node, (Status.LEFT, msg.incarnation))
            return
        self._mark_down(m, Status.LEFT, msg.incarnation)
        self._broadcast(m.node, msg, ident=(Status.LEFT, msg.incarnation))
        self._owe_ring(m.node, src)
