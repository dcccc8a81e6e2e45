"""What the daemon sees of the API server: a connection and the backend contract.

The server (:mod:`peerd.shell.api_server`) owns sockets, frames and tasks; the
daemon's backend only ever holds a :class:`Connection` and implements
:class:`Backend`. A connection is the backend's handle on one client: who it
is (peer credentials), a way to push events that no watch asked for, and the
mailbox where messages to its names wait for the writer, bounded by count and
bytes, and by one budget for all mailboxes of the daemon
(:mod:`peerd.shell.api_limits`), so a client that does not read costs a known
amount of memory and the sender hears ``mailbox_full`` instead of the daemon
blocking. Everything else
about the connection (requests in flight, open streams, its cancel scope) is
the server's: private fields of the connection that only
:mod:`peerd.shell.api_server` touches.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeAlias

import trio

from peerd.api.protocol import Event, FrameError, Request, encode_frame
from peerd.shell.api_limits import DEFAULT_QUEUE_BYTES, ByteGate, Shared
from peerd.shell.api_socket import PeerCred

# Messages to names waiting for the writer, per connection (the "mailbox"),
# bounded apart from the outgoing queue: by count and by bytes (defaults of
# the [messages] settings mailbox_messages and mailbox_bytes).
MAILBOX_MESSAGES = 16_384
MAILBOX_BYTES = 16 * 1024 * 1024

EventItem: TypeAlias = tuple[str, dict[str, Any]]
"""What a watch channel carries: ``(event name, data map)``."""


class Connection:
    """One client connection, as the backend sees it.

    ``id`` is unique for the server's lifetime (a key for registrations bound
    to this connection). ``cred`` is None when the transport has no peer
    credentials (tests over memory streams, non-Linux systems)."""

    def __init__(
        self,
        conn_id: int,
        cred: PeerCred | None,
        outgoing: trio.MemorySendChannel[bytes],
        max_frame: int,
        max_inflight: int,
        *,
        mailbox_messages: int = MAILBOX_MESSAGES,
        mailbox_bytes: int = MAILBOX_BYTES,
        queue_bytes: int = DEFAULT_QUEUE_BYTES,
        shared: Shared | None = None,
    ) -> None:
        self.id = conn_id
        self.cred = cred
        self._outgoing = outgoing
        # Bytes of frames in ``_outgoing`` (the writer gives them back).
        self._gate = ByteGate(queue_bytes)
        self._shared = shared
        self._max_frame = max_frame
        self._cancel_scope = trio.CancelScope()
        self._inflight = trio.Semaphore(max_inflight)
        self._busy = 0  # backend calls running for this connection
        # id -> the request using it (a watch keeps its id until its stream ends)
        self._ids_in_use: dict[int, Request] = {}
        self._streams: dict[int, _Stream] = {}
        self._reading = True
        self._closed = False
        self._released = False  # its admission slot was given back early (idle)
        self._mailbox: collections.deque[bytes] = collections.deque()
        self._mailbox_bytes = 0
        self.mailbox_messages = mailbox_messages
        self.mailbox_bytes = mailbox_bytes
        # Told how many mailbox messages the writer took (None: the connection closed).
        self.on_mail: Callable[[int | None], None] | None = None

    def __repr__(self) -> str:
        who = f" pid={self.cred.pid} uid={self.cred.uid}" if self.cred else ""
        return f"<Connection {self.id}{who}>"

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def streams(self) -> frozenset[int]:
        """Ids of the watch streams open on this connection."""
        return frozenset(self._streams)

    def push_nowait(self, stream: int, event: str, data: Mapping[str, Any]) -> bool:
        """Queue an event frame ``{"stream", "event", "data"}`` without waiting.

        For events that belong to no watch: connection events on stream
        ``CONNECTION_STREAM`` (0), such as a registry conflict for an entry
        this connection owns.
        Returns False if the connection is closed or its queue is full (the
        client is not reading); the backend decides whether that is fatal
        (:meth:`close`). Raises ValueError if the frame cannot be encoded."""
        frame = self._encode_event(stream, event, data)
        if self._put_nowait(frame):
            return True
        if not self._closed and self._shared is not None:
            self._shared.refusals.refuse(
                "queue_full", f"{self!r}: event {event!r} dropped, the client is not reading"
            )
        return False

    def _put_nowait(self, frame: bytes) -> bool:
        """Queue a frame for the writer if its bytes fit (see ``queue_bytes``)."""
        size = len(frame)
        if not self._gate.take_nowait(size):
            return False
        try:
            self._outgoing.send_nowait(frame)
        except (trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
            self._gate.give_back(size)
            return False
        return True

    async def _put(self, frame: bytes) -> None:
        """Queue a frame for the writer, waiting for room in bytes and frames.
        ClosedResourceError or BrokenResourceError once the connection closes."""
        size = len(frame)
        await self._gate.take(size)
        try:
            await self._outgoing.send(frame)
        except BaseException:
            self._gate.give_back(size)
            raise

    def offer(self, stream: int, event: str, data: Mapping[str, Any]) -> str:
        """Queue an event in the connection's mailbox (messages to names):
        "ok", "full" (``mailbox_messages`` or ``mailbox_bytes`` waiting: the
        client is not reading) or "closed". The mailbox is written out in order,
        between the other frames. Raises ValueError if the frame cannot be
        encoded."""
        if self._closed:
            return "closed"
        frame = self._encode_event(stream, event, data)
        size = len(frame)
        shared = self._shared
        if (
            len(self._mailbox) >= self.mailbox_messages
            or self._mailbox_bytes + size > self.mailbox_bytes
        ):
            if shared is not None:
                shared.refusals.refuse(
                    "mailbox_full",
                    f"{self!r} is not reading its messages ({len(self._mailbox)} "
                    f"messages, {self._mailbox_bytes} bytes waiting)",
                )
            return "full"
        if shared is not None:
            if not shared.mailboxes.fits(size):
                shared.refusals.refuse(
                    "mailbox_budget",
                    f"message to {self!r} refused: all mailboxes together hold "
                    f"{shared.mailboxes.used} of {shared.mailboxes.limit} bytes",
                )
                return "full"
            shared.mailboxes.used += size
        was_empty = not self._mailbox
        self._mailbox.append(frame)
        self._mailbox_bytes += size
        if was_empty:
            # Wake the writer (an empty frame writes nothing). If its queue
            # is full it is busy anyway and drains the mailbox after each write.
            try:
                self._outgoing.send_nowait(b"")
            except trio.WouldBlock:
                pass
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                return "closed"
        return "ok"

    def _take_mail(self, budget: int, parts: list[bytes]) -> int:
        """Move mailbox frames into ``parts`` up to ``budget`` bytes (at least one)."""
        size = 0
        box = self._mailbox
        taken = 0
        while box and (size < budget or not parts):
            frame = box.popleft()
            parts.append(frame)
            size += len(frame)
            taken += 1
        self._mailbox_bytes -= size
        if self._shared is not None:
            self._shared.mailboxes.used -= size
        if self.on_mail is not None:
            self.on_mail(taken)
        return size

    def _drop_mail(self) -> None:
        """The connection closed: its mailbox and queue hold nothing any more."""
        if self._shared is not None:
            self._shared.mailboxes.used -= self._mailbox_bytes
        self._mailbox.clear()
        self._mailbox_bytes = 0
        self._gate.close()

    async def push(self, stream: int, event: str, data: Mapping[str, Any]) -> bool:
        """Like :meth:`push_nowait` but waits for room. False if the connection closed."""
        frame = self._encode_event(stream, event, data)
        try:
            await self._put(frame)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            return False
        return True

    def close(self) -> None:
        """Drop the connection now (pending requests are cancelled)."""
        self._cancel_scope.cancel()

    def _encode_event(self, stream: int, event: str, data: Mapping[str, Any]) -> bytes:
        try:
            return encode_frame(Event(stream, event, dict(data)), max_frame=self._max_frame)
        except FrameError as exc:
            raise ValueError(exc.message) from None
        except Exception as exc:
            raise ValueError(f"event {event!r} cannot be encoded: {exc}") from exc


@dataclass(slots=True)
class _Stream:
    scope: trio.CancelScope
    channel: trio.abc.ReceiveChannel[EventItem]


class Backend(Protocol):
    """What the API server needs from the daemon. The runner implements it.

    All three methods run in the daemon's trio thread, called from the
    server's connection tasks.

    ``async call(conn, op, args) -> result``
        Perform one request and return its result, which must be
        CBOR-encodable (dict, list, str, int, bool, None, bytes). ``args`` is the
        request's args map (keys are text; values unchecked: validate them, the
        ``parse_*_args`` helpers in :mod:`peerd.api.protocol` do it for the
        current ops). Raise :class:`~peerd.api.protocol.ApiError` to answer with
        an error: ``unknown_op`` for an op the backend does not know,
        ``bad_args``, ``not_found``, ``conflict``, ``unavailable`` (e.g. still
        starting, or leaving). Any other exception is answered as ``internal``
        and logged with its traceback: it is a bug.

        Calls run concurrently, several per connection, so a slow op (``join``,
        ``leave``) does not hold up others. A call is cancelled when its client
        disconnects or the server stops, so it must be cancel-safe: hand the
        work to the core and await its answer, rather than half-apply state
        from the calling task. ``watch`` and ``unwatch`` never reach ``call``.

    ``watch(conn, topics) -> ReceiveChannel[(event, data)]``
        Start a watch for ``topics`` (deduplicated, non-empty; ``"members"``
        and ``"registry"`` in the daemon) and return the receiving end of a
        channel of ``(event name, data map)`` items, typically
        ``trio.open_memory_channel(N)[1]``. Raise ApiError (``bad_args``)
        for an unknown topic. It is synchronous so that registering cannot
        interleave with event delivery: no event is lost between the
        snapshot a client takes and its watch. When the request asks for
        ``"snapshot": true`` it is called as ``watch(conn, topics,
        snapshot=True)``: the channel then starts with the current state
        (taken in that same synchronous step).

        The backend keeps the sending end and should feed it with
        ``send_nowait``: on ``trio.WouldBlock`` the watcher is too slow and the
        backend should close its sending end (the client gets an ``end``
        event); on ``trio.BrokenResourceError`` the server has closed the
        stream (unwatch, disconnect) and the backend should forget it. To end
        a stream with a reason, send ``("end", {"code": ..., "message": ...})``
        and close. The server forwards each item as an event frame whose
        ``stream`` is the watch request's id.

    ``connection_closed(conn)``
        Called once per connection, after all its calls have finished or been
        cancelled and its streams closed. Drop whatever is bound to the
        connection (its registry entries). Must not block; an exception is
        logged and ignored.

    Events about the connection itself (not asked for by a watch) go out
    with :meth:`Connection.push_nowait` on stream ``CONNECTION_STREAM`` (0);
    a watch request with id 0 is therefore refused (``bad_args``).

    Optional, for speed: ``batchable(op, args) -> bool`` says that a request
    answers at once (no waiting on the network), and ``async
    call_batch(conn, [(op, args), ...]) -> [result or ApiError, ...]``
    performs such requests in order, in one go. The reader stops reading
    while a batch runs, so a batch must not wait for long.
    """

    async def call(self, conn: Connection, op: str, args: dict[str, Any]) -> Any: ...

    def watch(
        self, conn: Connection, topics: Sequence[str], snapshot: bool = False
    ) -> trio.abc.ReceiveChannel[EventItem]: ...

    def connection_closed(self, conn: Connection) -> None: ...
