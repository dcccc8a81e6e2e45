"""CBOR codec for :mod:`peerd.wire.messages` (normative spec: proto/wire.cddl).

A message is ``[type, field...]``. A datagram payload is a CBOR array of
messages; :func:`pack` builds one from already-encoded messages so that the
core can fill a datagram up to its size budget without re-encoding.

Decoding never raises anything but :class:`DecodeError`: every field is type
and range checked, so the core can trust what it gets. The CBOR layer is
restricted too (no tags, no indefinite lengths, no duplicate or non-text map
keys, bounded nesting, no trailing bytes): none of it is needed by the
protocol, and each is a way to make a cheap packet expensive to decode.

Encoding checks the same limits and raises :class:`EncodeError` instead of
emitting bytes every peer would drop: a bad message built by our own core is
a bug that should be loud where it happens. Encoding is deterministic (RFC
8949 section 4.2.1: shortest integer forms, definite lengths, sorted map
keys), which is what makes proto/vectors byte-exact.

``DecodeError.reason`` labels (stable, used in drop counters): ``bad_cbor``,
``not_packet``, ``not_message``, ``unknown_type``, ``bad_arity``,
``bad_field``.

This module is the entry point and the CBOR layer. The fields of each family
of messages are coded beside the family's other concerns: membership
(codec_membership), registry (codec_registry), partial mesh (codec_mesh),
messages to names (codec_names), key management (codec_keys), all built on
the field checks of codec_fields. Each family contributes one encoder per
message class and one decoder per type number; encoding and decoding a
message is one dict lookup into the merged tables here and one call, which
matters because the simulator codes millions of messages per run. The limits
are re-exported here: import them from peerd.wire.codec.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

import cbor2

from peerd.wire import codec_keys, codec_membership, codec_mesh, codec_names, codec_registry
from peerd.wire.codec_fields import (
    MAX_SYNC_BITS,
    MAX_TAG_KEY_BYTES,
    MAX_TAG_VALUE_BYTES,
    MAX_TAGS,
    MAX_U64,
    DecodeError,
    EncodeError,
)
from peerd.wire.codec_keys import KEY_BYTES, KEY_ID_BYTES, MAX_KEY_IDS, MAX_KEY_MESSAGE_BYTES
from peerd.wire.codec_membership import MAX_NAME_BYTES
from peerd.wire.codec_mesh import (
    MAX_GOSSIP_PAYLOAD_BYTES,
    MAX_IHAVE,
    MAX_SHUFFLE_PEERS,
    MAX_WALK_TTL,
    MAX_WANT,
)
from peerd.wire.codec_names import MAX_NAME_MSG_PAYLOAD_BYTES
from peerd.wire.codec_registry import MAX_REG_NAME_BYTES, MAX_SCOPE_BYTES, reg_sync_decoder
from peerd.wire.messages import MESSAGE_TYPES, Message, RegSync

__all__ = [
    "KEY_BYTES",
    "KEY_ID_BYTES",
    "MAX_DEPTH",
    "MAX_GOSSIP_PAYLOAD_BYTES",
    "MAX_IHAVE",
    "MAX_KEY_IDS",
    "MAX_KEY_MESSAGE_BYTES",
    "MAX_NAME_BYTES",
    "MAX_NAME_MSG_PAYLOAD_BYTES",
    "MAX_REG_NAME_BYTES",
    "MAX_SCOPE_BYTES",
    "MAX_SHUFFLE_PEERS",
    "MAX_SYNC_BITS",
    "MAX_TAGS",
    "MAX_TAG_KEY_BYTES",
    "MAX_TAG_VALUE_BYTES",
    "MAX_U64",
    "MAX_WALK_TTL",
    "MAX_WANT",
    "DecodeError",
    "EncodeError",
    "array_header_size",
    "decode",
    "decode_packet",
    "encode",
    "from_cbor_obj",
    "pack",
    "peek_type",
    "to_cbor_obj",
]

#: Deepest container nesting accepted on input. The deepest path we produce is
#: datagram > push-pull > members > member > addr/tags (5); the rest is room
#: for message types added later.
MAX_DEPTH = 16


# --- encoding ---------------------------------------------------------------

_ENCODERS: dict[type, Callable[[Any], list[Any]]] = {
    **codec_membership.ENCODERS,
    **codec_registry.ENCODERS,
    **codec_mesh.ENCODERS,
    **codec_names.ENCODERS,
    **codec_keys.ENCODERS,
}
assert set(_ENCODERS) == set(MESSAGE_TYPES.values()), "every message class needs an encoder"


def to_cbor_obj(msg: Message) -> list[Any]:
    """The CBOR data model of ``msg`` (what :func:`encode` serialises).

    Raises :class:`EncodeError` if a field is of the wrong type or out of the
    wire limits, :class:`TypeError` if ``msg`` is not a message at all.
    """
    encoder = _ENCODERS.get(type(msg))
    if encoder is None:
        raise TypeError(f"not a message: {msg!r}")
    return encoder(msg)


def encode(msg: Message) -> bytes:
    """Encode one message (deterministic: equal messages give equal bytes)."""
    out: bytes = cbor2.dumps(to_cbor_obj(msg))
    return out


def array_header_size(n: int) -> int:
    """Bytes taken by a CBOR array header for ``n`` items."""
    if n < 24:
        return 1
    if n < 256:
        return 2
    if n < 65536:
        return 3
    return 5


def _array_header(n: int) -> bytes:
    if n < 24:
        return bytes([0x80 | n])
    if n < 256:
        return bytes([0x98, n])
    if n < 65536:
        return bytes([0x99]) + n.to_bytes(2, "big")
    return bytes([0x9A]) + n.to_bytes(4, "big")


def pack(encoded: Sequence[bytes]) -> bytes:
    """A datagram payload from already-encoded messages.

    Its size is exactly ``array_header_size(len(encoded)) + sum(map(len, encoded))``.
    """
    return _array_header(len(encoded)) + b"".join(encoded)


# --- decoding ---------------------------------------------------------------


def from_cbor_obj(obj: Any) -> Message:
    """A message from its CBOR data model; raises only :class:`DecodeError`."""
    if type(obj) is not list or not obj:
        raise DecodeError("not_message", "a message is a non-empty array")
    t = obj[0]
    if type(t) is not int:
        raise DecodeError("not_message", "message type must be an integer")
    decoder = _DECODERS.get(t)
    if decoder is None:
        raise DecodeError("unknown_type", f"type {t}")
    return decoder(obj)


_DECODERS: dict[int, Callable[[list[Any]], Message]] = {
    **codec_membership.DECODERS,
    **codec_registry.DECODERS,
    RegSync.TYPE: reg_sync_decoder(from_cbor_obj),
    **codec_mesh.DECODERS,
    **codec_names.DECODERS,
    **codec_keys.DECODERS,
}
assert _DECODERS.keys() == MESSAGE_TYPES.keys(), "every message type needs a decoder"


def _reject_tag(*_args: Any) -> NoReturn:
    raise ValueError("CBOR tags are not allowed")


# Tags cbor2 would otherwise turn into Python objects (some costly: rationals,
# bigfloats, regexes, shared references). Other tags reach the tag hook.
_BUILTIN_TAGS = (
    0,
    1,
    2,
    3,
    4,
    5,
    25,
    28,
    29,
    30,
    35,
    36,
    37,
    52,
    54,
    100,
    256,
    258,
    260,
    261,
    1004,
    43000,
    55799,
)
_DECODER_OPTIONS: dict[str, Any] = {
    "tag_hook": _reject_tag,
    "semantic_decoders": {t: _reject_tag for t in _BUILTIN_TAGS},
    "max_depth": MAX_DEPTH,
    "allow_indefinite": False,
    "allow_duplicate_keys": False,
    "strict_hashable_types": True,
}
try:  # An older cbor2 would fail every decode at run time: fail loudly here instead.
    cbor2.CBORDecoder(io.BytesIO(b""), **_DECODER_OPTIONS)
except TypeError as exc:  # pragma: no cover - depends on the installed cbor2
    raise ImportError(f"peerd.wire.codec needs cbor2 >= 6.2 for strict decoding: {exc}") from exc


def _loads(data: bytes) -> Any:
    fp = io.BytesIO(data)
    try:
        obj = cbor2.CBORDecoder(fp, **_DECODER_OPTIONS).decode()
    except RecursionError as exc:
        raise DecodeError("bad_cbor", "nesting too deep") from exc
    except Exception as exc:  # cbor2 raises many types on hostile input
        raise DecodeError("bad_cbor", str(exc)[:80]) from exc
    if fp.tell() != len(data):
        raise DecodeError("bad_cbor", "trailing bytes after the top-level item")
    return obj


def peek_type(data: bytes) -> int | None:
    """The type number of an encoded message, read from its first bytes
    without decoding it (None when they are not an array of fewer than 24
    items starting with a type below 24): lets a transport route a frame
    before paying for the decoding."""
    if len(data) >= 2 and 0x81 <= data[0] <= 0x97 and data[1] < 24:
        return data[1]
    return None


def decode(data: bytes) -> Message:
    """Decode one message (a stream frame)."""
    return from_cbor_obj(_loads(data))


def decode_packet(data: bytes) -> tuple[list[Message], list[DecodeError]]:
    """Decode a datagram payload into its messages.

    A datagram that is not an array of messages raises :class:`DecodeError`.
    A single bad or unknown message inside an otherwise good datagram is
    returned in the error list and skipped, so one peer running a newer
    version does not make us drop its whole packet.
    """
    obj = _loads(data)
    if type(obj) is not list:
        raise DecodeError("not_packet", "a datagram is an array of messages")
    msgs: list[Message] = []
    errors: list[DecodeError] = []
    for item in obj:
        try:
            msgs.append(from_cbor_obj(item))
        except DecodeError as err:
            errors.append(err)
    return msgs, errors
