"""CBOR codec for :mod:`peerd.wire.messages` (normative spec: proto/wire.cddl).

A message is ``[type, field...]``. A datagram payload is a CBOR array of
messages; :func:`pack` builds one from already-encoded messages so that the
core can fill a datagram up to its size budget without re-encoding.

Decoding never raises anything but :class:`DecodeError`: every field is type
and range checked, so the core can trust what it gets.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from typing import Any

import cbor2

from peerd.wire.messages import (
    MESSAGE_TYPES,
    NODE_ID_BYTES,
    Ack,
    Addr,
    Alive,
    Dead,
    Left,
    MemberState,
    Message,
    Nack,
    Ping,
    PingReq,
    PushPull,
    Status,
    Suspect,
    Tags,
)

MAX_U64 = 2**64 - 1
MAX_NAME_BYTES = 255
MAX_TAG_KEY_BYTES = 64
MAX_TAG_VALUE_BYTES = 512
MAX_TAGS = 64


class DecodeError(ValueError):
    """Malformed input. ``reason`` is a short, stable label used in drop counters."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


# --- encoding ---------------------------------------------------------------


def _addr_out(addr: Addr) -> list[Any]:
    return [ipaddress.ip_address(addr[0]).packed, addr[1]]


def _tags_out(tags: Tags) -> dict[str, str]:
    return dict(tags)


def _member_out(m: MemberState) -> list[Any]:
    return [m.node, m.name, _addr_out(m.addr), m.incarnation, m.generation, _tags_out(m.tags),
            int(m.status)]


def to_cbor_obj(msg: Message) -> list[Any]:
    match msg:
        case Ping(seq, target):
            return [Ping.TYPE, seq, target]
        case PingReq(seq, target, target_addr, nack):
            return [PingReq.TYPE, seq, target, _addr_out(target_addr), nack]
        case Ack(seq):
            return [Ack.TYPE, seq]
        case Nack(seq):
            return [Nack.TYPE, seq]
        case Alive(node, name, addr, inc, gen, tags):
            return [Alive.TYPE, node, name, _addr_out(addr), inc, gen, _tags_out(tags)]
        case Suspect(node, inc, sender):
            return [Suspect.TYPE, node, inc, sender]
        case Dead(node, inc, sender):
            return [Dead.TYPE, node, inc, sender]
        case Left(node, inc):
            return [Left.TYPE, node, inc]
        case PushPull(join, members):
            return [PushPull.TYPE, join, [_member_out(m) for m in members]]
    raise TypeError(f"not a message: {msg!r}")


def encode(msg: Message) -> bytes:
    """Encode one message."""
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
    """A datagram payload from already-encoded messages."""
    return _array_header(len(encoded)) + b"".join(encoded)


# --- decoding ---------------------------------------------------------------


def _uint(v: Any, what: str) -> int:
    if type(v) is not int or v < 0 or v > MAX_U64:
        raise DecodeError("bad_field", f"{what} must be an unsigned 64-bit integer")
    return v


def _bool(v: Any, what: str) -> bool:
    if type(v) is not bool:
        raise DecodeError("bad_field", f"{what} must be a bool")
    return v


def _node_id(v: Any, what: str = "node") -> bytes:
    if type(v) is not bytes or len(v) != NODE_ID_BYTES:
        raise DecodeError("bad_field", f"{what} must be {NODE_ID_BYTES} bytes")
    return v


def _text(v: Any, what: str, max_bytes: int) -> str:
    if type(v) is not str:
        raise DecodeError("bad_field", f"{what} must be text")
    if len(v.encode("utf-8", "surrogatepass")) > max_bytes:
        raise DecodeError("bad_field", f"{what} longer than {max_bytes} bytes")
    return v


def _addr_in(v: Any) -> Addr:
    if type(v) is not list or len(v) != 2:
        raise DecodeError("bad_field", "addr must be [ip, port]")
    ip, port = v
    if type(ip) is not bytes or len(ip) not in (4, 16):
        raise DecodeError("bad_field", "addr ip must be 4 or 16 bytes")
    if type(port) is not int or not 0 <= port <= 65535:
        raise DecodeError("bad_field", "addr port out of range")
    return (str(ipaddress.ip_address(ip)), port)


def _tags_in(v: Any) -> Tags:
    if type(v) is not dict:
        raise DecodeError("bad_field", "tags must be a map")
    if len(v) > MAX_TAGS:
        raise DecodeError("bad_field", f"more than {MAX_TAGS} tags")
    items = []
    for k, val in v.items():
        items.append((_text(k, "tag key", MAX_TAG_KEY_BYTES),
                      _text(val, "tag value", MAX_TAG_VALUE_BYTES)))
    return tuple(sorted(items))


def _fields(obj: list[Any], n: int, name: str) -> list[Any]:
    # Extra trailing fields are allowed: a newer peer may append fields.
    if len(obj) < n + 1:
        raise DecodeError("bad_arity", f"{name} needs {n} fields")
    return obj[1 : n + 1]


def _member_in(v: Any) -> MemberState:
    if type(v) is not list or len(v) < 7:
        raise DecodeError("bad_field", "member state must be a 7-item array")
    node, name, addr, inc, gen, tags, status = v[:7]
    if type(status) is not int or status not in (0, 1, 2, 3):
        raise DecodeError("bad_field", "member status must be 0..3")
    return MemberState(_node_id(node), _text(name, "name", MAX_NAME_BYTES), _addr_in(addr),
                       _uint(inc, "incarnation"), _uint(gen, "generation"), _tags_in(tags),
                       Status(status))


def from_cbor_obj(obj: Any) -> Message:
    if type(obj) is not list or not obj:
        raise DecodeError("not_message", "a message is a non-empty array")
    t = obj[0]
    if type(t) is not int:
        raise DecodeError("not_message", "message type must be an integer")
    if t not in MESSAGE_TYPES:
        raise DecodeError("unknown_type", f"type {t}")
    if t == Ping.TYPE:
        seq, target = _fields(obj, 2, "ping")
        return Ping(_uint(seq, "seq"), _node_id(target, "target"))
    if t == PingReq.TYPE:
        seq, target, addr, nack = _fields(obj, 4, "ping-req")
        return PingReq(_uint(seq, "seq"), _node_id(target, "target"), _addr_in(addr),
                       _bool(nack, "nack"))
    if t == Ack.TYPE:
        (seq,) = _fields(obj, 1, "ack")
        return Ack(_uint(seq, "seq"))
    if t == Nack.TYPE:
        (seq,) = _fields(obj, 1, "nack")
        return Nack(_uint(seq, "seq"))
    if t == Alive.TYPE:
        node, name, addr, inc, gen, tags = _fields(obj, 6, "alive")
        return Alive(_node_id(node), _text(name, "name", MAX_NAME_BYTES), _addr_in(addr),
                     _uint(inc, "incarnation"), _uint(gen, "generation"), _tags_in(tags))
    if t == Suspect.TYPE:
        node, inc, sender = _fields(obj, 3, "suspect")
        return Suspect(_node_id(node), _uint(inc, "incarnation"), _node_id(sender, "sender"))
    if t == Dead.TYPE:
        node, inc, sender = _fields(obj, 3, "dead")
        return Dead(_node_id(node), _uint(inc, "incarnation"), _node_id(sender, "sender"))
    if t == Left.TYPE:
        node, inc = _fields(obj, 2, "left")
        return Left(_node_id(node), _uint(inc, "incarnation"))
    # PushPull
    join, members = _fields(obj, 2, "push-pull")
    if type(members) is not list:
        raise DecodeError("bad_field", "push-pull members must be an array")
    return PushPull(_bool(join, "join"), tuple(_member_in(m) for m in members))


def _loads(data: bytes) -> Any:
    try:
        return cbor2.loads(data)
    except RecursionError as exc:
        raise DecodeError("bad_cbor", "nesting too deep") from exc
    except Exception as exc:  # cbor2 raises many types on hostile input (tags, sizes)
        raise DecodeError("bad_cbor", str(exc)[:80]) from exc


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
