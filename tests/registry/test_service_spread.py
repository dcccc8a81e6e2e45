"""How registry news leaves a node: staged deltas encoded once per flush,
own changes sent straight to every peer in small clusters, the death of a
node that held entries spread at once, no partition sent back to its owner.

Driven through real cores wired by tests/core/harness.py (virtual time).
"""

from __future__ import annotations

from peerd.core.events import ConnClosed, Register, SendPacket
from peerd.core.registry.config import RegistryConfig
from peerd.core.registry.service import DIRECT_MAX
from peerd.wire import codec
from peerd.wire.messages import RegAck, RegDelta, RegDigestRow, RegKind, Status

from .test_service import cluster, holders, reg

NAME = RegKind.NAME


def sent_by(c_outs: list[tuple[int, object]], i: int) -> list[SendPacket]:
    return [o for j, o in c_outs if j == i and isinstance(o, SendPacket)]


def spy_sends(c) -> list[tuple[int, object]]:  # type: ignore[no-untyped-def]
    """Record every output of every node (wraps the harness's _apply)."""
    seen: list[tuple[int, object]] = []
    apply = c._apply

    def spy(i: int, outs: list) -> None:  # type: ignore[type-arg]
        seen.extend((i, o) for o in outs)
        apply(i, outs)

    c._apply = spy
    return seen


def test_own_changes_go_straight_to_every_peer_in_one_flush() -> None:
    c, _rec = cluster(12)
    sends = spy_sends(c)
    t0 = c.now
    for k in range(5):  # a burst: one flush carries all of it
        reg(c, 4, f"burst-{k}")
    c.run_until(t0 + RegistryConfig().registry_flush_s)
    deltas_to: dict[tuple[str, int], int] = {}
    for pkt in sent_by(sends, 4):
        msgs, _ = codec.decode_packet(pkt.data)
        for m in msgs:
            if isinstance(m, RegDelta) and m.origin == c.nodes[4].node_id:
                deltas_to[pkt.dst] = deltas_to.get(pkt.dst, 0) + 1
                assert (m.base, m.top, len(m.changes)) == (0, 5, 5)
    # Every peer directly; the gossip targets also in their gossip packet, if
    # it had room (fresher relays may take it: see the next test).
    assert len(deltas_to) == 11 and set(deltas_to.values()) <= {1, 2}
    assert c.nodes[4].counters["reg_direct_out"] == 11
    c.run_until(t0 + 0.01)
    assert all(h is not None for k in range(5) for h in holders(c, f"burst-{k}").values())


def test_a_busy_gossip_packet_does_not_delay_our_own_news() -> None:
    """Five nodes take turns registering; relays of the others' news fill the
    gossip packets. Every registration is still everywhere within a few ms
    (it used to wait for a gossip tick when a gossip target's packet had no
    room left for it)."""
    c, rec = cluster(10, seed=1)
    worst = 0.0
    for k in range(100):
        t0 = c.now
        reg(c, k % 5, f"turn-{k}", conn=1000 + k)
        seen: set[int] = set()
        while len(seen) < 10 and c.now - t0 < 1.0:
            c.run_until(c.now + 0.0005)
            seen = {
                i
                for _t, i, e in rec.events[-200:]
                if e.kind.value == "registered" and e.entry.name == f"turn-{k}"
            }
        worst = max(worst, c.now - t0)
        c.run_until(c.now + 0.02)
    assert worst < 0.01


def test_first_hand_news_is_not_relayed_in_a_small_cluster() -> None:
    c, _rec = cluster(6)
    t0 = c.now
    reg(c, 0, "direct")
    c.run_until(t0 + RegistryConfig().registry_flush_s + 0.0015)  # the direct send has arrived
    origin = c.nodes[0].node_id
    assert all(h is not None for h in holders(c, "direct").values())
    assert c.nodes[0].membership.queued(("r", origin)) is not None  # the origin gossips it too
    assert all(c.nodes[i].membership.queued(("r", origin)) is None for i in range(1, 6))


def test_big_clusters_rely_on_the_epidemic() -> None:
    c, _rec = cluster(DIRECT_MAX + 3, seed=3)
    t0 = c.now
    reg(c, 0, "wide")
    c.run_until(t0 + 0.1)
    assert c.nodes[0].counters["reg_direct_out"] == 0
    assert all(h is not None for h in holders(c, "wide").values())


def test_a_burst_is_announced_when_too_big_to_gossip() -> None:
    c, _rec = cluster(3)
    t0 = c.now
    for k in range(200):
        reg(c, 1, f"many-{k:03d}")
    c.run_until(t0 + RegistryConfig().registry_flush_s)
    queued = c.nodes[1].membership.queued(("r", c.nodes[1].node_id))
    assert queued is not None and isinstance(codec.decode(queued), RegAck)
    c.run_until(t0 + 1.0)  # peers pull what the announcement says they lack
    assert all(all(h is not None for h in holders(c, f"many-{k:03d}").values()) for k in range(200))


def test_a_burst_goes_out_in_datagram_sized_deltas_with_no_pull() -> None:
    c, _rec = cluster(4)
    sends = spy_sends(c)
    t0 = c.now
    for k in range(120):
        reg(c, 2, f"chunk-{k:03d}", meta=(("role", "worker"),))
    c.run_until(t0 + RegistryConfig().registry_flush_s)
    origin = c.nodes[2].node_id
    chunks = []
    for pkt in sent_by(sends, 2):
        assert len(pkt.data) <= c.config.max_packet_bytes
        msgs, _ = codec.decode_packet(pkt.data)
        chunks += [
            (pkt.dst, m.base, m.top) for m in msgs if isinstance(m, RegDelta) and m.origin == origin
        ]
    to_one = sorted((b, t) for dst, b, t in chunks if dst == c.addr_of[0])
    assert len(to_one) > 1 and to_one[0][0] == 0 and to_one[-1][1] == 120
    assert all(a[1] == b[0] for a, b in zip(to_one, to_one[1:], strict=False))  # contiguous
    c.run_until(t0 + 0.01)
    assert all(
        all(h is not None for h in holders(c, f"chunk-{k:03d}").values()) for k in range(120)
    )
    assert sum(n.counters["reg_pulls"] for n in c.nodes) == 0


def test_the_death_of_a_node_with_entries_spreads_at_once() -> None:
    c, _rec = cluster(30, seed=5)
    c.icmp = True
    reg(c, 7, "on-seven")
    c.run_until(c.now + 0.1)
    c.crash(7)
    c.run_until(c.now + 10.0)
    downs = sorted(t for t, i, e in c.events if e.member.name == "n7" and e.kind.value == "dead")
    assert len(downs) == 29
    # The first node to declare it tells every peer at once: one hop.
    assert downs[-1] - downs[0] < 0.01
    assert all(h is None for h in holders(c, "on-seven").values())


def test_in_big_clusters_the_death_spreads_by_fast_flush_rounds() -> None:
    c, _rec = cluster(DIRECT_MAX + 8, seed=6)
    c.icmp = True
    reg(c, 7, "on-seven")
    c.run_until(c.now + 0.1)
    c.crash(7)
    c.run_until(c.now + 10.0)
    downs = sorted(t for t, i, e in c.events if e.member.name == "n7" and e.kind.value == "dead")
    assert len(downs) == DIRECT_MAX + 7
    assert downs[-1] - downs[0] < 2 * c.config.gossip_interval_s


def test_a_sync_never_sends_a_peer_its_own_partition() -> None:
    c, _rec = cluster(3)
    reg(c, 0, "mine")
    c.run_until(c.now + 0.1)
    n0, n1 = c.nodes[0], c.nodes[1]
    # Node 0's digest as it was before its write: node 1 is "ahead" of it.
    stale = (RegDigestRow(n0.node_id, n0.registry.state.generation, 0),)
    assert n1.registry.missing_for(stale) != ()
    assert n1.registry.missing_for(stale, n0.node_id) == ()


def test_alone_the_delta_waits_for_the_first_peer() -> None:
    c, _rec = cluster(2)
    c.crash(1)
    c.run_until(c.now + 30.0)
    assert c.nodes[0].live_count() == 1
    c.feed(0, Register(999_001, 1, NAME, "default", "lonely", (), 1, 0, 1000))
    c.run_until(c.now + 1.0)
    assert c.nodes[0].registry.staged
    c.restart(1, incarnation=5, generation=1)
    c.run_until(c.now + 5.0)
    assert not c.nodes[0].registry.staged
    assert c.nodes[1].registry.state.lookup("default", "lonely") is not None
    assert c.view(1)["n0"] is Status.ALIVE
    c.feed(0, ConnClosed(1))
    c.run_until(c.now + 0.1)
    assert c.nodes[1].registry.state.lookup("default", "lonely") is None
