"""Peer composes the membership and the registry and adds nothing of its own:
driven with the same inputs it gives exactly the outputs of the membership
node it owns (an empty registry beside it adds none), and its read side is
the node's."""

from __future__ import annotations

import random

from peerd.core.events import PacketIn, SetTimer, Start, TimerFired
from peerd.core.peer import Peer
from peerd.core.swim.membership import Node

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
    # The registry is membership's sibling: it reads membership, never the reverse.
    assert peer.registry.members is peer.membership
    assert not hasattr(peer.membership, "registry")


# --- a Peer with the mesh and names messaging -------------------------------------

from peerd.core import events as nev  # noqa: E402
from peerd.core.peer import MESH_JOIN_CONTACTS  # noqa: E402

from .peer_harness import PeerCluster  # noqa: E402


def started(n: int = 6, until: float = 8.0) -> PeerCluster:
    c = PeerCluster(n, seed=3)
    for i in range(n):
        c.start(i, seeds=(0,) if i else ())
    c.run_until(until)
    return c


def test_membership_only_peer_is_its_node() -> None:
    kw = dict(node_id=nid(1), name=name(1), addr=addr(1), config=cfg(), generation=1)
    peer = Peer(rng=random.Random(7), registry=None, **kw)  # type: ignore[arg-type]
    assert peer.handle == peer.membership.handle
    assert peer.mesh is None and peer.names is None
    assert not peer.membership.news  # nothing feeds its (empty) registry
    with_registry, _node = make_both()
    assert with_registry.handle != with_registry.membership.handle


def test_the_mesh_forms_from_membership_and_carries_registry_deltas() -> None:
    c = started()
    assert c.converged()
    for p in c.nodes:
        assert 0 < p.mesh_neighbours <= len(c.nodes) - 1  # type: ignore[attr-defined]
    # (the joins went over the tree too: membership's channel)
    before = [p.mesh.plumtree.counters["delivered"] for p in c.nodes]  # type: ignore[union-attr]
    c.register(4, "db")
    c.run_until(c.now + 1.0)
    for p in c.nodes:
        claim = p.registry.state.lookup("default", "db")
        assert claim is not None and claim.origin == (4).to_bytes(16, "big")
    # the delta went over the tree (Plumtree on the registry channel) to
    # every other peer, not by gossip
    for i, p in enumerate(c.nodes):
        if i != 4:
            assert p.counters["mesh_in"] == 1, i
            assert p.mesh.plumtree.counters["delivered"] == before[i] + 1  # type: ignore[union-attr]


def test_a_message_to_a_name_reaches_its_owner_and_the_sender_hears() -> None:
    c = started()
    c.register(4, "db", conn=7)
    c.run_until(c.now + 1.0)
    c.send(1, call=1, name="db", payload=b"ping")
    c.run_until(c.now + 1.0)
    assert [(i, d.conn, d.payload) for _t, i, d in c.delivered] == [(4, 7, b"ping")]
    res = c.results[(1, 1)]
    assert res.delivered == 1 and res.error is None


def test_a_message_to_an_owner_that_dies_fails_it_is_never_silent() -> None:
    c = started()
    c.register(4, "db", conn=7)
    c.run_until(c.now + 1.0)
    c.crash(4)
    c.send(1, call=1, name="db")
    c.run_until(c.now + 5.0)
    res = c.results[(1, 1)]
    assert res.delivered == 0 and res.error is not None
    assert res.error.error is nev.SendError.UNAVAILABLE


def test_no_such_name_at_once() -> None:
    c = started(3, until=4.0)
    c.send(0, call=9, name="nobody")
    c.run_until(c.now + 0.1)
    res = c.results[(0, 9)]
    assert res.at_once and res.error is not None and res.error.why is nev.Why.NO_SUCH_NAME


def test_a_user_broadcast_reaches_every_other_peer_once() -> None:
    c = started()
    c.broadcast(2, ref=5, payload=b"hello")
    c.run_until(c.now + 2.0)
    assert c.bcast[(2, 5)].error is None
    got = sorted(i for _t, i, d in c.user if d.payload == b"hello")
    assert got == [i for i in range(len(c.nodes)) if i != 2]


def test_the_mesh_joins_through_alive_members_after_the_membership_joined() -> None:
    c = started(6)
    for p in c.nodes:
        hv = p.mesh.hyparview  # type: ignore[union-attr]
        # joined through SWIM members: a connected overlay, every peer reached
        assert p.mesh_neighbours == len(hv.active_ids()) > 0  # type: ignore[attr-defined]
    assert 0 < MESH_JOIN_CONTACTS < 6


# --- the registry beside membership ---------------------------------------------


def test_a_registry_message_inside_a_packet_is_handled_at_its_place() -> None:
    """Membership pauses at a registry delta in a datagram and the registry takes
    its turn there: its event comes after the news before it in the packet and
    before the news after it, as when membership called the registry."""
    from peerd.core.events import MemberEvent, RegistryEvent
    from peerd.wire.messages import RegChange, RegDelta, RegEntry, RegKind

    from .util import packet as pack

    peer, _node = make_both()
    peer.handle(0.0, Start(()))
    entry = RegEntry(1, RegKind.NAME, "default", "db", 1000, 55, 0, ())
    delta = RegDelta(nid(2), 1, 0, 1, (RegChange(1, 1, entry),))
    outs = peer.handle(0.1, PacketIn(addr(2), pack(alive(2, gen=1), delta, alive(3, gen=1))))
    order = [
        (o.kind.name, o.member.node) if isinstance(o, MemberEvent) else ("REG", o.origin)
        for o in outs
        if isinstance(o, MemberEvent | RegistryEvent)
    ]
    assert order == [("JOINED", nid(2)), ("REG", nid(2)), ("JOINED", nid(3))]
    assert peer.registry.state.lookup("default", "db") is not None
    assert peer.membership._resume is None  # not left paused


def test_the_registry_flushes_before_the_gossip_round_it_rides() -> None:
    """A write staged before a gossip tick goes out in that tick's packets:
    membership pauses at the tick, the registry flushes into its queue, then
    the round goes."""
    from peerd.core.events import Register, SendPacket
    from peerd.wire import codec
    from peerd.wire.messages import RegDelta

    peer, _node = make_both()
    peer.handle(0.0, Start(()))
    outs = peer.handle(0.1, PacketIn(addr(2), packet(alive(2, gen=1))))
    peer.registry.config = peer.registry.config.replace(registry_flush_s=60.0)  # no flush timer
    peer.handle(0.2, Register(1, 7, nev.RegKind.NAME, "default", "db", (), 5, 0, 1000, None))
    ticks = [
        o.timer
        for o in outs
        if isinstance(o, SetTimer) and o.timer.__class__.__name__ == "GossipTick"
    ]
    assert ticks
    outs = peer.handle(0.3, TimerFired(ticks[-1]))
    sent = [
        m
        for o in outs
        if isinstance(o, SendPacket)
        for m in codec.decode_packet(o.data)[0]
        if isinstance(m, RegDelta)
    ]
    assert sent and sent[0].origin == nid(1)
