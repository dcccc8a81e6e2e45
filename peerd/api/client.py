"""Clients for the local API: an async trio client and a blocking one.

Both speak :mod:`peerd.api.protocol` over the daemon's Unix socket::

    async with Client() as peerd:                    # trio
        members = await peerd.call("members")
        async with peerd.watch(["members"]) as events:
            async for ev in events:
                print(ev.event, ev.data["name"])

    with BlockingClient() as peerd:                  # scripts, the CLI
        print(peerd.call("status")["health"])

Registry (names unique per scope, process groups), the same on both clients
(``await`` on :class:`Client`)::

    with BlockingClient() as peerd:
        peerd.register("db-primary", {"port": "5432"})   # the name is ours now...
        peerd.lookup("db-primary")     # {"node_name", "node", "pid", "meta", ...} or None
        peerd.join_group("workers")
        peerd.group_members("workers")  # [entry, ...]
        ...                              # ...until this connection closes

Every entry belongs to the connection that made it: it is removed
cluster-wide when the connection closes (the process exited) and only that
connection can change it. ``register(..., wait="settled")`` returns once
every live member holds the entry (or ``timeout_s`` passed) with
``settled`` and ``won``. When two processes on different nodes claimed a
name at the same time, the loser's entry is removed and its connection gets
a ``conflict`` event naming the winner, without any watch:
``Client.connection_events()`` / ``BlockingClient.wait_connection_event()``
(or the ``on_connection_event`` callback).

Messages to names this connection holds wait in the client until the
application reads them (``receive_message()`` / ``messages()``), in order,
never dropped. They never hold up the answers to calls: past
``max_messages`` unread (default 1024) the async client stops reading the
socket only while no call waits for an answer and no watch is open (the
daemon's mailbox for the connection then fills, and senders get
``mailbox_full``); while calls wait it reads on, keeping the
messages. The hard bound is ``max_message_bytes`` (default 64 MiB) of
unread messages, each counted as its frame's length plus
``MESSAGE_OVERHEAD`` (1 KiB, about what Python keeps per message), so that
many small or empty messages count too: there the waiting calls, new calls
and open watches fail with :class:`MessagesNotRead` (an ``ApiError``, code
``unavailable``) until the application reads its messages, and reading the
socket pauses (the daemon's mailbox fills); still nothing is dropped.

Errors: :class:`~peerd.api.protocol.ApiError` when the daemon answers a
request with an error (``code`` says which), :class:`DaemonUnavailable` when
the socket cannot be reached, :class:`ConnectionLost` when an established
connection breaks. Both of the latter are ``ConnectionError``.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import math
import os
import socket
from collections.abc import AsyncIterator, Callable, Generator, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import trio

from peerd.api.protocol import (
    CONNECTION_STREAM,
    DEFAULT_MAX_FRAME,
    DEFAULT_SCOPE,
    MESSAGE_EVENT,
    STREAM_END,
    ApiError,
    ErrorCode,
    Event,
    FrameDecoder,
    FrameError,
    Op,
    Request,
    Response,
    Topic,
    encode_frame,
    parse_server_frame,
)

__all__ = [
    "ApiError",
    "BlockingClient",
    "Client",
    "ConnectionLost",
    "DaemonUnavailable",
    "Event",
    "MessagesNotRead",
    "Watch",
    "default_socket_path",
]

SOCKET_ENV = "PEERD_API_SOCKET"
SYSTEM_SOCKET_PATH = "/run/peerd/peerd.sock"
DEFAULT_WATCH_BUFFER = 1024
DEFAULT_MAX_MESSAGES = 1024  # unread messages before reading pauses (unless calls wait)
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # unread messages, counted bytes: calls fail past it
# Counted per unread message on top of its frame: what Python keeps for one
# (an Event and its dict, ~1 KiB measured), so empty ones are bounded too.
MESSAGE_OVERHEAD = 1024
_RECEIVE_CHUNK = 65536


def default_socket_path() -> str:
    """Where the local daemon listens, by the same rules the agent binds with.

    ``$PEERD_API_SOCKET`` wins. Otherwise root (a system service) uses
    /run/peerd/peerd.sock; other users get a per-user socket so that an
    unprivileged daemon works without any setup: under ``$XDG_RUNTIME_DIR``
    (private to the user, cleaned at logout) or else /tmp/peerd-<uid>/."""
    env = os.environ.get(SOCKET_ENV)
    if env:
        return env
    uid = os.getuid()
    if uid == 0:
        return SYSTEM_SOCKET_PATH
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return os.path.join(runtime, "peerd", "peerd.sock")
    return f"/tmp/peerd-{uid}/peerd.sock"


class DaemonUnavailable(ConnectionError):
    """The daemon's socket could not be connected to (not running, wrong path,
    no permission)."""


class ConnectionLost(ConnectionError):
    """An established connection to the daemon broke (closed, reset, or it sent
    something that is not the protocol)."""


class MessagesNotRead(ApiError):
    """The client holds ``max_message_bytes`` of messages to this
    connection's names that the application has not read (each counted as
    its frame plus ``MESSAGE_OVERHEAD``): calls (and watches) fail with this
    until it reads them (``receive_message()``, ``messages()``). Nothing was
    dropped; a call that failed so may still have been carried out by the
    daemon. Code ``unavailable``."""

    def __init__(self, count: int, size: int) -> None:
        super().__init__(
            ErrorCode.UNAVAILABLE,
            f"{count} unread messages ({size} bytes counted: frames plus "
            f"{MESSAGE_OVERHEAD} each) fill this client's buffer "
            "(max_message_bytes): read them (receive_message, messages) "
            "before calling again",
        )


def _message_charge(frame_bytes: int) -> int:
    """What one unread message counts against ``max_message_bytes``."""
    return frame_bytes + MESSAGE_OVERHEAD


def _check_bounds(max_message_bytes: int, max_messages: int = 1) -> None:
    """The same rule for both clients' bounds on unread messages."""
    for name, value in (("max_message_bytes", max_message_bytes), ("max_messages", max_messages)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer of at least 1, got {value!r}")


def _connect_error(path: str, exc: OSError) -> DaemonUnavailable:
    reason = exc.strerror or str(exc)
    if isinstance(exc, PermissionError):
        return DaemonUnavailable(
            f"cannot connect to peerd at {path}: {reason} (is your user in the socket's group?)"
        )
    return DaemonUnavailable(f"peerd is not running at {path}? (connect: {reason})")


def _connection_error(response: Response) -> Exception:
    """A response with id null: the server is closing the connection, and why."""
    assert response.error is not None
    return ApiError(response.error.code, response.error.message)


# --- async client -----------------------------------------------------------------


@dataclass(slots=True)
class _Pending:
    done: trio.Event = field(default_factory=trio.Event)
    response: Response | None = None
    error: Exception | None = None


@dataclass(slots=True)
class _StreamState:
    send: trio.MemorySendChannel[Event]
    error: Exception | None = None


class Client:
    """Async client (trio). Use as ``async with Client(path) as c:``.

    One background task reads frames and routes each response to the call
    waiting for its id, and each event to its watch; so any number of tasks
    may call concurrently over one connection (requests are pipelined).
    Unread messages to names never hold up a response: ``max_messages`` and
    ``max_message_bytes`` bound them as the module docs say.

    ``stream`` lets tests (or unusual transports) supply a connected
    ``trio.abc.Stream`` instead of a socket path."""

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        stream: trio.abc.Stream | None = None,
        max_frame: int = DEFAULT_MAX_FRAME,
        watch_buffer: int = DEFAULT_WATCH_BUFFER,
        on_connection_event: Callable[[Event], None] | None = None,
        max_messages: int = DEFAULT_MAX_MESSAGES,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        _check_bounds(max_message_bytes, max_messages)
        self.path = os.fspath(path) if path is not None else default_socket_path()
        self.max_frame = max_frame
        self.watch_buffer = watch_buffer
        self.on_connection_event = on_connection_event
        self.dropped_connection_events = 0
        self.max_messages = max_messages
        self.max_message_bytes = max_message_bytes
        # Connection events (stream 0: a registry conflict) are kept here until
        # read with connection_events(); past watch_buffer, new ones are dropped.
        self._conn_send, self._conn_receive = trio.open_memory_channel[Event](watch_buffer)
        # Messages to names held by this connection, with what each counts
        # (_message_charge): the channel never blocks the reader;
        # _wait_for_room bounds it.
        self._msg_send, self._msg_receive = trio.open_memory_channel[tuple[Event, int]](math.inf)
        self._unread = 0
        self._unread_bytes = 0
        self._room = trio.Event()  # set to wake a reader that paused (see _wait_for_room)
        self._stream = stream
        self._ids = itertools.count(1)
        self._pending: dict[int, _Pending] = {}
        self._streams: dict[int, _StreamState] = {}
        self._send_lock = trio.Lock()
        self._broken: Exception | None = None
        self._nursery: trio.Nursery | None = None
        self._nursery_cm: Any = None

    async def __aenter__(self) -> Client:
        if self._stream is None:
            try:
                self._stream = await trio.open_unix_socket(self.path)
            except OSError as exc:
                raise _connect_error(self.path, exc) from None
        self._nursery_cm = trio.open_nursery()
        self._nursery = await self._nursery_cm.__aenter__()
        self._nursery.start_soon(self._read_loop)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        assert self._nursery is not None and self._stream is not None
        self._nursery.cancel_scope.cancel()
        try:
            result: bool | None = await self._nursery_cm.__aexit__(exc_type, exc, tb)
        finally:
            self._fail(ConnectionLost("client closed"))
            await trio.aclose_forcefully(self._stream)
        return result

    async def call(self, op: str, /, **args: Any) -> Any:
        """Perform ``op`` with keyword ``args``; returns the result or raises ApiError."""
        return await self.request(op, args)

    async def request(self, op: str, args: Mapping[str, Any] | None = None) -> Any:
        """Like :meth:`call`, with args as a mapping (for keys that are not identifiers)."""
        return await self._roundtrip(next(self._ids), op, args)

    def watch(self, topics: Sequence[str] = (Topic.MEMBERS,), snapshot: bool = False) -> Watch:
        """A stream of events for ``topics``: an async iterator of :class:`Event`,
        best used as ``async with client.watch([...]) as events`` so that it is
        unwatched on exit. The watch starts on entry (or the first iteration);
        events arriving before you iterate are buffered (``watch_buffer``
        events; past that the watch ends with an error rather than block the
        connection's other calls). With ``snapshot``, the current state comes
        first (``member`` / ``entry`` events, then ``snapshot_end`` per
        topic), then the changes, with no gap between them."""
        return Watch(self, list(topics), snapshot)

    async def _roundtrip(self, rid: int, op: str, args: Mapping[str, Any] | None) -> Any:
        if self._broken is not None:
            raise self._broken
        if self._unread_bytes >= self.max_message_bytes:
            raise MessagesNotRead(self._unread, self._unread_bytes)
        frame = encode_frame(Request(rid, op, dict(args or {})), max_frame=self.max_frame)
        pending = self._pending[rid] = _Pending()
        self._room.set()  # a reader paused on unread messages reads on for the answer
        try:
            await self._send(frame)
            await pending.done.wait()
        finally:
            self._pending.pop(rid, None)
        if pending.error is not None:
            raise pending.error
        assert pending.response is not None
        return pending.response.unwrap()

    async def _send(self, frame: bytes) -> None:
        assert self._stream is not None
        async with self._send_lock:
            if self._broken is not None:
                raise self._broken
            # Cancelled here, nothing was written; cancelled inside send_all,
            # part of a frame may be on the wire and the stream is unusable.
            await trio.lowlevel.checkpoint_if_cancelled()
            try:
                await self._stream.send_all(frame)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                self._fail(ConnectionLost(f"connection to peerd lost: {exc}"))
                raise ConnectionLost(f"connection to peerd lost: {exc}") from None
            except BaseException:
                self._fail(ConnectionLost("a request was interrupted while being sent"))
                raise

    async def _read_loop(self) -> None:
        assert self._stream is not None
        decoder = FrameDecoder(self.max_frame)
        try:
            while True:
                await self._wait_for_room()
                data = await self._stream.receive_some(_RECEIVE_CHUNK)
                if not data:
                    raise ConnectionLost("peerd closed the connection")
                decoder.feed(data)
                while True:
                    before = decoder.buffered
                    if (frame := decoder.next_frame()) is None:
                        break
                    msg = parse_server_frame(frame)
                    if (
                        isinstance(msg, Event)
                        and msg.stream == CONNECTION_STREAM
                        and msg.event == MESSAGE_EVENT
                    ):
                        size = _message_charge(before - decoder.buffered)
                        self._msg_send.send_nowait((msg, size))  # never blocks, never drops
                        self._unread += 1
                        self._unread_bytes += size
                        continue
                    self._dispatch(msg)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self._fail(ConnectionLost(f"connection to peerd lost: {exc}"))
        except FrameError as exc:
            self._fail(ConnectionLost(f"peerd sent a bad frame: {exc.message}"))
        except (ConnectionLost, ApiError) as exc:
            self._fail(exc)

    async def _wait_for_room(self) -> None:
        """Before each read of the socket: past ``max_messages`` unread
        messages, read only while a call waits for its answer or a watch is
        open (so that unread messages never hold them up); past
        ``max_message_bytes``, fail those instead and wait (the daemon's
        mailbox then fills: senders hear "mailbox full")."""
        while True:
            if self._unread_bytes >= self.max_message_bytes:
                self._refuse_waiting()
            elif (
                self._unread < self.max_messages
                or self._streams
                or any(not p.done.is_set() for p in self._pending.values())
            ):
                return
            self._room = trio.Event()
            await self._room.wait()

    def _refuse_waiting(self) -> None:
        for stream in self._fail_waiters(MessagesNotRead(self._unread, self._unread_bytes)):
            assert self._nursery is not None
            self._nursery.start_soon(self._send_unwatch, stream)

    async def _next_message(self) -> Event | None:
        """The oldest unread message, None once the connection is closed."""
        try:
            item: tuple[Event, int] = await self._msg_receive.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            return None
        msg, size = item
        self._unread -= 1
        self._unread_bytes -= size
        self._room.set()
        return msg

    def _dispatch(self, msg: Response | Event) -> None:
        if isinstance(msg, Event) and msg.stream == CONNECTION_STREAM:
            if self.on_connection_event is not None:
                self.on_connection_event(msg)
            try:
                self._conn_send.send_nowait(msg)
            except (trio.WouldBlock, trio.ClosedResourceError):
                self.dropped_connection_events += 1
            return
        if isinstance(msg, Event):
            state = self._streams.get(msg.stream)
            if state is None:
                return  # late event of a stream we closed
            if msg.event == STREAM_END:
                code, message = msg.data.get("code"), msg.data.get("message")
                if isinstance(code, str):
                    state.error = ApiError(code, str(message or "stream ended"))
                self._end_stream(msg.stream)
                return
            try:
                state.send.send_nowait(msg)
            except trio.WouldBlock:
                state.error = ConnectionLost(
                    f"watch {msg.stream} fell behind by {self.watch_buffer} events; ended"
                )
                self._end_stream(msg.stream)
                assert self._nursery is not None
                self._nursery.start_soon(self._send_unwatch, msg.stream)
            return
        if msg.id is None:
            raise _connection_error(msg)
        pending = self._pending.get(msg.id)
        if pending is not None and not pending.done.is_set():
            pending.response = msg
            pending.done.set()

    def _end_stream(self, stream: int) -> None:
        state = self._streams.pop(stream, None)
        if state is not None:
            state.send.close()

    async def _send_unwatch(self, stream: int) -> None:
        """Ask the daemon to stop a stream, without waiting for the reply: the
        stream is already closed on our side, and an unwatch racing the
        daemon's own end of the stream may fairly be answered not_found."""
        frame = encode_frame(Request(next(self._ids), Op.UNWATCH, {"stream": stream}))
        with contextlib.suppress(ConnectionError):
            await self._send(frame)

    def _fail(self, exc: Exception) -> None:
        """Wake every waiter with ``exc``; later calls raise it at once."""
        if self._broken is None:
            self._broken = exc
        self._fail_waiters(exc)
        self._conn_send.close()
        self._msg_send.close()

    def _fail_waiters(self, exc: Exception) -> list[int]:
        """Every call waiting for an answer and every open watch raise
        ``exc``; returns the watches' stream ids."""
        for pending in self._pending.values():
            if not pending.done.is_set():
                pending.error = exc
                pending.done.set()
        streams = list(self._streams)
        for stream in streams:
            self._streams[stream].error = exc
            self._end_stream(stream)
        return streams

    # --- connection events ---------------------------------------------------------

    async def connection_events(self) -> AsyncIterator[Event]:
        """Yield the connection's own events (``conflict``: a name this
        connection registered was lost to an older claim elsewhere; ``data``
        is the lost entry, ``data["winner"]`` the entry that holds the name)
        until the connection closes. Events that arrived before are yielded
        first (up to ``watch_buffer`` of them are kept)."""
        while True:
            try:
                yield await self._conn_receive.receive()
            except (trio.EndOfChannel, trio.ClosedResourceError):
                return

    # --- partial mesh ------------------------------------------------------------------

    async def send(
        self,
        name: str | None = None,
        payload: bytes | str = b"",
        *,
        group: str | None = None,
        scope: str = DEFAULT_SCOPE,
        all: bool = False,
        reply_to: str | None = None,
    ) -> dict[str, Any]:
        """Send ``payload`` to the process holding ``name`` (or to one member
        of ``group``; with ``all=True`` to every member), wherever it runs.

        Returns ``{"delivered": n}`` (plus ``"failed": [...]`` with ``all``)
        once the owner's daemon queued it on the owner's connection. Raises
        ApiError: ``not_found`` (no such name, or its owner vanished before
        the message arrived), ``mailbox_full`` (the owner is not reading, or
        its daemon's mailboxes are full), ``unavailable`` (link lost, no
        answer in time: delivery unknown, never duplicated), ``bad_args``
        (payload over 256 KiB), ``no_receiver`` (the holder takes no
        messages: it registered with ``messages=False``, as ``peerd exec``
        does). Sends on one connection arrive in order.

        ``reply_to``: the token of a received message (``data["reply_to"]``;
        :meth:`reply` does this): answers the connection that sent it,
        through its node, with no registry lookup (``not_found`` once that
        connection closed or its daemon restarted).

        Request/reply: the receiver gets each message from :meth:`messages`
        and answers the sending connection itself (it needs no name), or
        the sender's registered name (``data["from"]`` in
        ``data["from_scope"]``, reachable at once even from a daemon whose
        replica does not hold it yet)::

            async for msg in server.messages():          # holds "db"
                await server.reply(msg, b"pong")

            await client.send("db", b"ping")
            reply = await client.receive_message()       # kind "reply", from "db"
        """
        args = send_args(name, payload, group, scope, all, reply_to)
        result: dict[str, Any] = await self.request(Op.SEND, args)
        return result

    async def reply(self, msg: Event, payload: bytes | str = b"") -> dict[str, Any]:
        """Answer the connection that sent the message ``msg`` (see :meth:`send`)."""
        return await self.send(payload=payload, reply_to=reply_token(msg))

    async def receive_message(self) -> Event:
        """The next message sent to a name this connection holds: an Event
        ``message`` whose ``data`` has ``from`` (the sender's registered name
        or None), ``from_node``, ``kind``, ``scope``, ``name``, ``payload``.
        Raises ConnectionLost when the connection closes (after the messages
        that had arrived)."""
        msg = await self._next_message()
        if msg is None:
            raise self._broken or ConnectionLost("connection closed")
        return msg

    async def messages(self) -> AsyncIterator[Event]:
        """Yield messages to this connection's names until it closes."""
        while (msg := await self._next_message()) is not None:
            yield msg

    async def event(self, name: str, payload: bytes = b"") -> str:
        """Broadcast a user event to every node (watch topic ``events``); the
        broadcast id (hex). ApiError ``bad_args`` above MAX_EVENT_BYTES."""
        result: dict[str, Any] = await self.request(Op.EVENT, {"name": name, "payload": payload})
        return str(result["id"])

    # --- registry --------------------------------------------------------------------

    async def register(
        self,
        name: str,
        meta: Mapping[str, str] | None = None,
        *,
        scope: str = DEFAULT_SCOPE,
        wait: str | None = None,
        timeout_s: float | None = None,
        messages: bool = True,
    ) -> dict[str, Any]:
        """Claim the unique ``name`` for this connection (ApiError ``conflict``
        if it is taken). With ``wait="settled"``: return once every live
        member holds it, or after ``timeout_s`` (default 5), with ``settled``
        and ``won`` in the result. ``messages=False``: this process takes no
        messages; a ``send`` to the name fails ``no_receiver``."""
        result: dict[str, Any] = await self.request(
            Op.REGISTER, register_args("name", name, meta, scope, wait, timeout_s, messages)
        )
        return result

    async def unregister(self, name: str, *, scope: str = DEFAULT_SCOPE) -> None:
        await self.request(Op.UNREGISTER, {"name": name, "scope": scope})

    async def update(
        self, name: str, meta: Mapping[str, str], *, scope: str = DEFAULT_SCOPE, group: bool = False
    ) -> dict[str, Any]:
        """Replace the metadata of this connection's ``name`` (or, with
        ``group=True``, of its membership of group ``name``)."""
        result: dict[str, Any] = await self.request(
            Op.UPDATE, update_args(name, meta, scope, group)
        )
        return result

    async def lookup(self, name: str, *, scope: str = DEFAULT_SCOPE) -> dict[str, Any] | None:
        """The entry holding ``name`` (owner node, pid, meta...), or None."""
        try:
            result: dict[str, Any] = await self.request(Op.LOOKUP, {"name": name, "scope": scope})
        except ApiError as exc:
            if exc.code == "not_found":
                return None
            raise
        return result

    async def names(self, *, scope: str | None = None, prefix: str = "") -> list[dict[str, Any]]:
        """Every registered name (of ``scope``, or of every scope) starting
        with ``prefix``, sorted by (scope, name); fetched page by page."""
        out: list[dict[str, Any]] = []
        args = list_args(scope, prefix)
        while True:
            page = await self.request(Op.LIST, args)
            out += page["entries"]
            if not page.get("more") or not page["entries"]:
                return out
            args["after"] = [out[-1]["scope"], out[-1]["name"]]

    async def join_group(
        self,
        group: str,
        meta: Mapping[str, str] | None = None,
        *,
        scope: str = DEFAULT_SCOPE,
        messages: bool = True,
    ) -> dict[str, Any]:
        """Join process group ``group`` (many members per group; a process may
        join many groups)."""
        result: dict[str, Any] = await self.request(
            Op.GROUP_JOIN, register_args("group", group, meta, scope, None, None, messages)
        )
        return result

    async def leave_group(self, group: str, *, scope: str = DEFAULT_SCOPE) -> None:
        await self.request(Op.GROUP_LEAVE, {"group": group, "scope": scope})

    async def group_members(
        self, group: str, *, scope: str = DEFAULT_SCOPE
    ) -> list[dict[str, Any]]:
        """The members of ``group`` (an empty list for an unknown group)."""
        page = await self.request(
            Op.GROUP_MEMBERS, {"group": group, "scope": scope, "limit": MAX_PAGE}
        )
        entries: list[dict[str, Any]] = page["entries"]
        return entries

    async def groups(self, *, scope: str | None = None, prefix: str = "") -> list[dict[str, Any]]:
        """``[{"scope", "group", "members": count}]``, sorted; page by page."""
        out: list[dict[str, Any]] = []
        args = list_args(scope, prefix)
        while True:
            page = await self.request(Op.GROUPS, args)
            out += page["groups"]
            if not page.get("more") or not page["groups"]:
                return out
            args["after"] = [out[-1]["scope"], out[-1]["group"]]


MAX_PAGE = 10_000


def send_args(
    name: str | None,
    payload: bytes | str,
    group: str | None,
    scope: str,
    every: bool,
    reply_to: str | None,
) -> dict[str, Any]:
    """Args of ``send``: to a name, a group, or a reply token."""
    args: dict[str, Any] = {"payload": payload}
    if reply_to is not None:
        if name is not None or group is not None:
            raise ValueError("give a name, a group or reply_to, not several")
        args["reply_to"] = reply_to
        return args
    args["scope"] = scope
    if group is not None:
        args["group"] = group
        if every:
            args["all"] = True
    else:
        if name is None:
            raise ValueError("give a name or a group")
        args["name"] = name
    return args


def reply_token(msg: Event) -> str:
    """The ``reply_to`` token of a received message (ValueError if it has none:
    not a message, or from a daemon too old to give one)."""
    token = msg.data.get("reply_to") if msg.event == "message" else None
    if not isinstance(token, str):
        raise ValueError("this message carries no reply_to token")
    return token


def register_args(
    key: str,
    name: str,
    meta: Mapping[str, str] | None,
    scope: str,
    wait: str | None,
    timeout_s: float | None,
    messages: bool = True,
) -> dict[str, Any]:
    """Args of ``register`` (key "name") and ``group.join`` (key "group")."""
    args: dict[str, Any] = {key: name, "scope": scope}
    if not messages:
        args["messages"] = False
    if meta:
        args["meta"] = dict(meta)
    if wait is not None:
        args["wait"] = wait
        if timeout_s is not None:
            args["timeout_s"] = timeout_s
    return args


def update_args(name: str, meta: Mapping[str, str], scope: str, group: bool) -> dict[str, Any]:
    return {"group" if group else "name": name, "scope": scope, "meta": dict(meta)}


def list_args(scope: str | None, prefix: str) -> dict[str, Any]:
    args: dict[str, Any] = {"limit": MAX_PAGE}
    if scope is not None:
        args["scope"] = scope
    if prefix:
        args["prefix"] = prefix
    return args


class Watch:
    """An open (or about to open) watch: async iterator of :class:`Event`,
    async context manager that unwatches on exit.

    Iteration stops when the daemon ends the stream normally; it raises
    ApiError if the daemon ended it with an error, and ConnectionLost if the
    connection broke or this watcher fell behind."""

    def __init__(self, client: Client, topics: list[str], snapshot: bool = False) -> None:
        self._client = client
        self.topics = topics
        self.snapshot = snapshot
        self.stream: int | None = None
        self._receive: trio.MemoryReceiveChannel[Event] | None = None
        self._state: _StreamState | None = None

    async def start(self) -> None:
        """Send the watch request and wait for the daemon to accept it."""
        if self.stream is not None:
            return
        client = self._client
        rid = next(client._ids)
        send, self._receive = trio.open_memory_channel[Event](client.watch_buffer)
        # Registered before the request goes out: events may follow the reply
        # in the same read, and must find their stream.
        self._state = client._streams[rid] = _StreamState(send)
        self.stream = rid
        try:
            args: dict[str, Any] = {"topics": self.topics}
            if self.snapshot:
                args["snapshot"] = True
            await client._roundtrip(rid, Op.WATCH, args)
        except BaseException:
            client._end_stream(rid)
            raise

    async def aclose(self) -> None:
        """Unwatch (if still open). Events already buffered are dropped."""
        if self.stream is None or self._receive is None:
            return
        self._receive.close()
        if self._client._streams.get(self.stream) is self._state:
            self._client._end_stream(self.stream)
            await self._client._send_unwatch(self.stream)

    async def __aenter__(self) -> Watch:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __aiter__(self) -> Watch:
        return self

    async def __anext__(self) -> Event:
        await self.start()
        assert self._receive is not None and self._state is not None
        try:
            event: Event = await self._receive.receive()
            return event
        except (trio.EndOfChannel, trio.ClosedResourceError):
            if self._state.error is not None:
                raise self._state.error from None
            raise StopAsyncIteration from None


# --- blocking client -----------------------------------------------------------------


class BlockingClient:
    """A small synchronous client on a plain socket, for scripts and the CLI.

    Calls are sequential (one request, then its response). ``timeout`` (seconds)
    bounds each call's wait; watches wait without limit. It reads the socket
    only inside calls: messages to names read on the way wait for
    ``receive_message``; past ``max_message_bytes`` of them unread (counted
    as :class:`Client` counts them), calls, watches and
    ``wait_connection_event`` raise :class:`MessagesNotRead` and stop
    reading (nothing is dropped)."""

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        timeout: float | None = None,
        max_frame: int = DEFAULT_MAX_FRAME,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        _check_bounds(max_message_bytes)
        self.path = os.fspath(path) if path is not None else default_socket_path()
        self.timeout = timeout
        self.max_message_bytes = max_message_bytes
        self._decoder = FrameDecoder(max_frame)
        self.max_frame = max_frame
        self._ids = itertools.count(1)
        self._events: dict[int, collections.deque[Event]] = {}
        # Connection events (stream 0), the newest DEFAULT_WATCH_BUFFER kept.
        self._conn_events: collections.deque[Event] = collections.deque(maxlen=DEFAULT_WATCH_BUFFER)
        # Messages to names that arrived while waiting for a response, with
        # what each counts (never dropped; see _check_unread).
        self._messages: collections.deque[tuple[Event, int]] = collections.deque()
        self._message_bytes = 0
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._sock.connect(self.path)
        except OSError as exc:
            self._sock.close()
            raise _connect_error(self.path, exc) from None

    def __enter__(self) -> BlockingClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        # shutdown first: a thread blocked reading this socket wakes up (EOF).
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()

    def call(self, op: str, /, **args: Any) -> Any:
        """Perform ``op``; returns the result or raises ApiError / ConnectionError."""
        return self.request(op, args)

    def request(self, op: str, args: Mapping[str, Any] | None = None) -> Any:
        self._check_unread()
        rid = next(self._ids)
        self._send(Request(rid, op, dict(args or {})))
        return self._wait_response(rid, self.timeout).unwrap()

    def watch(
        self, topics: Sequence[str] = (Topic.MEMBERS,), snapshot: bool = False
    ) -> Generator[Event, None, None]:
        """Yield events for ``topics`` until the daemon ends the stream (or
        raise as :class:`Watch` does). Closing the generator unwatches.
        ``snapshot``: the current state first, as :meth:`Client.watch`."""
        rid = next(self._ids)
        self._events[rid] = collections.deque()
        args: dict[str, Any] = {"topics": list(topics)}
        if snapshot:
            args["snapshot"] = True
        try:
            self._send(Request(rid, Op.WATCH, args))
            self._wait_response(rid, self.timeout).unwrap()
            while True:
                queue = self._events[rid]
                while queue:
                    ev = queue.popleft()
                    if ev.event == STREAM_END:
                        code = ev.data.get("code")
                        if isinstance(code, str):
                            raise ApiError(code, str(ev.data.get("message") or "stream ended"))
                        return
                    yield ev
                self._read_one(None)
                self._check_unread()
        finally:
            del self._events[rid]
            # Best effort: the connection may be gone already.
            with contextlib.suppress(OSError, ValueError):
                self._send(Request(next(self._ids), Op.UNWATCH, {"stream": rid}))

    def _send(self, request: Request) -> None:
        frame = encode_frame(request, max_frame=self.max_frame)
        try:
            self._sock.sendall(frame)
        except OSError as exc:
            raise ConnectionLost(f"connection to peerd lost: {exc}") from None

    def _wait_response(self, rid: int, timeout: float | None) -> Response:
        while True:
            msg = self._read_one(timeout)
            if isinstance(msg, Response) and msg.id == rid:
                return msg
            self._check_unread()

    def _check_unread(self) -> None:
        """Calls stop reading (and raise) once ``max_message_bytes`` of
        messages wait to be read; the rest stays in the socket."""
        if self._message_bytes >= self.max_message_bytes:
            raise MessagesNotRead(len(self._messages), self._message_bytes)

    def _read_one(self, timeout: float | None) -> Response | Event:
        """Read until one frame is complete; events go to their watch's queue."""
        while True:
            before = self._decoder.buffered
            try:
                frame = self._decoder.next_frame()
            except FrameError as exc:
                raise ConnectionLost(f"peerd sent a bad frame: {exc.message}") from None
            if frame is not None:
                try:
                    msg = parse_server_frame(frame)
                except FrameError as exc:
                    raise ConnectionLost(f"peerd sent a bad frame: {exc.message}") from None
                if isinstance(msg, Event):
                    if msg.stream == CONNECTION_STREAM and msg.event == MESSAGE_EVENT:
                        size = _message_charge(before - self._decoder.buffered)
                        self._messages.append((msg, size))
                        self._message_bytes += size
                        return msg
                    queue = (
                        self._conn_events
                        if msg.stream == CONNECTION_STREAM
                        else self._events.get(msg.stream)
                    )
                    if queue is not None:
                        queue.append(msg)
                elif msg.id is None:
                    raise _connection_error(msg)
                return msg
            self._sock.settimeout(timeout)
            try:
                data = self._sock.recv(_RECEIVE_CHUNK)
            except TimeoutError:
                raise TimeoutError(f"peerd did not answer within {timeout} s") from None
            except OSError as exc:
                raise ConnectionLost(f"connection to peerd lost: {exc}") from None
            if not data:
                raise ConnectionLost("peerd closed the connection")
            self._decoder.feed(data)

    # --- connection events and the registry (see Client for the docs) ------------------

    def wait_connection_event(self, timeout: float | None = None) -> Event | None:
        """The next connection event (a registry ``conflict``), reading the
        socket for up to ``timeout`` seconds (None: no limit); None if none
        came. Raises ConnectionLost when the connection closes."""
        if self._conn_events:
            return self._conn_events.popleft()
        try:
            while True:
                self._check_unread()
                msg = self._read_one(timeout)
                if isinstance(msg, Event) and msg.stream == CONNECTION_STREAM and self._conn_events:
                    return self._conn_events.popleft()
        except TimeoutError:
            return None

    def connection_events(self) -> list[Event]:
        """Connection events received so far (while waiting for responses)."""
        out = list(self._conn_events)
        self._conn_events.clear()
        return out

    def send(
        self,
        name: str | None = None,
        payload: bytes | str = b"",
        *,
        group: str | None = None,
        scope: str = DEFAULT_SCOPE,
        all: bool = False,
        reply_to: str | None = None,
    ) -> dict[str, Any]:
        """See :meth:`Client.send`."""
        args = send_args(name, payload, group, scope, all, reply_to)
        result: dict[str, Any] = self.request(Op.SEND, args)
        return result

    def reply(self, msg: Event, payload: bytes | str = b"") -> dict[str, Any]:
        """See :meth:`Client.reply`."""
        return self.send(payload=payload, reply_to=reply_token(msg))

    def receive_message(self, timeout: float | None = None) -> Event | None:
        """The next message to a name this connection holds (see
        :meth:`Client.receive_message`), reading the socket for up to
        ``timeout`` seconds (None: no limit); None if none came."""
        if not self._messages:
            try:
                while not self._messages:
                    self._read_one(timeout)
            except TimeoutError:
                return None
        msg, size = self._messages.popleft()
        self._message_bytes -= size
        return msg

    def event(self, name: str, payload: bytes = b"") -> str:
        result: dict[str, Any] = self.request(Op.EVENT, {"name": name, "payload": payload})
        return str(result["id"])

    def register(
        self,
        name: str,
        meta: Mapping[str, str] | None = None,
        *,
        scope: str = DEFAULT_SCOPE,
        wait: str | None = None,
        timeout_s: float | None = None,
        messages: bool = True,
    ) -> dict[str, Any]:
        result: dict[str, Any] = self.request(
            Op.REGISTER, register_args("name", name, meta, scope, wait, timeout_s, messages)
        )
        return result

    def unregister(self, name: str, *, scope: str = DEFAULT_SCOPE) -> None:
        self.request(Op.UNREGISTER, {"name": name, "scope": scope})

    def update(
        self, name: str, meta: Mapping[str, str], *, scope: str = DEFAULT_SCOPE, group: bool = False
    ) -> dict[str, Any]:
        result: dict[str, Any] = self.request(Op.UPDATE, update_args(name, meta, scope, group))
        return result

    def lookup(self, name: str, *, scope: str = DEFAULT_SCOPE) -> dict[str, Any] | None:
        try:
            result: dict[str, Any] = self.request(Op.LOOKUP, {"name": name, "scope": scope})
        except ApiError as exc:
            if exc.code == "not_found":
                return None
            raise
        return result

    def names(self, *, scope: str | None = None, prefix: str = "") -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        args = list_args(scope, prefix)
        while True:
            page = self.request(Op.LIST, args)
            out += page["entries"]
            if not page.get("more") or not page["entries"]:
                return out
            args["after"] = [out[-1]["scope"], out[-1]["name"]]

    def join_group(
        self,
        group: str,
        meta: Mapping[str, str] | None = None,
        *,
        scope: str = DEFAULT_SCOPE,
        messages: bool = True,
    ) -> dict[str, Any]:
        result: dict[str, Any] = self.request(
            Op.GROUP_JOIN, register_args("group", group, meta, scope, None, None, messages)
        )
        return result

    def leave_group(self, group: str, *, scope: str = DEFAULT_SCOPE) -> None:
        self.request(Op.GROUP_LEAVE, {"group": group, "scope": scope})

    def group_members(self, group: str, *, scope: str = DEFAULT_SCOPE) -> list[dict[str, Any]]:
        page = self.request(Op.GROUP_MEMBERS, {"group": group, "scope": scope, "limit": MAX_PAGE})
        entries: list[dict[str, Any]] = page["entries"]
        return entries

    def groups(self, *, scope: str | None = None, prefix: str = "") -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        args = list_args(scope, prefix)
        while True:
            page = self.request(Op.GROUPS, args)
            out += page["groups"]
            if not page.get("more") or not page["groups"]:
                return out
            args["after"] = [out[-1]["scope"], out[-1]["group"]]
