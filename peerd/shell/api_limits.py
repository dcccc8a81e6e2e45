"""What one local client may cost the daemon: the API socket's resource bounds.

Every process that can open the API socket shares one daemon, so whatever a
client can hold (a connection slot, a half-received frame, answers it does
not read, messages waiting in its mailbox) must have a bound that does not
depend on the client behaving. The rules follow systems that have met the
same problem:

* **Slots per user, with a reserve for the administrator.** Like the kernel's
  per-user process limit (``RLIMIT_NPROC``) and the blocks ext4 keeps for
  root, a connection is admitted only while its uid (the kernel's
  SO_PEERCRED, which a client cannot forge) holds fewer than
  ``max_connections_per_uid``, and the last ``reserved_connections`` of the
  global ``max_connections`` are kept for root and the daemon's own user.
  One user filling its share therefore locks out neither the other users
  nor ``peerd status`` run by the operator. Root and the daemon's user are
  not held to the per-uid share: they can stop the daemon anyway.
* **Timeouts that only count the client's silence.** Like nginx's
  ``client_body_timeout`` and ``keepalive_timeout``, a frame once started
  must be finished within ``read_timeout_s`` of time spent waiting for the
  client (time the server itself paused reading, at the in-flight limit,
  does not count), and a connection that sends nothing for
  ``idle_timeout_s`` is closed while slots are scarce (its user holds half
  its share, or the daemon half its connections: an idle hoard gives its
  slots back, a lone quiet client keeps its connection), and only if it
  holds nothing: a connection
  with a request in flight, an open watch, registry entries (or messages it
  sent, whose replies must find it) or mail waiting is never idle. Such a
  client may sit silent for days; the kernel tells us when its process
  exits (end of file), so it needs no keepalive. What bounds those is the
  per-uid share.
* **Output buffers bounded in bytes**, like Redis's
  ``client-output-buffer-limit``: answers and watch events wait for room in
  a per-connection queue of ``queue_bytes`` (the writer, and only one frame
  over when the queue is empty). A producer that finds it full waits (a
  request handler, so the reader stops at the in-flight limit and the kernel
  pushes back on the client); an event nobody can wait for (a connection
  event such as a registry conflict) is refused and counted; a watch whose
  backend channel fills meanwhile is ended with a "too slow" notice.
* **One budget for all mailboxes**, on top of each connection's bound, in
  bytes of encoded frames (what they cost): a message past it is refused
  ``mailbox_full`` instead of taking more memory, whichever connection it
  was for.

Every refusal is counted under ``refused.<reason>`` (``peerd metrics``:
``peerd_api_refusals_total{reason}``) and logged, rate limited per reason.
"""

from __future__ import annotations

import collections
import logging
import os
from dataclasses import dataclass

import trio

from peerd.api.protocol import ErrorCode
from peerd.shell.logs import RateLimiter

log = logging.getLogger("peerd.api")

MIB = 1024 * 1024
DEFAULT_MAX_CONNECTIONS = 256
DEFAULT_QUEUE_BYTES = 4 * MIB


@dataclass(frozen=True, slots=True)
class ApiLimits:
    """The ``[api]`` settings (peerd.shell.settings); bounds in :data:`API_BOUNDS`."""

    # Connections at once, from everyone. More: more file descriptors and
    # tasks; fewer: busy hosts with many client processes are refused.
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    # Connections one uid may hold (root and the daemon's own user excepted).
    # Below max_connections - reserved_connections, so one user cannot take
    # every slot; high enough for the many processes of one service user.
    max_connections_per_uid: int = 64
    # The last slots of max_connections: only root and the daemon's user get
    # them, so `peerd status` answers while other users hold their share.
    reserved_connections: int = 16
    # A connection that holds nothing (see the module docstring) and sends
    # nothing this long is closed. Shorter frees idle slots sooner; a client
    # that keeps a bare connection for rare calls must then reconnect.
    idle_timeout_s: float = 300.0
    # A frame once started must be complete within this much time waiting
    # for the client, else the connection is closed (a stalled sender holds
    # up to one frame of memory, 1 MiB, that long).
    read_timeout_s: float = 10.0
    # Bytes of answers and events waiting for a client that does not read,
    # per connection (messages to names wait apart, in its mailbox).
    queue_bytes: int = DEFAULT_QUEUE_BYTES


# Accepted range of each [api] setting, inclusive (documented in
# systemd/peerd.toml and the README).
API_BOUNDS: dict[str, tuple[float, float]] = {
    "max_connections": (8, 65_536),
    "max_connections_per_uid": (1, 65_536),
    "reserved_connections": (1, 1_024),
    "idle_timeout_s": (1.0, 86_400.0),
    "read_timeout_s": (0.1, 3_600.0),
    "queue_bytes": (64 * 1024, 1024 * MIB),
}

# [messages] mailbox_total_bytes: all mailboxes of the daemon together.
DEFAULT_MAILBOX_TOTAL_BYTES = 64 * MIB
MAILBOX_TOTAL_MAX = 64 * 1024 * MIB


def api_limits_problem(limits: ApiLimits) -> tuple[str, str] | None:
    """``(field, why)`` of the first [api] setting out of its range, else None."""
    for name, (low, high) in API_BOUNDS.items():
        value = getattr(limits, name)
        if not low <= value <= high:
            return name, f"must be between {low:g} and {high:g}, got {value:g}"
    if limits.reserved_connections > limits.max_connections // 2:
        return "reserved_connections", (
            f"must be at most half of max_connections ({limits.max_connections}), "
            f"got {limits.reserved_connections}"
        )
    share = limits.max_connections - limits.reserved_connections
    if limits.max_connections_per_uid > share:
        return "max_connections_per_uid", (
            f"must not exceed max_connections - reserved_connections ({share}), "
            f"got {limits.max_connections_per_uid}"
        )
    return None


class Refusals:
    """Counts each refusal under ``refused.<reason>`` and logs it, at most a
    few lines per reason per 10 s (the rest are counted in the next line's
    ``suppressed``)."""

    def __init__(self, counters: collections.Counter[str]) -> None:
        self.counters = counters
        self.limiter = RateLimiter(interval_s=10.0, burst=3)

    def refuse(self, reason: str, message: str) -> None:
        self.counters[f"refused.{reason}"] += 1
        emit, suppressed = self.limiter.check(reason)
        if emit:
            more = f" ({suppressed} more like it not logged)" if suppressed else ""
            log.warning("API %s: %s%s", reason.replace("_", " "), message, more)


class Admission:
    """Connection slots: the global limit, the per-uid share and the reserve.

    ``uid`` None (no SO_PEERCRED: memory streams in tests, non-Linux) is one
    unprivileged user."""

    def __init__(self, limits: ApiLimits, daemon_uid: int | None = None) -> None:
        self.limits = limits
        self.privileged = {0, os.getuid() if daemon_uid is None else daemon_uid}
        self.total = 0
        self.by_uid: dict[int | None, int] = {}

    def refusal(self, uid: int | None) -> tuple[str, str] | None:
        """Why a new connection of ``uid`` is refused (reason, message), or None."""
        lim = self.limits
        if self.total >= lim.max_connections:
            return "connection_limit", f"too many API connections (limit {lim.max_connections})"
        if uid in self.privileged:
            return None
        share = lim.max_connections - lim.reserved_connections
        if self.total >= share:
            return "reserved", (
                f"too many API connections: the last {lim.reserved_connections} of "
                f"{lim.max_connections} are kept for root and the daemon's user"
            )
        if self.by_uid.get(uid, 0) >= lim.max_connections_per_uid:
            return "uid_limit", (
                f"too many API connections from uid {uid} "
                f"(limit {lim.max_connections_per_uid} per user)"
            )
        return None

    def pressed(self, uid: int | None) -> bool:
        """Whether an idle connection of ``uid`` should give its slot back:
        its user holds half its share or more, or the daemon half its
        connections. A quiet client with a connection kept for rare calls is
        not cut while slots are plentiful (it would only have to reconnect);
        an idle hoard is."""
        lim = self.limits
        return (
            2 * self.total >= lim.max_connections
            or 2 * self.by_uid.get(uid, 0) >= lim.max_connections_per_uid
        )

    def add(self, uid: int | None) -> None:
        self.total += 1
        self.by_uid[uid] = self.by_uid.get(uid, 0) + 1

    def remove(self, uid: int | None) -> None:
        self.total -= 1
        left = self.by_uid.get(uid, 0) - 1
        if left > 0:
            self.by_uid[uid] = left
        else:
            self.by_uid.pop(uid, None)


class MailboxBudget:
    """Bytes of encoded message frames in every mailbox of the daemon."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def fits(self, size: int) -> bool:
        return self.used + size <= self.limit


class ByteGate:
    """Bytes waiting in one connection's outgoing queue, and the producers
    waiting for room. A frame always fits an empty queue (so one larger than
    the bound still goes out, alone)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self.closed = False
        self._lot = trio.lowlevel.ParkingLot()

    def fits(self, size: int) -> bool:
        return self.used == 0 or self.used + size <= self.limit

    def take_nowait(self, size: int) -> bool:
        if self.closed or not self.fits(size):
            return False
        self.used += size
        return True

    async def take(self, size: int) -> None:
        """Wait for room; ClosedResourceError once the connection closes."""
        while not self.closed and not self.fits(size):
            await self._lot.park()
        if self.closed:
            raise trio.ClosedResourceError
        self.used += size

    def give_back(self, size: int) -> None:
        self.used -= size
        if self._lot:
            self._lot.unpark_all()

    def close(self) -> None:
        self.closed = True
        self._lot.unpark_all()


@dataclass(frozen=True, slots=True)
class Close:
    """Why the server closes a connection: the error frame it sends, and the
    refusal reason it is counted under (None: a bad frame)."""

    code: str
    message: str
    reason: str | None


class ReadTimer:
    """The deadline of a connection's next read: ``idle_timeout_s`` at a frame
    boundary; while a frame is partial, what is left of ``read_timeout_s``
    (only time spent waiting for the client counts, not the server's own
    pauses at the in-flight limit, and a frame dripping in byte by byte
    gets no new time per byte)."""

    def __init__(self, limits: ApiLimits) -> None:
        self.limits = limits
        self.partial_left = limits.read_timeout_s

    async def receive(
        self, stream: trio.abc.Stream, size: int, partial: bool
    ) -> bytes | bytearray | None:
        """The next bytes (b"" at end of file), or None when the deadline passed."""
        if not partial:
            self.partial_left = self.limits.read_timeout_s
        started = trio.current_time()
        with trio.move_on_after(self.partial_left if partial else self.limits.idle_timeout_s):
            data = await stream.receive_some(size)
            if partial:
                self.partial_left -= trio.current_time() - started
            return data
        return None

    def read_timeout(self) -> Close:
        return Close(
            ErrorCode.UNAVAILABLE,
            f"a frame was started and not finished within {self.limits.read_timeout_s:g} s",
            "read_timeout",
        )

    def idle_timeout(self) -> Close:
        return Close(
            ErrorCode.UNAVAILABLE, f"idle for {self.limits.idle_timeout_s:g} s", "idle_timeout"
        )


@dataclass(slots=True)
class Shared:
    """What all connections of one server share: the mailbox budget and the
    refusal counters."""

    mailboxes: MailboxBudget
    refusals: Refusals
