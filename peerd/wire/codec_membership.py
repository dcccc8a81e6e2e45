"""Wire codec of the membership family (types 1-14): SWIM's failure detector
(ping, ping-req, ack, nack), the dissemination messages that piggyback on it
(alive, suspect, dead, left, died, died-ref) and anti-entropy (push-pull and
the bucketed digest sync).

Membership messages are the bulk of all traffic, so each encoder and decoder
is one flat function reached through one table lookup in peerd.wire.codec;
a member's state is the one nested shape, shared by push-pull and sync rows.
Decoders accept trailing fields (a newer peer may append some) and check the
rest with peerd.wire.codec_fields.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from peerd.wire.codec_fields import (
    MAX_SYNC_BITS,
    _addr_in,
    _addr_out,
    _bad,
    _bad_out,
    _bool,
    _bool_out,
    _fields,
    _node_id,
    _node_out,
    _tags_in,
    _tags_out,
    _text,
    _text_out,
    _uint,
    _uint_out,
)
from peerd.wire.messages import (
    NODE_PREFIX_BYTES,
    Ack,
    Alive,
    Dead,
    Died,
    DiedRef,
    Left,
    MemberState,
    Message,
    Nack,
    Ping,
    PingReq,
    PushPull,
    Status,
    Suspect,
    SyncDigest,
    SyncRows,
)

MAX_NAME_BYTES = 255
_STATUS_VALUES = frozenset(int(s) for s in Status)


# --- encoding ---


def _member_out(m: Any) -> list[Any]:
    if type(m) is not MemberState:
        _bad_out(f"push-pull members must be MemberState, got {m!r}")
    status = m.status
    if type(status) is not Status:
        _bad_out(f"member status must be a Status, got {status!r}")
    return [
        _node_out(m.node, "member node"),
        _text_out(m.name, "member name", MAX_NAME_BYTES),
        _addr_out(m.addr),
        _uint_out(m.incarnation, "member incarnation"),
        _uint_out(m.generation, "member generation"),
        _tags_out(m.tags),
        int(status),
    ]


def _ping_out(m: Ping) -> list[Any]:
    return [Ping.TYPE, _uint_out(m.seq, "seq"), _node_out(m.target, "target")]


def _ping_req_out(m: PingReq) -> list[Any]:
    return [
        PingReq.TYPE,
        _uint_out(m.seq, "seq"),
        _node_out(m.target, "target"),
        _addr_out(m.target_addr),
        _bool_out(m.nack, "nack"),
    ]


def _ack_out(m: Ack) -> list[Any]:
    return [Ack.TYPE, _uint_out(m.seq, "seq")]


def _nack_out(m: Nack) -> list[Any]:
    return [Nack.TYPE, _uint_out(m.seq, "seq")]


def _alive_out(m: Alive) -> list[Any]:
    return [
        Alive.TYPE,
        _node_out(m.node, "node"),
        _text_out(m.name, "name", MAX_NAME_BYTES),
        _addr_out(m.addr),
        _uint_out(m.incarnation, "incarnation"),
        _uint_out(m.generation, "generation"),
        _tags_out(m.tags),
    ]


def _suspect_out(m: Suspect) -> list[Any]:
    return [
        Suspect.TYPE,
        _node_out(m.node, "node"),
        _uint_out(m.incarnation, "incarnation"),
        _node_out(m.sender, "sender"),
    ]


def _dead_out(m: Dead) -> list[Any]:
    return [
        Dead.TYPE,
        _node_out(m.node, "node"),
        _uint_out(m.incarnation, "incarnation"),
        _node_out(m.sender, "sender"),
    ]


def _left_out(m: Left) -> list[Any]:
    return [Left.TYPE, _node_out(m.node, "node"), _uint_out(m.incarnation, "incarnation")]


def _died_out(m: Died) -> list[Any]:
    return [Died.TYPE, _node_out(m.node, "node"), _uint_out(m.incarnation, "incarnation")]


def _died_ref_out(m: DiedRef) -> list[Any]:
    prefix = m.prefix
    if type(prefix) is not bytes or len(prefix) != NODE_PREFIX_BYTES:
        _bad_out(f"node prefix must be {NODE_PREFIX_BYTES} bytes, got {prefix!r}")
    return [DiedRef.TYPE, prefix, _uint_out(m.incarnation, "incarnation")]


def _push_pull_out(m: PushPull) -> list[Any]:
    members = m.members
    if type(members) is not tuple:
        _bad_out(f"push-pull members must be a tuple, got {members!r}")
    return [PushPull.TYPE, _bool_out(m.join, "join"), [_member_out(x) for x in members]]


def _sync_digest_out(m: SyncDigest) -> list[Any]:
    bits, hashes = m.bits, m.hashes
    if type(bits) is not int or not 0 <= bits <= MAX_SYNC_BITS:
        _bad_out(f"sync digest bits must be 0..{MAX_SYNC_BITS}, got {bits!r}")
    if type(hashes) is not bytes or len(hashes) != 4 << bits:
        _bad_out(f"sync digest hashes must be {4 << bits} bytes")
    return [SyncDigest.TYPE, bits, hashes]


def _sync_rows_out(m: SyncRows) -> list[Any]:
    bits, buckets, members = m.bits, m.buckets, m.members
    if type(bits) is not int or not 0 <= bits <= MAX_SYNC_BITS:
        _bad_out(f"sync rows bits must be 0..{MAX_SYNC_BITS}, got {bits!r}")
    if type(buckets) is not tuple or any(
        type(b) is not int or not 0 <= b < 1 << bits for b in buckets
    ):
        _bad_out(f"sync rows buckets must be a tuple of ints below {1 << bits}")
    if type(members) is not tuple:
        _bad_out(f"sync rows members must be a tuple, got {members!r}")
    return [SyncRows.TYPE, bits, list(buckets), [_member_out(x) for x in members]]


# --- decoding ---


def _member_in(v: Any) -> MemberState:
    if type(v) is not list or len(v) < 7:
        _bad("member state must be an array of at least 7 items")
    node, name, addr, inc, gen, tags, status = v[:7]
    if type(status) is not int or status not in _STATUS_VALUES:
        _bad("member status must be 0..3")
    return MemberState(
        _node_id(node),
        _text(name, "name", MAX_NAME_BYTES),
        _addr_in(addr),
        _uint(inc, "incarnation"),
        _uint(gen, "generation"),
        _tags_in(tags),
        Status(status),
    )


def _ping_in(obj: list[Any]) -> Message:
    seq, target = _fields(obj, 2, "ping")
    return Ping(_uint(seq, "seq"), _node_id(target, "target"))


def _ping_req_in(obj: list[Any]) -> Message:
    seq, target, addr, nack = _fields(obj, 4, "ping-req")
    return PingReq(
        _uint(seq, "seq"), _node_id(target, "target"), _addr_in(addr), _bool(nack, "nack")
    )


def _ack_in(obj: list[Any]) -> Message:
    (seq,) = _fields(obj, 1, "ack")
    return Ack(_uint(seq, "seq"))


def _nack_in(obj: list[Any]) -> Message:
    (seq,) = _fields(obj, 1, "nack")
    return Nack(_uint(seq, "seq"))


def _alive_in(obj: list[Any]) -> Message:
    node, name, addr, inc, gen, tags = _fields(obj, 6, "alive")
    return Alive(
        _node_id(node),
        _text(name, "name", MAX_NAME_BYTES),
        _addr_in(addr),
        _uint(inc, "incarnation"),
        _uint(gen, "generation"),
        _tags_in(tags),
    )


def _suspect_in(obj: list[Any]) -> Message:
    node, inc, sender = _fields(obj, 3, "suspect")
    return Suspect(_node_id(node), _uint(inc, "incarnation"), _node_id(sender, "sender"))


def _dead_in(obj: list[Any]) -> Message:
    node, inc, sender = _fields(obj, 3, "dead")
    return Dead(_node_id(node), _uint(inc, "incarnation"), _node_id(sender, "sender"))


def _left_in(obj: list[Any]) -> Message:
    node, inc = _fields(obj, 2, "left")
    return Left(_node_id(node), _uint(inc, "incarnation"))


def _died_in(obj: list[Any]) -> Message:
    node, inc = _fields(obj, 2, "died")
    return Died(_node_id(node), _uint(inc, "incarnation"))


def _died_ref_in(obj: list[Any]) -> Message:
    prefix, inc = _fields(obj, 2, "died-ref")
    if type(prefix) is not bytes or len(prefix) != NODE_PREFIX_BYTES:
        _bad(f"node prefix must be {NODE_PREFIX_BYTES} bytes")
    return DiedRef(prefix, _uint(inc, "incarnation"))


def _sync_bits(v: Any) -> int:
    if type(v) is not int or not 0 <= v <= MAX_SYNC_BITS:
        _bad(f"sync bits must be 0..{MAX_SYNC_BITS}")
    return v


def _sync_digest_in(obj: list[Any]) -> Message:
    bits, hashes = _fields(obj, 2, "sync-digest")
    bits = _sync_bits(bits)
    if type(hashes) is not bytes or len(hashes) != 4 << bits:
        _bad("sync digest hashes must be 4 * 2**bits bytes")
    return SyncDigest(bits, hashes)


def _sync_rows_in(obj: list[Any]) -> Message:
    bits, buckets, members = _fields(obj, 3, "sync-rows")
    bits = _sync_bits(bits)
    if (
        type(buckets) is not list
        or len(buckets) > 1 << MAX_SYNC_BITS
        or any(type(b) is not int or not 0 <= b < 1 << bits for b in buckets)
    ):
        _bad("sync rows buckets must be an array of bucket numbers below 2**bits")
    if type(members) is not list:
        _bad("sync rows members must be an array")
    return SyncRows(bits, tuple(buckets), tuple(_member_in(m) for m in members))


def _push_pull_in(obj: list[Any]) -> Message:
    join, members = _fields(obj, 2, "push-pull")
    if type(members) is not list:
        _bad("push-pull members must be an array")
    return PushPull(_bool(join, "join"), tuple(_member_in(m) for m in members))


ENCODERS: dict[type, Callable[[Any], list[Any]]] = {
    Ping: _ping_out,
    PingReq: _ping_req_out,
    Ack: _ack_out,
    Nack: _nack_out,
    Alive: _alive_out,
    Suspect: _suspect_out,
    Dead: _dead_out,
    Left: _left_out,
    Died: _died_out,
    DiedRef: _died_ref_out,
    PushPull: _push_pull_out,
    SyncDigest: _sync_digest_out,
    SyncRows: _sync_rows_out,
}
DECODERS: dict[int, Callable[[list[Any]], Message]] = {
    Ping.TYPE: _ping_in,
    PingReq.TYPE: _ping_req_in,
    Ack.TYPE: _ack_in,
    Nack.TYPE: _nack_in,
    Alive.TYPE: _alive_in,
    Suspect.TYPE: _suspect_in,
    Dead.TYPE: _dead_in,
    Left.TYPE: _left_in,
    Died.TYPE: _died_in,
    DiedRef.TYPE: _died_ref_in,
    PushPull.TYPE: _push_pull_in,
    SyncDigest.TYPE: _sync_digest_in,
    SyncRows.TYPE: _sync_rows_in,
}
