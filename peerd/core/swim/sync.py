"""Anti-entropy: push-pull and digest sync, partition healing, reaping.

Theory of operation: gossip delivers with high probability, not certainly.
Push-pull full-state exchanges over a stream, on join and periodically with a
random member, repair whatever gossip missed (the anti-entropy of Demers et
al.). From ``DIGEST_SYNC_MIN_MEMBERS`` members on, the exchange first
compares bucket hashes of the two tables (:mod:`peerd.core.digest`) and then
sends only the rows of the buckets that differ, so a sync of two converged
10,000-member tables costs a few hundred bytes instead of a megabyte.

*Partners*: the periodic exchange goes to a member we hold alive; a suspect
is drawn again, since after a mass failure most suspects are dead and an
exchange with a dead node repairs nothing. An exchange that fails is tried
once more at once with another live member, and one refused outright
(nothing listens) is the same evidence as an ICMP port-unreachable hint.

*Partition healing*: dead members and the configured seeds are retried with
a push-pull every ``reconnect_interval``: after a split, each side has the
other as dead; when the link returns, one exchange makes each side learn it
was declared dead, refute, and the halves merge. These attempts have a
concurrency budget of their own (``max_concurrent_reconnects``): after a
mass failure nearly all of them wait on dead nodes, and they must never
take the places of the exchanges among the living. Dead and left members
are forgotten after ``dead_reclaim_s`` (reaping), which bounds the table;
a row a restart replaced goes sooner, and a dead row of a node we never knew
is not listed (see :mod:`peerd.core.swim.ghosts`).
"""

from __future__ import annotations

import itertools

from peerd.core import digest as digestmod
from peerd.core.events import (
    Carried,
    JoinDone,
    LogLevel,
    OpenStream,
    StreamReply,
    SyncedWith,
)
from peerd.core.swim import formulas
from peerd.core.swim.base import (
    DIGEST_SYNC_MIN_MEMBERS,
    LIVE,
    REPAIR_BURST,
    REPAIR_DELAY_S,
    STATE_CACHE_MAX_BYTES,
    SYNC_PARTNER_DRAWS,
    NodeBase,
    StreamCtx,
    _fmt,
    addr_problem,
)
from peerd.core.timers import PushPullTick, ReconnectTick
from peerd.wire import codec
from peerd.wire.codec import (
    DecodeError,
)
from peerd.wire.messages import (
    Addr,
    Alive,
    Left,
    MemberState,
    NodeId,
    PushPull,
    RegSync,
    Status,
    Suspect,
    SyncDigest,
    SyncRows,
)


class AntiEntropy(NodeBase):
    """Push-pull, digest sync, partition healing and reaping. See the module docs."""

    def _state(self, join: bool) -> bytes:
        # Encoding every member is the cost of a push-pull (and of every
        # reconnect attempt, refused or not). Reuse the last encoding while
        # no member changed: within one incarnation a member's name, address
        # and tags cannot change, so (node, incarnation, status) of every
        # member identifies the encoded rows.
        members = list(self._members.values())
        key = (join, hash(tuple((m.node, m.incarnation, m.status) for m in members)), len(members))
        cached = self._state_cache
        if cached is not None and cached[0] == key:
            self.counters["push_pull_state_reused"] += 1
            return cached[1]
        data = codec.encode(PushPull(join, tuple(m.state() for m in members)))
        # Bounded: a simulation holds thousands of nodes' caches at once.
        self._state_cache = (key, data) if len(data) <= STATE_CACHE_MAX_BYTES else None
        return data

    def _open_push_pull(self, addr: Addr, ctx: StreamCtx, join: bool) -> None:
        ctx.peer_addr = addr
        self._open_stream(addr, ctx, self._state(join))
        self.counters["push_pull_out"] += 1

    def _open_stream(self, addr: Addr, ctx: StreamCtx, data: bytes) -> None:
        self._next_stream += 1
        self._streams[self._next_stream] = ctx
        self._out.append(OpenStream(self._next_stream, addr, data))

    def _arm_push_pull(self, delay: float) -> None:
        self._push_pull_token = self._arm(PushPullTick, delay)
        self._push_pull_at = self._now + delay

    def _repair_soon(self) -> None:
        """We learnt a death or a leave. After REPAIR_BURST of them since our
        last exchange (a mass failure, not the odd crash), bring the next
        exchange forward to REPAIR_DELAY_S from now: gossip reaches every
        node only with high probability, and at large N the regular
        interval (minutes) would leave a missed death unrepaired that long.
        The delay lets the burst's gossip settle first, so the partner
        knows what we missed; one exchange per burst per node, cluster-wide
        O(N) small digest syncs, each repairing both ends."""
        self._deaths_since_sync += 1
        if self._deaths_since_sync >= REPAIR_BURST and self._tc.on:
            self._tree_sweep_soon()
        if self._deaths_since_sync < REPAIR_BURST or self.config.push_pull_interval_s <= 0:
            return
        if not self._push_pull_token or self._push_pull_at <= self._now + REPAIR_DELAY_S:
            return
        self._disarm(self._push_pull_token)
        self._arm_push_pull(REPAIR_DELAY_S)
        self.counters["push_pull_brought_forward"] += 1

    def _push_pull_tick(self) -> None:
        cfg = self.config
        n = self.live_count()
        self._arm_push_pull(formulas.push_pull_scale(cfg.push_pull_interval_s, n))
        self._deaths_since_sync = 0
        if self._leaving:
            return
        syncs = sum(1 for c in self._streams.values() if c.purpose == "sync")
        if syncs >= cfg.max_concurrent_syncs:
            self.counters["push_pull_skipped"] += 1
            return
        addr = self._sync_partner()
        if addr is not None:
            self._open_sync(addr)

    def _sync_partner(self) -> Addr | None:
        """A random member we hold alive. A suspect is drawn again (after a
        mass failure most suspects are dead, and an exchange with a dead
        node repairs nothing), at most SYNC_PARTNER_DRAWS times in all."""
        for _ in range(SYNC_PARTNER_DRAWS):
            picks = self._live.sample(self.rng, 1)
            if not picks:
                return None
            m = self._peek(picks[0])
            if m.status is Status.ALIVE:
                return m.addr
        return None

    def _reconnect_tick(self) -> None:
        cfg = self.config
        if self._live:
            self._alone_rounds = 0
            self._arm(ReconnectTick, cfg.reconnect_interval_s)
        else:
            # Alone (every seed was down when we started, or we were cut
            # off): retry soon, backing off to the normal interval.
            delay = min(cfg.reconnect_interval_s, cfg.probe_interval_s * 2**self._alone_rounds)
            self._alone_rounds = min(self._alone_rounds + 1, 16)
            self._arm(ReconnectTick, delay)
        if self._leaving:
            return
        # One of the dead members or the seeds not live, uniformly; without
        # listing the dead (thousands after a mass failure, every tick).
        dead = self._dead
        seeds = [s for s in self._seeds if self._by_addr.get(s) not in self._live]
        n = len(dead) + len(seeds)
        if not n:
            return
        # Healing has a budget of its own: after a mass failure nearly every
        # attempt goes to a dead node and waits for its connect to time out;
        # counted with the push-pulls, those attempts would starve the
        # repair among the living that gossip's misses need.
        heals = sum(1 for c in self._streams.values() if c.purpose == "heal")
        if heals >= self.config.max_concurrent_reconnects:
            return
        self.counters["reconnects"] += 1
        k = self.rng.randrange(n)  # the draw rng.choice makes
        if k < len(dead):
            self._open_sync(self._peek(next(itertools.islice(dead, k, None))).addr, "heal")
        else:
            self._open_sync(seeds[k - len(dead)], "heal")

    def _open_sync(self, addr: Addr, purpose: str = "sync", retry: bool = False) -> None:
        """Anti-entropy with ``addr``: a full push-pull while the membership
        is small, a digest sync once the full state would be the bigger cost
        (see :mod:`peerd.core.digest`). ``purpose``: "sync" (repair among
        live members) or "heal" (a dead member or a seed, tried again)."""
        if len(self._members) < DIGEST_SYNC_MIN_MEMBERS:
            self._open_push_pull(addr, StreamCtx(purpose, retry=retry), join=False)
            return
        bits = digestmod.bits_for(len(self._members))
        self.counters["digest_sync_out"] += 1
        self._open_stream(
            addr,
            StreamCtx(purpose, peer_addr=addr, digest_bits=bits, retry=retry),
            codec.encode(SyncDigest(bits, self._digest.hashes(bits))),
        )

    def _rows(self, bits: int, buckets: tuple[int, ...]) -> tuple[MemberState, ...]:
        want = set(buckets)
        shift = 16 - bits
        return tuple(
            m.state()
            for m in self._members.values()
            if int.from_bytes(m.node[:2], "big") >> shift in want
        )

    def _on_digest_reply(self, ctx: StreamCtx, data: bytes) -> None:
        try:
            msg = codec.decode(data)
        except DecodeError as err:
            self._drop(err.reason, "digest sync reply")
            return
        if not isinstance(msg, SyncRows) or msg.bits != ctx.digest_bits:
            self._drop("unexpected_stream_message", type(msg).__name__)
            return
        if ctx.rows:
            self._merge(PushPull(False, msg.members))
        elif msg.buckets:
            # Second step: our rows of the buckets that differ; the peer merges
            # them and answers with its own (after any refutation they caused).
            self.counters["digest_sync_rows_out"] += 1
            assert ctx.peer_addr is not None
            self._open_stream(
                ctx.peer_addr,
                StreamCtx(
                    ctx.purpose,
                    peer_addr=ctx.peer_addr,
                    digest_bits=msg.bits,
                    rows=True,
                    retry=ctx.retry,
                ),
                codec.encode(SyncRows(msg.bits, msg.buckets, self._rows(msg.bits, msg.buckets))),
            )
            return
        # Done: the registry's anti-entropy follows membership's, as after a push-pull.
        self._synced_with(ctx)

    def _on_stream_request(self, stream: int, src: Addr, data: bytes) -> None:
        try:
            msg = codec.decode(data)
        except DecodeError as err:
            self._drop(err.reason, f"stream from={_fmt(src)}")
            self._out.append(StreamReply(stream, None))
            return
        if isinstance(msg, RegSync):
            self.counters["reg_sync_in"] += 1
            if self.news:  # the registry answers it
                self._out.append(Carried(self._live_node_at(src), msg, stream))
            else:
                self._out.append(StreamReply(stream, None))
            return
        if isinstance(msg, SyncDigest):
            self.counters["digest_sync_in"] += 1
            differ = self._digest.differing(msg.bits, msg.hashes)
            self._out.append(
                StreamReply(stream, codec.encode(SyncRows(msg.bits, tuple(differ), ())))
            )
            return
        if isinstance(msg, SyncRows):
            self.counters["digest_sync_rows_in"] += 1
            # Merge first, then reply (as for push-pull).
            self._merge(PushPull(False, msg.members))
            rows = SyncRows(msg.bits, msg.buckets, self._rows(msg.bits, msg.buckets))
            self._out.append(StreamReply(stream, codec.encode(rows)))
            return
        if not isinstance(msg, PushPull):
            self._drop("unexpected_stream_message", type(msg).__name__)
            self._out.append(StreamReply(stream, None))
            return
        self.counters["push_pull_in"] += 1
        # Merge first, then reply: the reply then carries our refutation if
        # the peer held us dead (a healed partition), so both sides learn in
        # one exchange that both ends are alive.
        self._merge(msg)
        self._out.append(StreamReply(stream, self._state(False)))

    def _on_stream_response(self, stream: int, data: bytes) -> None:
        ctx = self._streams.pop(stream, None)
        if ctx is None:
            return
        if ctx.digest_bits is not None:
            self._on_digest_reply(ctx, data)
            return
        try:
            msg = codec.decode(data)
        except DecodeError as err:
            self._drop(err.reason, "stream reply")
            self._stream_done(ctx, ok=False)
            return
        if not isinstance(msg, PushPull):
            self._drop("unexpected_stream_message", type(msg).__name__)
            self._stream_done(ctx, ok=False)
            return
        self._merge(msg)
        self._stream_done(ctx, ok=True)
        self._synced_with(ctx)

    def _live_node_at(self, addr: Addr) -> NodeId | None:
        node = self._by_addr.get(addr)
        return node if node is not None and node in self._live else None

    def _synced_with(self, ctx: StreamCtx) -> None:
        """Tell the registry: its anti-entropy follows membership's, with the same peer."""
        peer = self._by_addr.get(ctx.peer_addr) if ctx.peer_addr else None
        if self.news and peer is not None and peer in self._live:
            self._out.append(SyncedWith(peer))

    def _on_stream_failed(self, stream: int, reason: str) -> None:
        ctx = self._streams.pop(stream, None)
        if ctx is None:
            return
        if ctx.purpose == "heal":
            self.counters["reconnects_failed"] += 1
        else:
            self.counters["push_pull_failed"] += 1
        if ctx.purpose == "sync" and ctx.peer_addr is not None:
            self._sync_failed(ctx, reason)
        level = LogLevel.WARNING if ctx.purpose == "join" else LogLevel.DEBUG
        hint = ""
        if reason == "eof":
            # The listener closes without a reply when it cannot open our
            # frame (peerd/shell/tcp.py): with a daemon listening, that is
            # almost always a key mismatch.
            hint = (
                " hint=the peer closed the stream without answering, as it does when it "
                "cannot open our frame: most often our keys differ (compare `peerd keys "
                "list`), else its log says why (tcp stream rejected reason=...)"
            )
        elif reason.startswith("seal_"):
            hint = " hint=we cannot open the peer's reply: our keys differ"
        self._log(level, f"push-pull failed purpose={ctx.purpose} reason={reason}{hint}")
        self._stream_done(ctx, ok=False)

    def _sync_failed(self, ctx: StreamCtx, reason: str) -> None:
        """A push-pull with a member we held alive failed. Refused, nothing
        listens there: the same evidence as an ICMP port-unreachable hint (a
        short suspicion, checked with a ping). Either way the exchange is
        tried once more at once with another live member, so a tick that
        drew a dead node that nobody has declared dead yet still repairs."""
        assert ctx.peer_addr is not None
        if reason == "refused":
            self._on_unreachable(ctx.peer_addr)
        if ctx.retry or self._leaving:
            return
        addr = self._sync_partner()
        if addr is not None and addr != ctx.peer_addr:
            self.counters["push_pull_retries"] += 1
            self._open_sync(addr, retry=True)

    def _stream_done(self, ctx: StreamCtx, ok: bool) -> None:
        if ctx.purpose != "join":
            return
        batch = self._batches.get(ctx.batch)
        if batch is None:
            return
        batch.pending -= 1
        if ok:
            batch.ok += 1
        else:
            batch.failed += 1
        if batch.pending == 0:
            del self._batches[ctx.batch]
            self._out.append(JoinDone(batch.ok, batch.failed))

    def _merge(self, msg: PushPull) -> None:
        """Merge a peer's full state. Their "dead" is only a suspicion to us:
        a stale view must not kill a node our own probes can still reach."""
        for st in msg.members:
            alive = Alive(st.node, st.name, st.addr, st.incarnation, st.generation, st.tags)
            m = self._members.get(st.node)
            if m is None and st.status in (Status.DEAD, Status.LEFT):
                # A stranger's death: not listed (the row carries no age,
                # and listing it with a fresh clock kept rows that others
                # had reaped going round); its tombstone keeps a stale Alive
                # from making it a member (see peerd.core.swim.ghosts).
                if st.node != self._me.node and not addr_problem(st.addr):
                    self.counters["drop.down_row_of_stranger"] += 1
                    self._bury(st.node, st.generation, st.incarnation)
                continue
            match st.status:
                case Status.ALIVE:
                    self._on_alive(alive)
                case Status.SUSPECT:
                    self._on_alive(alive)
                    self._on_suspect(Suspect(st.node, st.incarnation, self._me.node))
                case Status.DEAD:
                    self._on_alive(alive)
                    m = self._members.get(st.node)
                    fresh = m is not None and m.suspicion is None and m is not self._me
                    self._on_suspect(Suspect(st.node, st.incarnation, self._me.node))
                    if (
                        fresh
                        and m is not None
                        and m.suspicion is not None
                        and m.node not in self._checks.values()  # not checked already
                    ):
                        # A death we missed (or a stale one): ask the member
                        # ourselves, the suspicion riding on the ping. A live
                        # one refutes at once; a crashed daemon's closed port
                        # ends it within a round trip (a closed-port hint),
                        # not a full suspicion timeout later.
                        self.counters["merge_death_checks"] += 1
                        self._start_check(m)
                case Status.LEFT:
                    self._on_left(Left(st.node, st.incarnation))

    def _reap(self) -> None:
        horizon = self._now - self.config.dead_reclaim_s
        for m in list(self._members.values()):
            if m.status in LIVE or m.changed_at > horizon or m is self._me:
                continue
            self._forget(m)
