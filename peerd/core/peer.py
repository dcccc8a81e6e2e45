"""One peer: where the subsystems of the core meet (docs/DESIGN.md, "One Peer").

Theory of operation: a daemon and a simulated node are the same pure object,
driven only through :meth:`Peer.handle` (an input and the time it happened,
returning what to do), and read through the few methods the shells show over
the API (members, the local member, the registry, counters, local health).
The shells construct a :class:`Peer` and never reach past it, so what the
simulator measures at 10,000 nodes is what the daemon runs.

A Peer composes; it decides nothing. Each protocol lives in its subsystem
(membership in :mod:`peerd.core.swim`, the registry in
:mod:`peerd.core.registry`), with its own state and rules, and the Peer only
routes inputs to them and gathers their outputs. Today the membership still
hosts the registry (the registry reaches the membership's gossip queue, live
set and timers through the callbacks of ``peerd.core.registry.service.Host``),
so an input goes to the membership, which hands the registry's inputs on;
when the registry returns outputs of its own and reads a view of the
membership instead, the routing between them moves here, and so do the mesh
and names messaging.
"""

from __future__ import annotations

import collections
import random
from collections.abc import Callable

from peerd.core.config import SwimConfig
from peerd.core.events import Input, MemberInfo, Output
from peerd.core.registry.service import RegistryService
from peerd.core.swim.members import StoreFactory
from peerd.core.swim.membership import Node
from peerd.wire.messages import Addr, NodeId, Tags


class Peer:
    """The core of one peerd node: membership and registry. See the module docs."""

    __slots__ = ("membership", "registry", "counters", "handle")

    def __init__(
        self,
        *,
        node_id: NodeId,
        name: str,
        addr: Addr,
        config: SwimConfig,
        rng: random.Random,
        incarnation: int = 0,
        generation: int = 0,
        tags: Tags = (),
        store: StoreFactory | None = None,
    ) -> None:
        self.membership = Node(
            node_id=node_id,
            name=name,
            addr=addr,
            config=config,
            rng=rng,
            incarnation=incarnation,
            generation=generation,
            tags=tags,
            store=store,
        )
        self.registry: RegistryService = self.membership.registry
        # Drop and message counters of the whole peer (the shells show them).
        self.counters: collections.Counter[str] = self.membership.counters
        # The one way in: feed one input that happened at ``now``; returns what
        # to do. Bound once (not a method that forwards) so that the simulator
        # pays no extra call per input.
        self.handle: Callable[[float, Input], list[Output]] = self.membership.handle

    # --- the read side the shells use ------------------------------------------

    @property
    def node_id(self) -> NodeId:
        return self.membership.node_id

    @property
    def incarnation(self) -> int:
        return self.membership.incarnation

    @property
    def health_score(self) -> int:
        """Lifeguard local health (0 is healthy)."""
        return self.membership.health_score

    def live_count(self) -> int:
        """Live members, this node included."""
        return self.membership.live_count()

    def local_member(self) -> MemberInfo:
        return self.membership.local_member()

    def members(self) -> list[MemberInfo]:
        return self.membership.members()

    def member(self, node: NodeId) -> MemberInfo | None:
        return self.membership.member(node)

    def peer_addrs(self) -> list[Addr]:
        return self.membership.peer_addrs()

    def queued_broadcasts(self) -> int:
        return self.membership.queued_broadcasts()
