"""Wire codec of messages to names (types 39-40): a message addressed to a
registered name travels to its owner's node, directly or over the mesh, and
the owner's node answers with a name-reply status (delivered, no such name,
mailbox full...).

A name-msg names its target by registry coordinates (kind, scope, name,
eid), so it shares the registry's text bounds. Its six trailing fields (the
sender's and the target's generation and connection, the sender's scope and
eid) carry the reply routing: they travel all or none, and a decoder that
finds fewer treats them as absent, so older peers interoperate.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from peerd.wire.codec_fields import (
    _bad,
    _bad_out,
    _fields,
    _text,
    _text_out,
    _uint,
    _uint_out,
)
from peerd.wire.codec_registry import MAX_REG_NAME_BYTES, MAX_SCOPE_BYTES
from peerd.wire.messages import (
    Message,
    NameMsg,
    NameReply,
    NameStatus,
    RegKind,
)

MAX_NAME_MSG_PAYLOAD_BYTES = 1024 * 1024  # a message to a name (the API's limit is lower)
_REG_KINDS = frozenset(int(k) for k in RegKind)
_NAME_STATUSES = frozenset(int(k) for k in NameStatus)


# --- encoding ---


def _name_msg_out(msg: NameMsg) -> list[Any]:
    kind, payload = msg.kind, msg.payload
    if type(kind) is not RegKind:
        _bad_out(f"name-msg kind must be a RegKind, got {kind!r}")
    if type(payload) is not bytes or len(payload) > MAX_NAME_MSG_PAYLOAD_BYTES:
        _bad_out(f"name-msg payload must be bytes of at most {MAX_NAME_MSG_PAYLOAD_BYTES}")
    fields: list[Any] = [
        NameMsg.TYPE,
        _uint_out(msg.seq, "seq"),
        int(kind),
        _text_out(msg.scope, "scope", MAX_SCOPE_BYTES),
        _text_out(msg.name, "name", MAX_REG_NAME_BYTES),
        _uint_out(msg.eid, "eid"),
        _text_out(msg.sender, "sender", MAX_REG_NAME_BYTES),
        payload,
    ]
    if msg.extended or msg.from_scope:  # the trailing fields: all or none
        fields += [
            _uint_out(msg.from_gen, "from_gen"),
            _uint_out(msg.from_conn, "from_conn"),
            _text_out(msg.from_scope, "from_scope", MAX_SCOPE_BYTES),
            _uint_out(msg.from_eid, "from_eid"),
            _uint_out(msg.to_gen, "to_gen"),
            _uint_out(msg.to_conn, "to_conn"),
        ]
    return fields


def _name_reply_out(m: NameReply) -> list[Any]:
    status = m.status
    if type(status) is not NameStatus:
        _bad_out(f"name-reply status must be a NameStatus, got {status!r}")
    return [NameReply.TYPE, _uint_out(m.seq, "seq"), int(status)]


# --- decoding ---


def _name_msg_in(obj: list[Any]) -> Message:
    seq, kind, scope, name, eid, sender, payload = _fields(obj, 7, "name-msg")
    if type(kind) is not int or kind not in _REG_KINDS:
        _bad("name-msg kind must be 0..1")
    if type(payload) is not bytes or len(payload) > MAX_NAME_MSG_PAYLOAD_BYTES:
        _bad(f"name-msg payload must be bytes of at most {MAX_NAME_MSG_PAYLOAD_BYTES}")
    extra: tuple[int, int, str, int, int, int] = (0, 0, "", 0, 0, 0)
    if (
        len(obj) >= 14
    ):  # [type, 7 fields, from_gen, from_conn, from_scope, from_eid, to_gen, to_conn]
        fg, fc, fs, fe, tg, tc = obj[8:14]
        extra = (
            _uint(fg, "from_gen"),
            _uint(fc, "from_conn"),
            _text(fs, "from_scope", MAX_SCOPE_BYTES),
            _uint(fe, "from_eid"),
            _uint(tg, "to_gen"),
            _uint(tc, "to_conn"),
        )
    return NameMsg(
        _uint(seq, "seq"),
        RegKind(kind),
        _text(scope, "scope", MAX_SCOPE_BYTES),
        _text(name, "name", MAX_REG_NAME_BYTES),
        _uint(eid, "eid"),
        _text(sender, "sender", MAX_REG_NAME_BYTES),
        payload,
        *extra,
    )


def _name_reply_in(obj: list[Any]) -> Message:
    seq, status = _fields(obj, 2, "name-reply")
    if type(status) is not int or status not in _NAME_STATUSES:
        _bad("name-reply status must be 0..4")
    return NameReply(_uint(seq, "seq"), NameStatus(status))


ENCODERS: dict[type, Callable[[Any], list[Any]]] = {
    NameMsg: _name_msg_out,
    NameReply: _name_reply_out,
}
DECODERS: dict[int, Callable[[list[Any]], Message]] = {
    NameMsg.TYPE: _name_msg_in,
    NameReply.TYPE: _name_reply_in,
}
