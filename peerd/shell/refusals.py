"""Saying "wrong cluster key" when that is what happened.

A node started with another cluster's key (or none, or a stale one after a
rotation) is the most common way a join fails, and the two sides see it
differently. The receiver cannot open the sender's seal, and knows exactly
why (:class:`peerd.wire.seal.SealError`'s reason); the sender only sees its
first frame met with a closed connection, which used to be logged as a bare
``reason=eof`` at debug level, so the operator of the new node saw "no seed
answered" and nothing else. memberlist's "No installed keys could decrypt
the message" is the model for the receiver's side; for the sender's, the
close right after a well-formed first frame is the best evidence there is,
so the line says "likely" and names the cause to check first.

Both are counted (``key_refused_by_us`` / ``key_refused_by_peer``, shown as
``peerd_key_refusals_total{by=...}``) besides the drop or failure counters
of the transport, and logged through the transports' rate-limited logs.
"""

from __future__ import annotations

import collections
from collections.abc import Callable

from peerd.core.events import LogLevel
from peerd.wire.seal import SealError

# What each seal failure that is about keys means, as said to an operator.
_KEY_REASONS = {
    "unknown_key": "sealed with a key this node does not have: a different cluster key",
    "auth_failed": "did not authenticate with the key it names: a different cluster key",
    "encrypted_rejected": "sealed, but this node has no cluster key: the sender has one",
    "plaintext_rejected": "not sealed, but this node requires its cluster key",
}

PEER_CLOSED = (
    "peer closed the connection after our first frame without answering: "
    "likely a wrong cluster key (its log says why)"
)


def rejected(what: str, reason: str, counters: collections.Counter[str]) -> str:
    """The log message for ``what`` ("datagram", "stream") refused for the
    seal failure ``reason``; a refusal for the key is counted as such."""
    meaning = _KEY_REASONS.get(reason)
    if meaning is None:
        return f"{what} rejected"
    counters["key_refused_by_us"] += 1
    return f"{what} rejected: {meaning}"


def peer_closed(counters: collections.Counter[str]) -> str:
    """The log message when the peer closed after our first frame; counted."""
    counters["key_refused_by_peer"] += 1
    return PEER_CLOSED


def seal_refused(
    drop: Callable[..., None],
    what: str,
    err: SealError,
    counters: collections.Counter[str],
    src: object,
) -> None:
    """Count and log ``what`` ("datagram", "stream") from ``src`` that the
    seal refused, through the transport's ``_drop`` (``seal_<reason>``)."""
    reason = str(getattr(err, "reason", "") or "seal")
    drop(
        f"seal_{reason}",
        rejected(what, reason, counters),
        addr=src,
        reason=reason,
        level=LogLevel.WARNING,
    )
