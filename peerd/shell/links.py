"""Persistent peer links over TCP: the shell's side of the mesh link contract.

The partial mesh (:mod:`peerd.core.mesh`) and messages to names talk about
*links*: ordered, authenticated connections to single peer nodes. This module
keeps them, with the contract stated in :mod:`peerd.core.events`: at most
one link per peer node, :class:`~peerd.core.events.Send` in order,
``CloseLink`` flushes then closes, a failure (or the peer's close) is reported
once as :class:`LinkLost`, never for a close the core asked for.

Wire (over the daemon's TCP listener, shared with push-pull streams and watch
links): every frame is a 4-byte big-endian length and a sealed body
(:mod:`peerd.wire.seal`).

* The connector's first frame is a *hello*, sealed by the daemon's shared
  sealer (so the shared opener's replay check covers it): ``MAGIC "H" src(16)
  dst(16) nonce(8)``. The magic cannot start a push-pull payload (a CBOR
  array) nor a watch link (empty), which is how the listener tells them
  apart. ``src`` must equal the seal's sender (the sealer's id is the node
  id), ``dst`` our own id (an address now used by another node is refused).
* The acceptor answers ``MAGIC "A" src(16) echo(8) nonce(8)``: the echo of
  the connector's nonce proves the answer is fresh.
* Then each side writes data frames whose payload is the *other* side's
  nonce followed by one or more ``u32 length + codec message`` records. The
  nonce binds a frame to this link (a frame recorded on another link of the
  same sender does not open here); each side opens the frames of one link
  with its own replay window, so a link does not race UDP for the shared one.

Queues: each link has one queue per priority (lower first, as
``Send.priority``); the writer drains lowest priority first into frames of at
most ``batch_bytes``. Over ``max_queue_bytes`` the newest frames of the
lowest (droppable) priority are dropped (counted; Plumtree repairs them);
anything else over the hard bound (``4 x max_queue_bytes``) means the peer
does not read: the link is failed. A write that stalls ``write_timeout_s``
fails the link too, so a frozen peer holds memory for a bounded time.

Crossing connects (both ends connect at once) keep the link opened by the
lower node id. A new inbound link from a peer we hold an established link
with supersedes the old one (the peer closed or dropped it): new sends go on
the new link at once; the old one's unsent frames are dropped (counted) and
it is half-closed, but it is still read to its end, so everything the peer
wrote on it before it moved is delivered, then its :class:`LinkLost`, and
only then anything from the new link. The old link's end is the peer's EOF,
a broken connection, or ``drain_timeout_s`` after it was superseded (one
deadline, not reset by its frames: a peer still flushing a long queue on it,
or one that vanished with the connection half-open), whichever comes first.
Meanwhile the new link is not read, so its writer may stall that long:
``drain_timeout_s`` must stay below ``write_timeout_s``, or the peer's own
writes on the new link would time out (:func:`drain_s`).

Per peer, everything is delivered in the order of the links: each new link
(connected or accepted) waits for the *tail*, the newest earlier link to the
peer whose end has not been delivered yet, and a link's end (its
:class:`LinkLost`, or nothing if we closed it) counts as delivered only
after its own predecessors'. A LinkLost we cause ourselves (a direct link
evicted for another, or idle) takes the same ordered path.

A link being superseded frees its slot for the new one: at ``max_links``
a peer can still replace its link (the old one drains, so at most one more
link is held meanwhile). While an old mesh link drains, the mesh may mark
the new one as its own; when the old one's LinkLost tells the mesh the
link is down (it forgets the peer and never closes the new one), the mark
is cleared unless mesh traffic came in on the new link
(:meth:`LinkManager.mesh_lost`), so the idle reaper still closes it.

Direct links (messages to names) reuse the same links; a link nobody uses
(the mesh did not ask for it, no direct traffic for ``idle_s``) is closed.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import math
import secrets
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from peerd.core.events import LogLevel
from peerd.shell.logs import LimitedLog
from peerd.shell.tcp import FrameError, _enable_keepalive, connect_tcp, encode_frame, read_frame
from peerd.wire import codec
from peerd.wire.messages import Addr, Message, NodeId
from peerd.wire.seal import Keyring, Opener, Sealer, SealError

MAGIC = b"\xffPDL1"
HELLO = b"H"
ACK = b"A"
NONCE_BYTES = 8
ID_BYTES = 16
_REC = struct.Struct(">I")


@dataclass(frozen=True, slots=True)
class LinkLimits:
    # Links held at once (both directions); a connect or accept beyond is
    # refused, except a peer replacing its link (the old one is counted as
    # freed while it drains: at most one link more).
    max_links: int = 256
    connect_timeout_s: float = 5.0
    # From connect to the acceptor's answer.
    handshake_timeout_s: float = 5.0
    # A write that does not finish this long fails the link (frozen peer).
    write_timeout_s: float = 10.0
    # Largest frame read or written (sealed body).
    max_frame: int = 4 * 1024 * 1024
    # Records (messages) joined into one sealed frame, by bytes.
    batch_bytes: int = 256 * 1024
    # Queued bytes per link past which the lowest priority is dropped...
    max_queue_bytes: int = 4 * 1024 * 1024
    # ...and the priority whose frames may be dropped (user broadcasts).
    droppable_priority: int = 3
    # Direct links (to daemons we send messages to names to, not neighbours)
    # held at once; the least recently used is closed to open another.
    max_direct_links: int = 32
    # A link with no mesh use and no direct traffic this long is closed.
    idle_s: float = 60.0
    # How often idle links are looked for.
    reap_interval_s: float = 5.0
    # A superseded link is read to its end, for at most this long after it
    # was superseded (one deadline, not reset by its frames). The new link is
    # not read meanwhile, so this must stay below write_timeout_s (the
    # peer's writes on the new link would time out): see drain_s().
    drain_timeout_s: float = 5.0
    # Not the links' own: every incoming connection on the TCP port (a link,
    # a push-pull, a watch link) must deliver its first sealed frame this
    # long after accept (TcpLimits.hello_timeout_s; peerd.shell.preauth).
    hello_timeout_s: float = 3.0


def drain_s(limits: LinkLimits) -> float:
    """How long a superseded link is read: ``drain_timeout_s``, kept below
    ``write_timeout_s`` (settings refuse more; limits built by hand with
    more get half of ``write_timeout_s``)."""
    if limits.drain_timeout_s < limits.write_timeout_s:
        return limits.drain_timeout_s
    return limits.write_timeout_s / 2


@dataclass(frozen=True, slots=True)
class LinkMessages:
    """Runner input: the messages of one frame from ``src`` (in order)."""

    src: NodeId
    msgs: tuple[Message, ...]


@dataclass(frozen=True, slots=True)
class LinkLost:
    """Runner input: the link to ``node`` failed or the peer closed it.
    ``mesh``: the mesh owned it (and did not close it itself), so it must
    hear :class:`~peerd.core.events.LinkDown`. ``link``: which link
    (:meth:`LinkManager.link_id`; not compared); a newer link to ``node``
    may be up."""

    node: NodeId
    mesh: bool
    link: int | None = field(default=None, compare=False)


@dataclass(eq=False)
class _Link:
    peer: NodeId
    addr: Addr | None
    outbound: bool
    id: int
    state: str = "connecting"  # connecting, up, closing, draining (superseded), dead
    mesh: bool = False  # the mesh uses it (Connect/Send/inbound mesh traffic, no CloseLink)
    mesh_heard: bool = False  # a mesh message came in on it
    last_used: float = 0.0  # creation or last direct traffic
    direct: bool = False  # has carried direct (non-mesh) traffic
    queues: dict[int, collections.deque[bytes]] = field(default_factory=dict)
    queued_bytes: int = 0
    wake: trio.Event = field(default_factory=trio.Event)
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    conn: trio.SocketStream | None = None
    my_nonce: bytes = b""
    peer_nonce: bytes = b""
    reported: bool = False
    # Set once nothing more comes from this link or the ones before it (its
    # LinkLost, if any, is in the inputs): the next link to the peer
    # delivers only after that.
    finished: trio.Event = field(default_factory=trio.Event)
    after: trio.Event | None = None  # the previous tail's ``finished``
    read_scope: trio.CancelScope | None = None  # the read in progress
    drain_deadline: float = math.inf  # superseded: read until then at most


class LinkManager:
    """Keeps links to peer nodes; see the module docstring.

    Synchronous methods (``connect``, ``send``, ``close``) are called by the
    runner and never wait; results come back as :class:`LinkMessages` and
    :class:`LinkLost` items on ``inputs``. Counters: ``link_*``.
    """

    def __init__(
        self,
        node_id: NodeId,
        *,
        sealer: Sealer,
        keyring: Keyring,
        inputs: trio.MemorySendChannel[Any],
        counters: collections.Counter[str],
        log: LimitedLog,
        limits: LinkLimits | None = None,
        is_mesh_message: Callable[[Message], bool] | None = None,
    ) -> None:
        self.node_id = node_id
        self.sealer = sealer
        self.keyring = keyring
        self.inputs = inputs
        self.counters = counters
        self.log = log
        self.limits = limits if limits is not None else LinkLimits()
        self.is_mesh_message = is_mesh_message or (lambda m: 30 <= m.TYPE <= 38)
        self.links: dict[NodeId, _Link] = {}
        self._all: set[_Link] = set()  # including closing and draining ones
        # Per peer, the newest link whose end has not been delivered: the
        # next link to the peer delivers after it (see the module docs).
        self._tail: dict[NodeId, _Link] = {}
        self._ids = itertools.count(1)
        self._nursery: trio.Nursery | None = None

    # --- runner side (synchronous) ---------------------------------------------

    @property
    def open_count(self) -> int:
        return len(self._all)

    def is_up(self, peer: NodeId) -> bool:
        link = self.links.get(peer)
        return link is not None and link.state == "up"

    def has(self, peer: NodeId) -> bool:
        return peer in self.links

    def link_id(self, peer: NodeId) -> int | None:
        """The id of the link that now carries sends to ``peer`` (as in
        :class:`LinkLost`), None if there is none."""
        link = self.links.get(peer)
        return link.id if link is not None else None

    def connect(self, peer: NodeId, addr: Addr, *, mesh: bool = True) -> None:
        """Open a link (no-op if one is open or opening, in either direction)."""
        link = self.links.get(peer)
        if link is not None:
            if mesh:
                link.mesh = True
            return
        if peer == self.node_id:
            return
        if not mesh:
            self._make_room_for_direct()
        link = _Link(peer, addr, True, next(self._ids), mesh=mesh, last_used=trio.current_time())
        self._chain(link)
        self.links[peer] = link
        self._all.add(link)
        if self._nursery is None or len(self._all) > self.limits.max_links:
            self.counters["link_fail_busy" if self._nursery else "link_fail_not_running"] += 1
            self._lost(link, "busy")
            return
        self._nursery.start_soon(self._outbound, link)

    def send(
        self, peer: NodeId, msg: Message, priority: int = 0, *, mesh: bool | None = None
    ) -> bool:
        """Queue ``msg`` for ``peer``; False (counted) if there is no link or
        the frame was dropped. ``mesh``: mark the link as the mesh's;
        ``mesh=False``: direct traffic (messages to names), never dropped
        silently: over the hard queue bound it is refused (False) instead."""
        link = self.links.get(peer)
        if link is None or link.state not in ("connecting", "up"):
            self.counters["link_send_no_link"] += 1
            return False
        try:
            data = codec.encode(msg)
        except Exception as e:  # our own bug; must not kill the runner
            self.counters["link_send_encode_error"] += 1
            self.log.log(
                "link_encode",
                LogLevel.ERROR,
                "cannot encode link message",
                type=type(msg).__name__,
                error=str(e),
            )
            return False
        if mesh:
            link.mesh = True
        elif mesh is False:
            link.direct = True
            link.last_used = trio.current_time()
        return self._enqueue(link, data, priority, droppable=mesh is not False)

    def close(self, peer: NodeId, *, mesh: bool = True) -> None:
        """Flush then close. ``mesh``: the mesh's CloseLink; the link stays
        while direct traffic still uses it (the idle reaper closes it later).
        ``mesh=False``: direct traffic is done with it; it stays while the
        mesh uses it (the mesh hears of every link it did not close)."""
        link = self.links.get(peer)
        if link is None:
            return
        if mesh:
            link.mesh = False
            if link.direct and trio.current_time() - link.last_used < self.limits.idle_s:
                return  # still carries messages to names; the reaper closes it when idle
        elif link.mesh:
            return
        self._close(link)

    def _make_room_for_direct(self) -> None:
        """At the direct-link bound, close the least recently used direct
        link (its pending messages fail explicitly: LinkLost(mesh=False))."""
        direct = [lk for lk in self.links.values() if not lk.mesh]
        if len(direct) < self.limits.max_direct_links:
            return
        self._retire(min(direct, key=lambda lk: lk.last_used), "link_direct_evicted")

    def close_all(self) -> None:
        for link in list(self.links.values()):
            self._close(link)

    def mesh_lost(self, peer: NodeId, link: int | None) -> None:
        """The runner is about to tell the mesh that link ``link`` to
        ``peer`` is down (a :class:`LinkLost` with ``mesh``): the mesh then
        forgets the peer and will not close a newer link to it, so a mark it
        put on the newer one while the old one drained is cleared, unless
        mesh traffic came in on it (the peer made it a mesh link again).
        Direct traffic and the idle reaper then decide when it closes."""
        current = self.links.get(peer)
        if (
            link is not None
            and current is not None
            and current.id != link
            and not current.mesh_heard
        ):
            current.mesh = False

    # --- internals ----------------------------------------------------------------

    def _chain(self, link: _Link) -> None:
        """``link`` is the newest to its peer: it delivers after the tail."""
        tail = self._tail.get(link.peer)
        link.after = tail.finished if tail is not None and not tail.finished.is_set() else None
        self._tail[link.peer] = link

    def _retire(self, link: _Link, counter: str) -> None:
        """Close ``link`` ourselves (evicted for another direct link, or
        idle) and still report its LinkLost, so that the sends waiting on it
        fail; ordered like any LinkLost (after the links before it)."""
        self.counters[counter] += 1
        self._close(link, lost=True)

    def _close(self, link: _Link, *, lost: bool = False) -> None:
        """Flush then close. ``lost``: report it (:meth:`_retire`), else the
        core asked for it and hears nothing."""
        if self.links.get(link.peer) is link:
            del self.links[link.peer]
        reported = link.reported
        link.reported = True  # no other LinkLost from now on
        if lost and not reported:
            self._report(LinkLost(link.peer, link.mesh, link.id), link)
        else:
            self._finish(link)  # nobody reads a link it closed: nothing more comes from it
        if link.state == "dead":
            return
        if link.state == "connecting" and not link.queued_bytes:
            link.state = "dead"
            link.scope.cancel()
            self._all.discard(link)
            return
        link.state = "closing"
        link.wake.set()

    def _enqueue(self, link: _Link, data: bytes, priority: int, droppable: bool = True) -> bool:
        lim = self.limits
        if link.queued_bytes > lim.max_queue_bytes:
            if droppable and priority >= lim.droppable_priority:
                self.counters["link_drop_queue_full"] += 1
                return False
            if link.queued_bytes > 4 * lim.max_queue_bytes:
                if not droppable:  # direct traffic: the sender gets an error
                    self.counters["link_refused_queue_full"] += 1
                    return False
                self.counters["link_fail_queue_overflow"] += 1
                self._fail(link, "queue_overflow")
                return False
        q = link.queues.get(priority)
        if q is None:
            q = link.queues[priority] = collections.deque()
        q.append(data)
        link.queued_bytes += len(data) + _REC.size
        link.wake.set()
        return True

    def _supersede(self, old: _Link) -> None:
        """The peer opened a new link: ``old`` stops carrying sends (its unsent
        frames are dropped, its write side half-closed) but is read to its
        end (see the module docs); its LinkLost comes after its last frame."""
        self.counters["link_superseded"] += 1
        if self.links.get(old.peer) is old:
            del self.links[old.peer]
        dropped = sum(len(q) for q in old.queues.values())
        if dropped:
            self.counters["link_drop_superseded"] += dropped
        old.queues.clear()
        old.queued_bytes = 0
        old.state = "draining"
        old.drain_deadline = trio.current_time() + drain_s(self.limits)
        old.wake.set()
        if old.read_scope is not None:  # a read already waiting gets the deadline too
            old.read_scope.deadline = old.drain_deadline

    def _finish(self, link: _Link) -> None:
        """Nothing more comes from ``link``; its end counts as delivered
        once the ends of the links before it are (then the next one reads)."""
        if link.after is not None and not link.after.is_set() and self._nursery is not None:
            self._nursery.start_soon(self._finish_after, link)
            return
        link.finished.set()
        if self._tail.get(link.peer) is link:
            del self._tail[link.peer]

    async def _finish_after(self, link: _Link) -> None:
        assert link.after is not None
        try:
            await link.after.wait()
        finally:
            link.finished.set()
            if self._tail.get(link.peer) is link:
                del self._tail[link.peer]

    def _fail(self, link: _Link, reason: str) -> None:
        """The link is broken: report it (once) and stop its tasks."""
        self.counters[f"link_lost_{reason}"] += 1
        self.log.log(
            f"link_lost_{reason}",
            LogLevel.DEBUG,
            "link lost",
            peer=link.peer.hex()[:8],
            reason=reason,
        )
        self._lost(link, reason)
        link.scope.cancel()

    def _lost(self, link: _Link, reason: str) -> None:
        link.state = "dead"
        self._all.discard(link)
        if self.links.get(link.peer) is link:
            del self.links[link.peer]
        if not link.reported:
            link.reported = True
            self._report(LinkLost(link.peer, link.mesh, link.id), link)

    def _report(self, item: Any, link: _Link | None = None) -> None:
        """Queue ``item``; ``link``: it is that link's LinkLost, which comes
        after what the links it superseded delivered, and ends it."""
        after = link.after if link is not None else None
        if after is not None and not after.is_set():
            if self._nursery is not None:
                self._nursery.start_soon(self._feed, item, link)
            return
        try:
            self.inputs.send_nowait(item)
        except trio.WouldBlock:
            # Never lose a LinkLost: the runner would believe a dead link up.
            if self._nursery is not None:
                self._nursery.start_soon(self._feed, item, link)
                return
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        if link is not None:
            self._finish(link)

    async def _feed(self, item: Any, link: _Link | None = None) -> None:
        try:
            if link is not None and link.after is not None:
                await link.after.wait()
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await self.inputs.send(item)
        finally:
            if link is not None:
                self._finish(link)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            while True:
                await trio.sleep(self.limits.reap_interval_s)
                self._reap()

    def _reap(self) -> None:
        now = trio.current_time()
        for link in list(self.links.values()):
            if (
                not link.mesh
                and link.state == "up"
                and not link.queued_bytes
                and now - link.last_used >= self.limits.idle_s
            ):
                self._retire(link, "link_idle_closed")

    def _hello(self, dst: NodeId, nonce: bytes) -> bytes:
        return self.sealer.seal(MAGIC + HELLO + self.node_id + dst + nonce)

    async def _outbound(self, link: _Link) -> None:
        assert link.addr is not None
        lim = self.limits
        with link.scope:
            conn: trio.SocketStream | None = None
            try:
                with trio.move_on_after(lim.connect_timeout_s):
                    try:
                        conn = await connect_tcp(link.addr)
                    except OSError:
                        conn = None
                        self._fail(link, "connect")
                        return
                if conn is None:
                    self._fail(link, "connect_timeout")
                    return
                link.conn = conn
                _enable_keepalive(conn)
                link.my_nonce = secrets.token_bytes(NONCE_BYTES)
                opener = Opener(self.keyring, max_senders=1, max_size=lim.max_frame)
                answer: bytes | None = None
                with trio.move_on_after(lim.handshake_timeout_s):
                    await conn.send_all(encode_frame(self._hello(link.peer, link.my_nonce)))
                    answer = await read_frame(conn, lim.max_frame)
                if answer is None:
                    self._fail(link, "handshake_timeout")
                    return
                sender, payload = opener.open(answer)
                n = len(MAGIC) + 1
                if (
                    sender != link.peer
                    or payload[:n] != MAGIC + ACK
                    or payload[n : n + ID_BYTES] != link.peer
                    or payload[n + ID_BYTES : n + ID_BYTES + NONCE_BYTES] != link.my_nonce
                    or len(payload) != n + ID_BYTES + 2 * NONCE_BYTES
                ):
                    self._fail(link, "bad_ack")
                    return
                link.peer_nonce = payload[n + ID_BYTES + NONCE_BYTES :]
                if link.state == "dead":
                    return  # closed meanwhile with nothing to write
                if link.state == "connecting":
                    link.state = "up"
                self.counters["link_up_out"] += 1
                await self._run_link(link, conn, opener)
            except (FrameError, SealError):
                self._fail(link, "refused")
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                self._fail(link, "reset")
            finally:
                self._ended(link)
                if conn is not None:
                    await trio.aclose_forcefully(conn)

    async def accept(self, conn: trio.SocketStream, sender: bytes, payload: bytes) -> None:
        """Serve an inbound link whose (already opened) hello is ``payload``;
        called by the TCP listener, returns when the link ends."""
        n = len(MAGIC) + 1
        if (
            payload[:n] != MAGIC + HELLO
            or len(payload) != n + 2 * ID_BYTES + NONCE_BYTES
            or payload[n : n + ID_BYTES] != sender
        ):
            self.counters["link_drop_bad_hello"] += 1
            return
        if payload[n + ID_BYTES : n + 2 * ID_BYTES] != self.node_id:
            self.counters["link_drop_not_me"] += 1
            return
        if sender == self.node_id:
            self.counters["link_drop_self"] += 1
            return
        peer_nonce = payload[n + 2 * ID_BYTES :]
        old = self.links.get(sender)
        crossing = old is not None and old.state == "connecting" and old.outbound
        if crossing and self.node_id < sender:
            self.counters["link_drop_crossing"] += 1  # ours wins; the peer drops its own
            return
        # The link this one replaces frees its slot (checked before anything
        # changes: a refused link leaves the old one as it was).
        freed = 1 if old is not None and old in self._all else 0
        if len(self._all) - freed >= self.limits.max_links:
            self.counters["link_drop_busy"] += 1
            return
        moved = None
        if crossing:
            assert old is not None
            # Theirs wins: our queued frames move over to it.
            moved = old
            self._close_quietly(old)
        elif old is not None:
            self._supersede(old)
        link = _Link(sender, None, False, next(self._ids), last_used=trio.current_time())
        if moved is not None:
            link.queues, link.queued_bytes, link.mesh = moved.queues, moved.queued_bytes, moved.mesh
            link.last_used, link.direct = moved.last_used, moved.direct
            link.id = moved.id  # it carries what was sent on the moved one
        self._chain(link)
        link.conn = conn
        link.peer_nonce = peer_nonce
        link.my_nonce = secrets.token_bytes(NONCE_BYTES)
        self.links[sender] = link
        self._all.add(link)
        opener = Opener(self.keyring, max_senders=1, max_size=self.limits.max_frame)
        _enable_keepalive(conn)
        with link.scope:
            try:
                ack = self.sealer.seal(MAGIC + ACK + self.node_id + peer_nonce + link.my_nonce)
                with trio.move_on_after(self.limits.write_timeout_s) as cs:
                    await conn.send_all(encode_frame(ack))
                if cs.cancelled_caught:
                    self._fail(link, "handshake_timeout")
                    return
                if link.state == "connecting":  # not superseded meanwhile
                    link.state = "up"
                self.counters["link_up_in"] += 1
                await self._run_link(link, conn, opener)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                self._fail(link, "reset")
            finally:
                self._ended(link)

    def _close_quietly(self, link: _Link) -> None:
        link.reported = True
        link.state = "dead"
        link.scope.cancel()
        self._all.discard(link)
        if self.links.get(link.peer) is link:
            del self.links[link.peer]
        self._finish(link)

    def _ended(self, link: _Link) -> None:
        """A link's task is over (whatever the way)."""
        self._all.discard(link)
        if not link.reported:  # cancelled from outside: no report will end it
            self._finish(link)

    async def _run_link(self, link: _Link, conn: trio.SocketStream, opener: Opener) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._writer, link, conn, nursery.cancel_scope)
            await self._reader(link, conn, opener)
            # EOF from the peer (or a bad frame, already reported): stop writing.
            nursery.cancel_scope.cancel()
        if link.state == "draining":  # superseded and read to its end
            self._fail(link, "superseded")

    async def _reader(self, link: _Link, conn: trio.SocketStream, opener: Opener) -> None:
        lim = self.limits
        if link.after is not None:
            # Per peer, links deliver in order: not before what the peer
            # sent on the link this one superseded.
            await link.after.wait()
        while True:
            frame: bytes | None = None
            with trio.CancelScope() as link.read_scope:
                if link.state == "draining":
                    link.read_scope.deadline = link.drain_deadline
                try:
                    frame = await read_frame(conn, lim.max_frame)
                except FrameError as e:
                    if link.state in ("closing", "draining"):
                        return  # closing: done; draining: read to its end
                    self._fail(link, "closed" if e.reason == "eof" else e.reason)
                    return
            link.read_scope = None
            if frame is None:  # superseded, and not at its end by its drain deadline
                self.counters["link_drain_timeout"] += 1
                return
            try:
                sender, payload = opener.open(frame)
            except SealError as e:
                self._fail(link, f"seal_{e.reason}")
                return
            if sender != link.peer or payload[:NONCE_BYTES] != link.my_nonce:
                self._fail(link, "bad_frame")
                return
            msgs = _split(payload, NONCE_BYTES)
            if msgs is None:
                self._fail(link, "bad_frame")
                return
            if link.state == "closing":
                continue  # we closed it: nobody reads a link it closed
            self.counters["link_frames_in"] += 1
            if any(self.is_mesh_message(m) for m in msgs):
                link.mesh = link.mesh_heard = True
            else:
                link.direct = True
                link.last_used = trio.current_time()
            try:
                await self.inputs.send(LinkMessages(link.peer, msgs))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return

    async def _writer(self, link: _Link, conn: trio.SocketStream, scope: trio.CancelScope) -> None:
        lim = self.limits
        while True:
            if link.state == "draining":
                # Superseded: nothing more goes out on it; the half-close lets
                # a peer that is closing it finish, and the reader drains it.
                with contextlib.suppress(
                    trio.BrokenResourceError, trio.ClosedResourceError, OSError
                ):
                    with trio.move_on_after(lim.write_timeout_s):
                        await conn.send_eof()
                return
            if not link.queued_bytes:
                if link.state == "closing":
                    # Flushed: half-close, and let the reader drain until the
                    # peer closes too (closing with unread data would reset
                    # the connection and could lose what we just wrote).
                    with contextlib.suppress(
                        trio.BrokenResourceError, trio.ClosedResourceError, OSError
                    ):
                        with trio.move_on_after(lim.write_timeout_s):
                            await conn.send_eof()
                    await trio.sleep(lim.write_timeout_s)
                    scope.cancel()
                    return
                link.wake = trio.Event()
                await link.wake.wait()
                continue
            parts = [link.peer_nonce]
            size = NONCE_BYTES
            for prio in sorted(link.queues):
                q = link.queues[prio]
                while q and (size < lim.batch_bytes or len(parts) == 1):
                    data = q.popleft()
                    parts.append(_REC.pack(len(data)))
                    parts.append(data)
                    size += len(data) + _REC.size
                if size >= lim.batch_bytes:
                    break
            link.queued_bytes = max(0, link.queued_bytes - (size - NONCE_BYTES))
            body = self.sealer.seal(b"".join(parts))
            if len(body) > lim.max_frame:
                self.counters["link_drop_frame_too_large"] += 1
                continue
            with trio.move_on_after(lim.write_timeout_s) as cs:
                try:
                    await conn.send_all(encode_frame(body))
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    if link.state not in ("closing", "draining"):
                        self._fail(link, "reset")
                    return
            if cs.cancelled_caught:
                if link.state != "draining":  # its reader still has the peer's last frames
                    self._fail(link, "write_timeout")
                return
            self.counters["link_frames_out"] += 1


def _split(payload: bytes, start: int) -> tuple[Message, ...] | None:
    """The records of a data frame, decoded; None if any is malformed."""
    out: list[Message] = []
    i, n = start, len(payload)
    if i >= n:
        return None
    while i < n:
        if i + _REC.size > n:
            return None
        (length,) = _REC.unpack_from(payload, i)
        i += _REC.size
        if length == 0 or i + length > n:
            return None
        try:
            out.append(codec.decode(payload[i : i + length]))
        except codec.DecodeError:
            return None
        i += length
    return tuple(out)
