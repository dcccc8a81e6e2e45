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
"""

from __future__ import annotations

import functools
import io
import ipaddress
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

import cbor2

from peerd.wire.messages import (
    MESSAGE_ID_BYTES,
    MESSAGE_TYPES,
    NODE_ID_BYTES,
    NODE_PREFIX_BYTES,
    Ack,
    Addr,
    Alive,
    Channel,
    Dead,
    Died,
    DiedRef,
    Disconnect,
    ForwardJoin,
    Gossip,
    GossipControl,
    IHave,
    KeyOp,
    KeyReply,
    KeyRequest,
    KeyStatus,
    Left,
    MemberState,
    MeshJoin,
    MeshPeer,
    Message,
    Nack,
    NameMsg,
    NameReply,
    NameStatus,
    Neighbor,
    NeighborReply,
    Ping,
    PingReq,
    PushPull,
    RegAck,
    RegChange,
    RegDelta,
    RegDigestRow,
    RegEntry,
    RegKind,
    RegSnapshot,
    RegSync,
    Shuffle,
    ShuffleReply,
    Status,
    Suspect,
    SyncDigest,
    SyncRows,
    Tags,
    TreeLink,
)

MAX_U64 = 2**64 - 1
#: Most buckets a digest sync may use: 2**12 (16 KiB of hashes).
MAX_SYNC_BITS = 12
MAX_NAME_BYTES = 255
MAX_TAG_KEY_BYTES = 64
MAX_TAG_VALUE_BYTES = 512
MAX_TAGS = 64
MAX_SCOPE_BYTES = 64
MAX_REG_NAME_BYTES = 255
# Partial mesh (types 30-39).
MAX_WALK_TTL = 255  # random-walk hops left (forward-join, shuffle)
MAX_SHUFFLE_PEERS = 64
MAX_GOSSIP_PAYLOAD_BYTES = 1024 * 1024  # the wire bound; channels have smaller ones
MAX_IHAVE = 4096  # announcements in one gossip-control
MAX_WANT = 1024  # ids grafted in one gossip-control
MAX_NAME_MSG_PAYLOAD_BYTES = 1024 * 1024  # a message to a name (the API's limit is lower)
_REG_KINDS = frozenset(int(k) for k in RegKind)
_NAME_STATUSES = frozenset(int(k) for k in NameStatus)
_KEY_OPS = frozenset(int(k) for k in KeyOp)
_KEY_STATUSES = frozenset(int(k) for k in KeyStatus)
KEY_BYTES = 32
KEY_ID_BYTES = 4
MAX_KEY_IDS = 64  # a keyring is a handful of keys during a rotation
MAX_KEY_MESSAGE_BYTES = 512
#: Deepest container nesting accepted on input. The deepest path we produce is
#: datagram > push-pull > members > member > addr/tags (5); the rest is room
#: for message types added later.
MAX_DEPTH = 16

_STATUS_VALUES = frozenset(int(s) for s in Status)


class DecodeError(ValueError):
    """Malformed input. ``reason`` is a short, stable label used in drop counters."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


class EncodeError(ValueError):
    """A message that violates the wire limits or field types; a bug in the caller."""


# --- encoding ---------------------------------------------------------------


def _bad_out(detail: str) -> NoReturn:
    raise EncodeError(detail)


def _uint_out(v: Any, what: str) -> int:
    if type(v) is not int or v < 0 or v > MAX_U64:
        _bad_out(f"{what} must be an unsigned 64-bit integer, got {v!r}")
    return v


def _bool_out(v: Any, what: str) -> bool:
    if type(v) is not bool:
        _bad_out(f"{what} must be a bool, got {v!r}")
    return v


def _node_out(v: Any, what: str) -> bytes:
    if type(v) is not bytes or len(v) != NODE_ID_BYTES:
        _bad_out(f"{what} must be {NODE_ID_BYTES} bytes, got {v!r}")
    return v


def _text_out(v: Any, what: str, max_bytes: int) -> str:
    if type(v) is not str:
        _bad_out(f"{what} must be text, got {v!r}")
    # A character takes at most 4 UTF-8 bytes: short strings need no encoding pass.
    if len(v) * 4 > max_bytes or not v.isascii():
        try:
            n = len(v.encode("utf-8"))
        except UnicodeEncodeError:
            _bad_out(f"{what} is not valid Unicode (lone surrogate)")
        if n > max_bytes:
            _bad_out(f"{what} longer than {max_bytes} bytes")
    return v


@functools.lru_cache(maxsize=4096)
def _pack_ip(ip: str) -> bytes:
    if "%" in ip:
        raise ValueError("an address with a scope id cannot be sent to peers")
    return ipaddress.ip_address(ip).packed


def _addr_out(addr: Addr) -> list[Any]:
    if type(addr) is not tuple or len(addr) != 2:
        _bad_out(f"addr must be an (ip, port) tuple, got {addr!r}")
    ip, port = addr
    if type(ip) is not str:
        _bad_out(f"addr ip must be text, got {ip!r}")
    try:
        packed = _pack_ip(ip)
    except ValueError as exc:
        _bad_out(f"bad addr ip {ip!r}: {exc}")
    if type(port) is not int or not 0 <= port <= 65535:
        _bad_out(f"addr port out of range: {port!r}")
    return [packed, port]


def _tag_order(pair: tuple[str, str]) -> tuple[int, bytes]:
    key = pair[0].encode("utf-8")
    return (len(key), key)


def _tags_out(tags: Tags) -> dict[str, str]:
    if type(tags) is not tuple:
        _bad_out(f"tags must be a tuple of (key, value) pairs, got {tags!r}")
    if len(tags) > MAX_TAGS:
        _bad_out(f"more than {MAX_TAGS} tags")
    for pair in tags:
        if type(pair) is not tuple or len(pair) != 2:
            _bad_out(f"a tag must be a (key, value) pair, got {pair!r}")
        _text_out(pair[0], "tag key", MAX_TAG_KEY_BYTES)
        _text_out(pair[1], "tag value", MAX_TAG_VALUE_BYTES)
    # Keys in RFC 8949 deterministic order (shorter UTF-8 first, then bytewise)
    # so that equal tag sets always encode to equal bytes.
    out = dict(sorted(tags, key=_tag_order))
    if len(out) != len(tags):
        _bad_out("duplicate tag key")
    return out


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


def _reg_entry_out(e: Any) -> list[Any]:
    if type(e) is not RegEntry or type(e.kind) is not RegKind:
        _bad_out(f"registry entries must be RegEntry, got {e!r}")
    return [
        _uint_out(e.eid, "eid"),
        int(e.kind),
        _text_out(e.scope, "scope", MAX_SCOPE_BYTES),
        _text_out(e.name, "registry name", MAX_REG_NAME_BYTES),
        _uint_out(e.claimed_ms, "claimed_ms"),
        _uint_out(e.pid, "pid"),
        _uint_out(e.uid, "uid"),
        _tags_out(e.meta),
    ]


def _reg_change_out(c: Any) -> list[Any]:
    if type(c) is not RegChange:
        _bad_out(f"registry changes must be RegChange, got {c!r}")
    return [
        _uint_out(c.version, "version"),
        _uint_out(c.eid, "eid"),
        None if c.entry is None else _reg_entry_out(c.entry),
    ]


def _reg_item_out(item: Any) -> list[Any]:
    if type(item) not in (RegDelta, RegSnapshot):
        _bad_out(f"registry sync items must be deltas or snapshots, got {item!r}")
    return to_cbor_obj(item)


def _tuple_out(v: Any, what: str) -> tuple[Any, ...]:
    if type(v) is not tuple:
        _bad_out(f"{what} must be a tuple, got {v!r}")
    return v


def _peer_out(p: Any, what: str) -> list[Any]:
    if type(p) is not MeshPeer:
        _bad_out(f"{what} must be a MeshPeer, got {p!r}")
    return [_node_out(p.node, f"{what} node"), _addr_out(p.addr)]


def _peers_out(v: Any) -> list[Any]:
    peers = _tuple_out(v, "peers")
    if len(peers) > MAX_SHUFFLE_PEERS:
        _bad_out(f"more than {MAX_SHUFFLE_PEERS} peers")
    return [_peer_out(p, "peer") for p in peers]


def _ttl_out(v: Any) -> int:
    if type(v) is not int or not 0 <= v <= MAX_WALK_TTL:
        _bad_out(f"ttl must be 0..{MAX_WALK_TTL}, got {v!r}")
    return v


def _msg_id_out(v: Any, what: str = "message id") -> bytes:
    if type(v) is not bytes or len(v) != MESSAGE_ID_BYTES:
        _bad_out(f"{what} must be {MESSAGE_ID_BYTES} bytes, got {v!r}")
    return v


def _gossip_out(m: Gossip) -> list[Any]:
    if type(m.channel) is not Channel:
        _bad_out(f"gossip channel must be a Channel, got {m.channel!r}")
    if type(m.payload) is not bytes or len(m.payload) > MAX_GOSSIP_PAYLOAD_BYTES:
        _bad_out(f"gossip payload must be bytes of at most {MAX_GOSSIP_PAYLOAD_BYTES}")
    return [
        Gossip.TYPE,
        _msg_id_out(m.id),
        _node_out(m.origin, "origin"),
        _uint_out(m.round, "round"),
        int(m.channel),
        m.payload,
    ]


def _control_out(m: GossipControl) -> list[Any]:
    ihave = _tuple_out(m.ihave, "ihave")
    want = _tuple_out(m.want, "want")
    if len(ihave) > MAX_IHAVE:
        _bad_out(f"more than {MAX_IHAVE} ihave entries")
    if len(want) > MAX_WANT:
        _bad_out(f"more than {MAX_WANT} wanted ids")
    if type(m.link) is not TreeLink:
        _bad_out(f"gossip-control link must be a TreeLink, got {m.link!r}")
    items = []
    for i in ihave:
        if type(i) is not IHave:
            _bad_out(f"ihave entries must be IHave, got {i!r}")
        items.append([_msg_id_out(i.id), _uint_out(i.round, "round")])
    return [GossipControl.TYPE, items, [_msg_id_out(w, "wanted id") for w in want], int(m.link)]


def to_cbor_obj(msg: Message) -> list[Any]:
    """The CBOR data model of ``msg`` (what :func:`encode` serialises).

    Raises :class:`EncodeError` if a field is of the wrong type or out of the
    wire limits, :class:`TypeError` if ``msg`` is not a message at all.
    """
    match msg:
        case Ping(seq, target):
            return [Ping.TYPE, _uint_out(seq, "seq"), _node_out(target, "target")]
        case PingReq(seq, target, target_addr, nack):
            return [
                PingReq.TYPE,
                _uint_out(seq, "seq"),
                _node_out(target, "target"),
                _addr_out(target_addr),
                _bool_out(nack, "nack"),
            ]
        case Ack(seq):
            return [Ack.TYPE, _uint_out(seq, "seq")]
        case Nack(seq):
            return [Nack.TYPE, _uint_out(seq, "seq")]
        case Alive(node, name, addr, inc, gen, tags):
            return [
                Alive.TYPE,
                _node_out(node, "node"),
                _text_out(name, "name", MAX_NAME_BYTES),
                _addr_out(addr),
                _uint_out(inc, "incarnation"),
                _uint_out(gen, "generation"),
                _tags_out(tags),
            ]
        case Suspect(node, inc, sender):
            return [
                Suspect.TYPE,
                _node_out(node, "node"),
                _uint_out(inc, "incarnation"),
                _node_out(sender, "sender"),
            ]
        case Dead(node, inc, sender):
            return [
                Dead.TYPE,
                _node_out(node, "node"),
                _uint_out(inc, "incarnation"),
                _node_out(sender, "sender"),
            ]
        case Left(node, inc):
            return [Left.TYPE, _node_out(node, "node"), _uint_out(inc, "incarnation")]
        case Died(node, inc):
            return [Died.TYPE, _node_out(node, "node"), _uint_out(inc, "incarnation")]
        case DiedRef(prefix, inc):
            if type(prefix) is not bytes or len(prefix) != NODE_PREFIX_BYTES:
                _bad_out(f"node prefix must be {NODE_PREFIX_BYTES} bytes, got {prefix!r}")
            return [DiedRef.TYPE, prefix, _uint_out(inc, "incarnation")]
        case PushPull(join, members):
            if type(members) is not tuple:
                _bad_out(f"push-pull members must be a tuple, got {members!r}")
            return [PushPull.TYPE, _bool_out(join, "join"), [_member_out(m) for m in members]]
        case SyncDigest(bits, hashes):
            if type(bits) is not int or not 0 <= bits <= MAX_SYNC_BITS:
                _bad_out(f"sync digest bits must be 0..{MAX_SYNC_BITS}, got {bits!r}")
            if type(hashes) is not bytes or len(hashes) != 4 << bits:
                _bad_out(f"sync digest hashes must be {4 << bits} bytes")
            return [SyncDigest.TYPE, bits, hashes]
        case SyncRows(bits, buckets, members):
            if type(bits) is not int or not 0 <= bits <= MAX_SYNC_BITS:
                _bad_out(f"sync rows bits must be 0..{MAX_SYNC_BITS}, got {bits!r}")
            if type(buckets) is not tuple or any(
                type(b) is not int or not 0 <= b < 1 << bits for b in buckets
            ):
                _bad_out(f"sync rows buckets must be a tuple of ints below {1 << bits}")
            if type(members) is not tuple:
                _bad_out(f"sync rows members must be a tuple, got {members!r}")
            return [SyncRows.TYPE, bits, list(buckets), [_member_out(m) for m in members]]
        case RegDelta(origin, gen, base, top, changes, ack):
            return [
                RegDelta.TYPE,
                _node_out(origin, "origin"),
                _uint_out(gen, "generation"),
                _uint_out(base, "base"),
                _uint_out(top, "top"),
                [_reg_change_out(c) for c in _tuple_out(changes, "changes")],
                _bool_out(ack, "ack"),
            ]
        case RegSnapshot(origin, gen, version, entries):
            return [
                RegSnapshot.TYPE,
                _node_out(origin, "origin"),
                _uint_out(gen, "generation"),
                _uint_out(version, "version"),
                [_reg_entry_out(e) for e in _tuple_out(entries, "entries")],
            ]
        case RegSync(digest, items, bits, buckets, hashes):
            rows = []
            for r in _tuple_out(digest, "digest"):
                if type(r) is not RegDigestRow:
                    _bad_out(f"digest rows must be RegDigestRow, got {r!r}")
                rows.append(
                    [
                        _node_out(r.origin, "origin"),
                        _uint_out(r.generation, "generation"),
                        _uint_out(r.version, "version"),
                    ]
                )
            out = [RegSync.TYPE, rows, [_reg_item_out(i) for i in _tuple_out(items, "items")]]
            if bits == -1 and not buckets and not hashes:
                return out
            if type(bits) is not int or not 0 <= bits <= MAX_SYNC_BITS:
                _bad_out(f"reg-sync bits must be 0..{MAX_SYNC_BITS}, got {bits!r}")
            if type(hashes) is not bytes or (hashes and len(hashes) != 4 << bits):
                _bad_out("reg-sync hashes must be 4 bytes per bucket")
            b = list(_tuple_out(buckets, "buckets"))
            if any(type(x) is not int or not 0 <= x < 1 << bits for x in b) or b != sorted(set(b)):
                _bad_out("reg-sync buckets must be distinct, ascending and below 2**bits")
            return [*out, bits, b, hashes]
        case RegAck(origin, gen, version):
            return [
                RegAck.TYPE,
                _node_out(origin, "origin"),
                _uint_out(gen, "generation"),
                _uint_out(version, "version"),
            ]
        case MeshJoin(joiner):
            return [MeshJoin.TYPE, _peer_out(joiner, "joiner")]
        case ForwardJoin(joiner, ttl):
            return [ForwardJoin.TYPE, _peer_out(joiner, "joiner"), _ttl_out(ttl)]
        case Neighbor(sender, high):
            return [Neighbor.TYPE, _peer_out(sender, "sender"), _bool_out(high, "high")]
        case NeighborReply(accept):
            return [NeighborReply.TYPE, _bool_out(accept, "accept")]
        case Disconnect(alive):
            return [Disconnect.TYPE, _bool_out(alive, "alive")]
        case Shuffle(origin, ttl, peers):
            return [Shuffle.TYPE, _peer_out(origin, "origin"), _ttl_out(ttl), _peers_out(peers)]
        case ShuffleReply(peers):
            return [ShuffleReply.TYPE, _peers_out(peers)]
        case Gossip():
            return _gossip_out(msg)
        case GossipControl():
            return _control_out(msg)
        case NameMsg(seq, kind, scope, name, eid, sender, payload):
            if type(kind) is not RegKind:
                _bad_out(f"name-msg kind must be a RegKind, got {kind!r}")
            if type(payload) is not bytes or len(payload) > MAX_NAME_MSG_PAYLOAD_BYTES:
                _bad_out(f"name-msg payload must be bytes of at most {MAX_NAME_MSG_PAYLOAD_BYTES}")
            fields: list[Any] = [
                NameMsg.TYPE,
                _uint_out(seq, "seq"),
                int(kind),
                _text_out(scope, "scope", MAX_SCOPE_BYTES),
                _text_out(name, "name", MAX_REG_NAME_BYTES),
                _uint_out(eid, "eid"),
                _text_out(sender, "sender", MAX_REG_NAME_BYTES),
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
        case NameReply(seq, status):
            if type(status) is not NameStatus:
                _bad_out(f"name-reply status must be a NameStatus, got {status!r}")
            return [NameReply.TYPE, _uint_out(seq, "seq"), int(status)]
        case KeyRequest(op, key):
            if type(op) is not KeyOp:
                _bad_out(f"key-request op must be a KeyOp, got {op!r}")
            if type(key) is not bytes or len(key) != _key_len(op):
                _bad_out(f"key-request {op.name.lower()} needs {_key_len(op)} key bytes")
            return [KeyRequest.TYPE, int(op), key]
        case KeyReply(status, primary, keys, message):
            if type(status) is not KeyStatus:
                _bad_out(f"key-reply status must be a KeyStatus, got {status!r}")
            if type(primary) is not bytes or len(primary) not in (0, KEY_ID_BYTES):
                _bad_out("key-reply primary must be empty or a key id")
            if len(keys) > MAX_KEY_IDS or any(
                type(k) is not bytes or len(k) != KEY_ID_BYTES for k in keys
            ):
                _bad_out(f"key-reply keys must be at most {MAX_KEY_IDS} key ids")
            return [
                KeyReply.TYPE,
                int(status),
                primary,
                list(keys),
                _text_out(message, "message", MAX_KEY_MESSAGE_BYTES),
            ]
    raise TypeError(f"not a message: {msg!r}")


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


def _bad(detail: str) -> NoReturn:
    raise DecodeError("bad_field", detail)


def _uint(v: Any, what: str) -> int:
    if type(v) is not int or v < 0 or v > MAX_U64:
        _bad(f"{what} must be an unsigned 64-bit integer")
    return v


def _bool(v: Any, what: str) -> bool:
    if type(v) is not bool:
        _bad(f"{what} must be a bool")
    return v


def _node_id(v: Any, what: str = "node") -> bytes:
    if type(v) is not bytes or len(v) != NODE_ID_BYTES:
        _bad(f"{what} must be {NODE_ID_BYTES} bytes")
    return v


def _text(v: Any, what: str, max_bytes: int) -> str:
    if type(v) is not str:
        _bad(f"{what} must be text")
    # Decoded text is valid UTF-8 (strict decoding), so encoding cannot fail.
    if len(v) * 4 > max_bytes and len(v.encode("utf-8")) > max_bytes:
        _bad(f"{what} longer than {max_bytes} bytes")
    return v


@functools.lru_cache(maxsize=4096)
def _unpack_ip(ip: bytes) -> str:
    return str(ipaddress.ip_address(ip))


def _addr_in(v: Any) -> Addr:
    if type(v) is not list or len(v) != 2:
        _bad("addr must be [ip, port]")
    ip, port = v
    if type(ip) is not bytes or len(ip) not in (4, 16):
        _bad("addr ip must be 4 or 16 bytes")
    if type(port) is not int or not 0 <= port <= 65535:
        _bad("addr port out of range")
    return (_unpack_ip(ip), port)


def _tags_in(v: Any) -> Tags:
    if type(v) is not dict:
        _bad("tags must be a map")
    if len(v) > MAX_TAGS:
        _bad(f"more than {MAX_TAGS} tags")
    if not v:
        return ()
    return tuple(
        sorted(
            (_text(k, "tag key", MAX_TAG_KEY_BYTES), _text(val, "tag value", MAX_TAG_VALUE_BYTES))
            for k, val in v.items()
        )
    )


def _fields(obj: list[Any], n: int, name: str) -> list[Any]:
    # Extra trailing fields are allowed: a newer peer may append fields.
    if len(obj) < n + 1:
        raise DecodeError("bad_arity", f"{name} needs {n} fields")
    return obj[1 : n + 1]


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


def _array(v: Any, what: str) -> list[Any]:
    if type(v) is not list:
        _bad(f"{what} must be an array")
    return v


def _reg_entry_in(v: Any) -> RegEntry:
    v = _array(v, "registry entry")
    if len(v) < 8:
        _bad("registry entry needs 8 fields")
    eid, kind, scope, name, claimed, pid, uid, meta = v[:8]
    if type(kind) is not int or kind not in (0, 1):
        _bad("registry entry kind must be 0 or 1")
    return RegEntry(
        _uint(eid, "eid"),
        RegKind(kind),
        _text(scope, "scope", MAX_SCOPE_BYTES),
        _text(name, "registry name", MAX_REG_NAME_BYTES),
        _uint(claimed, "claimed_ms"),
        _uint(pid, "pid"),
        _uint(uid, "uid"),
        _tags_in(meta),
    )


def _reg_change_in(v: Any) -> RegChange:
    v = _array(v, "registry change")
    if len(v) < 3:
        _bad("registry change needs 3 fields")
    version, eid, entry = v[:3]
    e = None if entry is None else _reg_entry_in(entry)
    if e is not None and e.eid != eid:
        _bad("registry change eid does not match its entry")
    return RegChange(_uint(version, "version"), _uint(eid, "eid"), e)


def _reg_delta_in(obj: list[Any]) -> Message:
    origin, gen, base, top, changes, ack = _fields(obj, 6, "reg-delta")
    b, t = _uint(base, "base"), _uint(top, "top")
    if t < b:
        _bad("reg-delta top below base")
    return RegDelta(
        _node_id(origin, "origin"),
        _uint(gen, "generation"),
        b,
        t,
        tuple(_reg_change_in(c) for c in _array(changes, "changes")),
        _bool(ack, "ack"),
    )


def _reg_snapshot_in(obj: list[Any]) -> Message:
    origin, gen, version, entries = _fields(obj, 4, "reg-snapshot")
    return RegSnapshot(
        _node_id(origin, "origin"),
        _uint(gen, "generation"),
        _uint(version, "version"),
        tuple(_reg_entry_in(e) for e in _array(entries, "entries")),
    )


def _reg_sync_in(obj: list[Any]) -> Message:
    digest, items = _fields(obj, 2, "reg-sync")
    bits: int = -1
    buckets: tuple[int, ...] = ()
    hashes: bytes = b""
    if len(obj) >= 6:  # [type, digest, items, bits, buckets, hashes, ...]
        bits = _uint(obj[3], "bits")
        if bits > MAX_SYNC_BITS:
            _bad(f"reg-sync bits above {MAX_SYNC_BITS}")
        buckets = tuple(_uint(x, "bucket") for x in _array(obj[4], "buckets"))
        if any(x >= 1 << bits for x in buckets) or list(buckets) != sorted(set(buckets)):
            _bad("reg-sync buckets must be distinct, ascending and below 2**bits")
        hashes = obj[5]
        if type(hashes) is not bytes or (hashes and len(hashes) != 4 << bits):
            _bad("reg-sync hashes must be a byte string of 4 bytes per bucket")
    rows = []
    for r in _array(digest, "digest"):
        r = _array(r, "digest row")
        if len(r) < 3:
            _bad("digest row needs 3 fields")
        rows.append(
            RegDigestRow(
                _node_id(r[0], "origin"), _uint(r[1], "generation"), _uint(r[2], "version")
            )
        )
    out: list[RegDelta | RegSnapshot] = []
    for item in _array(items, "items"):
        msg = from_cbor_obj(item)
        if not isinstance(msg, RegDelta | RegSnapshot):
            _bad("reg-sync items must be deltas or snapshots")
        out.append(msg)
    return RegSync(tuple(rows), tuple(out), bits, buckets, hashes)


def _reg_ack_in(obj: list[Any]) -> Message:
    origin, gen, version = _fields(obj, 3, "reg-ack")
    return RegAck(_node_id(origin, "origin"), _uint(gen, "generation"), _uint(version, "version"))


def _peer_in(v: Any) -> MeshPeer:
    v = _array(v, "mesh peer")
    if len(v) < 2:
        _bad("mesh peer needs 2 fields")
    return MeshPeer(_node_id(v[0]), _addr_in(v[1]))


def _peers_in(v: Any) -> tuple[MeshPeer, ...]:
    v = _array(v, "peers")
    if len(v) > MAX_SHUFFLE_PEERS:
        _bad(f"more than {MAX_SHUFFLE_PEERS} peers")
    return tuple(_peer_in(p) for p in v)


def _ttl(v: Any) -> int:
    if type(v) is not int or not 0 <= v <= MAX_WALK_TTL:
        _bad(f"ttl must be 0..{MAX_WALK_TTL}")
    return v


def _msg_id(v: Any, what: str = "message id") -> bytes:
    if type(v) is not bytes or len(v) != MESSAGE_ID_BYTES:
        _bad(f"{what} must be {MESSAGE_ID_BYTES} bytes")
    return v


_CHANNELS = frozenset(int(c) for c in Channel)
_TREE_LINKS = frozenset(int(t) for t in TreeLink)


def _mesh_join_in(obj: list[Any]) -> Message:
    (joiner,) = _fields(obj, 1, "mesh-join")
    return MeshJoin(_peer_in(joiner))


def _forward_join_in(obj: list[Any]) -> Message:
    joiner, ttl = _fields(obj, 2, "forward-join")
    return ForwardJoin(_peer_in(joiner), _ttl(ttl))


def _neighbor_in(obj: list[Any]) -> Message:
    sender, high = _fields(obj, 2, "neighbor")
    return Neighbor(_peer_in(sender), _bool(high, "high"))


def _neighbor_reply_in(obj: list[Any]) -> Message:
    (accept,) = _fields(obj, 1, "neighbor-reply")
    return NeighborReply(_bool(accept, "accept"))


def _disconnect_in(obj: list[Any]) -> Message:
    (alive,) = _fields(obj, 1, "disconnect")
    return Disconnect(_bool(alive, "alive"))


def _shuffle_in(obj: list[Any]) -> Message:
    origin, ttl, peers = _fields(obj, 3, "shuffle")
    return Shuffle(_peer_in(origin), _ttl(ttl), _peers_in(peers))


def _shuffle_reply_in(obj: list[Any]) -> Message:
    (peers,) = _fields(obj, 1, "shuffle-reply")
    return ShuffleReply(_peers_in(peers))


def _gossip_in(obj: list[Any]) -> Message:
    mid, origin, rnd, channel, payload = _fields(obj, 5, "gossip")
    if type(channel) is not int or channel not in _CHANNELS:
        _bad("gossip channel must be 0..2")
    if type(payload) is not bytes or len(payload) > MAX_GOSSIP_PAYLOAD_BYTES:
        _bad(f"gossip payload must be bytes of at most {MAX_GOSSIP_PAYLOAD_BYTES}")
    return Gossip(
        _msg_id(mid), _node_id(origin, "origin"), _uint(rnd, "round"), Channel(channel), payload
    )


def _gossip_control_in(obj: list[Any]) -> Message:
    ihave, want, link = _fields(obj, 3, "gossip-control")
    ihave = _array(ihave, "ihave")
    want = _array(want, "want")
    if len(ihave) > MAX_IHAVE:
        _bad(f"more than {MAX_IHAVE} ihave entries")
    if len(want) > MAX_WANT:
        _bad(f"more than {MAX_WANT} wanted ids")
    if type(link) is not int or link not in _TREE_LINKS:
        _bad("gossip-control link must be 0..2")
    items = []
    for i in ihave:
        i = _array(i, "ihave entry")
        if len(i) < 2:
            _bad("ihave entry needs 2 fields")
        items.append(IHave(_msg_id(i[0]), _uint(i[1], "round")))
    return GossipControl(tuple(items), tuple(_msg_id(w, "wanted id") for w in want), TreeLink(link))


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


def _key_len(op: KeyOp) -> int:
    return {KeyOp.QUERY: 0, KeyOp.INSTALL: KEY_BYTES}.get(op, KEY_ID_BYTES)


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


_DECODERS: dict[int, Callable[[list[Any]], Message]] = {
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
    RegDelta.TYPE: _reg_delta_in,
    RegSnapshot.TYPE: _reg_snapshot_in,
    RegSync.TYPE: _reg_sync_in,
    RegAck.TYPE: _reg_ack_in,
    MeshJoin.TYPE: _mesh_join_in,
    ForwardJoin.TYPE: _forward_join_in,
    Neighbor.TYPE: _neighbor_in,
    NeighborReply.TYPE: _neighbor_reply_in,
    Disconnect.TYPE: _disconnect_in,
    Shuffle.TYPE: _shuffle_in,
    ShuffleReply.TYPE: _shuffle_reply_in,
    Gossip.TYPE: _gossip_in,
    GossipControl.TYPE: _gossip_control_in,
    NameMsg.TYPE: _name_msg_in,
    NameReply.TYPE: _name_reply_in,
    KeyRequest.TYPE: _key_request_in,
    KeyReply.TYPE: _key_reply_in,
}
assert _DECODERS.keys() == MESSAGE_TYPES.keys(), "every message type needs a decoder"


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
