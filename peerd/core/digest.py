"""Membership digests for anti-entropy between large memberships.

A full push-pull sends every member both ways: O(N) bytes and O(N) work per
exchange, on both sides, even when the two views are equal (the usual case).
Above a few hundred members that is most of a node's traffic. A digest sync
sends the membership's hash split into buckets instead, and only the rows of
the buckets that differ (proto/wire.cddl: sync-digest, sync-rows).

Buckets are chosen by the first bits of the node id (ids are random, so
buckets are even). A bucket's hash is the XOR of a 32-bit hash of each
member's (node, incarnation, status): order-free, and kept up to date in O(1)
per change by toggling the member's hash out before the change and in after
it. The node keeps the finest split (2**12 buckets) and folds it to the
number of buckets an exchange uses (about one bucket per 16 members).
"""

from __future__ import annotations

import functools
import hashlib
import math
import sys
from array import array

FINE_BITS = 12
MEMBERS_PER_BUCKET = 16


@functools.lru_cache(maxsize=1 << 16)
def member_hash(node: bytes, incarnation: int, status: int) -> int:
    h = hashlib.blake2b(node + incarnation.to_bytes(8, "big") + bytes((status,)), digest_size=4)
    return int.from_bytes(h.digest(), "big")


def bucket_of(node: bytes, bits: int) -> int:
    return int.from_bytes(node[:2], "big") >> (16 - bits)


def bits_for(members: int) -> int:
    """Bucket bits for an exchange over ``members`` members."""
    if members <= MEMBERS_PER_BUCKET:
        return 0
    return min(FINE_BITS, math.ceil(math.log2(members / MEMBERS_PER_BUCKET)))


class Digest:
    """Bucket hashes of one node's membership at the finest split."""

    __slots__ = ("fine",)

    def __init__(self, fine: array | None = None) -> None:  # type: ignore[type-arg]
        self.fine = array("I", fine) if fine is not None else array("I", bytes(4 << FINE_BITS))

    def toggle(self, node: bytes, incarnation: int, status: int) -> None:
        """Add a member's state, or remove it (XOR: the same call)."""
        self.fine[bucket_of(node, FINE_BITS)] ^= member_hash(node, incarnation, status)

    def hashes(self, bits: int) -> bytes:
        """The wire form: 2**bits big-endian 32-bit bucket hashes."""
        a = array("I", self.fine)
        if sys.byteorder == "little":
            a.byteswap()
        raw = a.tobytes()
        # Fold pairs of neighbouring buckets until 2**bits are left. XOR of
        # byte strings as big integers (no carries) keeps this in C.
        for _ in range(FINE_BITS - max(0, bits)):
            b = array("I", raw)
            even, odd = b[0::2].tobytes(), b[1::2].tobytes()
            raw = (int.from_bytes(even, "big") ^ int.from_bytes(odd, "big")).to_bytes(
                len(even), "big"
            )
        return raw

    def differing(self, bits: int, theirs: bytes) -> list[int]:
        """Buckets whose hash differs from ``theirs`` (same bits)."""
        mine = self.hashes(bits)
        return [i for i in range(1 << bits) if mine[4 * i : 4 * i + 4] != theirs[4 * i : 4 * i + 4]]
