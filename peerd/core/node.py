"""The membership node (interface stub; implementation in progress)."""

from __future__ import annotations

import collections
import random

from peerd.core.config import SwimConfig
from peerd.core.events import Input, MemberInfo, Output
from peerd.wire.messages import Addr, NodeId, Tags


class Node:
    def __init__(self, *, node_id: NodeId, name: str, addr: Addr, config: SwimConfig,
                 rng: random.Random, incarnation: int = 0, generation: int = 0,
                 tags: Tags = ()) -> None:
        self.counters: collections.Counter[str] = collections.Counter()
        raise NotImplementedError

    def handle(self, now: float, inp: Input) -> list[Output]:
        """Feed one input; returns what to do. Never raises on bad network/API input."""
        raise NotImplementedError

    def members(self) -> list[MemberInfo]:
        """Every known member including this node (alive, suspect, dead, left)."""
        raise NotImplementedError

    def local_member(self) -> MemberInfo:
        raise NotImplementedError

    @property
    def incarnation(self) -> int:
        raise NotImplementedError

    @property
    def health_score(self) -> int:
        """Lifeguard local health (0 = healthy)."""
        raise NotImplementedError

    def peer_addrs(self) -> list[Addr]:
        """Addresses of alive/suspect members, for the state directory."""
        raise NotImplementedError
