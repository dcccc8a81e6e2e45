"""The field layer of the wire codec: every value on the wire is one of a few
shapes (unsigned 64-bit integers, booleans, node ids, bounded UTF-8 text, an
address, a tag map), and each has one checker per direction here.

The two directions are deliberately not symmetric. Decoding checks type and
range of everything that arrives and raises only :class:`DecodeError`, so the
core can trust a decoded message whatever the peer sent. Encoding checks the
same limits and raises :class:`EncodeError`: a message our own core built
outside the limits is a bug, and failing where it is built is better than
emitting bytes every peer would drop. Tags encode in RFC 8949 section 4.2.1
order (shorter UTF-8 key first, then bytewise) so equal tag sets give equal
bytes, which is what makes proto/vectors byte-exact.

The per-family codecs (codec_membership, codec_registry, codec_mesh,
codec_names, codec_keys) build their messages from these; peerd.wire.codec
is the public entry point and re-exports the limits.
"""

from __future__ import annotations

import functools
import ipaddress
from typing import Any, NoReturn

from peerd.wire.messages import (
    NODE_ID_BYTES,
    Addr,
    Tags,
)

MAX_U64 = 2**64 - 1
#: Most buckets a digest sync may use: 2**12 (16 KiB of hashes). Membership
#: and registry anti-entropy share the bound.
MAX_SYNC_BITS = 12
MAX_TAG_KEY_BYTES = 64
MAX_TAG_VALUE_BYTES = 512
MAX_TAGS = 64


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


def _tuple_out(v: Any, what: str) -> tuple[Any, ...]:
    if type(v) is not tuple:
        _bad_out(f"{what} must be a tuple, got {v!r}")
    return v


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


def _array(v: Any, what: str) -> list[Any]:
    if type(v) is not list:
        _bad(f"{what} must be an array")
    return v
