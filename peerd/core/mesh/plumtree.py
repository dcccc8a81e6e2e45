"""Plumtree: epidemic broadcast trees over the HyParView active view (Leitão,
Pereira, Rodrigues, "Epidemic Broadcast Trees", SRDS 2007).

Theory of operation:

* **Eager and lazy links** (section 3). Each neighbour link is *eager* (full
  payloads are pushed over it) or *lazy* (only an IHAVE announcement of the
  id is sent, batched every ``ihave_interval_s``). New links start eager.
  The eager links form a spanning tree; the lazy ones are the backup.
* **Pruning.** The first copy of a broadcast is delivered and forwarded; a
  duplicate means its link is redundant, so its sender is made lazy and
  told (PRUNE). After the first broadcasts a tree remains and each node
  receives each payload about once.
* **Grafting** (section 3.6). An IHAVE for an id not received starts a timer.
  If the payload still has not come when it fires, the tree is broken
  upstream: the node asks the first announcer for it (GRAFT), which also
  makes that link eager, so the tree repairs itself where it broke. Further
  announcers are tried every ``graft_retry_s``. The first timeout is
  measured, not fixed (:func:`first_graft_timeout`): twice the largest recent
  delay from an IHAVE to the tree's copy, between ``graft_timeout_min_s`` and
  ``graft_timeout_s`` (iroh-gossip waits a fixed 80 ms; the paper leaves it
  to the deployment).
* **Optimisation** (section 3.8). An IHAVE of the latest broadcast showing a
  path at least ``optimize_hops`` shorter than the one it came by makes the
  announcer eager and, once it acknowledged that (an empty control message
  answers every GRAFT without wants), the old parent lazy, so the tree keeps
  short paths. At most one per ``optimize_interval_s``; see
  :meth:`Plumtree._optimize` for why each step is there. Done the paper's way
  (graft and prune at once, on any IHAVE), broadcasts from rotating origins
  kept moving links of the one shared tree, and a broadcast passing during a
  move could find a node with no eager link left and wait for a graft.
* **Crossed messages.** A PRUNE and a push, or a PRUNE and a GRAFT, can
  cross on a link and leave its ends disagreeing (one pushes, the other not),
  which can cut a node off the tree. So a first copy from a neighbour we
  made lazy (its push crossed our PRUNE) grafts it back, since this
  broadcast's duplicate may be pruning the path we kept; a PRUNE sent before
  our GRAFT landed (not acknowledged yet) is ignored; a duplicate from a lazy
  neighbour is answered with a PRUNE again.
* **Neighbours** come and go with HyParView's NeighborUp/NeighborDown; a lost
  link is repaired by the grafts it causes.
* **Channels.** Every broadcast carries a channel (membership, registry,
  user) with its own size limit, and user broadcasts this node originates go
  through a token bucket. Sends carry the channel's priority, so on a busy
  link the daemon's own traffic goes first (see :mod:`peerd.core.events`).

Broadcast ids are 16 bytes: 8 random bytes drawn once per instance (a
restarted node never reuses an id) and an 8-byte sequence number. Ids are
remembered for ``seen_ttl_s`` (and at most ``seen_max``) to drop duplicates;
payloads are kept for ``store_ttl_s`` (and at most ``store_max_bytes``) to
answer grafts. ``round`` counts hops: the origin's neighbours get round 1.
"""

from __future__ import annotations

import collections
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from peerd.core.events import (
    PRIORITY_CONTROL,
    Broadcast,
    BroadcastResult,
    Deliver,
    Log,
    LogLevel,
    MeshInput,
    MeshOutput,
    MeshTimer,
    MeshTimerFired,
    MessageIn,
    NeighborDown,
    NeighborUp,
    Send,
    SetMeshTimer,
    channel_priority,
)
from peerd.core.mesh.config import PlumtreeConfig
from peerd.core.timers import GraftTimeout, IHaveFlush
from peerd.wire.codec import MAX_GOSSIP_PAYLOAD_BYTES, MAX_IHAVE, MAX_U64, MAX_WANT
from peerd.wire.messages import Channel, Gossip, GossipControl, IHave, NodeId, TreeLink

# The first graft timeout is this many times the largest recent lag: the
# eager path's delay varies from broadcast to broadcast (other origins, a busy
# neighbour), and a needless graft costs a copy and moves a tree link.
LAG_MARGIN = 2.0


def first_graft_timeout(lags: Sequence[float], config: PlumtreeConfig) -> float:
    """How long to wait, after the first IHAVE of a broadcast not received,
    before grafting it: ``LAG_MARGIN`` times the largest of the recent
    ``lags`` (first IHAVE to the copy the tree brought, 0 when the copy came
    first), within [graft_timeout_min_s, graft_timeout_s]; the floor while
    no lag is known; graft_timeout_s with a ``graft_lag_window`` of 0.

    A healthy tree brings most copies before their announcements (IHAVEs
    wait for a batch), so the timeout stays near the floor, and a node the
    tree lost (a link cut while a broadcast passed) gets the payload after
    one IHAVE batch and the floor, not the ceiling. Where long tree paths run
    late behind short lazy ones (large clusters), the lags hold the timeout
    above them, so healthy paths are not grafted; a graft that was needless
    all the same shows its lag when the tree's copy follows, and raises it."""
    if config.graft_lag_window <= 0:
        return config.graft_timeout_s
    return min(
        config.graft_timeout_s, max(config.graft_timeout_min_s, LAG_MARGIN * max(lags, default=0.0))
    )


@dataclass(slots=True)
class _Seen:
    at: float
    round: int  # hops it came by (0: our own)
    src: NodeId | None  # the neighbour it came from (None: our own)
    # The graft timeout's lag sample (see first_graft_timeout): when the first
    # IHAVE came, if before the payload (None: the payload came first), the
    # peers we grafted it from (their copies say nothing of the tree), and
    # whether this broadcast has given its sample yet.
    ihave_at: float | None = None
    grafted: tuple[NodeId, ...] = ()
    sampled: bool = False


@dataclass(slots=True)
class _Missing:
    """An announced broadcast we have not received."""

    announcers: list[tuple[NodeId, int]]  # (neighbour, round), first heard first
    token: int
    first_at: float  # when the first IHAVE came
    grafted: list[NodeId] = field(default_factory=list)  # asked, in order


@dataclass(frozen=True, slots=True)
class _Swap:
    """A tree optimisation under way: ``new`` was grafted; ``old`` is pruned
    when ``new`` acknowledges the graft, unless something moved first."""

    new: NodeId
    old: NodeId


@dataclass(slots=True)
class _Bucket:
    tokens: float
    at: float


class Plumtree:
    """One node's Plumtree state machine. See the module docs."""

    def __init__(self, me: NodeId, config: PlumtreeConfig, rng: random.Random) -> None:
        for ch, limit in config.max_payload_bytes.items():
            if not 0 <= limit <= MAX_GOSSIP_PAYLOAD_BYTES:
                raise ValueError(
                    f"max_payload_bytes[{ch.name}] must be 0..{MAX_GOSSIP_PAYLOAD_BYTES}"
                )
        self.me = me
        self.config = config
        self.rng = rng
        self.counters: collections.Counter[str] = collections.Counter()
        self._eager: dict[NodeId, None] = {}
        self._lazy: dict[NodeId, None] = {}
        self._seen: collections.OrderedDict[bytes, _Seen] = collections.OrderedDict()
        self._store: collections.OrderedDict[bytes, tuple[float, Gossip]] = (
            collections.OrderedDict()
        )
        self._store_bytes = 0
        self._missing: dict[bytes, _Missing] = {}
        self._lags: collections.deque[float] = collections.deque(
            maxlen=max(0, config.graft_lag_window)
        )
        self._optimize_after = 0.0  # no tree optimisation before this time
        self._cut_until = 0.0  # a tree link to us went down: see graft_cut_window_s
        self._swap: _Swap | None = None
        # GRAFTs without wants not acknowledged yet, per peer: (how many, last sent)
        self._unacked: dict[NodeId, tuple[int, float]] = {}
        self._latest: bytes | None = None  # the last broadcast received or sent
        self._ihave_queue: dict[NodeId, list[IHave]] = {}
        self._flush_armed = False
        self._prefix = rng.getrandbits(64).to_bytes(8, "big")
        self._seq = 0
        self._buckets: dict[Channel, _Bucket] = {}
        self._timers: dict[int, MeshTimer] = {}
        self._next_token = 0
        self._now = 0.0
        self._out: list[MeshOutput] = []

    # --- read side -------------------------------------------------------------

    def eager_peers(self) -> list[NodeId]:
        return list(self._eager)

    def lazy_peers(self) -> list[NodeId]:
        return list(self._lazy)

    def has_seen(self, msg_id: bytes) -> bool:
        return msg_id in self._seen

    def missing_ids(self) -> list[bytes]:
        return list(self._missing)

    def graft_timeout(self) -> float:
        """The first graft timeout now (see :func:`first_graft_timeout`): the
        floor for a while after a tree link to us went down."""
        if self._now < self._cut_until:
            return self.config.graft_timeout_min_s
        return first_graft_timeout(self._lags, self.config)

    # --- the one entry point ---------------------------------------------------

    def handle(self, now: float, inp: MeshInput) -> list[MeshOutput]:
        """Feed one input; returns what to do. Bad input is counted, never raised."""
        self._now = now
        out: list[MeshOutput] = []
        self._out = out
        match inp:
            case Broadcast(ref, channel, payload):
                self._on_broadcast(ref, channel, payload)
            case MessageIn(src, Gossip() as msg):
                self._on_gossip(src, msg)
            case MessageIn(src, GossipControl() as msg):
                self._on_control(src, msg)
            case MessageIn(_src, msg):
                self._drop("not_plumtree", type(msg).__name__)
            case NeighborUp(peer):
                self._lazy.pop(peer.node, None)
                self._eager[peer.node] = None
            case NeighborDown(peer):
                self._on_neighbor_down(peer.node)
            case MeshTimerFired(timer):
                self._on_timer(timer)
        self._out = []
        return out

    # --- plumbing --------------------------------------------------------------

    def _drop(self, reason: str, detail: str = "") -> None:
        self.counters[f"drop.{reason}"] += 1
        self._out.append(Log(LogLevel.DEBUG, f"plumtree drop reason={reason} {detail}".rstrip()))

    def _arm(self, make: Callable[..., MeshTimer], delay: float, *context: Any) -> int:
        """Arm the timer ``make(token, *context)`` to fire in ``delay`` s."""
        self._next_token += 1
        token = self._next_token
        timer = make(token, *context)
        self._timers[token] = timer
        self._out.append(SetMeshTimer(self._now + delay, timer))
        return token

    def _is_neighbor(self, node: NodeId) -> bool:
        return node in self._eager or node in self._lazy

    def _make_eager(self, node: NodeId) -> None:
        if node in self._lazy:
            del self._lazy[node]
            self._eager[node] = None

    def _make_lazy(self, node: NodeId) -> None:
        if node in self._eager:
            del self._eager[node]
            self._lazy[node] = None

    def _send_gossip(self, dst: NodeId, msg: Gossip) -> None:
        self.counters["gossip_out"] += 1
        self._out.append(Send(dst, msg, channel_priority(msg.channel)))

    def _send_control(
        self, dst: NodeId, want: tuple[bytes, ...] = (), link: TreeLink = TreeLink.KEEP
    ) -> None:
        """Send a control message, carrying any announcements queued for ``dst``."""
        queued = self._ihave_queue.pop(dst, [])
        while len(queued) > MAX_IHAVE:
            self._out.append(
                Send(
                    dst,
                    GossipControl(tuple(queued[:MAX_IHAVE]), (), TreeLink.KEEP),
                    PRIORITY_CONTROL,
                )
            )
            queued = queued[MAX_IHAVE:]
        self.counters["control_out"] += 1
        self._out.append(Send(dst, GossipControl(tuple(queued), want, link), PRIORITY_CONTROL))

    def _announce(self, dst: NodeId, item: IHave) -> None:
        self._ihave_queue.setdefault(dst, []).append(item)
        if not self._flush_armed:
            self._flush_armed = True
            self._arm(IHaveFlush, self.config.ihave_interval_s)

    # --- caches ----------------------------------------------------------------

    def _remember(self, msg: Gossip, src: NodeId | None) -> None:
        now = self._now
        cfg = self.config
        self._seen[msg.id] = _Seen(now, msg.round, src)
        while self._seen:
            oldest_id, oldest = next(iter(self._seen.items()))
            if len(self._seen) <= cfg.seen_max and oldest.at > now - cfg.seen_ttl_s:
                break
            del self._seen[oldest_id]
        size = len(msg.payload)
        if size <= cfg.store_max_bytes:
            self._store[msg.id] = (now, msg)
            self._store_bytes += size
        while self._store:
            oldest_id, (at, stored) = next(iter(self._store.items()))
            if self._store_bytes <= cfg.store_max_bytes and at > now - cfg.store_ttl_s:
                break
            del self._store[oldest_id]
            self._store_bytes -= len(stored.payload)

    # --- broadcasting ----------------------------------------------------------

    def _on_broadcast(self, ref: int, channel: Channel, payload: bytes) -> None:
        limit = self.config.max_payload_bytes.get(channel, MAX_GOSSIP_PAYLOAD_BYTES)
        if len(payload) > limit:
            self.counters["broadcast_too_large"] += 1
            self._out.append(
                BroadcastResult(
                    ref,
                    error=(
                        "too_large",
                        f"{channel.name.lower()} payload of {len(payload)} bytes is over "
                        f"the limit of {limit} bytes",
                    ),
                )
            )
            return
        if not self._take_tokens(channel, len(payload)):
            self.counters["broadcast_rate_limited"] += 1
            rate, burst = self.config.rate[channel]
            self._out.append(
                BroadcastResult(
                    ref,
                    error=(
                        "rate_limited",
                        f"{channel.name.lower()} broadcasts are limited to "
                        f"{rate:.0f} bytes/s (burst {burst:.0f}); try again later",
                    ),
                )
            )
            return
        self._seq += 1
        msg_id = self._prefix + self._seq.to_bytes(8, "big")
        self.counters["broadcasts"] += 1
        self._passed(msg_id)
        self._remember(Gossip(msg_id, self.me, 0, channel, payload), None)
        self._seen[msg_id].sampled = True  # our own: no tree lag to learn
        self._forward(Gossip(msg_id, self.me, 1, channel, payload), None)
        self._out.append(BroadcastResult(ref, id=msg_id))

    def _take_tokens(self, channel: Channel, size: int) -> bool:
        limits = self.config.rate.get(channel)
        if limits is None:
            return True
        rate, burst = limits
        b = self._buckets.get(channel)
        if b is None:
            b = self._buckets[channel] = _Bucket(burst, self._now)
        b.tokens = min(burst, b.tokens + (self._now - b.at) * rate)
        b.at = self._now
        if size > b.tokens:
            return False
        b.tokens -= size
        return True

    def _forward(self, msg: Gossip, src: NodeId | None) -> None:
        """Push ``msg`` (already at the receivers' round) to eager peers and
        announce it to lazy ones, except where it came from."""
        for node in self._eager:
            if node != src:
                self._send_gossip(node, msg)
        if self._lazy:
            item = IHave(msg.id, msg.round)
            for node in self._lazy:
                if node != src:
                    self._announce(node, item)

    # --- messages --------------------------------------------------------------

    def _on_gossip(self, src: NodeId, msg: Gossip) -> None:
        self.counters["gossip_in"] += 1
        limit = self.config.max_payload_bytes.get(msg.channel, MAX_GOSSIP_PAYLOAD_BYTES)
        if len(msg.payload) > limit:
            self._drop("too_large", f"channel={msg.channel.name.lower()}")
            return
        neighbor = self._is_neighbor(src)
        seen = self._seen.get(msg.id)
        if seen is not None:
            self.counters["duplicates"] += 1
            if not seen.sampled and seen.ihave_at is not None and src not in seen.grafted:
                # The tree's copy, late behind a graft: how late it was.
                self._sample_lag(self._now - seen.ihave_at, seen)
            if src in self._eager:
                # A second path to us: make it lazy on both ends (PRUNE).
                self._make_lazy(src)
                self.counters["prunes_out"] += 1
                self._send_control(src, link=TreeLink.LAZY)
            elif src in self._lazy:
                # It pushes to us, we do not to it: its end missed that the
                # link is lazy (a GRAFT and a PRUNE crossed). Say it again.
                self.counters["prunes_out"] += 1
                self._send_control(src, link=TreeLink.LAZY)
            return
        self.counters["delivered"] += 1
        self._passed(msg.id)
        missing = self._missing.pop(msg.id, None)
        self._remember(msg, src)
        self._out.append(Deliver(msg.id, msg.origin, msg.channel, msg.payload, msg.round, src))
        if src in self._lazy:
            # Its push crossed our PRUNE (or theirs): it pushed before it
            # heard. We depend on it for this broadcast, and it will stop
            # pushing to us once the PRUNE lands, while the path we kept
            # may be pruned by this very broadcast's duplicate. Graft it
            # back, so that both ends agree the link is eager.
            self.counters["regrafts"] += 1
            self._make_eager(src)
            self._graft_link(src)
        elif not neighbor:
            self.counters["gossip_from_non_neighbor"] += 1
        if msg.round < MAX_U64:
            self._forward(Gossip(msg.id, msg.origin, msg.round + 1, msg.channel, msg.payload), src)
        if missing is not None:
            # After forwarding: an announcer grafted now has this broadcast,
            # and a copy pushed to it would be a duplicate (and a PRUNE back).
            self._timers.pop(missing.token, None)
            self._arrived_after_ihave(src, msg, missing)

    def _on_control(self, src: NodeId, msg: GossipControl) -> None:
        self.counters["control_in"] += 1
        if not self._is_neighbor(src):
            # Tree links exist only between neighbours; a late control message
            # from a former neighbour is moot.
            self._drop("control_from_non_neighbor")
            return
        if msg.link is TreeLink.EAGER:
            self.counters["grafts_in"] += 1
            self._make_eager(src)
            if not msg.want:
                # A tree optimisation's graft: say it has been applied (an
                # empty control message), so the grafter can prune its old
                # parent without a moment in which neither pushes to it.
                self.counters["swap_acks_out"] += 1
                self._out.append(Send(src, GossipControl((), (), TreeLink.KEEP), PRIORITY_CONTROL))
                if self._swap is not None and self._swap.new == src:
                    # ``src`` grafted us while we grafted it: each would prune
                    # a parent for the one link both added. Neither does; the
                    # next broadcast's duplicate cuts the loop.
                    self._cancel_swap("crossed")
        elif msg.link is TreeLink.KEEP and not msg.ihave and not msg.want:
            self._on_swap_ack(src)
        elif msg.link is TreeLink.LAZY:
            self.counters["prunes_in"] += 1
            if self._awaiting_ack(src):
                # Sent before it saw our GRAFT, which lands after it: the
                # link is to be eager at both ends. (Its acknowledgement
                # comes before any PRUNE it sends later.)
                self.counters["prunes_in_crossed"] += 1
            else:
                self._make_lazy(src)
        for msg_id in msg.want[:MAX_WANT]:
            stored = self._store.get(msg_id)
            if stored is None:
                self.counters["graft_misses"] += 1
                continue
            g = stored[1]
            if g.round < MAX_U64:
                self._send_gossip(src, Gossip(g.id, g.origin, g.round + 1, g.channel, g.payload))
        for item in msg.ihave:
            self._on_ihave(src, item)

    def _on_ihave(self, src: NodeId, item: IHave) -> None:
        seen = self._seen.get(item.id)
        if seen is not None:
            if not seen.sampled and seen.ihave_at is None:
                self._sample_lag(0.0, seen)  # the tree was first
            if item.id == self._latest and seen.src is not None:
                self._optimize(item.id, seen, [(src, item.round)])
            return
        missing = self._missing.get(item.id)
        if missing is not None:
            if all(n != src for n, _ in missing.announcers):
                missing.announcers.append((src, item.round))
            return
        if len(self._missing) >= self.config.max_missing:
            self.counters["missing_overflow"] += 1
            return
        token = self._arm(GraftTimeout, self.graft_timeout(), item.id)
        self._missing[item.id] = _Missing([(src, item.round)], token, self._now)

    def _arrived_after_ihave(self, src: NodeId, msg: Gossip, missing: _Missing) -> None:
        """A broadcast we had been announced has come (just delivered)."""
        seen = self._seen.get(msg.id)
        if seen is None:
            return  # remembering nothing (seen_max 0)
        seen.ihave_at = missing.first_at
        if src in missing.grafted:
            # The answer to our graft: the tree's copy, if it still comes,
            # gives the lag sample (as a duplicate).
            seen.grafted = tuple(missing.grafted)
            return
        self._sample_lag(self._now - missing.first_at, seen)
        if not missing.grafted:
            self._optimize(msg.id, seen, missing.announcers)

    # --- tree optimisation -------------------------------------------------------

    def _passed(self, msg_id: bytes) -> None:
        """A broadcast reached us first-hand (or left us)."""
        self._latest = msg_id
        if self._swap is not None:
            # Its copies may have met, and a duplicate cut the loop the
            # graft made, somewhere on it: pruning the old parent as well
            # could cut the tree in two. The duplicate rule finishes it.
            self._cancel_swap("overtaken")

    def _optimize(self, msg_id: bytes, seen: _Seen, announcers: list[tuple[NodeId, int]]) -> None:
        """Section 3.8: ``msg_id``, the latest broadcast we received, came by
        ``seen.src`` in ``seen.round`` hops; ``announcers`` announced it with
        their rounds. If one is a lazy neighbour at least ``optimize_hops``
        closer to the origin, swap it in for the parent: graft it now, prune
        the parent once it acknowledged the graft.

        Why this care: rounds show the announcer is not below us in *this*
        broadcast's tree, so only the latest broadcast's rounds are used (an
        older one's tree may have moved since). The prune waits for the
        graft to be applied, or for a moment neither would push to us and a
        broadcast passing then would wait for a graft timeout. It is dropped
        if a broadcast passes first (its duplicate then cuts the loop the
        graft made, wherever the copies met) or if the announcer grafts us
        at the same time."""
        old = seen.src
        hops = self.config.optimize_hops
        if (
            hops <= 0
            or old is None
            or old not in self._eager
            or self._swap is not None
            or self._now < self._optimize_after
        ):
            return
        best = min(((r, n) for n, r in announcers if n in self._lazy), default=None)
        if best is None or seen.round - best[0] < hops:
            return
        rnd, node = best
        self.counters["optimizations"] += 1
        self._optimize_after = self._now + self.config.optimize_interval_s
        seen.src, seen.round = node, rnd
        self._make_eager(node)
        self._graft_link(node)
        self._swap = _Swap(node, old)

    def _graft_link(self, node: NodeId) -> None:
        """Make the link to ``node`` eager on its end too (acknowledged)."""
        self._send_control(node, link=TreeLink.EAGER)
        self._unacked[node] = (self._awaiting_ack(node) + 1, self._now)

    def _awaiting_ack(self, node: NodeId) -> int:
        """GRAFTs without wants sent to ``node`` and not acknowledged. An
        acknowledgement not back within graft_timeout_s is not coming (a
        peer of an earlier version does not send them, a link failed)."""
        entry = self._unacked.get(node)
        if entry is None:
            return 0
        if self._now - entry[1] > self.config.graft_timeout_s:
            del self._unacked[node]
            return 0
        return entry[0]

    def _on_swap_ack(self, src: NodeId) -> None:
        due = self._awaiting_ack(src)
        if not due:
            self._drop("unexpected_ack")
            return
        due -= 1
        if due:
            self._unacked[src] = (due, self._unacked[src][1])
        else:
            del self._unacked[src]
        swap = self._swap
        if swap is None or swap.new != src or due:
            return  # an earlier graft's, or not a swap's
        self._swap = None
        if swap.new not in self._eager or swap.old not in self._eager:
            self.counters["optimizations_moot"] += 1
            return  # the tree moved meanwhile (a prune, a lost link)
        self.counters["prunes_out"] += 1
        self._make_lazy(swap.old)
        self._send_control(swap.old, link=TreeLink.LAZY)

    def _cancel_swap(self, why: str) -> None:
        self._swap = None
        self.counters[f"optimizations_{why}"] += 1

    def _sample_lag(self, lag: float, seen: _Seen) -> None:
        seen.sampled = True
        if self._lags.maxlen and self._now >= self._cut_until:
            self._lags.append(max(0.0, lag))

    def _on_neighbor_down(self, node: NodeId) -> None:
        if node in self._eager and self.config.graft_cut_window_s > 0:
            # Our tree may have been cut above us: graft announced broadcasts
            # soon, and forget the lags measured before (graft_cut_window_s).
            self._cut_until = self._now + self.config.graft_cut_window_s
            self._lags.clear()
        self._eager.pop(node, None)
        self._lazy.pop(node, None)
        self._ihave_queue.pop(node, None)
        self._unacked.pop(node, None)
        if self._swap is not None and node in (self._swap.new, self._swap.old):
            self._cancel_swap("lost")
        for m in self._missing.values():
            m.announcers = [(n, r) for n, r in m.announcers if n != node]

    # --- timers ----------------------------------------------------------------

    def _on_timer(self, timer: MeshTimer) -> None:
        armed = self._timers.get(timer.token)
        if armed is None or (armed is not timer and armed != timer):
            return  # superseded, or not ours
        del self._timers[timer.token]
        match armed:
            case IHaveFlush():
                self._flush_armed = False
                for node in list(self._ihave_queue):
                    self._send_control(node)
            case GraftTimeout(msg_id=msg_id):
                self._graft(msg_id)

    def _graft(self, msg_id: bytes) -> None:
        m = self._missing.get(msg_id)
        if m is None:
            return
        while m.announcers:
            node, _round = m.announcers.pop(0)
            if self._is_neighbor(node):
                self.counters["grafts_out"] += 1
                m.grafted.append(node)
                self._make_eager(node)
                self._send_control(node, want=(msg_id,), link=TreeLink.EAGER)
                m.token = self._arm(GraftTimeout, self.config.graft_retry_s, msg_id)
                return
        # Nobody left to ask: forget it; a later announcement starts over.
        self.counters["graft_gave_up"] += 1
        del self._missing[msg_id]
