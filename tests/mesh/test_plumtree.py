"""Plumtree: exact outputs for broadcasts, each message, timers and neighbour
changes; cache bounds; channel limits."""

from __future__ import annotations

import pytest

from peerd.core.events import (
    Broadcast,
    BroadcastResult,
    Deliver,
    JoinMesh,
    MeshTimerKind,
    NeighborDown,
    NeighborUp,
    Send,
    SetMeshTimer,
    channel_priority,
)
from peerd.core.mesh.config import MeshConfig
from peerd.core.mesh.plumtree import first_graft_timeout
from peerd.wire.messages import (
    Channel,
    Gossip,
    GossipControl,
    IHave,
    NeighborReply,
    TreeLink,
)

from .util import Rig, hv_cfg, mesh_rig, nid, notimers, one, peer, pt_cfg, pt_rig

M1 = bytes.fromhex("aa" * 8 + "00" * 7 + "01")
M2 = bytes.fromhex("aa" * 8 + "00" * 7 + "02")
ORIGIN = nid(50)
USER = channel_priority(Channel.USER)


def gossip(
    rnd: int = 3, msg_id: bytes = M1, payload: bytes = b"data", channel: Channel = Channel.USER
) -> Gossip:
    return Gossip(msg_id, ORIGIN, rnd, channel, payload)


def prune() -> GossipControl:
    return GossipControl((), (), TreeLink.LAZY)


def graft(*want: bytes) -> GossipControl:
    return GossipControl((), want, TreeLink.EAGER)


def ack() -> GossipControl:
    """The answer to a GRAFT without wants."""
    return GossipControl((), (), TreeLink.KEEP)


def ihave(*items: tuple[bytes, int]) -> GossipControl:
    return GossipControl(tuple(IHave(i, r) for i, r in items), (), TreeLink.KEEP)


def lazy_of(r: Rig) -> list[bytes]:
    return list(r.core.lazy_peers())


# --- broadcasting ----------------------------------------------------------------


def test_priorities_put_control_first_then_membership_registry_user() -> None:
    assert [channel_priority(c) for c in Channel] == [1, 2, 3]


def test_broadcast_pushes_to_eager_and_announces_to_lazy() -> None:
    r = pt_rig(eager=(2, 4), lazy=(3,))
    outs = r.handle(Broadcast(7, Channel.USER, b"hi"), now=1.0)
    result = one(outs, BroadcastResult)
    assert result.error is None and result.id is not None
    mid = result.id
    assert len(mid) == 16 and mid.endswith((1).to_bytes(8, "big"))
    g = Gossip(mid, nid(1), 1, Channel.USER, b"hi")
    assert outs == [
        Send(nid(2), g, USER),
        Send(nid(4), g, USER),
        SetMeshTimer(1.05, r.timer(MeshTimerKind.IHAVE_FLUSH).timer),
        BroadcastResult(7, id=mid),
    ]
    # The origin does not deliver to itself, and a copy coming back is a duplicate.
    assert r.core.has_seen(mid)
    assert r.fire(MeshTimerKind.IHAVE_FLUSH) == [Send(nid(3), ihave((mid, 1)), 0)]


def test_ids_are_sequential_under_a_random_prefix() -> None:
    r = pt_rig(eager=(2,))
    a = one(r.handle(Broadcast(1, Channel.REGISTRY, b"")), BroadcastResult).id
    b = one(r.handle(Broadcast(2, Channel.REGISTRY, b"")), BroadcastResult).id
    assert a is not None and b is not None
    assert a[:8] == b[:8]
    assert int.from_bytes(b[8:], "big") == int.from_bytes(a[8:], "big") + 1
    other = one(
        pt_rig(seed=8, eager=(2,)).handle(Broadcast(1, Channel.REGISTRY, b"")), BroadcastResult
    ).id
    assert other is not None and other[:8] != a[:8]


@pytest.mark.parametrize("channel", list(Channel))
def test_broadcast_over_the_channel_limit_is_refused(channel: Channel) -> None:
    limit = pt_cfg().max_payload_bytes[channel]
    r = pt_rig(eager=(2,))
    outs = r.handle(Broadcast(3, channel, bytes(limit + 1)))
    assert outs == [
        BroadcastResult(
            3,
            error=(
                "too_large",
                f"{channel.name.lower()} payload of {limit + 1} bytes is over the limit "
                f"of {limit} bytes",
            ),
        )
    ]
    assert one(r.handle(Broadcast(4, channel, bytes(limit))), BroadcastResult).error is None


def test_user_broadcasts_are_rate_limited_and_the_daemons_are_not() -> None:
    r = pt_rig(pt_cfg(rate={Channel.USER: (1000.0, 3000.0)}), eager=(2,))
    big = bytes(1000)
    results = [
        one(r.handle(Broadcast(i, Channel.USER, big), now=0.0), BroadcastResult) for i in range(4)
    ]
    assert [x.error is None for x in results] == [True, True, True, False]
    assert results[3].error is not None and results[3].error[0] == "rate_limited"
    # Membership and registry traffic is not held back by a busy user.
    for i in range(10):
        res = one(r.handle(Broadcast(10 + i, Channel.REGISTRY, big), now=0.0), BroadcastResult)
        assert res.error is None
    # The bucket refills with time.
    res = one(r.handle(Broadcast(30, Channel.USER, big), now=1.0), BroadcastResult)
    assert res.error is None


def test_broadcast_payloads_keep_their_channel_priority() -> None:
    r = pt_rig(eager=(2,))
    for ch in Channel:
        send = one(r.handle(Broadcast(int(ch), ch, b"x")), Send)
        assert send.priority == channel_priority(ch)


# --- gossip ----------------------------------------------------------------------


def test_new_gossip_is_delivered_forwarded_eagerly_and_announced_lazily() -> None:
    r = pt_rig(eager=(2, 3), lazy=(4,))
    outs = r.recv(2, gossip(3), now=2.0)
    assert notimers(outs) == [
        Deliver(M1, ORIGIN, Channel.USER, b"data", 3, nid(2)),
        Send(nid(3), gossip(4), USER),
    ]
    assert r.fire(MeshTimerKind.IHAVE_FLUSH) == [Send(nid(4), ihave((M1, 4)), 0)]
    assert r.now == 2.05


def test_announcements_are_batched_per_peer() -> None:
    r = pt_rig(eager=(2,), lazy=(3, 4))
    r.recv(2, gossip(1, M1))
    r.recv(2, gossip(5, M2))
    assert len(r.timers(MeshTimerKind.IHAVE_FLUSH)) == 1
    assert r.fire(MeshTimerKind.IHAVE_FLUSH) == [
        Send(nid(3), ihave((M1, 2), (M2, 6)), 0),
        Send(nid(4), ihave((M1, 2), (M2, 6)), 0),
    ]


def test_duplicate_from_an_eager_peer_prunes_it() -> None:
    r = pt_rig(eager=(2, 3))
    r.recv(2, gossip(3))
    assert r.recv(3, gossip(4)) == [Send(nid(3), prune(), 0)]
    assert lazy_of(r) == [nid(3)]
    assert r.counter("duplicates") == 1


def test_duplicate_from_a_lazy_peer_is_pruned_again() -> None:
    # It still pushes to us, so its end missed the PRUNE (a GRAFT crossed it).
    r = pt_rig(eager=(2,), lazy=(3,))
    r.recv(2, gossip(3))
    # (The PRUNE carries the announcement queued for 3.)
    assert r.recv(3, gossip(4)) == [
        Send(nid(3), GossipControl((IHave(M1, 4),), (), TreeLink.LAZY), 0)
    ]
    assert lazy_of(r) == [nid(3)]


def test_prune_piggybacks_queued_announcements() -> None:
    r = pt_rig(eager=(2, 3), lazy=(4,))
    r.recv(2, gossip(3, M1))
    r.recv(4, prune())  # already lazy: no change
    r.recv(2, gossip(1, M2))  # M2 queued for 4 (lazy) ... and 3 is eager
    outs = r.recv(3, gossip(9, M2))
    assert outs == [Send(nid(3), GossipControl((), (), TreeLink.LAZY), 0)]
    # 4's announcements are still queued: they go at the flush.
    assert r.fire(MeshTimerKind.IHAVE_FLUSH) == [Send(nid(4), ihave((M1, 4), (M2, 2)), 0)]


def test_first_copy_from_a_lazy_peer_grafts_it_back() -> None:
    # Its push crossed our PRUNE: we depend on it for this broadcast, and it
    # is about to stop pushing to us. Both ends are made to agree on eager.
    r = pt_rig(eager=(2,), lazy=(3,))
    assert notimers(r.recv(3, gossip(3))) == [
        Deliver(M1, ORIGIN, Channel.USER, b"data", 3, nid(3)),
        Send(nid(3), GossipControl((), (), TreeLink.EAGER), 0),
        Send(nid(2), gossip(4), USER),
    ]
    assert r.core.eager_peers() == [nid(2), nid(3)]
    assert r.counter("regrafts") == 1


def test_a_graft_without_wants_is_acknowledged_with_an_empty_control() -> None:
    r = pt_rig(eager=(2,), lazy=(3,))
    assert r.recv(3, GossipControl((), (), TreeLink.EAGER)) == [Send(nid(3), ack(), 0)]
    assert r.core.eager_peers() == [nid(2), nid(3)]
    # A graft with wants is answered by the payloads (or nothing) instead.
    r.recv(2, gossip(3))
    assert r.recv(2, graft(M1)) == [Send(nid(2), gossip(4), USER)]


def test_a_prune_sent_before_our_graft_landed_is_ignored() -> None:
    r = pt_rig(eager=(2,), lazy=(3,))
    r.recv(3, gossip(3), now=1.0)  # grafts 3 back
    assert r.recv(3, prune(), now=1.01) == []
    assert r.core.eager_peers() == [nid(2), nid(3)]
    assert r.counter("prunes_in_crossed") == 1
    # After its acknowledgement, a PRUNE is a PRUNE again.
    assert r.recv(3, ack(), now=1.02) == []
    assert r.recv(3, prune(), now=1.03) == []
    assert r.core.eager_peers() == [nid(2)]


def test_an_acknowledgement_not_back_within_the_graft_timeout_is_not_awaited() -> None:
    # (a peer of an earlier version sends none)
    r = pt_rig(eager=(2,), lazy=(3,))
    r.recv(3, gossip(3), now=1.0)
    r.recv(3, prune(), now=1.26)
    assert r.core.eager_peers() == [nid(2)]
    assert notimers(r.recv(3, ack(), now=1.3)) == []
    assert r.counter("drop.unexpected_ack") == 1


def test_gossip_from_a_non_neighbour_is_delivered_but_not_linked() -> None:
    r = pt_rig(eager=(2,))
    outs = r.recv(9, gossip(3))
    assert notimers(outs) == [
        Deliver(M1, ORIGIN, Channel.USER, b"data", 3, nid(9)),
        Send(nid(2), gossip(4), USER),
    ]
    assert r.core.eager_peers() == [nid(2)]


def test_relayed_gossip_over_the_channel_limit_is_dropped() -> None:
    r = pt_rig(pt_cfg(max_payload_bytes={Channel.USER: 3}), eager=(2, 3))
    assert notimers(r.recv(2, gossip(3, payload=b"four"))) == []
    assert r.counter("drop.too_large") == 1
    assert not r.core.has_seen(M1)


# --- ihave and graft -------------------------------------------------------------


def test_missing_announcement_is_grafted_after_the_timeout() -> None:
    r = pt_rig(pt_cfg(graft_lag_window=0), eager=(2,), lazy=(3, 4))
    assert notimers(r.recv(3, ihave((M1, 2)), now=1.0)) == []
    t = r.timer(MeshTimerKind.GRAFT)
    assert t.at == 1.25
    r.recv(4, ihave((M1, 5)), now=1.1)
    assert len(r.timers(MeshTimerKind.GRAFT)) == 1  # one timer per id
    outs = r.fire(t)
    assert notimers(outs) == [Send(nid(3), graft(M1), 0)]
    assert nid(3) in r.core.eager_peers()
    # No answer: the next announcer is asked after the retry interval.
    retry = r.timer(MeshTimerKind.GRAFT)
    assert retry.at == 1.375
    assert notimers(r.fire(retry)) == [Send(nid(4), graft(M1), 0)]
    # Nobody left: give up (a later announcement starts over).
    assert notimers(r.fire(MeshTimerKind.GRAFT)) == []
    assert r.core.missing_ids() == []
    assert r.counter("graft_gave_up") == 1


def test_payload_arriving_in_time_cancels_the_graft() -> None:
    r = pt_rig(eager=(2,), lazy=(3,))
    r.recv(3, ihave((M1, 2)), now=1.0)
    r.recv(2, gossip(3), now=1.1)
    assert r.fire(MeshTimerKind.GRAFT) == []
    assert r.core.missing_ids() == []


@pytest.mark.parametrize(
    ("lags", "changes", "timeout"),
    [
        ([], {}, 0.05),  # nothing measured yet: the floor
        ([0.0, 0.0, 0.0], {}, 0.05),  # the tree always first
        ([0.0, 0.03125, 0.0], {}, 0.0625),  # twice the largest lag
        ([0.2], {}, 0.25),  # never above graft_timeout_s
        ([0.0], {"graft_lag_window": 0}, 0.25),  # measurement off: fixed
        ([0.0], {"graft_timeout_min_s": 0.2, "graft_timeout_s": 1.0}, 0.2),  # wan
        ([0.25], {"graft_timeout_min_s": 0.2, "graft_timeout_s": 1.0}, 0.5),
    ],
)
def test_first_graft_timeout(lags: list[float], changes: dict[str, float], timeout: float) -> None:
    assert first_graft_timeout(lags, pt_cfg(**changes)) == timeout


def test_graft_timeout_follows_the_lag_of_the_tree_behind_announcements() -> None:
    r = pt_rig(pt_cfg(graft_lag_window=2), eager=(2,), lazy=(3,))
    # The tree first, then the announcement: a lag of 0.
    r.recv(2, gossip(3, M1), now=1.0)
    r.recv(3, ihave((M1, 2)), now=1.04)
    # An announcement first: the timer is the floor.
    r.recv(3, ihave((M2, 2)), now=2.0)
    assert r.timer(MeshTimerKind.GRAFT).at == 2.05
    # The tree's copy 31.25 ms later: the next timeout is twice that.
    r.recv(2, gossip(3, M2), now=2.03125)
    assert r.core.graft_timeout() == 0.0625
    m3, m4 = bytes(15) + b"\x03", bytes(15) + b"\x04"
    r.recv(3, ihave((m3, 2)), now=3.0)
    assert r.timer(MeshTimerKind.GRAFT).at == 3.0625
    # Two broadcasts later (the window) it is forgotten.
    r.recv(2, gossip(3, m3), now=3.01)
    r.recv(2, gossip(3, m4), now=4.0)
    r.recv(3, ihave((m4, 2)), now=4.01)
    assert r.core.graft_timeout() == 0.05


def test_a_needless_graft_raises_the_graft_timeout() -> None:
    r = pt_rig(eager=(2,), lazy=(3,))
    r.recv(3, ihave((M1, 2)), now=1.0)
    assert notimers(r.fire(MeshTimerKind.GRAFT)) == [Send(nid(3), graft(M1), 0)]
    r.recv(3, gossip(3), now=1.0625)  # the graft's answer: says nothing of the tree
    assert r.core.graft_timeout() == 0.05
    # The tree's copy was only late: 0.125 s behind the announcement.
    assert r.recv(2, gossip(4), now=1.125) == [Send(nid(2), prune(), 0)]
    assert r.core.graft_timeout() == 0.25


def test_after_a_tree_link_went_down_announced_broadcasts_are_grafted_at_the_floor() -> None:
    r = pt_rig(eager=(2, 4), lazy=(3,))
    # A late tree raised the timeout to its ceiling (as above) ...
    r.recv(3, ihave((M1, 2)), now=1.0)
    r.fire(MeshTimerKind.GRAFT)
    r.recv(3, gossip(3), now=1.0625)
    r.recv(2, gossip(4), now=1.125)
    assert r.core.graft_timeout() == 0.25
    # ... then an eager neighbour (maybe our parent in the tree) goes down:
    # what is announced now will not come by the tree; graft at the floor.
    r.handle(NeighborDown(peer(4)), now=2.0)
    assert r.core.graft_timeout() == 0.05
    m3, m4 = bytes(15) + b"\x03", bytes(15) + b"\x04"
    r.recv(3, ihave((m3, 2)), now=2.1)
    assert r.timer(MeshTimerKind.GRAFT).at == pytest.approx(2.15)
    # the lag of the repair is not the tree's: not sampled in the window
    r.recv(2, gossip(3, m3), now=2.5)
    assert r.core.graft_timeout() == 0.05
    # after it, the lags measured before the cut are forgotten too
    r.recv(3, ihave((m4, 2)), now=4.5)
    assert r.core.graft_timeout() == 0.05
    # a lazy neighbour going down cuts no tree path: nothing changes
    r2 = pt_rig(eager=(2,), lazy=(3, 4))
    r2.recv(3, ihave((M1, 2)), now=1.0)
    r2.fire(MeshTimerKind.GRAFT)
    r2.recv(3, gossip(3), now=1.0625)
    r2.recv(2, gossip(4), now=1.125)
    r2.handle(NeighborDown(peer(4)), now=2.0)
    assert r2.core.graft_timeout() == 0.25


def test_announcement_of_a_known_id_is_ignored() -> None:
    r = pt_rig(eager=(2,), lazy=(3,))
    r.recv(2, gossip(3))
    assert notimers(r.recv(3, ihave((M1, 2)))) == []
    assert r.core.missing_ids() == []


def test_graft_makes_the_sender_eager_and_gets_the_payload() -> None:
    r = pt_rig(eager=(2,), lazy=(3,))
    r.recv(2, gossip(3))
    assert r.recv(3, graft(M1)) == [Send(nid(3), gossip(4), USER)]
    assert r.core.eager_peers() == [nid(2), nid(3)]
    assert r.recv(3, graft(M2)) == []  # unknown id: nothing to send
    assert r.counter("graft_misses") == 1


def test_own_broadcast_answers_grafts_at_round_one() -> None:
    r = pt_rig(lazy=(3,))
    mid = one(r.handle(Broadcast(1, Channel.MEMBERSHIP, b"m")), BroadcastResult).id
    assert mid is not None
    assert r.recv(3, graft(mid)) == [
        Send(
            nid(3),
            Gossip(mid, nid(1), 1, Channel.MEMBERSHIP, b"m"),
            channel_priority(Channel.MEMBERSHIP),
        )
    ]


def test_prune_makes_the_sender_lazy() -> None:
    r = pt_rig(eager=(2, 3))
    assert r.recv(2, prune()) == []
    assert r.core.eager_peers() == [nid(3)] and lazy_of(r) == [nid(2)]


def test_control_from_a_non_neighbour_is_dropped() -> None:
    r = pt_rig(eager=(2,))
    r.recv(2, gossip(3))
    assert notimers(r.recv(9, graft(M1))) == []
    assert r.counter("drop.control_from_non_neighbor") == 1


def test_tree_optimisation_swaps_in_a_much_shorter_path_once_acknowledged() -> None:
    r = pt_rig(pt_cfg(optimize_hops=3), eager=(2,), lazy=(3, 4))
    r.recv(2, gossip(9))
    # 3 hops shorter through 4: 4 is grafted. (The graft carries what was
    # queued for 4, as every control message does.) 2 stays eager for now.
    outs = notimers(r.recv(4, ihave((M1, 6))))
    assert outs == [Send(nid(4), GossipControl((IHave(M1, 10),), (), TreeLink.EAGER), 0)]
    assert r.core.eager_peers() == [nid(2), nid(4)]
    # 4 applied it: now 2 is pruned.
    assert r.recv(4, ack()) == [Send(nid(2), prune(), 0)]
    assert r.core.eager_peers() == [nid(4)]
    assert r.counter("optimizations") == 1
    # 2 hops shorter: not worth it.
    r.recv(4, gossip(9, M2), now=2.0)
    assert notimers(r.recv(3, ihave((M2, 7)), now=2.0)) == []


def test_tree_optimisation_when_the_announcement_came_before_the_payload() -> None:
    r = pt_rig(eager=(2,), lazy=(3, 4))
    r.recv(3, ihave((M1, 2)), now=1.0)
    # The tree's copy comes 7 hops longer: after forwarding it (not to 3,
    # which has it), 3 is grafted.
    assert notimers(r.recv(2, gossip(9), now=1.03125)) == [
        Deliver(M1, ORIGIN, Channel.USER, b"data", 9, nid(2)),
        Send(nid(3), GossipControl((IHave(M1, 10),), (), TreeLink.EAGER), 0),
    ]
    assert r.recv(3, ack()) == [Send(nid(2), prune(), 0)]
    assert r.core.eager_peers() == [nid(3)]


def test_tree_optimisation_reads_only_the_latest_broadcast() -> None:
    # An older broadcast's rounds describe a tree that may have moved since.
    r = pt_rig(eager=(2,), lazy=(3,))
    r.recv(2, gossip(9, M1))
    r.recv(2, gossip(9, M2))
    assert notimers(r.recv(3, ihave((M1, 1)))) == []
    assert r.counter("optimizations") == 0


def test_a_broadcast_passing_first_drops_the_prune() -> None:
    # Its duplicate cuts the loop the graft made, wherever its copies meet;
    # pruning the old parent as well could cut the tree in two.
    r = pt_rig(eager=(2,), lazy=(3, 4))
    r.recv(2, gossip(9, M1))
    r.recv(4, ihave((M1, 2)))
    r.recv(2, gossip(9, M2))
    assert notimers(r.recv(4, ack())) == []
    assert r.core.eager_peers() == [nid(2), nid(4)]
    assert r.counter("optimizations_overtaken") == 1


def test_crossed_tree_grafts_prune_nothing() -> None:
    # 4 grafted us while we grafted it: each would prune a parent for the one
    # link both added.
    r = pt_rig(eager=(2,), lazy=(3, 4))
    r.recv(2, gossip(9, M1))
    r.recv(4, ihave((M1, 2)))
    assert r.recv(4, GossipControl((), (), TreeLink.EAGER)) == [Send(nid(4), ack(), 0)]
    assert notimers(r.recv(4, ack())) == []
    assert r.core.eager_peers() == [nid(2), nid(4)]
    assert r.counter("optimizations_crossed") == 1


def test_losing_either_end_drops_a_tree_move() -> None:
    r = pt_rig(eager=(2, 5), lazy=(3, 4))
    r.recv(2, gossip(9, M1))
    r.recv(4, ihave((M1, 2)))
    r.handle(NeighborDown(peer(2)))
    assert r.counter("optimizations_lost") == 1
    assert notimers(r.recv(4, ack())) == []
    assert r.core.eager_peers() == [nid(5), nid(4)]


def test_at_most_one_tree_optimisation_per_interval() -> None:
    r = pt_rig(pt_cfg(optimize_interval_s=1.0), eager=(2,), lazy=(3, 4, 5))
    r.recv(2, gossip(9, M1), now=0.0)
    r.recv(4, ihave((M1, 2)), now=0.0)
    r.recv(4, ack(), now=0.01)
    r.recv(4, gossip(9, M2), now=0.5)
    assert notimers(r.recv(3, ihave((M2, 2)), now=0.5)) == []
    m3 = bytes(16)
    r.recv(4, gossip(9, m3), now=1.0)
    outs = notimers(r.recv(3, ihave((m3, 2)), now=1.0))
    assert [(o.dst, o.msg.link) for o in outs if isinstance(o.msg, GossipControl)] == [
        (nid(3), TreeLink.EAGER)
    ]
    assert r.counter("optimizations") == 2


def test_tree_optimisation_can_be_disabled() -> None:
    r = pt_rig(pt_cfg(optimize_hops=0), eager=(2,), lazy=(4,))
    r.recv(2, gossip(20))
    assert notimers(r.recv(4, ihave((M1, 1)))) == []


# --- neighbours ------------------------------------------------------------------


def test_new_neighbours_start_eager_and_lost_ones_are_forgotten() -> None:
    r = pt_rig(eager=(2,), lazy=(3,))
    r.handle(NeighborUp(peer(3)))  # back after a reconnect: eager again
    assert r.core.eager_peers() == [nid(2), nid(3)]
    r.handle(NeighborDown(peer(2)))
    assert r.core.eager_peers() == [nid(3)] and lazy_of(r) == []


def test_lost_announcer_is_not_grafted() -> None:
    r = pt_rig(eager=(2,), lazy=(3, 4))
    r.recv(3, ihave((M1, 2)))
    r.recv(4, ihave((M1, 2)))
    r.handle(NeighborDown(peer(3)))
    assert notimers(r.fire(MeshTimerKind.GRAFT)) == [Send(nid(4), graft(M1), 0)]


def test_announcements_for_a_lost_neighbour_are_dropped() -> None:
    r = pt_rig(eager=(2,), lazy=(3,))
    r.recv(2, gossip(3))
    r.handle(NeighborDown(peer(3)))
    assert r.fire(MeshTimerKind.IHAVE_FLUSH) == []


# --- bounds ----------------------------------------------------------------------


def test_seen_ids_are_bounded_by_count_and_age() -> None:
    r = pt_rig(pt_cfg(seen_max=3, seen_ttl_s=10.0), eager=(2,))
    ids_ = [bytes([i]) * 16 for i in range(5)]
    for i, mid in enumerate(ids_):
        r.recv(2, gossip(1, mid), now=float(i))
    assert [r.core.has_seen(m) for m in ids_] == [False, False, True, True, True]
    r.recv(2, gossip(1, bytes([9]) * 16), now=13.5)
    assert [r.core.has_seen(m) for m in ids_] == [False] * 4 + [True]


def test_stored_payloads_are_bounded_by_bytes_and_age() -> None:
    r = pt_rig(pt_cfg(store_max_bytes=10, store_ttl_s=5.0), eager=(2,), lazy=(3,))
    r.recv(2, gossip(1, M1, payload=b"123456"), now=0.0)
    r.recv(2, gossip(1, M2, payload=b"123456"), now=1.0)
    # M1 made room for M2: a graft for it finds nothing.
    assert r.recv(3, graft(M1)) == []
    assert len(r.recv(3, graft(M2))) == 1
    r.recv(2, gossip(1, bytes(16), payload=b""), now=7.0)
    assert r.recv(3, graft(M2)) == []
    assert r.core.has_seen(M2)  # still a duplicate if it comes again


def test_missing_ids_are_bounded() -> None:
    r = pt_rig(pt_cfg(max_missing=2), eager=(2,), lazy=(3,))
    r.recv(3, ihave((M1, 1), (M2, 1), (bytes(16), 1)))
    assert r.core.missing_ids() == [M1, M2]
    assert r.counter("missing_overflow") == 1


# --- with HyParView --------------------------------------------------------------


def test_mesh_feeds_hyparview_neighbours_to_plumtree() -> None:
    r = mesh_rig(MeshConfig(hv_cfg(), pt_cfg()))
    r.handle(JoinMesh((peer(2),)))
    outs = r.recv(2, NeighborReply(True))
    assert outs == [NeighborUp(peer(2))]
    assert r.core.plumtree.eager_peers() == [nid(2)]
    outs = r.handle(Broadcast(1, Channel.USER, b"x"))
    send = one(outs, Send)
    assert send.dst == nid(2) and isinstance(send.msg, Gossip)
    assert notimers(r.recv(2, gossip(1))) == [Deliver(M1, ORIGIN, Channel.USER, b"data", 1, nid(2))]


def test_announcements_beyond_one_message_are_split() -> None:
    from peerd.wire.codec import MAX_IHAVE

    r = pt_rig(eager=(2,), lazy=(3,))
    n = MAX_IHAVE + 5
    for i in range(n):
        r.recv(2, gossip(1, i.to_bytes(16, "big")))
    outs = r.fire(MeshTimerKind.IHAVE_FLUSH)
    assert [
        len(o.msg.ihave) for o in outs if isinstance(o, Send) and isinstance(o.msg, GossipControl)
    ] == [MAX_IHAVE, 5]
