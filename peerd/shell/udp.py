"""The UDP endpoint: sealed datagrams in and out, plus closed-port hints.

Why a raw non-blocking socket instead of trio's socket wrapper: with
``IP_RECVERR`` the kernel queues an ICMP port-unreachable for a datagram we
sent on the socket's error queue and reports it on the next ``recvfrom`` or
``sendto`` as ``ConnectionRefusedError``. Reading that queue needs
``recvmsg(..., MSG_ERRQUEUE)``, which must not wait for readability (trio's
wrapper would), and its 4th element is the destination of the datagram that
bounced: that becomes the core input :class:`Unreachable`. Without
``IP_RECVERR`` Linux drops these errors for unconnected sockets.

Sending never awaits: a full socket buffer drops the datagram (counted), as
the network would, so the runner task that owns the core never blocks on I/O.

No ``SO_REUSEADDR``/``SO_REUSEPORT``: a second daemon on the same port must
fail at once, not silently share (and steal) half the traffic.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import ipaddress
import os
import socket
import struct
from collections.abc import Iterator, Mapping
from typing import Protocol

import trio

from peerd.core.events import Input, LogLevel, PacketIn, Unreachable
from peerd.shell.logs import LimitedLog, format_addr
from peerd.shell.refusals import seal_refused
from peerd.wire.messages import Addr
from peerd.wire.seal import SealError

SOL_IP = getattr(socket, "SOL_IP", 0)
IP_RECVERR = getattr(socket, "IP_RECVERR", 11)
SOL_IPV6 = getattr(socket, "SOL_IPV6", 41)
IPV6_RECVERR = getattr(socket, "IPV6_RECVERR", 25)
MSG_ERRQUEUE = getattr(socket, "MSG_ERRQUEUE", 0x2000)

# struct sock_extended_err { u32 ee_errno; u8 origin, type, code, pad; u32 info, data; }
_EXT_ERR = struct.Struct("=IBBBBII")
# Datagrams read per wakeup before yielding to other tasks.
_RECV_BATCH = 64
_ERRQUEUE_BATCH = 64


class Sealer(Protocol):
    def seal(self, payload: bytes) -> bytes: ...


class Opener(Protocol):
    def open(self, data: bytes) -> tuple[bytes, bytes]: ...


class BindError(Exception):
    """Binding failed (address in use, not local, permission): fatal at start.
    ``in_use``: the port was taken (EADDRINUSE)."""

    def __init__(self, message: str, in_use: bool = False) -> None:
        super().__init__(message)
        self.in_use = in_use


def address_family(host: str) -> socket.AddressFamily:
    ip = ipaddress.ip_address(host.split("%", 1)[0])
    return socket.AF_INET6 if ip.version == 6 else socket.AF_INET


def sockaddr_for(host: str, port: int, family: socket.AddressFamily) -> tuple[object, ...] | None:
    """The sockaddr to hand the kernel for ``(host, port)`` on a socket of
    ``family``; IPv4 peers of a dual-stack IPv6 socket become ::ffff:a.b.c.d.
    None when the family cannot reach it."""
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    if family == socket.AF_INET:
        return (host, port) if ip.version == 4 else None
    if ip.version == 4:
        return (f"::ffff:{host}", port, 0, 0)
    return (host, port, 0, 0)


def normalize_addr(sockaddr: tuple[object, ...]) -> Addr:
    """A kernel address as the core's ``(ip_literal, port)``; IPv4-mapped IPv6
    addresses (from a dual-stack socket) become plain IPv4, as peers gossip them."""
    host, port = str(sockaddr[0]), int(sockaddr[1])  # type: ignore[call-overload]
    if ":" in host:
        try:
            ip = ipaddress.IPv6Address(host.split("%", 1)[0])
        except ValueError:
            return host, port
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped), port
    return host, port


def enable_recverr(sock: socket.socket) -> bool:
    """Ask the kernel to report ICMP errors for unconnected sends (Linux only)."""
    ok = False
    levels = [(SOL_IP, IP_RECVERR)]
    if sock.family == socket.AF_INET6:
        levels.insert(0, (SOL_IPV6, IPV6_RECVERR))
    for level, opt in levels:
        try:
            sock.setsockopt(level, opt, 1)
            ok = True
        except OSError:
            # IP_RECVERR on a v6-only socket or a non-Linux kernel: the hint is optional.
            pass
    return ok


def open_udp_socket(addr: Addr) -> socket.socket:
    """Bind a non-blocking UDP socket to ``addr`` (no address reuse)."""
    host, port = addr
    family = address_family(host)
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        if family == socket.AF_INET6 and ipaddress.ip_address(host).is_unspecified:
            # "::" serves IPv4 peers too (as ::ffff:a.b.c.d), like most daemons.
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(sockaddr_for(host, port, family) or (host, port))
        sock.setblocking(False)
        enable_recverr(sock)
    except OSError as e:
        sock.close()
        raise BindError(bind_error_message("UDP", addr, e), e.errno == errno.EADDRINUSE) from e
    return sock


def bind_error_message(proto: str, addr: Addr, e: OSError) -> str:
    where = format_addr(addr)
    if e.errno == errno.EADDRINUSE:
        return f"cannot bind {proto} {where}: address already in use (another peerd running?)"
    if e.errno == errno.EADDRNOTAVAIL:
        return f"cannot bind {proto} {where}: address not available on this host"
    if e.errno == errno.EACCES:
        return f"cannot bind {proto} {where}: permission denied"
    return f"cannot bind {proto} {where}: {e.strerror or e}"


class UdpEndpoint:
    """One bound UDP socket feeding the runner's input channel.

    ``counters`` is shared with the runner (exposed by the API ``status``):
    ``udp_rx``/``udp_tx`` and ``udp_drop_<reason>``.
    """

    def __init__(
        self,
        sock: socket.socket,
        *,
        sealer: Sealer,
        opener: Opener,
        inputs: trio.MemorySendChannel[Input],
        counters: collections.Counter[str],
        log: LimitedLog,
        max_datagram: int = 65507,
    ) -> None:
        self.sock = sock
        self.sealer = sealer
        self.opener = opener
        self.inputs = inputs
        self.counters = counters
        self.log = log
        self.max_datagram = max_datagram
        self.family = socket.AddressFamily(sock.family)

    @property
    def local_addr(self) -> Addr:
        return normalize_addr(self.sock.getsockname())

    def close(self) -> None:
        trio.lowlevel.notify_closing(self.sock)
        self.sock.close()

    # --- sending --------------------------------------------------------------

    def send(self, dst: Addr, payload: bytes) -> None:
        """Seal and send one datagram now; failures are counted, never raised."""
        target = sockaddr_for(dst[0], dst[1], self.family)
        if target is None:
            self._drop("send_family", f"cannot reach {format_addr(dst)} from this socket", addr=dst)
            return
        data = self.sealer.seal(payload)
        for _ in range(2):
            try:
                self.sock.sendto(data, target)
            except ConnectionRefusedError:
                # The refusal belongs to an earlier datagram (reported on this
                # call, which then sent nothing): collect it and try once more.
                self._drain_errors()
                continue
            except BlockingIOError:
                self._drop("send_backlog", "socket send buffer full", addr=dst)
                return
            except OSError as e:
                name = errno.errorcode.get(e.errno or 0, "error").lower()
                self._drop(f"send_{name}", f"send failed: {e.strerror or e}", addr=dst)
                return
            self.counters["udp_tx"] += 1
            return
        self._drop("send_refused", "send refused twice", addr=dst)

    # --- receiving ------------------------------------------------------------

    async def run(self) -> None:
        """Receive forever (until cancelled)."""
        while True:
            await trio.lowlevel.wait_readable(self.sock)
            self.receive_ready()

    def receive_ready(self) -> None:
        """Read what is queued now (bounded), then return to let others run."""
        for _ in range(_RECV_BATCH):
            try:
                data, sockaddr = self.sock.recvfrom(self.max_datagram + 1)
            except BlockingIOError:
                # Woken by an error-queue entry (EPOLLERR) with nothing to read.
                self._drain_errors()
                return
            except OSError:
                # ConnectionRefusedError and friends: an ICMP error for a
                # datagram we sent; the details are on the error queue.
                self._drain_errors()
                continue
            self._datagram(data, sockaddr)

    def _datagram(self, data: bytes, sockaddr: tuple[object, ...]) -> None:
        src = normalize_addr(sockaddr)
        if len(data) > self.max_datagram:
            self._drop("oversize", "datagram too large", addr=src, size=len(data))
            return
        try:
            _sender, payload = self.opener.open(data)
        except SealError as e:
            seal_refused(self._drop, "datagram", e, self.counters, src)
            return
        self.counters["udp_rx"] += 1
        self._feed(PacketIn(src, payload))

    def _drain_errors(self) -> None:
        """Turn queued ICMP errors into inputs; port unreachable -> Unreachable."""
        for _ in range(_ERRQUEUE_BATCH):
            try:
                _data, ancdata, _flags, sockaddr = self.sock.recvmsg(1, 1024, MSG_ERRQUEUE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            code = _extended_errno(ancdata)
            if code == errno.ECONNREFUSED and sockaddr:
                self.counters["udp_unreachable"] += 1
                self._feed(Unreachable(normalize_addr(sockaddr)))
            else:
                name = errno.errorcode.get(code or 0, "unknown").lower()
                self.counters[f"udp_icmp_{name}"] += 1

    def _feed(self, inp: Input) -> None:
        try:
            self.inputs.send_nowait(inp)
        except trio.WouldBlock:
            # The core is behind: shed load here rather than queue without bound.
            self._drop("backlog", "input queue full")
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            self.counters["udp_drop_closed"] += 1

    def _drop(
        self, kind: str, message: str, *, level: LogLevel = LogLevel.DEBUG, **fields: object
    ) -> None:
        key = f"udp_drop_{kind}"
        self.counters[key] += 1
        self.log.log(key, level, f"udp {message}", **fields)


def _extended_errno(ancdata: list[tuple[int, int, bytes]]) -> int | None:
    for level, kind, payload in ancdata:
        if (level, kind) in ((SOL_IP, IP_RECVERR), (SOL_IPV6, IPV6_RECVERR)) and (
            len(payload) >= _EXT_ERR.size
        ):
            return int(_EXT_ERR.unpack_from(payload)[0])
    return None


def kernel_drops(sock: socket.socket, proc_net: str = "/proc/net") -> int | None:
    """Datagrams the kernel dropped for ``sock`` because its receive buffer
    was full (the daemon did not read fast enough: a flood, or a stalled
    loop), from the ``drops`` column of /proc/net/udp or udp6 (the socket's
    own network namespace, as seen from this process); None where there is
    no such table. The count is the kernel's since the socket was opened.
    Read when the metrics are, not per datagram."""
    try:
        inode = str(os.fstat(sock.fileno()).st_ino)
    except OSError:
        return None
    for table in ("udp", "udp6"):
        try:
            with open(f"{proc_net}/{table}", encoding="ascii", errors="replace") as f:
                lines = f.read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) >= 13 and fields[9] == inode:
                with contextlib.suppress(ValueError):
                    return int(fields[12])
    return None


class KernelDrops(Mapping[str, int]):
    """``{"rcvbuf": n}``: :func:`kernel_drops` of a socket, as a counter
    source (the runner's ``counter_sources["udp_drop"]`` makes it
    ``udp_drop_rcvbuf``, shown as ``peerd_drops_total{layer="udp",
    reason="rcvbuf"}``)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def _now(self) -> dict[str, int]:
        n = kernel_drops(self.sock)
        return {} if n is None else {"rcvbuf": n}

    def __getitem__(self, key: str) -> int:
        return self._now()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._now())

    def __len__(self) -> int:
        return len(self._now())
