"""The local API's framing and envelopes, sans-I/O.

Normative spec: ``proto/api.cddl``. Applications talk to their local daemon over
a Unix stream socket. Each frame is a 4-byte big-endian length followed by that
many bytes holding exactly one CBOR map. Three kinds of map travel:

* request (client to server): ``{"id": uint, "op": text, ? "args": map}``
* response (server to client): ``{"id": uint / null, "ok": true, "result": any}``
  or ``{"id": ..., "ok": false, "error": {"code": text, "message": text}}``
* event (server to client): ``{"stream": uint, "event": text, "data": map}``,
  where ``stream`` is the id of the request that opened the stream (``watch``),
  or 0 (:data:`CONNECTION_STREAM`) for events about the connection itself (a
  registry ``conflict`` for one of its entries), which need no watch.

This module does no I/O (no sockets, no trio) so that the async client, the
blocking client, the trio server and the tests all share one implementation of
the byte-level rules, the way h11 separates HTTP/1.1 from its transports. It
also holds the vocabulary both ends share (:class:`Op`, :class:`ErrorCode`,
:class:`Topic`) and the text form of addresses, and it depends on no core
module: a frame is checked without knowing what any op means.

Forward compatibility: unknown keys in any map are ignored by both sides, so a
newer client can add optional args and a newer daemon can add result fields.
"""

from __future__ import annotations

import enum
import io
import ipaddress
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeGuard

import cbor2

from peerd.wire.messages import Addr

DEFAULT_MAX_FRAME = 1 << 20
"""Largest frame body (bytes, excluding the 4-byte header) accepted by default.

It bounds the memory one client can make the daemon buffer. A ``members`` reply
for a few thousand nodes fits easily; both ends can raise it."""

HEADER = struct.Struct(">I")
MAX_UINT = 2**64 - 1


class ErrorCode(enum.StrEnum):
    """The ``error.code`` values. Stable: clients branch on them."""

    BAD_FRAME = "bad_frame"  # undecodable frame; the server answers with id null and closes
    UNKNOWN_OP = "unknown_op"
    BAD_ARGS = "bad_args"
    NOT_FOUND = "not_found"
    CONFLICT = "conflict"
    UNAVAILABLE = "unavailable"  # daemon not ready, shutting down, or overloaded
    # send: the name is held by a process that takes no messages (it was
    # registered with "messages": false, e.g. by `peerd exec`)
    NO_RECEIVER = "no_receiver"
    # send: the owner's mailbox is full (its process is not reading), or all
    # mailboxes of the owner's daemon together are at their bound
    MAILBOX_FULL = "mailbox_full"
    INTERNAL = "internal"  # a bug in the daemon; the message says what
    # the caller's uid/groups may not do this (peerd.shell.authz); the message names the rule
    FORBIDDEN = "forbidden"


class Op(enum.StrEnum):
    """Operation names. A StrEnum, so ``match op: case Op.STATUS`` works on the raw text."""

    STATUS = "status"
    MEMBERS = "members"
    SET_TAGS = "set-tags"
    LEAVE = "leave"
    JOIN = "join"
    KEYS_LIST = "keys.list"
    KEYS_INSTALL = "keys.install"
    KEYS_USE = "keys.use"
    KEYS_REMOVE = "keys.remove"
    WATCH = "watch"
    UNWATCH = "unwatch"
    # registry (names are unique per scope; groups have many members)
    REGISTER = "register"
    UNREGISTER = "unregister"
    UPDATE = "update"
    LOOKUP = "lookup"
    LIST = "list"
    GROUP_JOIN = "group.join"
    GROUP_LEAVE = "group.leave"
    GROUP_MEMBERS = "group.members"
    GROUPS = "groups"
    # partial mesh
    EVENT = "event"
    SEND = "send"


class Topic(enum.StrEnum):
    """Topics a ``watch`` can subscribe to."""

    MEMBERS = "members"
    REGISTRY = "registry"
    EVENTS = "events"  # user events (``event`` op) from every node


CONNECTION_STREAM = 0
"""The stream id of events about the connection itself (not opened by a
request): a registry ``conflict`` for an entry the connection owns. A
``watch`` request may therefore not use id 0."""


STREAM_END = "end"
"""Event name the server sends when it ends a stream on its own (for instance a
watcher that fell too far behind). ``data`` may carry ``code`` and ``message``.
A stream closed by ``unwatch`` gets no ``end`` event: the unwatch reply is the end."""


class FrameError(Exception):
    """A frame that cannot be used. The connection cannot continue after it.

    ``code`` is an :class:`ErrorCode` value (normally ``bad_frame``) and
    ``message`` a one-line human explanation, sent back to the peer as is."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class ApiError(Exception):
    """An operation failed: the daemon answered ``ok: false``.

    Raised by backends to answer a request with an error, and by clients when
    the daemon answered with one. ``code`` is an :class:`ErrorCode` value."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


# --- envelopes ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Request:
    id: int
    op: str
    args: dict[str, Any] = field(default_factory=dict)

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "op": self.op}
        if self.args:
            out["args"] = self.args
        return out


@dataclass(frozen=True, slots=True)
class ErrorInfo:
    code: str
    message: str


@dataclass(frozen=True, slots=True)
class Response:
    """A reply. ``id`` is None only on the ``bad_frame`` reply to an unparsable frame."""

    id: int | None
    ok: bool
    result: Any = None
    error: ErrorInfo | None = None

    @classmethod
    def success(cls, id: int, result: Any) -> Response:
        return cls(id, True, result)

    @classmethod
    def failure(cls, id: int | None, code: str, message: str) -> Response:
        return cls(id, False, None, ErrorInfo(code, message))

    def to_wire(self) -> dict[str, Any]:
        if self.ok:
            return {"id": self.id, "ok": True, "result": self.result}
        assert self.error is not None
        return {
            "id": self.id,
            "ok": False,
            "error": {"code": self.error.code, "message": self.error.message},
        }

    def unwrap(self) -> Any:
        """The result, or :class:`ApiError` for an error reply."""
        if self.ok:
            return self.result
        assert self.error is not None
        raise ApiError(self.error.code, self.error.message)


@dataclass(frozen=True, slots=True)
class Event:
    """A server-pushed event on stream ``stream`` (the id of the opening request)."""

    stream: int
    event: str
    data: dict[str, Any]

    def to_wire(self) -> dict[str, Any]:
        return {"stream": self.stream, "event": self.event, "data": self.data}


def _uint(value: Any) -> TypeGuard[int]:
    # bool is an int subclass in Python but a distinct CBOR type: reject it.
    return type(value) is int and 0 <= value <= MAX_UINT


def _bad(message: str) -> FrameError:
    return FrameError(ErrorCode.BAD_FRAME, message)


def parse_request(frame: Mapping[Any, Any]) -> Request:
    """Validate a decoded frame as a request (server side).

    Raises :class:`FrameError` (``bad_frame``) when a field is missing or has the
    wrong type: such a client is broken, and guessing its intent is worse than
    telling it so. Unknown keys are ignored."""
    rid = frame.get("id")
    if not _uint(rid):
        raise _bad('request "id" must be an unsigned integer')
    op = frame.get("op")
    if type(op) is not str:
        raise _bad('request "op" must be text')
    args = frame.get("args", {})
    if type(args) is not dict:
        raise _bad('request "args" must be a map')
    if any(type(k) is not str for k in args):
        raise _bad('request "args" keys must be text')
    return Request(rid, op, args)


def parse_server_frame(frame: Mapping[Any, Any]) -> Response | Event:
    """Validate a decoded frame from the server (client side): a response or an event."""
    if "stream" in frame:
        stream, name, data = frame.get("stream"), frame.get("event"), frame.get("data")
        if not _uint(stream):
            raise _bad('event "stream" must be an unsigned integer')
        if type(name) is not str:
            raise _bad('event "event" must be text')
        if type(data) is not dict:
            raise _bad('event "data" must be a map')
        return Event(stream, name, data)
    rid = frame.get("id")
    if rid is not None and not _uint(rid):
        raise _bad('response "id" must be an unsigned integer or null')
    ok = frame.get("ok")
    if type(ok) is not bool:
        raise _bad('response "ok" must be a bool')
    if ok:
        if "result" not in frame:
            raise _bad('ok response without "result"')
        return Response(rid, True, frame["result"])
    error = frame.get("error")
    if type(error) is not dict:
        raise _bad('error response "error" must be a map')
    code, message = error.get("code"), error.get("message")
    if type(code) is not str or type(message) is not str:
        raise _bad('error "code" and "message" must be text')
    return Response(rid, False, None, ErrorInfo(code, message))


# --- framing ------------------------------------------------------------------


# Reject map keys other than text/bytes (a hash-collision denial of service:
# many int keys with one hash) and duplicate keys. cbor2 >= 6.2 has both
# options (peerd.wire.codec refuses to import on an older one).
_DECODER_OPTIONS: dict[str, Any] = {"strict_hashable_types": True, "allow_duplicate_keys": False}


def decode_body(body: bytes) -> dict[Any, Any]:
    """Decode one frame body: exactly one CBOR map and nothing after it."""
    if not body:
        raise _bad("empty frame")
    fp = io.BytesIO(body)
    try:
        obj = cbor2.CBORDecoder(fp, **_DECODER_OPTIONS).decode()
    except RecursionError:
        raise _bad("not CBOR: nesting too deep") from None
    except Exception as exc:
        # Hostile input makes cbor2 raise many types (CBORDecodeError,
        # ValueError from semantic tags, OverflowError, ...): all mean garbage.
        raise _bad(f"not CBOR: {str(exc)[:120]}") from None
    if fp.tell() != len(body):
        raise _bad(f"{len(body) - fp.tell()} bytes after the CBOR item")
    if type(obj) is not dict:
        raise _bad(f"frame is a CBOR {type(obj).__name__}, not a map")
    return obj


def encode_frame(
    obj: Mapping[str, Any] | Request | Response | Event, *, max_frame: int = DEFAULT_MAX_FRAME
) -> bytes:
    """Header plus CBOR body for one frame.

    Raises :class:`FrameError` if the body would exceed ``max_frame`` (the peer
    would drop the connection on it, so it is better to fail the one call), and
    ``cbor2.CBOREncodeError`` if ``obj`` holds something CBOR cannot carry."""
    if isinstance(obj, Request | Response | Event):
        obj = obj.to_wire()
    body = cbor2.dumps(obj)
    if len(body) > max_frame:
        raise _bad(f"frame of {len(body)} bytes exceeds the {max_frame}-byte limit")
    return HEADER.pack(len(body)) + body


class FrameDecoder:
    """Split a byte stream into frames: ``feed(data)``, then ``next_frame()``
    until it returns None.

    An oversized length prefix is rejected as soon as the header arrives, so a
    hostile peer cannot make us buffer a body first. After any
    :class:`FrameError` the decoder stays failed (every later ``next_frame``
    raises the same error): the protocol closes the connection on bad framing,
    and a failed decoder can never be mistaken for a healthy one."""

    _COMPACT_AT = 1 << 16

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self.max_frame = max_frame
        self._buf = bytearray()
        self._pos = 0
        self._error: FrameError | None = None

    def feed(self, data: bytes | bytearray) -> None:
        if self._error is None:
            self._buf += data

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as frames (0 at a frame boundary)."""
        return len(self._buf) - self._pos

    def next_frame(self) -> dict[Any, Any] | None:
        """The next complete frame as a dict, or None if more bytes are needed."""
        if self._error is not None:
            raise self._error
        try:
            return self._next()
        except FrameError as exc:
            self._error = exc
            self._buf = bytearray()
            self._pos = 0
            raise

    def _next(self) -> dict[Any, Any] | None:
        avail = len(self._buf) - self._pos
        if avail < HEADER.size:
            return None
        (length,) = HEADER.unpack_from(self._buf, self._pos)
        if length > self.max_frame:
            raise _bad(f"frame length {length} exceeds the {self.max_frame}-byte limit")
        if avail < HEADER.size + length:
            return None
        start = self._pos + HEADER.size
        body = bytes(self._buf[start : start + length])
        self._pos = start + length
        if self._pos == len(self._buf):
            self._buf.clear()
            self._pos = 0
        elif self._pos >= self._COMPACT_AT:
            del self._buf[: self._pos]
            self._pos = 0
        return decode_body(body)


# --- addresses ----------------------------------------------------------------


def format_addr(addr: Addr) -> str:
    """``host:port``, with IPv6 literals in brackets (``[::1]:7946``)."""
    host, port = addr
    if ":" in host:
        return f"[{host}]:{port}"
    return f"{host}:{port}"


def _port(text: str, original: str) -> int:
    # isdigit() alone would accept non-ASCII digits that int() then parses.
    if not (text.isascii() and text.isdigit()):
        raise ValueError(f"invalid address {original!r}: port {text!r} is not a number")
    port = int(text)
    if not 1 <= port <= 65535:
        raise ValueError(f"invalid address {original!r}: port {port} is out of range 1-65535")
    return port


def parse_addr(text: str, default_port: int | None = None) -> Addr:
    """Parse ``"1.2.3.4:5"``, ``"[::1]:5"``, ``"::1"`` or ``"1.2.3.4"`` (with
    ``default_port``) into ``(ip_text, port)``.

    Only IP literals are accepted, plus ``localhost`` as 127.0.0.1: this
    function runs inside the daemon, where a blocking DNS lookup must not
    happen by surprise. Callers that want names resolve them first (the CLI
    does). The host is returned normalised (``str(ipaddress.ip_address(h))``).
    Raises ValueError with a message naming the offending input."""
    if type(text) is not str:
        raise ValueError(f"invalid address {text!r}: must be text")
    port_text: str | None = None
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError(f"invalid address {text!r}: missing ']'")
        host, rest = text[1:end], text[end + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"invalid address {text!r}: expected ':' after ']'")
            port_text = rest[1:]
        if ":" not in host:
            raise ValueError(f"invalid address {text!r}: brackets are only for IPv6")
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    else:
        host = text  # no colon, or a bare IPv6 literal (which cannot carry a port)
    if host.lower() == "localhost":
        ip_text = "127.0.0.1"
    else:
        try:
            ip_text = str(ipaddress.ip_address(host))
        except ValueError:
            hint = (
                "IPv6 with a port needs brackets, e.g. [::1]:7946"
                if text.count(":") > 1
                else "not an IP address (host names are not resolved here)"
            )
            raise ValueError(f"invalid address {text!r}: {hint}") from None
    port = _port(port_text, text) if port_text is not None else default_port
    if port is None:
        raise ValueError(f"invalid address {text!r}: missing port (use HOST:PORT)")
    return (ip_text, port)
