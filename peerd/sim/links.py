"""Peer links in a simulated run: the TCP links a daemon keeps to other
daemons, for the partial mesh and for messages to names.

Theory of operation. Links follow the contract in :mod:`peerd.core.events`
(as the shell's link manager, :mod:`peerd.shell.links`, does over TCP): one
link per pair of hosts at a time, messages in order per direction, a close
delivers what the closer sent and then tells the other end, nobody hears of a
close it made itself. A process that dies on a live host resets its links
(the peers hear at once); a host that vanishes or freezes keeps them open,
and what is sent to it is lost until SWIM says it is dead or the sender's TCP
gives up (``stream_timeout_s``), as across a partition.

One link serves both users, as in the daemon: each end remembers whether its
mesh uses the link (it connected or sent a mesh message on it, or mesh
traffic came in on it) and whether messages to names do. The mesh's close
leaves a link that still carries messages to names open, a close for a dead
member's links (``mesh=False``) leaves one the mesh uses, and a lost link is
reported to each end with whether its mesh used it (a link only messages to
names used is news for those alone). Links that only names traffic uses are
not reaped when idle (runs are short; the daemon's reaper only frees sockets).

Latencies come from a stream of their own, so turning the mesh or names on
or off does not change what happens to the membership's datagrams. Messages
are the real wire dataclasses; their encoded size is counted for the traffic
figures without re-encoding them (:func:`msg_bytes`).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from peerd.core import events as nev
from peerd.core.events import LinkDown, MessageIn
from peerd.wire.messages import Gossip, GossipControl, NameMsg, NameReply

if TYPE_CHECKING:
    from peerd.sim.engine import Proc
    from peerd.sim.faults import Faults as World


# Rough encoded sizes (CBOR, before the seal) of link messages, for traffic.
_CONTROL_BYTES = 40
_PEER_BYTES = 32


def msg_bytes(msg: Any) -> int:
    if isinstance(msg, Gossip):
        return 48 + len(msg.payload)
    if isinstance(msg, GossipControl):
        return 8 + 20 * (len(msg.ihave) + len(msg.want))
    if isinstance(msg, NameMsg | NameReply):
        return 64 + len(getattr(msg, "payload", b"") or b"")
    peers = getattr(msg, "peers", None)
    if peers is not None:
        return _CONTROL_BYTES + _PEER_BYTES * len(peers)
    return _CONTROL_BYTES


@dataclass(slots=True)
class _Link:
    id: int
    gen: int
    up: bool
    closed_by: set[int] = field(default_factory=set)  # host indices
    dropped: set[tuple[int, int]] = field(default_factory=set)  # dead directions
    mesh: set[int] = field(default_factory=set)  # ends whose mesh uses it
    direct: set[int] = field(default_factory=set)  # ends that sent messages to names on it


class Links:
    """Every peer link of the run; see the module docstring."""

    def __init__(self, world: World) -> None:
        self.w = world
        # (the stream's name predates names messaging: mesh runs keep their draws)
        self.net_rng = random.Random(f"peerd-sim-mesh-net:{world.sc.seed}")
        self.links: dict[tuple[int, int], _Link] = {}
        self.links_of: list[dict[tuple[int, int], None]] = [{} for _ in range(world.n)]
        self.chan_at: dict[tuple[int, int], float] = {}
        self.link_count = [0] * world.n
        self.max_links = 0
        self.max_links_at = 0.0
        self._ids = 0
        # mesh traffic (the mesh summary's figures) and names traffic
        self.counts = dict.fromkeys(
            ("msgs", "bytes", "dropped_no_link", "link_failures", "connects", "refused"), 0
        )
        self.names_counts = dict.fromkeys(("msgs", "bytes", "refused"), 0)
        # copies of each user broadcast received (by Gossip id), for the mesh
        # workload; None: not counted
        self.gossip_seen: dict[bytes, Any] | None = None

    # --- what a process asks for -----------------------------------------------------

    def connect(self, me: int, node: bytes, t: float, mesh: bool = True) -> _Link | None:
        w = self.w
        other = w.index_of.get(node)
        if other is None:
            return None
        key = (me, other) if me < other else (other, me)
        g = self.links.get(key)
        if g is not None and g.up:
            if mesh:
                g.mesh.add(me)
            return g
        self.counts["connects"] += 1
        host = w.hosts[other]
        if host.cur is None or w._blocked(me, other):
            # refused by a live host at once; else the SYN times out
            g = self._set_up(me, other, False)
            g.dropped |= {(me, other), (other, me)}
            if mesh:
                g.mesh.add(me)
            self.counts["refused"] += 1
            refused = host.cur is None and host.icmp and host.started and not w._blocked(me, other)
            delay = 2 * self._latency() if refused else min(5.0, w.stream_timeout)
            self._event(other, me, g, None, t + delay)
            return g
        g = self._set_up(me, other, True)
        if mesh:
            g.mesh.add(me)
        return g

    def close(self, me: int, node: bytes, mesh: bool) -> None:
        other = self.w.index_of.get(node)
        if other is None:
            return
        key = (me, other) if me < other else (other, me)
        g = self.links.get(key)
        if g is None:
            return
        if mesh:
            g.mesh.discard(me)
            if g.up and me in g.direct:
                return  # still carries messages to names
        elif me in g.mesh and g.up:
            return  # the mesh uses it: the mesh hears of every link it did not close
        g.closed_by.add(me)
        if g.up:
            g.up = False
            self._count(key, -1)
            g.dropped.add((other, me))
            self._event(me, other, g, None, self.w.now)

    def send(self, me: int, node: bytes, msg: Any, t: float) -> None:
        """A mesh message on the link to ``node`` (dropped if none is up)."""
        w = self.w
        other = w.index_of.get(node)
        if other is None:
            return
        key = (me, other) if me < other else (other, me)
        g = self.links.get(key)
        if g is None or not g.up:
            self.counts["dropped_no_link"] += 1
            return
        g.mesh.add(me)
        size = msg_bytes(msg)
        self.counts["msgs"] += 1
        self.counts["bytes"] += size
        self._write(me, other, g, msg, t)

    def link_send(self, me: int, o: nev.LinkSend, t: float) -> tuple[bool, int | None]:
        """A message to names: on the link to ``o.node``, opening one to
        ``o.addr`` if none is up. Returns (taken, the link's id)."""
        w = self.w
        other = w.index_of.get(o.node)
        if other is None:
            self.names_counts["refused"] += 1
            return False, None
        key = (me, other) if me < other else (other, me)
        g = self.links.get(key)
        if g is None or not g.up:
            if o.addr is None:
                self.names_counts["refused"] += 1
                return False, None
            g = self.connect(me, o.node, t, mesh=False)
            assert g is not None
            if not g.up:
                return True, g.id  # the connect fails: LinkDown(link=id) follows
        g.direct.add(me)
        self.names_counts["msgs"] += 1
        self.names_counts["bytes"] += msg_bytes(o.msg)
        self._write(me, other, g, o.msg, t)
        return True, g.id

    def stop(self, proc: Proc, reset: bool) -> None:
        """The process is gone. ``reset``: its host is up and resets every
        link at once (the peers hear); else the links hang open."""
        me = proc.host.index
        for a, b in list(self.links_of[me]):
            g = self.links[(a, b)]
            if g.up:
                other = b if a == me else a
                if reset:
                    self._fail(g, a, b, notify=(other,), delay=self._latency())
                else:
                    g.dropped |= {(a, b), (b, a)}  # nothing gets through any more

    # --- the model --------------------------------------------------------------------

    def _latency(self) -> float:
        return self.w.latency_with(self.net_rng)

    def _write(self, me: int, other: int, g: _Link, msg: Any, t: float) -> None:
        w = self.w
        host = w.hosts[other]
        if w.netfaults and w._blocked(me, other) or (host.cur is None and not host.icmp):
            # Nothing comes back: the sender's TCP gives up after a while.
            self._fail(g, me, other, notify=(me,), delay=w.stream_timeout)
            return
        self._event(me, other, g, msg, t)

    def _set_up(self, a: int, b: int, up: bool) -> _Link:
        key = (a, b) if a < b else (b, a)
        old = self.links.get(key)
        if old is not None and old.up:
            self._count(key, -1)
        self._ids += 1
        g = _Link(self._ids, (old.gen + 1) if old else 1, up)
        self.links[key] = g
        if old is None:
            self.links_of[a][key] = None
            self.links_of[b][key] = None
        if up:
            self._count(key, 1)
        return g

    def _count(self, key: tuple[int, int], d: int) -> None:
        for i in key:
            n = self.link_count[i] + d
            self.link_count[i] = n
            if n > self.max_links:
                self.max_links = n
                self.max_links_at = self.w.now

    def _fail(self, g: _Link, a: int, b: int, notify: tuple[int, ...], delay: float) -> None:
        if g.up:
            g.up = False
            self._count((a, b) if a < b else (b, a), -1)
        g.dropped |= {(a, b), (b, a)}
        self.counts["link_failures"] += 1
        for dst in notify:
            src = b if dst == a else a
            self._event(src, dst, g, None, self.w.now + delay, force=True)

    def _event(self, src: int, dst: int, g: _Link, msg: Any, t: float, force: bool = False) -> None:
        """Queue a message (None: the end of the link) src -> dst, in order."""
        w = self.w
        key = (src, dst)
        when = max(t + self._latency() + w.link_delay(src, dst), self.chan_at.get(key, 0.0))
        self.chan_at[key] = when
        w.at(when, lambda: self._arrive(src, dst, g, msg, force))

    def _arrive(self, src: int, dst: int, g: _Link, msg: Any, force: bool) -> None:
        w = self.w
        proc = w.hosts[dst].cur
        if proc is None:
            return
        if msg is None:
            if force or dst not in g.closed_by:
                w._push(w.now, proc, LinkDown(w.hosts[src].node_id, g.id, dst in g.mesh))
            return
        if (src, dst) in g.dropped or dst in g.closed_by:
            return
        c = msg.__class__
        if c is not NameMsg and c is not NameReply:
            g.mesh.add(dst)
            seen = self.gossip_seen
            if seen is not None and c is Gossip:
                rec = seen.get(msg.id)
                if rec is not None:
                    rec.copies += 1
        w._push(w.now, proc, MessageIn(w.hosts[src].node_id, msg))
