"""What the registry may read of membership: plain queries, no actions.

Theory of operation: the registry decides alone; membership only carries
what it decides. Whatever the registry must know about the cluster to decide
(who is live, in which life, how many, whether an item still waits in the
gossip queue it shares with membership) it reads through this view at the
moment of the decision, never keeping a copy, so it cannot drift from the
members table and cannot change it. Everything it wants done (queue an item
for gossip, send a datagram, open a stream, gossip a round now) it returns as
values (peerd.core.events) that the peer hands to membership in the order
they were produced. The membership node implements this view over its own
members store (peerd.core.swim.membership).
"""

from __future__ import annotations

import random
from collections.abc import Hashable
from typing import Protocol

from peerd.wire.messages import NodeId


class MembersView(Protocol):
    """Read-only queries over membership (see the module docstring)."""

    @property
    def node_id(self) -> NodeId: ...

    @property
    def started(self) -> bool:
        """Membership runs (started, not necessarily joined)."""

    @property
    def leaving(self) -> bool: ...

    def live_peers(self) -> list[tuple[NodeId, int]]:
        """(node id, generation) of every live member other than us."""

    def live_peer_count(self) -> int:
        """How many live members other than us."""

    def is_live_peer(self, node: NodeId) -> bool:
        """Whether ``node`` is a live member other than us."""

    def is_live_member(self, node: NodeId) -> bool:
        """Whether the members table holds ``node`` as live (us included)."""

    def sample_live(self, rng: random.Random, k: int) -> list[NodeId]:
        """Up to ``k`` live members other than us, drawn with ``rng``."""

    def queued(self, key: Hashable) -> bytes | None:
        """The encoded item queued for gossip under ``key``, if any."""
