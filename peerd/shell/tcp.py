"""Push-pull streams over TCP: one sealed request frame, one sealed reply frame.

A frame is a 4-byte big-endian length followed by that many sealed bytes.
The listener shares the UDP endpoint's host:port.

A first frame whose payload starts with 0xff is a peer link's hello
(:mod:`peerd.shell.links`), handed to ``on_link`` once it opened.

Incoming connections are untrusted until their first frame opens, so every
limit is enforced before any cryptography (:mod:`peerd.shell.preauth`): a cap
on concurrent connections and a smaller one per source address (extra ones
are closed at once), a small maximum for the first frame (checked on the
length prefix, before reading the body) whose bytes come out of one budget
shared by all unauthenticated connections, and a deadline for that frame (a
slow-loris peer holds a slot for at most ``hello_timeout_s``). A request too
large for that limit is preceded by a stream hello, after which its sender
is known and the full ``max_frame`` applies (within ``read_timeout_s``).

The runner owns the core and must never wait on a peer: it hands replies to
:meth:`TcpEndpoint.reply` and outgoing requests to
:meth:`TcpEndpoint.open_stream`, both synchronous; the waiting happens in
per-connection tasks here, which feed results back through the input channel.

Watch links (the core's :class:`WatchLinks`): an idle connection to a ring
neighbour whose only job is to be closed by the neighbour's kernel when its
process dies, which we report as :class:`LinkClosed` within a round trip. A
link starts like a stream, with one sealed frame, but its payload is empty
(a push-pull request never is): the listener then keeps the connection open
without a deadline, in a separate, capped pool, answers once with a sealed
empty frame (the ack: only an acked link counts as up) and writes nothing more.
A refused connect is reported the same way (nothing listens there any more).
While an address stays wanted, a closed link is retried with a backoff,
and reported again only after it had been re-established.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import ipaddress
import itertools
import socket
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

from peerd.core.events import (
    Input,
    LinkClosed,
    LogLevel,
    StreamFailed,
    StreamRequest,
    StreamResponse,
)
from peerd.shell.logs import LimitedLog
from peerd.shell.preauth import STREAM_HELLO, PreauthGate
from peerd.shell.refusals import peer_closed, seal_refused
from peerd.shell.udp import (
    BindError,
    Opener,
    Sealer,
    address_family,
    bind_error_message,
    normalize_addr,
    sockaddr_for,
)
from peerd.wire.messages import Addr
from peerd.wire.seal import SEALED_OVERHEAD, SealError

_LEN = struct.Struct(">I")


@dataclass(frozen=True, slots=True)
class TcpLimits:
    # Concurrent incoming connections; more are closed on accept (pre-auth DoS bound).
    max_connections: int = 64
    # Concurrent outgoing streams (the core bounds its own syncs; this is a backstop).
    max_outgoing: int = 16
    # Largest frame accepted or sent. A full push-pull of ~10k members fits.
    max_frame: int = 8 * 1024 * 1024
    # A request frame after a stream hello must arrive within this long.
    read_timeout_s: float = 10.0
    # Before authentication (peerd.shell.preauth): the first frame must
    # arrive this long after accept, and be at most preauth_max_frame bytes
    # long; all first frames being read share preauth_budget_bytes; one
    # source address holds at most max_preauth_per_source of the
    # max_connections slots until its first frame opened.
    hello_timeout_s: float = 3.0
    preauth_max_frame: int = 4096
    preauth_budget_bytes: int = 256 * 1024
    max_preauth_per_source: int = 8
    # The core must answer a request within this long, or the connection is closed.
    reply_timeout_s: float = 10.0
    # Sending a reply frame, and connecting out.
    write_timeout_s: float = 10.0
    connect_timeout_s: float = 5.0
    # Outgoing: from connected to reply frame fully read.
    response_timeout_s: float = 15.0
    # Incoming watch links held open at once (each peer keeps a few to us).
    max_watch_links: int = 256
    # Retry a wanted watch link that closed or failed: first delay, doubling to the max.
    link_retry_s: float = 1.0
    link_retry_max_s: float = 30.0


class FrameError(Exception):
    """A frame could not be read; ``reason`` is a counter label."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def encode_frame(body: bytes) -> bytes:
    return _LEN.pack(len(body)) + body


async def _receive_exactly(stream: trio.abc.ReceiveStream, n: int, buf: bytearray) -> bytes:
    while len(buf) < n:
        chunk = await stream.receive_some(min(n - len(buf), 65536))
        if not chunk:
            raise FrameError("eof")
        buf += chunk
    out = bytes(buf[:n])
    del buf[:n]
    return out


async def read_frame(
    stream: trio.abc.ReceiveStream, max_frame: int, *, budget: PreauthGate | None = None
) -> bytes:
    """Read one frame; the size limit is checked on the prefix, before the body.
    ``budget``: the body's announced length is reserved from it first (and
    given back once read), refused with ``preauth_budget`` if not left."""
    buf = bytearray()
    try:
        (length,) = _LEN.unpack(await _receive_exactly(stream, _LEN.size, buf))
        if length > max_frame:
            raise FrameError("frame_too_large")
        if length == 0:
            raise FrameError("empty_frame")
        if budget is None:
            return await _receive_exactly(stream, length, buf)
        if not budget.reserve(length):
            raise FrameError("preauth_budget")
        try:
            return await _receive_exactly(stream, length, buf)
        finally:
            budget.release(length)
    except trio.BrokenResourceError:
        raise FrameError("reset") from None


def open_tcp_listener(addr: Addr) -> socket.socket:
    """Listen on ``addr`` (the port the UDP socket already holds). Plain
    socket, so that start-up can fail before the trio loop runs; wrap it in
    ``trio.SocketListener(trio.socket.from_stdlib_socket(sock))``."""
    host, port = addr
    family = address_family(host)
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        # On TCP (unlike UDP) SO_REUSEADDR only skips TIME_WAIT after a restart;
        # a live listener on the port still makes bind fail.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6 and ipaddress.ip_address(host).is_unspecified:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind((host, port) if family == socket.AF_INET else (host, port, 0, 0))
        sock.listen(128)
    except OSError as e:
        sock.close()
        raise BindError(bind_error_message("TCP", addr, e), e.errno == errno.EADDRINUSE) from e
    return sock


@dataclass(slots=True)
class _Pending:
    done: trio.Event
    data: bytes | None = None


class TcpEndpoint:
    """Serves incoming streams and runs outgoing ones; see the module docstring.

    Counters: ``tcp_in``/``tcp_out`` (completed), ``tcp_drop_<reason>`` for
    rejected incoming connections, ``tcp_fail_<reason>`` for failed outgoing ones.
    """

    def __init__(
        self,
        listener: trio.SocketListener | None,
        *,
        sealer: Sealer,
        opener: Opener,
        inputs: trio.MemorySendChannel[Input],
        counters: collections.Counter[str],
        log: LimitedLog,
        limits: TcpLimits | None = None,
    ) -> None:
        self.listener = listener
        self.sealer = sealer
        self.opener = opener
        self.inputs = inputs
        self.counters = counters
        self.log = log
        self.limits = limits if limits is not None else TcpLimits()
        self.preauth = PreauthGate(
            self.limits.max_preauth_per_source, self.limits.preauth_budget_bytes
        )
        self.active_in = 0
        self.active_out = 0
        self.links_in = 0
        # Outgoing watch links: address -> the cancel scope of its task.
        self._links: dict[Addr, trio.CancelScope] = {}
        self._pending: dict[int, _Pending] = {}
        self._ids = itertools.count(1)
        self._nursery: trio.Nursery | None = None
        # Serves an authenticated peer-link hello (the LinkManager's accept).
        self.on_link: Callable[[trio.SocketStream, bytes, bytes], Awaitable[None]] | None = None

    @property
    def local_addr(self) -> Addr | None:
        if self.listener is None:
            return None
        return normalize_addr(self.listener.socket.getsockname())

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Accept forever and host the per-connection tasks (until cancelled)."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            if self.listener is not None:
                await self._accept_loop(nursery, self.listener)
            else:
                await trio.sleep_forever()

    # --- incoming -------------------------------------------------------------

    async def _accept_loop(self, nursery: trio.Nursery, listener: trio.SocketListener) -> None:
        while True:
            try:
                conn = await listener.accept()
            except OSError as e:
                # EMFILE and friends: back off instead of spinning or dying.
                name = errno.errorcode.get(e.errno or 0, "error").lower()
                self._drop(
                    f"accept_{name}", f"accept failed: {e.strerror or e}", level=LogLevel.WARNING
                )
                await trio.sleep(0.1)
                continue
            src = _peer(conn)
            if not self.preauth.enter(src[0]):
                self._drop(
                    "per_source_cap",
                    "too many unauthenticated connections from one address",
                    addr=src,
                    level=LogLevel.WARNING,
                )
                await trio.aclose_forcefully(conn)
                continue
            if self.active_in >= self.limits.max_connections:
                self.preauth.leave(src[0])
                self._drop("busy", "too many connections", addr=src, level=LogLevel.WARNING)
                await trio.aclose_forcefully(conn)
                continue
            self.active_in += 1
            nursery.start_soon(self._serve, conn, src)

    async def _first_frame(self, conn: trio.SocketStream, src: Addr) -> tuple[bytes, bytes] | None:
        """The first frame, read under the pre-authentication bounds and
        opened; None (counted) if it is refused."""
        lim = self.limits
        frame: bytes | None = None
        with trio.move_on_after(lim.hello_timeout_s):
            try:
                frame = await read_frame(
                    conn, min(lim.preauth_max_frame, lim.max_frame), budget=self.preauth
                )
            except FrameError as e:
                if e.reason == "frame_too_large":
                    self._drop(
                        "preauth_oversize",
                        "first frame over the pre-authentication limit",
                        addr=src,
                        level=LogLevel.WARNING,
                    )
                elif e.reason == "preauth_budget":
                    self._drop(
                        "preauth_budget",
                        "pre-authentication budget spent",
                        addr=src,
                        level=LogLevel.WARNING,
                    )
                else:
                    self._drop(e.reason, "bad request frame", addr=src)
                return None
        if frame is None:
            self._drop(
                "preauth_timeout", "first frame not received in time", addr=src, level=LogLevel.INFO
            )
            return None
        return self._open(frame, src)

    async def _after_hello(self, conn: trio.SocketStream, src: Addr, sender: bytes) -> bytes | None:
        """The request that follows a stream hello (full frame size); None
        (counted) unless it is a request from the hello's sender."""
        frame: bytes | None = None
        with trio.move_on_after(self.limits.read_timeout_s):
            try:
                frame = await read_frame(conn, self.limits.max_frame)
            except FrameError as e:
                self._drop(e.reason, "bad request frame", addr=src)
                return None
        if frame is None:
            self._drop("timeout", "request not received in time", addr=src)
            return None
        opened = self._open(frame, src)
        if opened is None:
            return None
        second, payload = opened
        if second != sender or not payload or payload[:1] == b"\xff":
            self._drop(
                "bad_stream_hello",
                "a stream hello not followed by a request of its sender",
                addr=src,
                level=LogLevel.WARNING,
            )
            return None
        return payload

    def _open(self, frame: bytes, src: Addr) -> tuple[bytes, bytes] | None:
        try:
            return self.opener.open(frame)
        except SealError as e:
            seal_refused(self._drop, "stream", e, self.counters, src)
            return None

    async def _serve(self, conn: trio.SocketStream, src: Addr) -> None:
        stream_id: int | None = None
        unauthenticated = True  # holds a slot of src in self.preauth
        try:
            opened = await self._first_frame(conn, src)
            if opened is None:
                return
            self.preauth.leave(src[0])
            unauthenticated = False
            sender, payload = opened
            if payload == STREAM_HELLO:
                request = await self._after_hello(conn, src, sender)
                if request is None:
                    return
                payload = request
            if not payload:
                await self._hold_link(conn, src)
                return
            if payload[:1] == b"\xff":  # a peer link's hello (peerd.shell.links.MAGIC)
                if self.on_link is None:
                    self._drop("no_links", "peer link but no link manager", addr=src)
                    return
                # Authenticated: leave the pre-auth pool (the link manager caps links).
                self.active_in -= 1
                try:
                    await self.on_link(conn, sender, payload)
                finally:
                    self.active_in += 1
                return
            stream_id = next(self._ids)
            pending = _Pending(trio.Event())
            self._pending[stream_id] = pending
            with trio.move_on_after(self.limits.reply_timeout_s) as cs:
                await self.inputs.send(StreamRequest(stream_id, src, payload))
                await pending.done.wait()
            if cs.cancelled_caught:
                self._drop("no_reply", "no reply from the core in time", addr=src)
                return
            if pending.data is not None:
                body = self.sealer.seal(pending.data)
                if len(body) > self.limits.max_frame:
                    self._drop("reply_too_large", "reply frame over the limit", addr=src)
                    return
                with trio.move_on_after(self.limits.write_timeout_s) as cs:
                    try:
                        await conn.send_all(encode_frame(body))
                    except trio.BrokenResourceError:
                        self._drop("reset", "peer went away before the reply", addr=src)
                        return
                if cs.cancelled_caught:
                    self._drop("write_timeout", "reply not sent in time", addr=src)
                    return
            self.counters["tcp_in"] += 1
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            self.counters["tcp_drop_closed"] += 1
        finally:
            if unauthenticated:
                self.preauth.leave(src[0])
            if stream_id is not None:
                self._pending.pop(stream_id, None)
            self.active_in -= 1
            await trio.aclose_forcefully(conn)

    async def _hold_link(self, conn: trio.SocketStream, src: Addr) -> None:
        """Keep an incoming watch link open until the watcher closes it."""
        if self.links_in >= self.limits.max_watch_links:
            self._drop("links_busy", "too many watch links", addr=src)
            return
        # Move from the pre-auth pool to the link pool: links are long-lived.
        self.active_in -= 1
        self.links_in += 1
        _enable_keepalive(conn)
        try:
            with trio.move_on_after(self.limits.write_timeout_s) as cs:
                await conn.send_all(encode_frame(self.sealer.seal(b"")))  # the ack
            if cs.cancelled_caught:
                return
            self.counters["tcp_links_accepted"] += 1
            while True:
                data = await conn.receive_some(4096)
                if not data:
                    return
                # A watch link carries nothing; bytes mean a confused or hostile peer.
                self._drop("link_data", "data on a watch link", addr=src)
                return
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return
        finally:
            self.links_in -= 1
            self.active_in += 1  # _serve's finally gives the slot back

    def reply(self, stream: int, data: bytes | None) -> None:
        """The core's :class:`StreamReply`; unknown (timed out) streams are ignored."""
        pending = self._pending.get(stream)
        if pending is None:
            self.counters["tcp_drop_late_reply"] += 1
            return
        pending.data = data
        pending.done.set()

    # --- outgoing -------------------------------------------------------------

    def open_stream(self, stream: int, dst: Addr, data: bytes) -> None:
        """The core's :class:`OpenStream`; the outcome comes back as an input."""
        if self._nursery is None:
            raise RuntimeError("TcpEndpoint.run() has not started")
        if self.active_out >= self.limits.max_outgoing:
            self.counters["tcp_fail_busy"] += 1
            self._nursery.start_soon(self._feed, StreamFailed(stream, "busy"))
            return
        self.active_out += 1
        self._nursery.start_soon(self._client, stream, dst, data)

    async def _client(self, stream: int, dst: Addr, data: bytes) -> None:
        try:
            result = await self._exchange(stream, dst, data)
        finally:
            self.active_out -= 1
        if isinstance(result, StreamFailed):
            self.counters[f"tcp_fail_{result.reason}"] += 1
            eof = result.reason == "eof"  # closed after our request: no key of theirs?
            self.log.log(
                f"tcp_fail_{result.reason}",
                LogLevel.WARNING if eof else LogLevel.DEBUG,
                f"tcp stream failed: {peer_closed(self.counters)}" if eof else "tcp stream failed",
                addr=dst,
                reason=result.reason,
            )
        else:
            self.counters["tcp_out"] += 1
        await self._feed(result)

    async def request(self, dst: Addr, data: bytes) -> bytes | str:
        """One request/reply exchange for the shell itself (``peerd keys
        --cluster``), on the same sealed stream transport as push-pull: the
        reply's payload, or the failure reason."""
        if self.active_out >= self.limits.max_outgoing:
            self.counters["tcp_fail_busy"] += 1
            return "busy"
        self.active_out += 1
        try:
            result = await self._exchange(0, dst, data)
        finally:
            self.active_out -= 1
        if isinstance(result, StreamFailed):
            self.counters[f"tcp_fail_{result.reason}"] += 1
            return result.reason
        self.counters["tcp_out"] += 1
        assert isinstance(result, StreamResponse)
        return result.data

    async def _exchange(self, stream: int, dst: Addr, data: bytes) -> Input:
        # Too large a first frame for the listener's pre-authentication
        # limit: a stream hello goes first, in the same write.
        hello = b""
        if len(data) + SEALED_OVERHEAD > self.limits.preauth_max_frame:
            hello = encode_frame(self.sealer.seal(STREAM_HELLO))
        body = self.sealer.seal(data)
        if len(body) > self.limits.max_frame:
            return StreamFailed(stream, "request_too_large")
        conn: trio.SocketStream | None = None
        try:
            with trio.move_on_after(self.limits.connect_timeout_s):
                try:
                    conn = await connect_tcp(dst)
                except OSError as e:
                    if isinstance(e, ConnectionRefusedError):
                        return StreamFailed(stream, "refused")
                    name = errno.errorcode.get(e.errno or 0, "error").lower()
                    return StreamFailed(stream, f"connect_{name}")
            if conn is None:
                return StreamFailed(stream, "connect_timeout")
            reply: bytes | None = None
            with trio.move_on_after(self.limits.response_timeout_s):
                try:
                    await conn.send_all(hello + encode_frame(body))
                    reply = await read_frame(conn, self.limits.max_frame)
                except FrameError as e:
                    return StreamFailed(stream, e.reason)
                except (trio.BrokenResourceError, OSError):
                    return StreamFailed(stream, "reset")
            if reply is None:
                return StreamFailed(stream, "timeout")
            try:
                _sender, payload = self.opener.open(reply)
            except SealError as e:
                return StreamFailed(stream, f"seal_{getattr(e, 'reason', '') or 'seal'}")
            return StreamResponse(stream, payload)
        finally:
            if conn is not None:
                await trio.aclose_forcefully(conn)

    # --- watch links --------------------------------------------------------------

    def set_watch_links(self, addrs: tuple[Addr, ...]) -> None:
        """The core's :class:`WatchLinks`: open links to ``addrs``, close the others."""
        if self._nursery is None:
            raise RuntimeError("TcpEndpoint.run() has not started")
        wanted = set(addrs)
        for addr in list(self._links):
            if addr not in wanted:
                self._links.pop(addr).cancel()
        for addr in addrs:
            if addr not in self._links:
                scope = trio.CancelScope()
                self._links[addr] = scope
                self._nursery.start_soon(self._link, addr, scope)

    @property
    def watch_links(self) -> tuple[Addr, ...]:
        return tuple(self._links)

    async def _link(self, addr: Addr, scope: trio.CancelScope) -> None:
        delay = self.limits.link_retry_s
        reported = False  # LinkClosed already sent for the current outage
        with scope:
            while True:
                outcome = await self._link_once(addr)
                if outcome == "closed" or (outcome == "refused" and not reported):
                    reported = True
                    self.counters[f"tcp_link_{outcome}"] += 1
                    self.log.log(
                        "tcp_link_closed",
                        LogLevel.DEBUG,
                        "tcp watch link lost",
                        addr=addr,
                        how=outcome,
                    )
                    await self._feed(LinkClosed(addr))
                if outcome == "closed":
                    delay = self.limits.link_retry_s
                elif outcome == "failed":
                    self.counters["tcp_link_failed"] += 1
                await trio.sleep(delay)
                delay = min(delay * 2, self.limits.link_retry_max_s)

    async def _link_once(self, addr: Addr) -> str:
        """One link's life: "closed" (was up, then closed), "refused" or "failed".

        Only a link the peer accepted (its ack frame arrived) can be "closed",
        so a peer that turns links away (at its cap) raises no false alarm.
        """
        conn: trio.SocketStream | None = None
        try:
            with trio.move_on_after(self.limits.connect_timeout_s):
                try:
                    conn = await connect_tcp(addr)
                except ConnectionRefusedError:
                    return "refused"
                except OSError:
                    return "failed"
            if conn is None:
                return "failed"
            _enable_keepalive(conn)
            acked = False
            try:
                with trio.move_on_after(self.limits.response_timeout_s):
                    await conn.send_all(encode_frame(self.sealer.seal(b"")))
                    _sender, payload = self.opener.open(
                        await read_frame(conn, self.limits.max_frame)
                    )
                    acked = payload == b""
                if not acked:
                    return "failed"
                self.counters["tcp_link_up"] += 1
                while await conn.receive_some(4096):
                    pass  # the peer writes nothing after the ack; ignore it if it does
            except (FrameError, SealError):
                return "failed"
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                if not acked:
                    return "failed"
            return "closed"
        finally:
            if conn is not None:
                await trio.aclose_forcefully(conn)

    async def _feed(self, inp: Input) -> None:
        with contextlib.suppress(trio.ClosedResourceError, trio.BrokenResourceError):
            await self.inputs.send(inp)

    def _drop(
        self, kind: str, message: str, *, level: LogLevel = LogLevel.DEBUG, **fields: object
    ) -> None:
        key = f"tcp_drop_{kind}"
        self.counters[key] += 1
        self.log.log(key, level, f"tcp {message}", **fields)


async def connect_tcp(addr: Addr) -> trio.SocketStream:
    """Connect to an IP literal; the OS error comes through as is (unlike
    ``trio.open_tcp_stream``, which wraps it), so a refusal is recognisable."""
    family = address_family(addr[0])
    sock = trio.socket.socket(family, socket.SOCK_STREAM)
    target = sockaddr_for(addr[0], addr[1], family)
    try:
        await sock.connect(target if target is not None else addr)
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)


def _enable_keepalive(conn: trio.SocketStream) -> None:
    """Find dead peers of idle links in about a minute rather than hours."""
    options = [(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)]
    for name, value in (("TCP_KEEPIDLE", 30), ("TCP_KEEPINTVL", 10), ("TCP_KEEPCNT", 3)):
        if hasattr(socket, name):
            options.append((socket.IPPROTO_TCP, getattr(socket, name), value))
    for level, opt, value in options:
        with contextlib.suppress(OSError):
            conn.setsockopt(level, opt, value)


def _peer(conn: trio.SocketStream) -> Addr:
    try:
        return normalize_addr(conn.socket.getpeername())
    except OSError:
        return ("0.0.0.0", 0)
