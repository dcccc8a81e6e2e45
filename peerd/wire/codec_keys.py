"""Wire codec of key management (types 15-16): an operator's request to a
daemon to query, install, make primary or remove a cluster key, and the
daemon's reply with its keyring as key ids.

Keys themselves only ever travel in an install request; a reply names keys
by their short ids, so a keyring can be inspected without exposing it. The
bounds are small on purpose: a keyring holds a handful of keys during a
rotation, and the message is a one-line status.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from peerd.wire.codec_fields import (
    _array,
    _bad,
    _bad_out,
    _fields,
    _text,
    _text_out,
)
from peerd.wire.messages import (
    KeyOp,
    KeyReply,
    KeyRequest,
    KeyStatus,
    Message,
)

_KEY_OPS = frozenset(int(k) for k in KeyOp)
_KEY_STATUSES = frozenset(int(k) for k in KeyStatus)
KEY_BYTES = 32
KEY_ID_BYTES = 4
MAX_KEY_IDS = 64  # a keyring is a handful of keys during a rotation
MAX_KEY_MESSAGE_BYTES = 512


def _key_len(op: KeyOp) -> int:
    return {KeyOp.QUERY: 0, KeyOp.INSTALL: KEY_BYTES}.get(op, KEY_ID_BYTES)


# --- encoding ---


def _key_request_out(m: KeyRequest) -> list[Any]:
    op, key = m.op, m.key
    if type(op) is not KeyOp:
        _bad_out(f"key-request op must be a KeyOp, got {op!r}")
    if type(key) is not bytes or len(key) != _key_len(op):
        _bad_out(f"key-request {op.name.lower()} needs {_key_len(op)} key bytes")
    return [KeyRequest.TYPE, int(op), key]


def _key_reply_out(m: KeyReply) -> list[Any]:
    status, primary, keys = m.status, m.primary, m.keys
    if type(status) is not KeyStatus:
        _bad_out(f"key-reply status must be a KeyStatus, got {status!r}")
    if type(primary) is not bytes or len(primary) not in (0, KEY_ID_BYTES):
        _bad_out("key-reply primary must be empty or a key id")
    if len(keys) > MAX_KEY_IDS or any(type(k) is not bytes or len(k) != KEY_ID_BYTES for k in keys):
        _bad_out(f"key-reply keys must be at most {MAX_KEY_IDS} key ids")
    return [
        KeyReply.TYPE,
        int(status),
        primary,
        list(keys),
        _text_out(m.message, "message", MAX_KEY_MESSAGE_BYTES),
    ]


# --- decoding ---


def _key_request_in(obj: list[Any]) -> Message:
    op, key = _fields(obj, 2, "key-request")
    if type(op) is not int or op not in _KEY_OPS:
        _bad("key-request op must be 0..3")
    kop = KeyOp(op)
    if type(key) is not bytes or len(key) != _key_len(kop):
        _bad(f"key-request {kop.name.lower()} needs {_key_len(kop)} key bytes")
    return KeyRequest(kop, key)


def _key_reply_in(obj: list[Any]) -> Message:
    status, primary, keys, message = _fields(obj, 4, "key-reply")
    if type(status) is not int or status not in _KEY_STATUSES:
        _bad("key-reply status must be 0..4")
    if type(primary) is not bytes or len(primary) not in (0, KEY_ID_BYTES):
        _bad("key-reply primary must be empty or a 4-byte key id")
    keys = _array(keys, "keys")
    if len(keys) > MAX_KEY_IDS:
        _bad(f"more than {MAX_KEY_IDS} key ids")
    for k in keys:
        if type(k) is not bytes or len(k) != KEY_ID_BYTES:
            _bad("a key id is 4 bytes")
    return KeyReply(
        KeyStatus(status),
        primary,
        tuple(keys),
        _text(message, "message", MAX_KEY_MESSAGE_BYTES),
    )


ENCODERS: dict[type, Callable[[Any], list[Any]]] = {
    KeyRequest: _key_request_out,
    KeyReply: _key_reply_out,
}
DECODERS: dict[int, Callable[[list[Any]], Message]] = {
    KeyRequest.TYPE: _key_request_in,
    KeyReply.TYPE: _key_reply_in,
}
