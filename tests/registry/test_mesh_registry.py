"""Registry deltas over the partial mesh: with the mesh connected a node
emits one MeshCast per flush instead of gossip and direct sends, applies
MeshDelivered without relaying it, and drops garbage with a count."""

from __future__ import annotations

import pytest

from peerd.core.events import MeshCast, MeshConnected, MeshDelivered, Output, SetTimer, TimerKind
from peerd.core.registry.service import MESH_CHANNEL
from peerd.core.timers import RegSyncTick
from peerd.wire import codec
from peerd.wire.messages import RegAck, RegDelta
from tests.registry.test_service import cluster, holders, reg


def tune(c, **changes: object) -> None:  # type: ignore[no-untyped-def]
    """Change every node's RegistryConfig."""
    for node in c.nodes:
        node.registry.config = node.registry.config.replace(**changes)


def mesh_cluster(n: int):  # type: ignore[no-untyped-def]
    c, rec = cluster(n, seed=7)
    casts: list[tuple[int, MeshCast]] = []
    # The registry's own outputs: a Peer without a mesh of its own takes its
    # MeshCasts (these tests play the mesh, feeding MeshDelivered back).
    for i, node in enumerate(c.nodes):
        handle = node.registry.handle

        def spy(now: float, inp: object, i: int = i, handle=handle) -> list[Output]:  # type: ignore[no-untyped-def]
            outs = handle(now, inp)
            casts.extend((i, o) for o in outs if isinstance(o, MeshCast))
            return outs

        node.registry.handle = spy
    for i in range(n):
        c.feed(i, MeshConnected(True))
    c.run_until(c.now + 0.01)
    return c, rec, casts


def deliver_everywhere(c, origin: int, cast: MeshCast) -> None:  # type: ignore[no-untyped-def]
    for j in range(c.n):
        if j != origin:
            c.feed(j, MeshDelivered(cast.channel, c.nodes[origin].node_id, cast.payload))


def test_a_registration_is_one_mesh_broadcast_and_receivers_do_not_relay(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    c, rec, casts = mesh_cluster(6)
    reg(c, 2, "svc")
    c.run_until(c.now + 0.5)
    own = [m for i, m in casts if i == 2]
    assert len(own) == 1 and own[0].channel == MESH_CHANNEL
    delta = codec.decode(own[0].payload)
    assert isinstance(delta, RegDelta) and delta.origin == c.nodes[2].node_id
    # A small cluster also gets its origin's direct send (one hop), but no
    # gossip: with direct sends off (a large cluster), nobody else has it
    # until the mesh delivers it.
    assert all(h == (c.nodes[2].node_id, 1) for h in holders(c, "svc").values())
    tune(c, direct_max=0)
    casts.clear()
    reg(c, 3, "big")
    c.run_until(c.now + 0.5)
    own = [m for i, m in casts if i == 3]
    assert len(own) == 1
    assert [h for i, h in holders(c, "big").items() if i != 3] == [None] * 5
    deliver_everywhere(c, 3, own[0])
    casts.clear()
    c.run_until(c.now + 0.5)
    assert all(h == (c.nodes[3].node_id, 1) for h in holders(c, "big").values())
    assert casts == []  # receivers leave relaying to the mesh


def test_garbage_and_wrong_channel_are_counted_drops() -> None:
    c, _rec, _casts = mesh_cluster(3)
    src = c.nodes[1].node_id
    c.feed(0, MeshDelivered(MESH_CHANNEL, src, b"\xff\x00garbage"))
    c.feed(0, MeshDelivered(7, src, codec.encode(RegAck(src, 1, 1))))
    c.run_until(c.now + 0.1)
    counters = c.nodes[0].counters
    assert counters["mesh_in"] == 2
    assert sum(v for k, v in counters.items() if k.startswith("drop")) >= 2


def test_without_mesh_neighbours_deltas_go_back_to_gossip_and_joining_syncs() -> None:
    c, _rec, casts = mesh_cluster(5)
    node = c.nodes[0]
    assert node.handle(c.now, MeshConnected(False)) == []
    reg(c, 0, "alone", conn=2)
    c.run_until(c.now + 0.5)
    assert [m for i, m in casts if i == 0] == []
    assert all(h is not None for h in holders(c, "alone").values())  # gossip/direct
    # Connecting again schedules one sync round with a peer soon.
    outs = node.handle(
        c.now,
        MeshDelivered(
            MESH_CHANNEL, c.nodes[1].node_id, codec.encode(RegAck(c.nodes[1].node_id, 0, 0))
        ),
    )
    assert outs == []
    outs = node.handle(c.now, MeshConnected(True))
    peer = node.registry._heal_peer
    assert peer is not None and peer != node.node_id
    armed = [o.timer for o in outs if isinstance(o, SetTimer)]
    assert [t.kind for t in armed] == [TimerKind.REG_SYNC]
    assert armed == [RegSyncTick(armed[0].token, peer)]  # the timer says with whom


def test_a_long_burst_goes_over_the_mesh_in_chunks_that_apply_in_order(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    c, rec, casts = mesh_cluster(4)
    tune(c, max_mesh_delta_bytes=600, direct_max=0)
    for k in range(40):
        reg(c, 1, f"burst-{k}", conn=100 + k)
    c.run_until(c.now + 0.5)
    own = [m for i, m in casts if i == 1]
    deltas = [codec.decode(m.payload) for m in own]
    assert len(own) > 3 and all(isinstance(d, RegDelta) for d in deltas)
    assert all(len(m.payload) <= 600 for m in own)
    assert [d.base for d in deltas[1:]] == [d.top for d in deltas[:-1]]  # consecutive
    for m in own:
        deliver_everywhere(c, 1, m)
    c.run_until(c.now + 0.5)
    for k in range(40):
        assert set(holders(c, f"burst-{k}").values()) == {(c.nodes[1].node_id, k + 1)}
    assert c.nodes[2].counters["reg_pulls"] == 0  # nobody had to pull
