"""HyParView: a small, symmetric, self-healing overlay (Leitão, Pereira,
Rodrigues, "HyParView: a membership protocol for reliable gossip-based
broadcast", DSN 2007).

Theory of operation:

* **Two views** (section 4.1). The *active view* is the node's neighbours: a
  few peers (``active_size``, about log10 N + 1) it holds open links to and
  broadcasts over. The *passive view* is a larger random sample of other
  nodes (``passive_size``) that are not linked, kept only as replacements.
* **Symmetry.** If A has B as a neighbour, B has A. Every addition goes
  through a request the other side answers (join -> neighbor-reply, neighbor
  -> neighbor-reply), and every removal is either told (disconnect) or seen by
  both ends (the link dies, or one end closes it and the other hears
  :class:`LinkDown`). Crossing requests are resolved the same way on both
  sides: a neighbor request from a peer we are asking ourselves is taken as
  its answer. A late "accept" for a request we gave up on is answered with a
  disconnect, so the peer drops us again.
* **Join** (section 4.2). A new node sends JOIN to a contact. The contact
  takes it as a neighbour (dropping a random one if full) and sends a
  FORWARD_JOIN random walk of ``arwl`` hops through each of its other
  neighbours. A walk leaves the joiner in the passive view of the node it
  reaches at ``prwl`` hops left, and ends (ttl 0, or a node with one
  neighbour) at a node that asks the joiner to be its neighbour with high
  priority. The joiner so gets links spread over the overlay, not only
  around its contact.
* **Failure** (section 4.3). A failed neighbour is replaced from the passive
  view at once: NEIGHBOR with *high* priority when the active view is empty
  (the receiver must accept, dropping a neighbour if full: an isolated node
  always gets back in), *low* otherwise (accepted only if the receiver has
  room). A dead candidate moves on to the next one at once; so does a
  refusal while the node has fewer than half its neighbours (otherwise the
  next shuffle tick asks again: in a settled overlay most nodes are full, and
  a burst of refusals buys a link the node can do without). A refusing or
  unreachable peer is not asked again for ``reject_cooldown_s``.
* **Shuffle** (section 4.4). Every ``shuffle_interval_s`` a node sends a
  random walk with itself, ``shuffle_active`` active and ``shuffle_passive``
  passive peers. Where it ends, the node answers with as many of its own
  passive peers and keeps the sample; both sides make room by evicting first
  what they just sent. Passive views stay fresh and mixed, so replacements
  are likely alive and random. The same tick refills a short active view,
  and rejoins through the contacts when the node is isolated.
* **Hints.** SWIM membership may tell the mesh which members it sees alive
  (seeding the passive view where there is room) and which died (forgotten;
  an active link to a dead member is dropped, since a frozen process keeps
  its links open). The overlay never depends on hints.

See :mod:`peerd.core.events` for the link contract the shell keeps.
"""

from __future__ import annotations

import collections
import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from peerd.core.events import (
    CloseLink,
    Connect,
    HyParViewMessage,
    JoinMesh,
    LeaveMesh,
    LinkDown,
    LinkMessage,
    Log,
    LogLevel,
    MembershipHint,
    MeshInput,
    MeshOutput,
    MeshTimer,
    MeshTimerFired,
    MessageIn,
    NeighborDown,
    NeighborUp,
    Send,
    SetMeshTimer,
)
from peerd.core.mesh.config import HyParViewConfig
from peerd.core.timers import NeighborTimeout, ShuffleTick
from peerd.wire.messages import (
    Addr,
    Disconnect,
    ForwardJoin,
    MeshJoin,
    MeshPeer,
    Neighbor,
    NeighborReply,
    NodeId,
    Shuffle,
    ShuffleReply,
)

# Revivals within a shuffle interval that mean "a partition healed".
BRIDGE_MIN_REVIVED = 3


@dataclass(slots=True)
class _Pending:
    """A neighbor request (or join) we sent and await the answer to."""

    addr: Addr
    high: bool
    join: bool
    token: int


class HyParView:
    """One node's HyParView state machine. See the module docs."""

    def __init__(self, me: MeshPeer, config: HyParViewConfig, rng: random.Random) -> None:
        if config.active_size < 1:
            raise ValueError("active_size must be at least 1")
        self.me = me
        self.config = config
        self.rng = rng
        self.counters: collections.Counter[str] = collections.Counter()
        # Dicts (insertion ordered), never sets: the same seed must give the
        # same run whatever the hash seed.
        self._active: dict[NodeId, Addr] = {}
        self._passive: dict[NodeId, Addr] = {}
        self._pending: dict[NodeId, _Pending] = {}
        self._links: dict[NodeId, None] = {}  # links we believe open
        self._cooldown: dict[NodeId, float] = {}  # refused us: not before this time
        self._contacts: tuple[MeshPeer, ...] = ()
        self._untried: list[MeshPeer] = []  # contacts left for the current join
        self._last_shuffle: tuple[NodeId, ...] = ()
        self._timers: dict[int, MeshTimer] = {}
        self._next_token = 0
        self._started = False
        self._left = False
        self._now = 0.0
        self._out: list[MeshOutput] = []
        # Partition healing: members seen revived lately (node -> when).
        self._revived: dict[NodeId, float] = {}
        self._last_bridge = -math.inf

    # --- read side -------------------------------------------------------------

    @property
    def node_id(self) -> NodeId:
        return self.me.node

    def active(self) -> list[MeshPeer]:
        return [MeshPeer(n, a) for n, a in self._active.items()]

    def passive(self) -> list[MeshPeer]:
        return [MeshPeer(n, a) for n, a in self._passive.items()]

    def active_ids(self) -> list[NodeId]:
        return list(self._active)

    def passive_ids(self) -> list[NodeId]:
        return list(self._passive)

    def pending_ids(self) -> list[NodeId]:
        return list(self._pending)

    def is_active(self, node: NodeId) -> bool:
        return node in self._active

    # --- the one entry point ---------------------------------------------------

    def handle(self, now: float, inp: MeshInput) -> list[MeshOutput]:
        """Feed one input; returns what to do. Bad input is counted, never raised."""
        self._now = now
        out: list[MeshOutput] = []
        self._out = out
        if self._left:
            if isinstance(inp, MessageIn):
                self._drop("left")
            self._out = []
            return out
        match inp:
            case JoinMesh(contacts):
                self._on_join_mesh(contacts)
            case MessageIn(src, msg):
                self._on_message(src, msg)
            case LinkDown(node):
                self._on_link_down(node)
            case MeshTimerFired(timer):
                self._on_timer(timer)
            case MembershipHint(alive, dead, revived):
                self._on_hint(alive + revived, dead, revived)
            case LeaveMesh():
                self._on_leave()
        self._out = []
        return out

    # --- plumbing --------------------------------------------------------------

    def _log(self, level: LogLevel, message: str) -> None:
        self._out.append(Log(level, message))

    def _drop(self, reason: str, detail: str = "") -> None:
        self.counters[f"drop.{reason}"] += 1
        self._log(LogLevel.DEBUG, f"mesh drop reason={reason} {detail}".rstrip())

    def _arm(self, make: Callable[..., MeshTimer], delay: float, *context: Any) -> int:
        """Arm the timer ``make(token, *context)`` to fire in ``delay`` s."""
        self._next_token += 1
        token = self._next_token
        timer = make(token, *context)
        self._timers[token] = timer
        self._out.append(SetMeshTimer(self._now + delay, timer))
        return token

    def _disarm(self, token: int) -> None:
        self._timers.pop(token, None)

    def _send(self, peer: MeshPeer | NodeId, msg: HyParViewMessage) -> None:
        """Send over the link to ``peer``, opening it first if we have none
        (which needs the peer's address: a bare id only for open links)."""
        if isinstance(peer, MeshPeer):
            node = peer.node
            if node not in self._links:
                self._links[node] = None
                self._out.append(Connect(peer))
        else:
            node = peer
        self.counters[f"msg_out.{type(msg).__name__.lower()}"] += 1
        self._out.append(Send(node, msg))

    def _close_if_idle(self, node: NodeId) -> None:
        """Close a link that carries no neighbour relation (a temporary one
        for a shuffle reply, a refused request)."""
        if node in self._links and node not in self._active and node not in self._pending:
            del self._links[node]
            self._out.append(CloseLink(node))

    # --- views -----------------------------------------------------------------

    def _add_active(self, peer: MeshPeer) -> None:
        node = peer.node
        if node == self.me.node or node in self._active:
            return
        self._passive.pop(node, None)
        self._cooldown.pop(node, None)
        if len(self._active) >= self.config.active_size:
            victim = self.rng.choice(list(self._active))
            self.counters["evictions"] += 1
            self._drop_active(victim, tell=True, keep_passive=True)
        self._active[node] = peer.addr
        if node not in self._links:  # the link exists (we heard from it); just note it
            self._links[node] = None
        self.counters["neighbor_up"] += 1
        self._out.append(NeighborUp(peer))

    def _drop_active(self, node: NodeId, *, tell: bool, keep_passive: bool) -> None:
        """Remove ``node`` from the active view. ``tell``: send it a disconnect
        (it stays a passive peer of ours and keeps us likewise)."""
        addr = self._active.pop(node, None)
        if addr is None:
            return
        peer = MeshPeer(node, addr)
        self.counters["neighbor_down"] += 1
        self._out.append(NeighborDown(peer))
        if tell:
            self._send(node, Disconnect(True))
        if node in self._links:
            del self._links[node]
            self._out.append(CloseLink(node))
        if keep_passive:
            self._add_passive(peer)
        else:
            self._passive.pop(node, None)

    def _add_passive(
        self, peer: MeshPeer, *, evict: bool = True, prefer: tuple[NodeId, ...] = ()
    ) -> None:
        node = peer.node
        if node == self.me.node or node in self._active or node in self._pending:
            return
        if node in self._passive:
            self._passive[node] = peer.addr  # the newest address wins
            return
        size = self.config.passive_size
        if size <= 0:
            return
        if len(self._passive) >= size:
            if not evict:
                return
            victims = [n for n in prefer if n in self._passive]
            victim = victims[0] if victims else self.rng.choice(list(self._passive))
            del self._passive[victim]
        self._passive[node] = peer.addr

    def _ask(self, peer: MeshPeer, *, high: bool, join: bool = False) -> None:
        """Send a neighbor request (or a join) and await the answer."""
        self._passive.pop(peer.node, None)
        token = self._arm(NeighborTimeout, self.config.neighbor_timeout_s, peer.node)
        self._pending[peer.node] = _Pending(peer.addr, high, join, token)
        if join:
            self._send(peer, MeshJoin(self.me))
        else:
            self._send(peer, Neighbor(self.me, high))

    def _refill(self, exclude: tuple[NodeId, ...] = ()) -> None:
        """Ask passive peers to fill the active view (section 4.3)."""
        want = self.config.active_size - len(self._active) - len(self._pending)
        if want <= 0:
            return
        now = self._now
        candidates = [
            n for n in self._passive if n not in exclude and self._cooldown.get(n, 0.0) <= now
        ]
        picks = self.rng.sample(candidates, min(want, len(candidates)))
        for node in picks:
            # High priority only for the first request of an isolated node:
            # one forced entry is enough to get back in, and forcing more
            # would make others drop neighbours for nothing.
            high = not self._active and not any(p.high for p in self._pending.values())
            self.counters["neighbor_requests"] += 1
            self._ask(MeshPeer(node, self._passive[node]), high=high)
        if not self._active and not self._pending:
            self._rejoin()

    def _rejoin(self) -> None:
        """Isolated, with no passive peer to ask: join again through a contact."""
        if not self._untried:
            self._untried = [c for c in self._contacts if c.node != self.me.node]
            self.rng.shuffle(self._untried)
        while self._untried:
            contact = self._untried.pop(0)
            if contact.node in self._active or contact.node in self._pending:
                continue
            if self._cooldown.get(contact.node, 0.0) > self._now:
                continue
            self.counters["joins"] += 1
            self._ask(contact, high=True, join=True)
            return

    # --- inputs ----------------------------------------------------------------

    def _on_join_mesh(self, contacts: tuple[MeshPeer, ...]) -> None:
        if not self._started:
            self._started = True
            interval = self.config.shuffle_interval_s
            # A random phase spreads the shuffles of nodes started together.
            self._arm(ShuffleTick, self.rng.uniform(0.5, 1.0) * interval)
        contacts = tuple(c for c in dict.fromkeys(contacts) if c.node != self.me.node)
        if not contacts:
            return
        self._contacts = contacts
        first, rest = contacts[0], contacts[1:]
        self._untried = list(rest)
        for c in rest:
            self._add_passive(c)
        if first.node in self._active or first.node in self._pending:
            return
        self.counters["joins"] += 1
        self._ask(first, high=True, join=True)

    def _on_message(self, src: NodeId, msg: LinkMessage) -> None:
        if src == self.me.node:
            self._drop("from_self")
            return
        self.counters[f"msg_in.{type(msg).__name__.lower()}"] += 1
        self._links.setdefault(src, None)
        match msg:
            case MeshJoin(joiner):
                if joiner.node != src:
                    self._drop("sender_mismatch", "join")
                    return
                self._on_join(joiner)
            case ForwardJoin(joiner, ttl):
                self._on_forward_join(src, joiner, ttl)
            case Neighbor(sender, high):
                if sender.node != src:
                    self._drop("sender_mismatch", "neighbor")
                    return
                self._on_neighbor(sender, high)
            case NeighborReply(accept):
                self._on_neighbor_reply(src, accept)
            case Disconnect(alive):
                self._on_disconnect(src, alive)
            case Shuffle(origin, ttl, peers):
                self._on_shuffle(src, origin, ttl, peers)
            case ShuffleReply(peers):
                self._on_shuffle_reply(src, peers)
            case _:
                self._drop("not_hyparview", type(msg).__name__)

    def _on_join(self, joiner: MeshPeer) -> None:
        node = joiner.node
        if node in self._active:
            self._send(node, NeighborReply(True))
            return
        self._settle_pending(node)
        self._add_active(joiner)
        self._send(node, NeighborReply(True))
        for other in list(self._active):
            if other != node:
                self._send(other, ForwardJoin(joiner, self.config.arwl))

    def _settle_pending(self, node: NodeId) -> _Pending | None:
        p = self._pending.pop(node, None)
        if p is not None:
            self._disarm(p.token)
        return p

    def _on_forward_join(self, src: NodeId, joiner: MeshPeer, ttl: int) -> None:
        node = joiner.node
        if node == self.me.node:
            return  # the walk came back to the joiner itself
        ttl = min(ttl, self.config.arwl)
        if ttl > 0 and len(self._active) > 1:
            if ttl == self.config.prwl:
                self._add_passive(joiner)
            nxt = [n for n in self._active if n != src and n != node]
            if nxt:
                self._send(self.rng.choice(nxt), ForwardJoin(joiner, ttl - 1))
                return
        # The walk ends here: ask the joiner to be our neighbour (the paper
        # adds it outright; asking keeps both ends agreeing).
        if node in self._active or node in self._pending:
            return
        self.counters["walk_ends"] += 1
        self._ask(joiner, high=True)

    def _on_neighbor(self, sender: MeshPeer, high: bool) -> None:
        node = sender.node
        if node in self._active:
            self._send(node, NeighborReply(True))
            return
        if self._settle_pending(node) is not None:
            # Crossing requests: we asked it too. Its request is our answer,
            # and ours will be its answer, so both sides end up neighbours.
            self._add_active(sender)
            self._send(node, NeighborReply(True))
            return
        if high or len(self._active) + len(self._pending) < self.config.active_size:
            self._add_active(sender)
            self._send(node, NeighborReply(True))
            return
        self.counters["neighbor_refused"] += 1
        self._send(node, NeighborReply(False))
        self._add_passive(sender)
        self._close_if_idle(node)

    def _on_neighbor_reply(self, src: NodeId, accept: bool) -> None:
        p = self._settle_pending(src)
        if p is None:
            # An answer to a request we no longer wait for (we gave up on it,
            # or a crossing request settled it). Whatever it says is the
            # peer's view now; make ours agree.
            if accept and src not in self._active:
                self.counters["late_accept"] += 1
                self._send(src, Disconnect(True))
                self._close_if_idle(src)
            elif not accept and src in self._active:
                self.counters["late_refusal"] += 1
                self._drop_active(src, tell=False, keep_passive=True)
                self._refill(exclude=(src,))
            return
        peer = MeshPeer(src, p.addr)
        if accept:
            self._add_active(peer)
            return
        self._cooldown[src] = self._now + self.config.reject_cooldown_s
        self._add_passive(peer)
        self._close_if_idle(src)
        if len(self._active) * 2 < self.config.active_size:
            # Short of neighbours: try the next candidate now (section 4.3).
            # Otherwise wait for the next tick: in a settled overlay most
            # nodes are full, and asking them one after the other right away
            # costs a burst of refusals for a link the node can do without.
            self._refill()

    def _on_disconnect(self, src: NodeId, alive: bool) -> None:
        if src not in self._active:
            if not alive:
                self._passive.pop(src, None)
            return
        self._drop_active(src, tell=False, keep_passive=alive)
        self._refill(exclude=(src,))

    def _on_shuffle(
        self, src: NodeId, origin: MeshPeer, ttl: int, peers: tuple[MeshPeer, ...]
    ) -> None:
        if origin.node == self.me.node:
            return
        ttl = min(ttl, self.config.arwl)
        if ttl > 0 and len(self._active) > 1:
            nxt = [n for n in self._active if n != src and n != origin.node]
            if nxt:
                self._send(self.rng.choice(nxt), Shuffle(origin, ttl - 1, peers))
                return
        # The walk ends here: answer with a sample of our passive view, the
        # same size as what we got, and keep what we got.
        offered = {p.node for p in peers} | {origin.node}
        pool = [n for n in self._passive if n not in offered]
        reply_ids = self.rng.sample(pool, min(len(peers) + 1, len(pool)))
        reply = tuple(MeshPeer(n, self._passive[n]) for n in reply_ids)
        self.counters["shuffles_answered"] += 1
        self._send(origin, ShuffleReply(reply))
        for p in (origin, *peers):
            self._add_passive(p, prefer=tuple(reply_ids))
        self._close_if_idle(origin.node)

    def _on_shuffle_reply(self, src: NodeId, peers: tuple[MeshPeer, ...]) -> None:
        for p in peers:
            self._add_passive(p, prefer=self._last_shuffle)
        self._last_shuffle = ()
        self._close_if_idle(src)

    def _on_link_down(self, node: NodeId) -> None:
        self._links.pop(node, None)
        if node in self._active:
            self.counters["neighbor_failed"] += 1
            self._log(LogLevel.INFO, f"mesh neighbour lost node={node.hex()[:12]}")
            self._drop_active(node, tell=False, keep_passive=False)
            self._unreachable(node)
            self._refill()
            return
        if self._settle_pending(node) is not None:
            self._unreachable(node)
            self._refill()

    def _unreachable(self, node: NodeId) -> None:
        """``node`` failed or did not answer: no longer a candidate, and (if it
        is a contact) not retried before the cooldown, so a dead contact is
        not hammered in a connect-fail loop."""
        self._passive.pop(node, None)
        self._cooldown[node] = self._now + self.config.reject_cooldown_s

    def _on_timer(self, timer: MeshTimer) -> None:
        armed = self._timers.get(timer.token)
        if armed is None or (armed is not timer and armed != timer):
            return  # superseded, or not ours
        del self._timers[timer.token]
        match armed:
            case ShuffleTick():
                self._arm(ShuffleTick, self.config.shuffle_interval_s)
                self._tick()
            case NeighborTimeout(node=node):
                self._neighbor_timeout(node)

    def _neighbor_timeout(self, node: NodeId) -> None:
        p = self._pending.pop(node, None)
        if p is None:
            return
        self.counters["neighbor_timeouts"] += 1
        # Closing the link makes a late acceptance moot: the peer hears the
        # link go down and drops us.
        self._unreachable(node)
        self._close_if_idle(node)
        self._refill()

    def _tick(self) -> None:
        now = self._now
        for node in [n for n, t in self._cooldown.items() if t <= now]:
            del self._cooldown[node]
        self._refill()
        self._shuffle()

    def _shuffle(self) -> None:
        if not self._active:
            return
        cfg = self.config
        target = self.rng.choice(list(self._active))
        act = [n for n in self._active if n != target]
        sample = self.rng.sample(act, min(cfg.shuffle_active, len(act)))
        pas = list(self._passive)
        sample += self.rng.sample(pas, min(cfg.shuffle_passive, len(pas)))
        peers = tuple(MeshPeer(n, self._active.get(n) or self._passive[n]) for n in sample)
        self._last_shuffle = tuple(sample)
        self.counters["shuffles"] += 1
        self._send(target, Shuffle(self.me, cfg.arwl, peers))

    def _on_hint(
        self,
        alive: tuple[MeshPeer, ...],
        dead: tuple[NodeId, ...],
        revived: tuple[MeshPeer, ...] = (),
    ) -> None:
        for node in dead:
            self._passive.pop(node, None)
            self._cooldown.pop(node, None)
            if node in self._active:
                self.counters["neighbor_dead_hint"] += 1
                self._drop_active(node, tell=False, keep_passive=False)
            elif self._settle_pending(node) is not None:
                self._close_if_idle(node)
        for peer in alive:
            if peer.node not in self._active:
                self._add_passive(peer, evict=False)
        if self._started:
            self._refill()
            if revived:
                self._bridge(revived)

    def _bridge(self, revived: tuple[MeshPeer, ...]) -> None:
        """Several nodes we had seen die are back at once: a partition has
        healed. Our active view holds only our own side (the links across
        failed and were replaced), and so does everyone's: the overlay is
        two overlays, and broadcasts would not cross. One high-priority
        neighbor request to one of them joins them (the peer makes room).
        Revived means refuted deaths in the same life (the driver tells,
        from membership: a restarted process is not one and rejoins by
        itself), only for a burst of them (one false positive is not a heal),
        and once per shuffle interval."""
        now = self._now
        window = self.config.shuffle_interval_s
        for peer in revived:
            self._revived[peer.node] = now
        for node in [n for n, t in self._revived.items() if t < now - window]:
            del self._revived[node]
        if len(self._revived) < BRIDGE_MIN_REVIVED or now - self._last_bridge < window:
            return
        candidates = [
            p
            for p in revived
            if p.node not in self._active and p.node not in self._pending and p.node != self.me.node
        ]
        if not candidates:
            return
        self._last_bridge = now
        self.counters["bridge_requests"] += 1
        peer = self.rng.choice(candidates)
        self._add_passive(peer)
        self._ask(peer, high=True)

    def _on_leave(self) -> None:
        for node in list(self._active):
            self._send(node, Disconnect(False))
            self._drop_active(node, tell=False, keep_passive=False)
        for node in list(self._pending):
            self._settle_pending(node)
        for node in list(self._links):
            self._out.append(CloseLink(node))
        self._links.clear()
        self._passive.clear()
        self._timers.clear()
        self._left = True
