"""Where the shells and the simulator import the membership node from.

The node now lives in :mod:`peerd.core.swim` (one module per concern,
composed by :mod:`peerd.core.swim.membership`); this module keeps
``from peerd.core.node import Node`` and the constants tests use working.
"""

from peerd.core.swim.base import (
    DIGEST_SYNC_MIN_MEMBERS,
    FIRST_GOSSIP_DELAY_S,
    LAST_CHECK_MIN_NODES,
    LIVE,
    MAX_QUEUED_BROADCASTS,
    NACK_AFTER,
    REAP_INTERVAL_S,
    RING_RECENT_MAX,
    RING_RECENT_S,
    RING_SUCCESSORS,
    STATE_CACHE_MAX_BYTES,
    JoinBatch,
    Probe,
    Relay,
    StreamCtx,
    addr_problem,
    tags_problem,
)
from peerd.core.swim.members import AMBIGUOUS, LiveSet, Member, Suspicion
from peerd.core.swim.membership import Node

__all__ = [
    "AMBIGUOUS",
    "DIGEST_SYNC_MIN_MEMBERS",
    "FIRST_GOSSIP_DELAY_S",
    "JoinBatch",
    "LAST_CHECK_MIN_NODES",
    "LIVE",
    "LiveSet",
    "MAX_QUEUED_BROADCASTS",
    "Member",
    "NACK_AFTER",
    "Node",
    "Probe",
    "REAP_INTERVAL_S",
    "RING_RECENT_MAX",
    "RING_RECENT_S",
    "RING_SUCCESSORS",
    "Relay",
    "STATE_CACHE_MAX_BYTES",
    "StreamCtx",
    "Suspicion",
    "addr_problem",
    "tags_problem",
]
