"""The local API server: applications and the CLI talk to the daemon here.

Protocol: :mod:`peerd.api.protocol`, spec ``proto/api.cddl``. This module is
only transport: it accepts Unix-socket connections, splits them into frames,
hands each request to a :class:`Backend` and writes back what the backend
answers. What an op *means* is the backend's business (the daemon's runner
implements it), so new ops (registry, messaging) need no change here. The
connection as the backend sees it and the :class:`Backend` contract are in
:mod:`peerd.shell.api_conn`; binding the socket file and reading peer
credentials, in :mod:`peerd.shell.api_socket`.

Shape of one connection (all tasks in one nursery per connection)::

    reader ──request──> handler task ─┐
       │                handler task ─┼──> outgoing queue ──> writer ──> socket
       │                watch stream ─┘        (frames)
       └─ bad frame: error frame (id null), then close

* Every frame goes through one queue and one writer task, so a frame is never
  interleaved with another and cancelling a handler can never cut a frame in
  half on the socket.
* Requests run concurrently (pipelining), at most ``max_inflight`` per
  connection: past that the reader stops reading, and the kernel's socket
  buffer pushes back on the client instead of our memory growing.
* Quick requests are batched: when the backend says an op answers at once
  (``batchable``), the requests of that kind found in one read are handed
  to ``call_batch`` together and answered in one write, instead of one task
  and one write each. This is what makes a pipelining client fast (tens of
  thousands of registry writes per second); a request-reply client sees a
  batch of one. The writer also joins the frames waiting for it into one
  write.
* ``watch`` and ``unwatch`` are handled here, because streams are a transport
  concern: the backend only hands over a channel of events per watch.
* A client that stops reading fills the bounded queue (frames and bytes);
  handlers then wait, and the backend sees ``push_nowait`` fail or its watch
  channel fill up, and may drop the watcher. Nothing a client does can block
  the daemon's core.
* What one client may hold (connection slots per uid with a reserve for
  root, idle and partial-frame timeouts, queue and mailbox bytes) is bounded
  by the rules of :mod:`peerd.shell.api_limits`; every refusal is counted.

Who may connect is the socket file's permissions (the directory is 0o750,
the socket 0o660). Each connection records the peer's credentials
(SO_PEERCRED, SO_PEERGROUPS): what a caller may do is the backend's policy
(:mod:`peerd.shell.authz`); they also give the per-uid connection share and
the logs.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import errno
import itertools
import logging
import os
import socket
from collections.abc import Callable, Mapping
from typing import Any, TypeAlias

import trio

from peerd.api.protocol import (
    CONNECTION_STREAM,
    DEFAULT_MAX_FRAME,
    STREAM_END,
    ApiError,
    ErrorCode,
    FrameDecoder,
    FrameError,
    Op,
    Request,
    Response,
    encode_frame,
    parse_request,
    parse_unwatch_args,
    parse_watch_args,
    parse_watch_snapshot,
)
from peerd.shell.api_conn import (
    MAILBOX_BYTES,
    MAILBOX_MESSAGES,
    Backend,
    Connection,
    EventItem,
    _Stream,
)
from peerd.shell.api_limits import (
    DEFAULT_MAILBOX_TOTAL_BYTES,
    DEFAULT_MAX_CONNECTIONS,
    Admission,
    ApiLimits,
    Close,
    MailboxBudget,
    ReadTimer,
    Refusals,
    Shared,
)
from peerd.shell.api_socket import (
    ApiSocketError,
    PeerCred,
    _unlink_if_ours,
    bind_api_socket,
    peer_cred,
)

__all__ = [
    "DEFAULT_MAX_CONNECTIONS",
    "MAILBOX_BYTES",  # the mailbox defaults, for peerd.shell.messaging
    "MAILBOX_MESSAGES",
    "ApiError",
    "ApiLimits",
    "ApiServer",
    "ApiSocketError",
    "Backend",
    "Connection",
    "PeerCred",
    "bind_api_socket",
    "serve_api",
]

log = logging.getLogger("peerd.api")

DEFAULT_MAX_INFLIGHT = 64  # concurrent requests per connection before the reader pauses
OUTGOING_QUEUE_FRAMES = 256  # frames waiting for the writer, per connection
CLOSE_GRACE_S = 5.0  # time to flush the last frames to a client we are closing
RECEIVE_CHUNK = 65536
_RESOURCE_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}


ListenerArg: TypeAlias = (
    str
    | os.PathLike[str]
    | socket.socket
    | trio.socket.SocketType
    | trio.abc.Listener[trio.abc.Stream]
)


async def serve_api(
    listener: ListenerArg,
    backend: Backend,
    *,
    max_frame: int = DEFAULT_MAX_FRAME,
    max_connections: int | None = None,
    mailbox_messages: int = MAILBOX_MESSAGES,
    mailbox_bytes: int = MAILBOX_BYTES,
    mailbox_total_bytes: int = DEFAULT_MAILBOX_TOTAL_BYTES,
    limits: ApiLimits | None = None,
    task_status: trio.TaskStatus[ApiServer] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the API until cancelled.

    ``listener`` is one of:

    * a filesystem path: bind a Unix stream socket there (see
      :func:`bind_api_socket`), and remove the socket file again on exit;
    * an already bound and listening socket (stdlib or trio), e.g. from
      systemd socket activation; it is left in place on exit;
    * any ``trio.abc.Listener`` (tests use in-memory listeners).

    Use with ``await nursery.start(serve_api, path, backend)``: ``start``
    returns once the socket accepts connections, with the :class:`ApiServer`
    (its ``path``, live ``connections`` and ``counters``). Setup problems raise
    :class:`ApiSocketError` before that point.
    """
    server = ApiServer(
        backend,
        max_frame=max_frame,
        max_connections=max_connections,
        mailbox_messages=mailbox_messages,
        mailbox_bytes=mailbox_bytes,
        mailbox_total_bytes=mailbox_total_bytes,
        limits=limits,
    )
    await server.serve(listener, task_status=task_status)


class ApiServer:
    """The accept loop and the per-connection machinery. See :func:`serve_api`."""

    def __init__(
        self,
        backend: Backend,
        *,
        max_frame: int = DEFAULT_MAX_FRAME,
        max_connections: int | None = None,
        max_inflight: int = DEFAULT_MAX_INFLIGHT,
        mailbox_messages: int = MAILBOX_MESSAGES,
        mailbox_bytes: int = MAILBOX_BYTES,
        mailbox_total_bytes: int = DEFAULT_MAILBOX_TOTAL_BYTES,
        limits: ApiLimits | None = None,
        credentials: Callable[[trio.abc.Stream], PeerCred | None] = peer_cred,
        daemon_uid: int | None = None,
    ) -> None:
        limits = limits if limits is not None else ApiLimits()
        if max_connections is not None:  # the reserve and the share shrink with it
            reserved = min(limits.reserved_connections, max_connections // 2)
            limits = dataclasses.replace(
                limits,
                max_connections=max_connections,
                reserved_connections=reserved,
                max_connections_per_uid=min(
                    limits.max_connections_per_uid, max(1, max_connections - reserved)
                ),
            )
        self.backend = backend
        self.limits = limits
        self.max_frame = max_frame
        self.max_connections = limits.max_connections
        self.max_inflight = max_inflight
        self.mailbox_messages = mailbox_messages
        self.mailbox_bytes = mailbox_bytes
        self.path: str | None = None
        self.connections: dict[int, Connection] = {}
        self.counters: collections.Counter[str] = collections.Counter()
        self.admission = Admission(limits, daemon_uid)
        self.shared = Shared(MailboxBudget(mailbox_total_bytes), Refusals(self.counters))
        self._credentials = credentials
        self._ids = itertools.count(1)

    async def serve(
        self,
        listener: ListenerArg,
        *,
        task_status: trio.TaskStatus[ApiServer] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        owned_inode: tuple[int, int] | None = None
        if isinstance(listener, str | os.PathLike):
            self.path = os.fspath(listener)
            sock = await bind_api_socket(self.path)
            st = os.stat(self.path)
            owned_inode = (st.st_dev, st.st_ino)
            listener = trio.SocketListener(sock)
        elif isinstance(listener, socket.socket):
            listener = trio.SocketListener(trio.socket.from_stdlib_socket(listener))
        elif isinstance(listener, trio.socket.SocketType):
            listener = trio.SocketListener(listener)
        try:
            async with listener, trio.open_nursery() as nursery:
                task_status.started(self)
                await self._accept_loop(listener, nursery)
        finally:
            if owned_inode is not None and self.path is not None:
                _unlink_if_ours(self.path, owned_inode)

    async def _accept_loop(
        self, listener: trio.abc.Listener[trio.abc.Stream], nursery: trio.Nursery
    ) -> None:
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:
                if exc.errno not in _RESOURCE_ERRNOS:
                    raise
                # Out of file descriptors or memory: keep the daemon up, retry
                # shortly (existing connections may close and free some).
                log.error("API accept failed: %s; retrying", exc)
                self.counters["accept_errors"] += 1
                await trio.sleep(0.1)
                continue
            cred = self._credentials(stream)
            refusal = self.admission.refusal(cred.uid if cred is not None else None)
            if refusal is not None:
                reason, message = refusal
                self.counters["refused_connections"] += 1
                who = f" (pid {cred.pid}, uid {cred.uid})" if cred is not None else ""
                self.shared.refusals.refuse(reason, message + who)
                nursery.start_soon(self._refuse, stream, message)
            else:
                # Registered here, before its task runs, so that the limits
                # hold even when many connections arrive at once.
                self.admission.add(cred.uid if cred is not None else None)
                send, receive = trio.open_memory_channel[bytes](OUTGOING_QUEUE_FRAMES)
                conn = Connection(
                    next(self._ids),
                    cred,
                    send,
                    self.max_frame,
                    self.max_inflight,
                    mailbox_messages=self.mailbox_messages,
                    mailbox_bytes=self.mailbox_bytes,
                    queue_bytes=self.limits.queue_bytes,
                    shared=self.shared,
                )
                self.connections[conn.id] = conn
                nursery.start_soon(self._serve_connection, stream, conn, receive)

    async def _refuse(self, stream: trio.abc.Stream, message: str) -> None:
        """Tell a client over the limit why, instead of leaving it hanging."""
        frame = encode_frame(Response.failure(None, ErrorCode.UNAVAILABLE, message))
        with (
            trio.move_on_after(CLOSE_GRACE_S),
            contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError),
        ):
            await stream.send_all(frame)
        await trio.aclose_forcefully(stream)

    async def _serve_connection(
        self, stream: trio.abc.Stream, conn: Connection, receive: trio.MemoryReceiveChannel[bytes]
    ) -> None:
        send = conn._outgoing
        self.counters["connections"] += 1
        log.debug("API connection %r opened", conn)
        try:
            with conn._cancel_scope:
                async with trio.open_nursery() as top:
                    top.start_soon(_write_loop, stream, receive, top.cancel_scope, conn)
                    async with send:
                        async with trio.open_nursery() as work:
                            error = await self._read_loop(stream, conn, work)
                            conn._reading = False
                            if error is not None:
                                work.cancel_scope.cancel()
                            else:
                                # EOF: let pending calls answer; streams would never end.
                                for s in list(conn._streams.values()):
                                    s.scope.cancel()
                        if error is not None:
                            if error.reason is None:
                                self.counters["bad_frames"] += 1
                                log.info("API connection %r: %s; closing", conn, error.message)
                            else:
                                self.shared.refusals.refuse(
                                    error.reason, f"{conn!r}: {error.message}; closing"
                                )
                            frame = encode_frame(Response.failure(None, error.code, error.message))
                            conn._put_nowait(frame)
                    # The queue is closed: the writer drains it and exits. Bound
                    # that for a client that does not read.
                    top.cancel_scope.deadline = trio.current_time() + CLOSE_GRACE_S
        except Exception:
            # A bug in one connection must not take the server down with it.
            self.counters["internal_errors"] += 1
            log.exception("API connection %r failed", conn)
        finally:
            conn._closed = True
            conn._drop_mail()
            if conn.on_mail is not None:
                conn.on_mail(None)
            del self.connections[conn.id]
            if not conn._released:
                self.admission.remove(conn.cred.uid if conn.cred is not None else None)
            conn._streams.clear()
            try:
                self.backend.connection_closed(conn)
            except Exception:
                log.exception("API backend failed in connection_closed(%r)", conn)
            await trio.aclose_forcefully(stream)
            log.debug("API connection %r closed", conn)

    async def _read_loop(
        self, stream: trio.abc.Stream, conn: Connection, work: trio.Nursery
    ) -> Close | None:
        """Read and dispatch requests until EOF (None), a bad frame or a
        timeout (why to close)."""
        decoder = FrameDecoder(self.max_frame)
        timer = ReadTimer(self.limits)
        while True:
            partial = decoder.buffered > 0
            try:
                data = await timer.receive(stream, RECEIVE_CHUNK, partial)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return None
            if data is None:  # timed out
                if partial:
                    return timer.read_timeout()
                uid = conn.cred.uid if conn.cred is not None else None
                if self._idle(conn) and self.admission.pressed(uid):
                    # The slot is given back now: idle connections timing
                    # out together close only down to below the pressure.
                    self.admission.remove(uid)
                    conn._released = True
                    return timer.idle_timeout()
                continue
            if not data:
                return None
            decoder.feed(data)
            batch: list[Request] = []
            error: FrameError | None = None
            while True:
                try:
                    frame = decoder.next_frame()
                    if frame is None:
                        break
                    request = parse_request(frame)
                except FrameError as exc:
                    error = exc
                    break
                self.counters["requests"] += 1
                # Checked here, in arrival order: handler tasks start in no
                # particular order.
                in_use = request.id in conn._ids_in_use
                if not in_use:
                    conn._ids_in_use[request.id] = request
                    if self._batchable(request):
                        batch.append(request)
                        continue
                await conn._inflight.acquire()
                work.start_soon(self._handle, conn, request, in_use)
            if batch:
                begin = getattr(self.backend, "begin_batch", None)
                if begin is None:
                    await self._run_batch(conn, batch)
                else:
                    await self._start_batch(conn, batch, begin, work)
            if error is not None:
                return Close(error.code, error.message, None)

    def _idle(self, conn: Connection) -> bool:
        """No request the backend is working on, no watch, no mail, nothing
        owned in the backend. (Answers the client did not read do not count:
        a client that neither reads nor writes is idle.)"""
        if conn._busy or conn._streams or conn._mailbox:
            return False
        holds = getattr(self.backend, "holds_state", None)
        try:
            return holds is None or not holds(conn)
        except Exception:
            log.exception("API backend failed in holds_state(%r)", conn)
            return False

    def _batchable(self, request: Request) -> bool:
        batchable = getattr(self.backend, "batchable", None)
        if batchable is None or request.op in (Op.WATCH, Op.UNWATCH):
            return False
        try:
            return bool(batchable(request.op, request.args))
        except Exception:
            log.exception("API backend failed in batchable(%r)", request.op)
            return False

    async def _start_batch(
        self, conn: Connection, batch: list[Request], begin: Any, work: trio.Nursery
    ) -> None:
        """Start a batch in order (the backend's ``begin_batch``), and let its
        results be awaited and written by a task of its own, so the next
        batch of this connection can start meanwhile (bounded by the
        connection's in-flight limit, one slot per batch)."""
        try:
            finish = await begin(conn, [(r.op, r.args) for r in batch])
        except Exception as exc:  # answered (and logged) as internal errors
            await self._run_batch(conn, batch, failed=exc)
            return
        await conn._inflight.acquire()

        async def finish_and_answer() -> None:
            try:
                await self._run_batch(conn, batch, finish=finish)
            finally:
                conn._inflight.release()

        work.start_soon(finish_and_answer)

    async def _run_batch(
        self,
        conn: Connection,
        batch: list[Request],
        *,
        finish: Any = None,
        failed: Exception | None = None,
    ) -> None:
        """Answer quick requests together: one backend call, one write."""
        try:
            try:
                if failed is not None:
                    raise failed
                conn._busy += 1
                try:
                    if finish is not None:
                        results = await finish()
                    else:
                        results = await self.backend.call_batch(  # type: ignore[attr-defined]
                            conn, [(r.op, r.args) for r in batch]
                        )
                finally:
                    conn._busy -= 1
                if len(results) != len(batch):
                    raise RuntimeError(f"{len(results)} results for {len(batch)} requests")
            except Exception as exc:
                self.counters["internal_errors"] += 1
                log.exception("API batch of %d failed on %r", len(batch), conn)
                results = [exc] * len(batch)
            frames = []
            for request, result in zip(batch, results, strict=True):
                if isinstance(result, ApiError):
                    response = Response.failure(request.id, result.code, result.message)
                elif isinstance(result, Exception):
                    response = Response.failure(
                        request.id,
                        ErrorCode.INTERNAL,
                        f"{request.op}: {type(result).__name__}: {result}",
                    )
                else:
                    response = Response.success(request.id, result)
                frames.append(self._encode_response(response))
            await conn._put(b"".join(frames))
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass  # connection going away; nobody to answer
        finally:
            for request in batch:
                if conn._ids_in_use.get(request.id) is request:
                    del conn._ids_in_use[request.id]

    async def _handle(self, conn: Connection, request: Request, id_in_use: bool) -> None:
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                conn._inflight.release()

        try:
            if id_in_use:
                response = Response.failure(
                    request.id,
                    ErrorCode.CONFLICT,
                    f"request id {request.id} is already in use on this connection",
                )
            elif request.op == Op.WATCH:
                await self._watch(conn, request, release)
                return
            else:
                response = await self._call(conn, request)
            await conn._put(self._encode_response(response))
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass  # connection going away; nobody to answer
        finally:
            if conn._ids_in_use.get(request.id) is request:
                del conn._ids_in_use[request.id]
            release()

    async def _call(self, conn: Connection, request: Request) -> Response:
        try:
            if request.op == Op.UNWATCH:
                return Response.success(request.id, self._unwatch(conn, request.args))
            conn._busy += 1
            try:
                result = await self.backend.call(conn, request.op, request.args)
            finally:
                conn._busy -= 1
            return Response.success(request.id, result)
        except ApiError as exc:
            return Response.failure(request.id, exc.code, exc.message)
        except Exception as exc:
            self.counters["internal_errors"] += 1
            log.exception("API op %r failed on %r", request.op, conn)
            return Response.failure(
                request.id, ErrorCode.INTERNAL, f"{request.op}: {type(exc).__name__}: {exc}"
            )

    def _encode_response(self, response: Response) -> bytes:
        """Encode, turning an unencodable or oversized result into an internal error."""
        try:
            return encode_frame(response, max_frame=self.max_frame)
        except Exception as exc:
            self.counters["internal_errors"] += 1
            log.error("API response to request %s cannot be sent: %s", response.id, exc)
            message = exc.message if isinstance(exc, FrameError) else f"unencodable: {exc}"
            return encode_frame(
                Response.failure(
                    response.id, ErrorCode.INTERNAL, f"result cannot be sent: {message}"
                )
            )

    async def _watch(self, conn: Connection, request: Request, release: Callable[[], None]) -> None:
        try:
            if request.id == CONNECTION_STREAM:
                raise ApiError(
                    ErrorCode.BAD_ARGS,
                    f"a watch cannot use request id "
                    f"{CONNECTION_STREAM}: it is the connection's own event stream",
                )
            topics = parse_watch_args(request.args)
            if parse_watch_snapshot(request.args):
                # Only then: backends without snapshots keep working.
                channel = self.backend.watch(conn, topics, snapshot=True)
            else:
                channel = self.backend.watch(conn, topics)
        except ApiError as exc:
            await conn._put(
                self._encode_response(Response.failure(request.id, exc.code, exc.message))
            )
            return
        except Exception as exc:
            log.exception("API backend failed in watch(%r) on %r", request.args, conn)
            await conn._put(
                self._encode_response(
                    Response.failure(
                        request.id, ErrorCode.INTERNAL, f"watch: {type(exc).__name__}: {exc}"
                    )
                )
            )
            return
        entry = _Stream(trio.CancelScope(), channel)
        try:
            if not conn._reading:
                return  # the client hung up while we set up the watch
            conn._streams[request.id] = entry
            with entry.scope:
                await conn._put(self._encode_response(Response.success(request.id, {})))
                release()  # a long-lived stream does not count as an in-flight request
                await self._forward(conn, request.id, channel)
        finally:
            if conn._streams.get(request.id) is entry:
                del conn._streams[request.id]
            # Closing our end tells the backend (BrokenResourceError on send).
            await trio.aclose_forcefully(channel)

    async def _forward(
        self, conn: Connection, stream_id: int, channel: trio.abc.ReceiveChannel[EventItem]
    ) -> None:
        async for item in channel:
            try:
                name, data = item
                if type(name) is not str or not isinstance(data, Mapping):
                    raise ValueError(f"not an (event, data) pair: {item!r:.80}")
                frame = conn._encode_event(stream_id, name, data)
            except ValueError as exc:
                self.counters["internal_errors"] += 1
                log.error("API watch %s on %r: dropping event: %s", stream_id, conn, exc)
                continue
            await conn._put(frame)
            if name == STREAM_END:
                return
        # The backend closed the stream without saying why.
        await conn._put(conn._encode_event(stream_id, STREAM_END, {}))

    def _unwatch(self, conn: Connection, args: dict[str, Any]) -> dict[str, Any]:
        stream_id = parse_unwatch_args(args)
        entry = conn._streams.pop(stream_id, None)
        if entry is None:
            raise ApiError(ErrorCode.NOT_FOUND, f"no open stream {stream_id}")
        # Cancelling before the reply is queued guarantees no event of this
        # stream follows the reply: a cancelled task cannot queue another frame.
        entry.scope.cancel()
        conn._ids_in_use.pop(stream_id, None)  # the id may be reused at once
        return {}


WRITE_COALESCE_BYTES = 256 * 1024


async def _write_loop(
    stream: trio.abc.Stream,
    frames: trio.MemoryReceiveChannel[bytes],
    connection_scope: trio.CancelScope,
    conn: Connection | None = None,
) -> None:
    try:
        async with frames:
            async for frame in frames:
                while True:
                    # Whatever else is already queued goes out in the same write.
                    parts = [frame] if frame else []
                    size = len(frame)
                    while frames.statistics().current_buffer_used and size < WRITE_COALESCE_BYTES:
                        try:
                            more = frames.receive_nowait()
                        except (trio.WouldBlock, trio.EndOfChannel):
                            break
                        parts.append(more)
                        size += len(more)
                    queued = size  # bytes of the queue, given back once written
                    if conn is not None and conn._mailbox and size < WRITE_COALESCE_BYTES:
                        size += conn._take_mail(WRITE_COALESCE_BYTES - size, parts)
                    if parts:
                        await stream.send_all(parts[0] if len(parts) == 1 else b"".join(parts))
                    if conn is not None and queued:
                        conn._gate.give_back(queued)
                    if conn is None or not conn._mailbox:
                        break
                    frame = b""
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        connection_scope.cancel()  # the client is gone: stop everything for it
