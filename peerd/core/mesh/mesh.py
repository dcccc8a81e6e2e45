"""The partial mesh of one node: HyParView's overlay with Plumtree on top.

:class:`Mesh` routes inputs to the two state machines and feeds HyParView's
neighbour changes to Plumtree, so a driver (the node, the simulator, a test)
deals with one object. Both parts stay usable on their own.
"""

from __future__ import annotations

import random

from peerd.core.events import (
    Broadcast,
    MeshInput,
    MeshOutput,
    MeshTimerFired,
    MessageIn,
    NeighborDown,
    NeighborUp,
)
from peerd.core.mesh.config import MeshConfig
from peerd.core.mesh.hyparview import HyParView
from peerd.core.mesh.plumtree import Plumtree
from peerd.core.timers import GraftTimeout, IHaveFlush
from peerd.wire.messages import Gossip, GossipControl, MeshPeer, NodeId

_PLUMTREE_TIMERS = (IHaveFlush, GraftTimeout)


class Mesh:
    def __init__(self, me: MeshPeer, config: MeshConfig, rng: random.Random) -> None:
        self.me = me
        self.config = config
        self.hyparview = HyParView(me, config.hyparview, rng)
        self.plumtree = Plumtree(me.node, config.plumtree, rng)

    @property
    def node_id(self) -> NodeId:
        return self.me.node

    def handle(self, now: float, inp: MeshInput) -> list[MeshOutput]:
        """Feed one input; returns what to do (HyParView's outputs first, then
        Plumtree's reactions to its neighbour changes)."""
        match inp:
            case MessageIn(msg=Gossip() | GossipControl()) | Broadcast():
                return self.plumtree.handle(now, inp)
            case MeshTimerFired(timer) if isinstance(timer, _PLUMTREE_TIMERS):
                return self.plumtree.handle(now, inp)
            case NeighborUp() | NeighborDown():
                return self.plumtree.handle(now, inp)
        out = self.hyparview.handle(now, inp)
        for o in list(out):
            if isinstance(o, NeighborUp | NeighborDown):
                out.extend(self.plumtree.handle(now, o))
        return out
