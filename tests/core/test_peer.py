"""Peer composes the membership and the registry and adds nothing of its own:
driven with the same inputs it gives exactly the outputs of the membership
node it owns, and its read side is the node's."""

from __future__ import annotations

import random

from peerd.core.events import PacketIn, SetTimer, Start, TimerFired
from peerd.core.node import Node
from peerd.core.peer import Peer

from .util import addr, alive, cfg, name, nid, packet


def make_both() -> tuple[Peer, Node]:
    kw = dict(node_id=nid(1), name=name(1), addr=addr(1), config=cfg(), generation=1)
    peer = Peer(rng=random.Random(7), **kw)  # type: ignore[arg-type]
    node = Node(rng=random.Random(7), **kw)  # type: ignore[arg-type]
    return peer, node


def test_peer_gives_the_outputs_of_its_membership() -> None:
    peer, node = make_both()
    hello = packet(alive(2))
    inputs = [Start(()), PacketIn(addr(2), hello)]
    now = 0.0
    for _round in range(20):
        for inp in inputs:
            outs = peer.handle(now, inp)
            assert outs == node.handle(now, inp)
        timers = [o for o in outs if isinstance(o, SetTimer)]
        if not timers:
            break
        first = min(timers, key=lambda t: t.at)
        now, inputs = first.at, [TimerFired(first.timer)]
    assert peer.members() == node.members()
    assert peer.member(nid(2)) == node.member(nid(2)) is not None
    assert peer.local_member() == node.local_member()
    assert peer.live_count() == node.live_count() == 2
    assert peer.peer_addrs() == node.peer_addrs() == [addr(2)]
    assert peer.health_score == node.health_score
    assert peer.counters == node.counters
    assert peer.registry is peer.membership.registry
