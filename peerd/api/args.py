"""The local API's op arguments: a request's ``args`` map to typed values.

Each ``parse_*`` function checks one op's args against ``proto/api.cddl`` and
returns a frozen value, or raises :class:`~peerd.api.framing.ApiError`
``bad_args`` with a message meant for the person who typed the command. The
daemon validates here, once, before anything reaches the core, so the core
only ever sees well-formed commands; limits (payload sizes, list pages,
settle timeouts) are stated here next to the check that enforces them.
Unknown keys are ignored, as everywhere in the API.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from peerd.api.framing import MAX_UINT, ApiError, ErrorCode, _uint, parse_addr
from peerd.wire.codec import MAX_TAG_KEY_BYTES, MAX_TAG_VALUE_BYTES, MAX_TAGS
from peerd.wire.messages import Addr, NodeId, RegKind


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


MAX_MESSAGE_BYTES = 256 * 1024
"""Largest payload of a message to a name (``send``)."""


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
