"""Wire codec of the registry family (types 20-23): a node's registry is a
log it alone writes, replicated as deltas (changes between two versions of
one origin and generation), whole snapshots when a delta would not connect,
acks that settle a write, and reg-sync, the anti-entropy round that carries
a per-origin digest, optionally bucket hashes, and the deltas or snapshots
that repair the difference.

A registry entry is the one nested shape (an eid, its kind, scope and name,
claim time, owner pid and uid, and a meta tag map); a change is a version
with the entry it installs or None for a removal. Reg-sync's items are whole
messages, decoded through the codec's own entry point so they get exactly
the checks they would get alone.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from peerd.wire.codec_fields import (
    MAX_SYNC_BITS,
    _array,
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
    _tuple_out,
    _uint,
    _uint_out,
)
from peerd.wire.messages import (
    Message,
    RegAck,
    RegChange,
    RegDelta,
    RegDigestRow,
    RegEntry,
    RegKind,
    RegSnapshot,
    RegSync,
)

MAX_SCOPE_BYTES = 64
MAX_REG_NAME_BYTES = 255


# --- encoding ---


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
    if type(item) is RegDelta:
        return _reg_delta_out(item)
    if type(item) is RegSnapshot:
        return _reg_snapshot_out(item)
    _bad_out(f"registry sync items must be deltas or snapshots, got {item!r}")


def _reg_delta_out(m: RegDelta) -> list[Any]:
    return [
        RegDelta.TYPE,
        _node_out(m.origin, "origin"),
        _uint_out(m.generation, "generation"),
        _uint_out(m.base, "base"),
        _uint_out(m.top, "top"),
        [_reg_change_out(c) for c in _tuple_out(m.changes, "changes")],
        _bool_out(m.ack, "ack"),
    ]


def _reg_snapshot_out(m: RegSnapshot) -> list[Any]:
    return [
        RegSnapshot.TYPE,
        _node_out(m.origin, "origin"),
        _uint_out(m.generation, "generation"),
        _uint_out(m.version, "version"),
        [_reg_entry_out(e) for e in _tuple_out(m.entries, "entries")],
    ]


def _reg_sync_out(m: RegSync) -> list[Any]:
    bits, buckets, hashes = m.bits, m.buckets, m.hashes
    rows = []
    for r in _tuple_out(m.digest, "digest"):
        if type(r) is not RegDigestRow:
            _bad_out(f"digest rows must be RegDigestRow, got {r!r}")
        rows.append(
            [
                _node_out(r.origin, "origin"),
                _uint_out(r.generation, "generation"),
                _uint_out(r.version, "version"),
            ]
        )
    out = [RegSync.TYPE, rows, [_reg_item_out(i) for i in _tuple_out(m.items, "items")]]
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


def _reg_ack_out(m: RegAck) -> list[Any]:
    return [
        RegAck.TYPE,
        _node_out(m.origin, "origin"),
        _uint_out(m.generation, "generation"),
        _uint_out(m.version, "version"),
    ]


# --- decoding ---


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


def reg_sync_decoder(item_in: Callable[[Any], Message]) -> Callable[[list[Any]], Message]:
    """The reg-sync decoder, given the decoder of one whole message.

    A reg-sync carries deltas and snapshots as whole messages: ``item_in`` is
    peerd.wire.codec's own entry point, handed in so that an item is checked
    exactly as the same message on its own would be (and this module need not
    import the one that imports it).
    """

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
            msg = item_in(item)
            if not isinstance(msg, RegDelta | RegSnapshot):
                _bad("reg-sync items must be deltas or snapshots")
            out.append(msg)
        return RegSync(tuple(rows), tuple(out), bits, buckets, hashes)

    return _reg_sync_in


def _reg_ack_in(obj: list[Any]) -> Message:
    origin, gen, version = _fields(obj, 3, "reg-ack")
    return RegAck(_node_id(origin, "origin"), _uint(gen, "generation"), _uint(version, "version"))


ENCODERS: dict[type, Callable[[Any], list[Any]]] = {
    RegDelta: _reg_delta_out,
    RegSnapshot: _reg_snapshot_out,
    RegSync: _reg_sync_out,
    RegAck: _reg_ack_out,
}
#: Without reg-sync, which peerd.wire.codec builds with :func:`reg_sync_decoder`.
DECODERS: dict[int, Callable[[list[Any]], Message]] = {
    RegDelta.TYPE: _reg_delta_in,
    RegSnapshot.TYPE: _reg_snapshot_in,
    RegAck.TYPE: _reg_ack_in,
}
