"""The local API protocol, sans-I/O: framing, envelopes and op payloads.

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
the byte-level rules, the way h11 separates HTTP/1.1 from its transports.

Besides framing it holds the op vocabulary (:class:`Op`, :class:`ErrorCode`),
argument parsers that turn a request's ``args`` into typed values or raise
``bad_args``, and converters from core data (:class:`MemberInfo`,
:class:`MemberEvent`) to the API's maps. Keeping those next to the framing means
the daemon and the spec cannot drift apart op by op.

Forward compatibility: unknown keys in any map are ignored by both sides, so a
newer client can add optional args and a newer daemon can add result fields.
"""

from __future__ import annotations

import enum
import io
import ipaddress
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeGuard

import cbor2

from peerd import __version__
from peerd.core.events import MemberEvent, MemberInfo, RegEventKind, RegistryEvent
from peerd.core.registry.service import entry_to_dict
from peerd.wire.codec import MAX_TAG_KEY_BYTES, MAX_TAG_VALUE_BYTES, MAX_TAGS
from peerd.wire.messages import Addr, NodeId, RegEntry, RegKind, Status

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
    INTERNAL = "internal"  # a bug in the daemon; the message says what


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


# --- op payloads ----------------------------------------------------------------


def member_to_wire(m: MemberInfo) -> dict[str, Any]:
    """One entry of the ``members`` result and the ``data`` of member events."""
    return {
        "name": m.name,
        "id": m.node.hex(),
        "addr": format_addr(m.addr),
        "status": m.status.label,
        "incarnation": m.incarnation,
        "generation": m.generation,
        "tags": dict(m.tags),
    }


def member_event_to_wire(ev: MemberEvent) -> tuple[str, dict[str, Any]]:
    """``(event name, data)`` for a member event on a ``members`` watch."""
    data = member_to_wire(ev.member)
    if ev.other is not None:
        data["other"] = member_to_wire(ev.other)
    return ev.kind.value, data


def status_to_wire(
    local: MemberInfo, health: int, members: Iterable[MemberInfo], version: str = __version__
) -> dict[str, Any]:
    """The ``status`` result. ``members`` is every known member (counts by status)."""
    counts = {s.label: 0 for s in Status}
    for m in members:
        counts[m.status.label] += 1
    return {
        "name": local.name,
        "id": local.node.hex(),
        "addr": format_addr(local.addr),
        "incarnation": local.incarnation,
        "generation": local.generation,
        "health": health,
        "members": counts,
        "version": version,
    }


def _bad_args(message: str) -> ApiError:
    return ApiError(ErrorCode.BAD_ARGS, message)


def _text_list(args: Mapping[str, Any], key: str) -> list[str]:
    value = args.get(key)
    if type(value) is not list or not value or any(type(v) is not str for v in value):
        raise _bad_args(f'"{key}" must be a non-empty array of text')
    return value


@dataclass(frozen=True, slots=True)
class TagUpdate:
    """Parsed ``set-tags`` args: ``set`` these, ``delete`` those (a null value in
    the request), and with ``replace`` drop every tag not in ``set`` first."""

    set: dict[str, str]
    delete: frozenset[str]
    replace: bool

    def apply(self, current: Mapping[str, str]) -> dict[str, str]:
        """The resulting tags; ApiError(bad_args) if they exceed the tag limit."""
        tags = {} if self.replace else dict(current)
        for key in self.delete:
            tags.pop(key, None)
        tags.update(self.set)
        if len(tags) > MAX_TAGS:
            raise _bad_args(f"a node can have at most {MAX_TAGS} tags")
        return tags


def parse_set_tags_args(args: Mapping[str, Any]) -> TagUpdate:
    """``{"tags": {key: value or null}, ? "replace": bool}``."""
    tags, replace = args.get("tags"), args.get("replace", False)
    if type(tags) is not dict:
        raise _bad_args('"tags" must be a map of text to text (or null to delete)')
    if type(replace) is not bool:
        raise _bad_args('"replace" must be a bool')
    to_set: dict[str, str] = {}
    to_delete: set[str] = set()
    for key, value in tags.items():
        if type(key) is not str or not key:
            raise _bad_args("tag keys must be non-empty text")
        if len(key.encode("utf-8", "surrogatepass")) > MAX_TAG_KEY_BYTES:
            raise _bad_args(f"tag key {key[:20]!r}... is longer than {MAX_TAG_KEY_BYTES} bytes")
        if value is None:
            to_delete.add(key)
        elif type(value) is not str:
            raise _bad_args(f"tag {key!r}: value must be text or null")
        elif len(value.encode("utf-8", "surrogatepass")) > MAX_TAG_VALUE_BYTES:
            raise _bad_args(f"tag {key!r}: value longer than {MAX_TAG_VALUE_BYTES} bytes")
        else:
            to_set[key] = value
    return TagUpdate(to_set, frozenset(to_delete), replace)


def parse_join_args(args: Mapping[str, Any], default_port: int | None = None) -> tuple[Addr, ...]:
    """``{"addrs": ["host:port", ...]}`` as addresses (IP literals, see :func:`parse_addr`)."""
    out: list[Addr] = []
    for text in _text_list(args, "addrs"):
        try:
            out.append(parse_addr(text, default_port))
        except ValueError as exc:
            raise _bad_args(str(exc)) from None
    return tuple(out)


def parse_key_args(args: Mapping[str, Any]) -> str:
    """``{"key": text}`` for keys.install/use/remove (the one-line key format)."""
    key = args.get("key")
    if type(key) is not str or not key.strip():
        raise _bad_args('"key" must be non-empty text')
    return key.strip()


def parse_keys_list_args(args: Mapping[str, Any]) -> bool:
    """``{? "file": bool}`` of keys.list: also list keys only the key file holds."""
    value = args.get("file", False)
    if type(value) is not bool:
        raise _bad_args('"file" must be a bool')
    return value


def parse_key_flags(args: Mapping[str, Any]) -> tuple[bool, bool]:
    """``(force, cluster)`` of keys.install/use/remove (both default false)."""
    out = []
    for name in ("force", "cluster"):
        value = args.get(name, False)
        if type(value) is not bool:
            raise _bad_args(f'"{name}" must be a bool')
        out.append(value)
    return out[0], out[1]


def parse_watch_args(args: Mapping[str, Any]) -> tuple[str, ...]:
    """``{"topics": [text, ...]}``, deduplicated in order. Whether a topic is
    known is the backend's call (new subsystems add topics)."""
    return tuple(dict.fromkeys(_text_list(args, "topics")))


def parse_watch_snapshot(args: Mapping[str, Any]) -> bool:
    """``? "snapshot": bool`` of a watch (default false): the current state of
    each topic first, then its changes (see :data:`SNAPSHOT_END`)."""
    snapshot = args.get("snapshot", False)
    if type(snapshot) is not bool:
        raise _bad_args('"snapshot" must be a bool')
    return snapshot


SNAPSHOT_MEMBER = "member"
"""Watch event (topic ``members``, with ``snapshot``): one member as it is at the cut."""
SNAPSHOT_ENTRY = "entry"
"""Watch event (topic ``registry``, with ``snapshot``): one entry as it is at the cut."""
SNAPSHOT_END = "snapshot_end"
"""Watch event closing the snapshot of one topic: ``{"topic", "count"}``.
Every event of that topic after it is a change made after the cut."""


def with_topic(item: tuple[str, dict[str, Any]], topic: str) -> tuple[str, dict[str, Any]]:
    """A change event as a watch stream carries it: its data names its
    ``topic`` (a copy; the original may be sent elsewhere too)."""
    return item[0], {**item[1], "topic": topic}


def snapshot_member_to_wire(m: MemberInfo) -> tuple[str, dict[str, Any]]:
    """One member of a ``members`` snapshot."""
    data = member_to_wire(m)
    data["topic"], data["snapshot"] = Topic.MEMBERS.value, True
    return SNAPSHOT_MEMBER, data


def snapshot_entry_to_wire(
    origin: NodeId, entry: RegEntry, member: MemberInfo | None = None
) -> tuple[str, dict[str, Any]]:
    """One entry of a ``registry`` snapshot."""
    data = reg_entry_to_wire(origin, entry, member)
    data["topic"], data["snapshot"] = Topic.REGISTRY.value, True
    return SNAPSHOT_ENTRY, data


def snapshot_end_to_wire(topic: str, count: int) -> tuple[str, dict[str, Any]]:
    return SNAPSHOT_END, {"topic": topic, "count": count}


def parse_unwatch_args(args: Mapping[str, Any]) -> int:
    """``{"stream": uint}``."""
    stream = args.get("stream")
    if not _uint(stream):
        raise _bad_args('"stream" must be the id of a watch request')
    return stream


# --- registry ---------------------------------------------------------------------

DEFAULT_SCOPE = "default"
DEFAULT_SETTLE_TIMEOUT_S = 5.0
MAX_SETTLE_TIMEOUT_S = 60.0
DEFAULT_LIST_LIMIT = 1000
MAX_LIST_LIMIT = 10_000
PAGE_BUDGET_BYTES = 768 * 1024
"""A ``list``/``groups``/``group.members`` page stops growing past about this
many bytes (``more`` is then true), so a page always fits the default frame."""


@dataclass(frozen=True, slots=True)
class RegisterArgs:
    """Parsed ``register`` / ``group.join`` args. ``settle_s`` is set for
    ``wait: "settled"`` (the timeout)."""

    kind: RegKind
    scope: str
    name: str
    meta: tuple[tuple[str, str], ...]
    settle_s: float | None
    # False: the holder takes no messages; a send to it fails "no_receiver".
    messages: bool = True


@dataclass(frozen=True, slots=True)
class RegTarget:
    """Parsed ``unregister`` / ``group.leave`` / ``lookup`` / ``group.members``
    args (``meta`` only for ``update``)."""

    kind: RegKind
    scope: str
    name: str
    meta: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class ListArgs:
    """Parsed ``list`` / ``groups`` / ``group.members`` paging args. ``scope``
    None means every scope; ``after`` is the last (scope, name) of the
    previous page."""

    scope: str | None
    prefix: str
    after: tuple[str, str] | None
    limit: int


def _text_arg(args: Mapping[str, Any], key: str, default: str | None = None) -> str:
    value = args.get(key, default)
    if type(value) is not str or (not value and default is None):
        raise _bad_args(f'"{key}" must be non-empty text')
    return value


def _scope_arg(args: Mapping[str, Any]) -> str:
    scope = args.get("scope", DEFAULT_SCOPE)
    if type(scope) is not str or not scope:
        raise _bad_args('"scope" must be non-empty text')
    return scope


def parse_meta_arg(args: Mapping[str, Any], required: bool = False) -> tuple[tuple[str, str], ...]:
    """``"meta": {text: text}`` as sorted pairs (sizes are checked by the core)."""
    if "meta" not in args and not required:
        return ()
    meta = args.get("meta")
    if type(meta) is not dict or any(
        type(k) is not str or type(v) is not str for k, v in meta.items()
    ):
        raise _bad_args('"meta" must be a map of text to text')
    return tuple(sorted(meta.items()))


def parse_register_args(args: Mapping[str, Any], kind: RegKind = RegKind.NAME) -> RegisterArgs:
    """``register``: ``{"name", ? "scope", ? "meta", ? "wait": "settled", ? "timeout_s",
    ? "messages": bool}``;
    ``group.join``: the same with ``"group"`` for ``"name"``."""
    key = "name" if kind is RegKind.NAME else "group"
    name = _text_arg(args, key)
    scope = _scope_arg(args)
    meta = parse_meta_arg(args)
    wait = args.get("wait")
    settle_s: float | None = None
    if wait is not None:
        if wait != "settled":
            raise _bad_args('"wait" must be "settled" (or absent)')
        timeout = args.get("timeout_s", DEFAULT_SETTLE_TIMEOUT_S)
        if type(timeout) not in (int, float) or not 0 < timeout <= MAX_SETTLE_TIMEOUT_S:
            raise _bad_args(f'"timeout_s" must be a number in (0, {MAX_SETTLE_TIMEOUT_S:g}]')
        settle_s = float(timeout)
    messages = args.get("messages", True)
    if type(messages) is not bool:
        raise _bad_args('"messages" must be a boolean')
    return RegisterArgs(kind, scope, name, meta, settle_s, messages)


def parse_target_args(args: Mapping[str, Any], kind: RegKind = RegKind.NAME) -> RegTarget:
    """``{"name", ? "scope"}`` (``"group"`` for groups)."""
    key = "name" if kind is RegKind.NAME else "group"
    return RegTarget(kind, _scope_arg(args), _text_arg(args, key))


def parse_update_args(args: Mapping[str, Any]) -> RegTarget:
    """``update``: ``{"name" or "group", ? "scope", "meta"}``: replace the
    metadata of this connection's name, or of its membership of a group."""
    if ("name" in args) == ("group" in args):
        raise _bad_args('give exactly one of "name" and "group"')
    kind = RegKind.NAME if "name" in args else RegKind.GROUP
    target = parse_target_args(args, kind)
    return RegTarget(kind, target.scope, target.name, parse_meta_arg(args, required=True))


def parse_limit_arg(args: Mapping[str, Any]) -> int:
    """``? "limit"``: at most this many items in one page."""
    limit = args.get("limit", DEFAULT_LIST_LIMIT)
    if not _uint(limit) or not 1 <= limit <= MAX_LIST_LIMIT:
        raise _bad_args(f'"limit" must be an integer from 1 to {MAX_LIST_LIMIT}')
    return limit


def parse_list_args(args: Mapping[str, Any]) -> ListArgs:
    """``{? "scope", ? "prefix", ? "after": [scope, name], ? "limit"}``."""
    scope = args.get("scope")
    if scope is not None and (type(scope) is not str or not scope):
        raise _bad_args('"scope" must be non-empty text (absent: every scope)')
    prefix = args.get("prefix", "")
    if type(prefix) is not str:
        raise _bad_args('"prefix" must be text')
    after = args.get("after")
    if after is not None:
        if type(after) is not list or len(after) != 2 or any(type(x) is not str for x in after):
            raise _bad_args('"after" must be [scope, name] (the last of the previous page)')
        after = (after[0], after[1])
    return ListArgs(scope, prefix, after, parse_limit_arg(args))


def reg_entry_to_wire(
    origin: NodeId, entry: RegEntry, member: MemberInfo | None = None
) -> dict[str, Any]:
    """One registry entry as the API shows it: what the core reports
    (:func:`peerd.core.registry.service.entry_to_dict`) plus the owner node's
    name and address from membership, when it is known."""
    out = entry_to_dict(origin, entry)
    if member is not None:
        out["node_name"] = member.name
        out["node_addr"] = format_addr(member.addr)
    return out


def entry_wire_size(entry: RegEntry) -> int:
    """A cheap upper estimate of the encoded size of one entry map."""
    return (
        160 + len(entry.scope) + len(entry.name) + sum(len(k) + len(v) + 4 for k, v in entry.meta)
    ) * 2


def registry_event_to_wire(ev: RegistryEvent, member_of: Any = None) -> tuple[str, dict[str, Any]]:
    """``(event name, data)`` for a registry event: the entry; for
    ``conflict`` (the entry lost its name) also ``"winner"``, the entry that
    holds the name. ``member_of(node_id)`` adds node names and addresses."""

    def member(node: NodeId) -> MemberInfo | None:
        return member_of(node) if member_of is not None else None

    data = reg_entry_to_wire(ev.origin, ev.entry, member(ev.origin))
    if ev.kind is RegEventKind.CONFLICT and ev.winner is not None:
        w_origin, w_entry = ev.winner
        data["winner"] = reg_entry_to_wire(w_origin, w_entry, member(w_origin))
    return ev.kind.value, data


# --- user events ------------------------------------------------------------------

MAX_EVENT_NAME_BYTES = 128
MAX_EVENT_BYTES = 8 * 1024
"""Largest user event: name plus payload, in bytes (UTF-8 name). Events are
broadcast to every node, so they are meant to be small (a deploy marker, a
"reload now"); bulk data belongs in messages to names."""


@dataclass(frozen=True, slots=True)
class EventArgs:
    name: str
    payload: bytes


def parse_event_args(args: Mapping[str, Any]) -> EventArgs:
    """``{"name": text, ? "payload": bytes / text}`` (text is sent as UTF-8)."""
    name = args.get("name")
    if type(name) is not str or not name:
        raise _bad_args('"name" must be non-empty text')
    name_bytes = len(name.encode("utf-8", "surrogatepass"))
    if name_bytes > MAX_EVENT_NAME_BYTES:
        raise _bad_args(
            f"event name is {name_bytes} bytes, over the {MAX_EVENT_NAME_BYTES}-byte limit"
        )
    payload = args.get("payload", b"")
    if isinstance(payload, str):
        payload = payload.encode("utf-8", "surrogatepass")
    if not isinstance(payload, bytes):
        raise _bad_args('"payload" must be bytes or text')
    size = name_bytes + len(payload)
    if size > MAX_EVENT_BYTES:
        raise _bad_args(
            f"event is {size} bytes (name + payload), over the {MAX_EVENT_BYTES}-byte limit"
        )
    return EventArgs(name, payload)


def user_event_to_wire(
    msg_id: bytes, origin: NodeId, name: str, payload: bytes, origin_name: str | None = None
) -> dict[str, Any]:
    """The ``data`` of a ``user`` event on an ``events`` watch."""
    data: dict[str, Any] = {
        "name": name,
        "payload": payload,
        "id": msg_id.hex(),
        "origin": origin.hex(),
    }
    if origin_name is not None:
        data["origin_name"] = origin_name
    return data


def encode_user_event(name: str, payload: bytes) -> bytes:
    """The broadcast payload of a user event: CBOR ``[name, payload]``."""
    return cbor2.dumps([name, payload])


def decode_user_event(data: bytes) -> tuple[str, bytes] | None:
    """Inverse of :func:`encode_user_event`; None for anything malformed."""
    if len(data) > MAX_EVENT_BYTES + 64:
        return None
    fp = io.BytesIO(data)
    try:
        obj = cbor2.CBORDecoder(fp, **_DECODER_OPTIONS).decode()
    except Exception:  # garbage makes cbor2 raise many types (see decode_body)
        return None
    if fp.tell() != len(data):
        return None
    if (
        type(obj) is not list
        or len(obj) != 2
        or type(obj[0]) is not str
        or type(obj[1]) is not bytes
        or not obj[0]
    ):
        return None
    return obj[0], obj[1]


# --- messages to names --------------------------------------------------------------

MAX_MESSAGE_BYTES = 256 * 1024
"""Largest payload of a message to a name (``send``)."""

MESSAGE_EVENT = "message"
"""Connection event (stream 0) carrying a message to a name this connection holds."""


def message_event_to_wire(
    sender: str | None,
    from_node: NodeId,
    kind: RegKind | None,
    scope: str,
    name: str,
    payload: bytes,
    *,
    from_scope: str = "",
    reply_to: str | None = None,
) -> dict[str, Any]:
    """The ``data`` of a ``message`` connection event: a message to ``name``
    (or group; ``kind`` None: a reply to this connection, ``scope`` and
    ``name`` "") from the process holding ``sender`` in ``from_scope`` (None:
    it holds no name) on node ``from_node``. ``reply_to``: the token that
    answers the sending connection itself (None: the sender's daemon is too
    old to say which)."""
    return {
        "from": sender or None,
        "from_scope": (from_scope or DEFAULT_SCOPE) if sender else None,
        "from_node": from_node.hex(),
        "kind": "reply" if kind is None else "name" if kind is RegKind.NAME else "group",
        "scope": scope,
        "name": name,
        "payload": payload,
        "reply_to": reply_to,
    }


@dataclass(frozen=True, slots=True)
class ReplyTo:
    """A ``reply_to`` token, decoded: the API connection ``conn`` of the
    daemon ``node`` in its life ``generation``. Connection ids are never
    reused within a daemon life, and a new life has a new generation, so a
    token names one connection of one process, ever."""

    node: NodeId
    generation: int
    conn: int

    def token(self) -> str:
        return f"{self.node.hex()}.{self.generation:x}.{self.conn:x}"

    @classmethod
    def parse(cls, token: Any) -> ReplyTo:
        """Raises ApiError bad_args for anything :meth:`token` cannot have made."""
        if type(token) is not str or len(token) > 80:
            raise _bad_args('"reply_to" must be the text of a message\'s "reply_to"')
        parts = token.split(".")
        try:
            if len(parts) != 3 or len(parts[0]) != 32:
                raise ValueError
            node = bytes.fromhex(parts[0])
            gen, conn = int(parts[1], 16), int(parts[2], 16)
        except ValueError:
            raise _bad_args(f'"reply_to" is not a reply token: {token!r}') from None
        if not (0 < gen <= MAX_UINT and 0 < conn <= MAX_UINT) or parts[1] != f"{gen:x}":
            raise _bad_args(f'"reply_to" is not a reply token: {token!r}')
        return cls(node, gen, conn)


@dataclass(frozen=True, slots=True)
class SendArgs:
    kind: RegKind
    scope: str
    name: str
    payload: bytes
    all: bool = False
    # Set: answer the connection this token names (kind/scope/name unused).
    reply_to: ReplyTo | None = None


def parse_send_args(args: Mapping[str, Any]) -> SendArgs:
    """``{"name": text} / {"group": text} / {"reply_to": token}, ? "scope",
    "payload": bytes / text, ? "all": bool`` (``all`` only with a group)."""
    reply_to: ReplyTo | None = None
    if "reply_to" in args:
        if "name" in args or "group" in args:
            raise _bad_args('give one of "name", "group" and "reply_to"')
        reply_to = ReplyTo.parse(args["reply_to"])
        kind, scope, name = RegKind.NAME, "", ""
    else:
        if "group" in args:
            kind = RegKind.GROUP
            if "name" in args:
                raise _bad_args('give "name" or "group", not both')
        else:
            kind = RegKind.NAME
        target = parse_target_args(args, kind)
        scope, name = target.scope, target.name
    payload = args.get("payload", b"")
    if isinstance(payload, str):
        payload = payload.encode("utf-8", "surrogatepass")
    if not isinstance(payload, bytes):
        raise _bad_args('"payload" must be bytes or text')
    if len(payload) > MAX_MESSAGE_BYTES:
        raise _bad_args(f"message is {len(payload)} bytes, over the {MAX_MESSAGE_BYTES}-byte limit")
    everyone = args.get("all", False)
    if type(everyone) is not bool:
        raise _bad_args('"all" must be a boolean')
    if everyone and kind is not RegKind.GROUP:
        raise _bad_args('"all" needs a "group"')
    return SendArgs(kind, scope, name, payload, everyone, reply_to)
