"""HyParView: exact outputs for each message, timer and input.

Views are small here (active 3, passive 4, arwl 4, prwl 2: see util.hv_cfg)
so that full-view cases take a few lines.
"""

from __future__ import annotations

import pytest

from peerd.core.events import (
    CloseLink,
    Connect,
    JoinMesh,
    LeaveMesh,
    LinkDown,
    MembershipHint,
    MeshTimerKind,
    MessageIn,
    NeighborDown,
    NeighborUp,
    Send,
    SetMeshTimer,
)
from peerd.core.mesh.config import HyParViewConfig, active_view_size, passive_view_size
from peerd.wire.messages import (
    Channel,
    Disconnect,
    ForwardJoin,
    Gossip,
    MeshJoin,
    Neighbor,
    NeighborReply,
    Shuffle,
    ShuffleReply,
)

from .util import Rig, hv_cfg, hv_rig, ids, nid, notimers, one, peer, peers, with_active

ME = peer(1)


def joined(
    *active: int, passive: tuple[int, ...] = (), config: HyParViewConfig | None = None
) -> Rig:
    """A started node with ``active`` neighbours and ``passive`` peers."""
    r = hv_rig(config)
    r.handle(JoinMesh())
    with_active(r, *active)
    if passive:
        # A shuffle reply fills the passive view without refilling the active
        # one (a hint would: the test decides when that happens).
        assert active, "passive peers need a neighbour to come from"
        r.recv(active[0], ShuffleReply(peers(*passive)))
    assert ids(r.core.passive_ids()) == list(passive)
    return r


# --- formulas --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "active", "passive"),
    [
        (1, 1, 6),
        (2, 2, 12),
        (10, 2, 12),
        (11, 3, 18),
        (100, 3, 18),
        (1000, 4, 24),
        (10_000, 5, 30),
        (10_001, 6, 36),
    ],
)
def test_view_sizes(n: int, active: int, passive: int) -> None:
    assert active_view_size(n) == active
    assert passive_view_size(n) == passive


def test_defaults_are_the_papers_for_ten_thousand_nodes() -> None:
    cfg = HyParViewConfig()
    assert (cfg.active_size, cfg.passive_size) == (
        active_view_size(10_000),
        passive_view_size(10_000),
    )
    assert (cfg.arwl, cfg.prwl) == (6, 3)


# --- join ------------------------------------------------------------------------


def test_join_asks_the_first_contact_and_keeps_the_others_passive() -> None:
    r = hv_rig()
    outs = r.handle(JoinMesh(peers(2, 3)), now=100.0)
    assert notimers(outs) == [Connect(peer(2)), Send(nid(2), MeshJoin(ME))]
    shuffle = r.timer(MeshTimerKind.SHUFFLE)
    assert 105.0 <= shuffle.at <= 110.0  # random phase within one interval
    assert r.timer(MeshTimerKind.NEIGHBOR_TIMEOUT).at == 103.0
    assert ids(r.core.passive_ids()) == [3]
    assert ids(r.core.pending_ids()) == [2]


def test_join_accepted_makes_the_contact_a_neighbour() -> None:
    r = hv_rig()
    r.handle(JoinMesh(peers(2)))
    assert r.recv(2, NeighborReply(True)) == [NeighborUp(peer(2))]
    assert ids(r.core.active_ids()) == [2]
    assert r.core.pending_ids() == []
    assert notimers(r.fire(MeshTimerKind.NEIGHBOR_TIMEOUT)) == []  # settled: stale


def test_join_without_contacts_only_starts() -> None:
    r = hv_rig()
    outs = r.handle(JoinMesh())
    assert [type(o) for o in outs] == [SetMeshTimer]
    assert r.handle(JoinMesh()) == []  # started once


def test_contact_takes_the_joiner_and_walks_it_through_the_others() -> None:
    r = joined(2, 3)
    outs = r.recv(4, MeshJoin(peer(4)))
    assert notimers(outs) == [
        NeighborUp(peer(4)),
        Send(nid(4), NeighborReply(True)),
        Send(nid(2), ForwardJoin(peer(4), 4)),
        Send(nid(3), ForwardJoin(peer(4), 4)),
    ]


def test_full_contact_drops_a_random_neighbour_for_the_joiner() -> None:
    r = joined(2, 3, 4)
    outs = notimers(r.recv(5, MeshJoin(peer(5))))
    victim = one(outs, NeighborDown).peer
    assert victim.node in {nid(2), nid(3), nid(4)}
    rest = [n for n in (nid(2), nid(3), nid(4)) if n != victim.node]
    assert outs == [
        NeighborDown(victim),
        Send(victim.node, Disconnect(True)),
        CloseLink(victim.node),
        NeighborUp(peer(5)),
        Send(nid(5), NeighborReply(True)),
        *(Send(n, ForwardJoin(peer(5), 4)) for n in rest),
    ]
    assert victim.node in r.core.passive_ids()  # dropped, not forgotten
    assert r.counter("evictions") == 1


def test_join_from_a_neighbour_is_answered_without_new_walks() -> None:
    r = joined(2, 3)
    assert notimers(r.recv(2, MeshJoin(peer(2)))) == [Send(nid(2), NeighborReply(True))]


def test_join_naming_someone_else_is_dropped() -> None:
    r = joined(2)
    assert notimers(r.recv(3, MeshJoin(peer(4)))) == []
    assert r.counter("drop.sender_mismatch") == 1
    assert ids(r.core.active_ids()) == [2]


# --- forward join ----------------------------------------------------------------


def test_forward_join_walks_on_to_another_neighbour() -> None:
    r = joined(2, 3)
    assert notimers(r.recv(2, ForwardJoin(peer(9), 4))) == [Send(nid(3), ForwardJoin(peer(9), 3))]
    assert r.core.passive_ids() == []


def test_forward_join_at_prwl_leaves_the_joiner_passive() -> None:
    r = joined(2, 3)
    assert notimers(r.recv(2, ForwardJoin(peer(9), 2))) == [Send(nid(3), ForwardJoin(peer(9), 1))]
    assert ids(r.core.passive_ids()) == [9]


@pytest.mark.parametrize(("active", "ttl"), [((2, 3), 0), ((2,), 4)])
def test_forward_join_ends_asking_the_joiner_with_high_priority(
    active: tuple[int, ...], ttl: int
) -> None:
    r = joined(*active)
    outs = r.recv(2, ForwardJoin(peer(9), ttl), now=5.0)
    assert notimers(outs) == [Connect(peer(9)), Send(nid(9), Neighbor(ME, True))]
    assert r.timer(MeshTimerKind.NEIGHBOR_TIMEOUT).at == 8.0
    assert r.recv(9, NeighborReply(True)) == [NeighborUp(peer(9))]


def test_forward_join_ttl_is_capped_at_arwl() -> None:
    r = joined(2, 3)
    assert notimers(r.recv(2, ForwardJoin(peer(9), 200))) == [Send(nid(3), ForwardJoin(peer(9), 3))]


def test_forward_join_back_to_the_joiner_or_to_a_neighbour_ends_quietly() -> None:
    r = joined(2)
    assert notimers(r.recv(2, ForwardJoin(ME, 0))) == []
    assert notimers(r.recv(2, ForwardJoin(peer(2), 0))) == []


def test_forward_join_with_nowhere_else_to_go_ends_here() -> None:
    r = joined(2, 9)
    # The only other neighbour is the joiner itself.
    assert notimers(r.recv(2, ForwardJoin(peer(9), 4))) == []


# --- neighbor requests -----------------------------------------------------------


def test_low_priority_request_accepted_when_there_is_room() -> None:
    r = joined(2)
    assert notimers(r.recv(5, Neighbor(peer(5), False))) == [
        NeighborUp(peer(5)),
        Send(nid(5), NeighborReply(True)),
    ]


def test_low_priority_request_refused_when_full() -> None:
    r = joined(2, 3, 4)
    assert notimers(r.recv(5, Neighbor(peer(5), False))) == [
        Send(nid(5), NeighborReply(False)),
        CloseLink(nid(5)),
    ]
    assert ids(r.core.passive_ids()) == [5]
    assert r.counter("neighbor_refused") == 1


def test_pending_requests_count_against_room() -> None:
    r = joined(2, 3, 4, passive=(6,))
    r.handle(LinkDown(nid(4)))  # asks 6 (low priority: 2 and 3 are still there)
    assert ids(r.core.pending_ids()) == [6]
    assert notimers(r.recv(5, Neighbor(peer(5), False))) == [
        Send(nid(5), NeighborReply(False)),
        CloseLink(nid(5)),
    ]


def test_high_priority_request_accepted_when_full() -> None:
    r = joined(2, 3, 4)
    outs = notimers(r.recv(5, Neighbor(peer(5), True)))
    victim = one(outs, NeighborDown).peer
    assert outs == [
        NeighborDown(victim),
        Send(victim.node, Disconnect(True)),
        CloseLink(victim.node),
        NeighborUp(peer(5)),
        Send(nid(5), NeighborReply(True)),
    ]
    assert len(r.core.active_ids()) == 3


def test_request_from_a_neighbour_is_confirmed() -> None:
    r = joined(2)
    assert notimers(r.recv(2, Neighbor(peer(2), False))) == [Send(nid(2), NeighborReply(True))]


def test_crossing_requests_make_both_neighbours() -> None:
    r = joined(2, passive=(6,))
    r.handle(LinkDown(nid(2)))  # isolated: asks 6 with high priority
    assert ids(r.core.pending_ids()) == [6]
    # 6 asked us at the same time: its request answers ours.
    assert notimers(r.recv(6, Neighbor(peer(6), False))) == [
        NeighborUp(peer(6)),
        Send(nid(6), NeighborReply(True)),
    ]
    assert r.core.pending_ids() == []
    # Then its answer to our request changes nothing.
    assert notimers(r.recv(6, NeighborReply(True))) == []
    assert ids(r.core.active_ids()) == [6]


def test_request_naming_someone_else_is_dropped() -> None:
    r = joined(2)
    assert notimers(r.recv(5, Neighbor(peer(6), True))) == []
    assert r.counter("drop.sender_mismatch") == 1


# --- neighbor replies ------------------------------------------------------------


def test_refusal_cools_the_peer_down_and_waits_for_the_tick_when_not_short() -> None:
    r = joined(2, 3, 4, passive=(6, 7))
    r.handle(LinkDown(nid(4)), now=1.0)  # 2 left of 3: asks one passive peer
    (asked,) = r.core.pending_ids()
    other = nid(6) if asked == nid(7) else nid(7)
    outs = r.recv(ids([asked])[0], NeighborReply(False), now=2.0)
    assert notimers(outs) == [CloseLink(asked)]
    assert r.core.passive_ids() == [other, asked]
    # The tick asks the other one; the refusing peer waits for its cooldown.
    outs = r.fire(MeshTimerKind.SHUFFLE)
    assert Send(other, Neighbor(ME, False)) in outs
    assert not [
        o for o in outs if isinstance(o, Send) and o.dst == asked and isinstance(o.msg, Neighbor)
    ]


def test_refusal_of_a_short_node_tries_the_next_candidate_at_once() -> None:
    r = joined(2, passive=(6, 7), config=hv_cfg(active_size=1))
    r.handle(LinkDown(nid(2)))  # isolated: one high priority request
    (asked,) = r.core.pending_ids()
    other = nid(6) if asked == nid(7) else nid(7)
    outs = r.recv(ids([asked])[0], NeighborReply(False))
    assert notimers(outs) == [
        CloseLink(asked),
        Connect(peer(ids([other])[0])),
        Send(other, Neighbor(ME, True)),
    ]


def test_late_accept_is_undone() -> None:
    r = joined(2)
    assert notimers(r.recv(5, NeighborReply(True))) == [
        Send(nid(5), Disconnect(True)),
        CloseLink(nid(5)),
    ]
    assert r.counter("late_accept") == 1


def test_late_refusal_from_a_neighbour_drops_it() -> None:
    r = joined(2, 3)
    outs = notimers(r.recv(2, NeighborReply(False)))
    assert outs == [NeighborDown(peer(2)), CloseLink(nid(2))]
    assert ids(r.core.active_ids()) == [3]
    assert ids(r.core.passive_ids()) == [2]


def test_stray_refusal_is_ignored() -> None:
    r = joined(2)
    assert notimers(r.recv(5, NeighborReply(False))) == []


# --- disconnect ------------------------------------------------------------------


def test_disconnect_keeps_the_peer_passive_and_refills_from_others() -> None:
    r = joined(2, 3, passive=(6,))
    outs = notimers(r.recv(2, Disconnect(True)))
    assert outs == [
        NeighborDown(peer(2)),
        CloseLink(nid(2)),
        Connect(peer(6)),
        Send(nid(6), Neighbor(ME, False)),
    ]
    assert ids(r.core.passive_ids()) == [2]


def test_disconnect_of_a_leaving_peer_forgets_it() -> None:
    r = joined(2, 3)
    outs = notimers(r.recv(2, Disconnect(False)))
    assert outs == [NeighborDown(peer(2)), CloseLink(nid(2))]
    assert r.core.passive_ids() == []


def test_disconnect_from_a_passive_leaving_peer_forgets_it() -> None:
    r = joined(2, passive=(6,))
    assert notimers(r.recv(6, Disconnect(False))) == []
    assert r.core.passive_ids() == []
    assert notimers(r.recv(2, Disconnect(True))) != []


def test_last_neighbour_gone_with_nothing_passive_rejoins_a_contact() -> None:
    r = hv_rig()
    r.handle(JoinMesh(peers(2)))
    r.recv(2, NeighborReply(True))
    outs = notimers(r.recv(2, Disconnect(True)))
    # 2 went passive, but we exclude the peer that just dropped us from the
    # immediate refill, so with nobody else the contact is joined again.
    assert outs == [
        NeighborDown(peer(2)),
        CloseLink(nid(2)),
        Connect(peer(2)),
        Send(nid(2), MeshJoin(ME)),
    ]


# --- shuffle ---------------------------------------------------------------------


def test_shuffle_tick_sends_a_sample_to_a_neighbour_and_rearms() -> None:
    r = joined(2, 3, 4, passive=(6, 7, 8))
    outs = r.fire(MeshTimerKind.SHUFFLE)
    sent = one(outs, Send)
    assert sent.dst in {nid(2), nid(3), nid(4)}
    assert isinstance(sent.msg, Shuffle)
    assert sent.msg.origin == ME and sent.msg.ttl == 4
    # one active peer (not the target) and two passive ones
    sample = [p.node for p in sent.msg.peers]
    assert len(sample) == 3
    assert sample[0] in {nid(2), nid(3), nid(4)} - {sent.dst}
    assert set(sample[1:]) < {nid(6), nid(7), nid(8)}
    rearmed = r.timer(MeshTimerKind.SHUFFLE)
    assert rearmed.at == r.now + 10.0


def test_shuffle_walks_on_to_another_neighbour() -> None:
    r = joined(2, 3)
    msg = Shuffle(peer(9), 3, peers(10))
    assert notimers(r.recv(2, msg)) == [Send(nid(3), Shuffle(peer(9), 2, peers(10)))]


def test_shuffle_ends_with_a_reply_of_passive_peers() -> None:
    r = joined(2, passive=(6, 7, 8))
    outs = notimers(r.recv(2, Shuffle(peer(9), 0, peers(10))))
    connect, send, close = outs
    assert connect == Connect(peer(9))
    assert close == CloseLink(nid(9))
    assert isinstance(send, Send) and send.dst == nid(9)
    assert isinstance(send.msg, ShuffleReply)
    replied = set(ids(p.node for p in send.msg.peers))
    assert len(replied) == 2 and replied <= {6, 7, 8}  # one more than offered: the origin
    # The origin and its sample are kept; room is made by evicting what we
    # sent (it lives on at the origin).
    passive = set(ids(r.core.passive_ids()))
    assert len(passive) == 4 and {9, 10} <= passive
    assert {6, 7, 8} - passive <= replied


def test_shuffle_reply_replaces_what_we_sent() -> None:
    r = joined(2, 3, 4, passive=(6, 7, 8, 11))
    sent = one(r.fire(MeshTimerKind.SHUFFLE), Send).msg
    assert isinstance(sent, Shuffle)
    offered = {p.node for p in sent.peers}
    outs = notimers(r.recv(5, ShuffleReply(peers(12, 13))))
    assert outs == [CloseLink(nid(5))]
    passive = set(r.core.passive_ids())
    assert {nid(12), nid(13)} <= passive
    assert len(passive) == 4
    # The two evicted were the ones we offered (they now live at the replier).
    assert passive - {nid(12), nid(13)} == {nid(6), nid(7), nid(8), nid(11)} - offered


def test_own_shuffle_coming_back_is_ignored() -> None:
    r = joined(2)
    assert notimers(r.recv(2, Shuffle(ME, 0, peers(5)))) == []


# --- failures and timeouts -------------------------------------------------------


def test_failed_neighbour_is_replaced_with_high_priority_when_alone() -> None:
    r = joined(2, passive=(6,))
    outs = notimers(r.handle(LinkDown(nid(2))))
    assert outs == [NeighborDown(peer(2)), Connect(peer(6)), Send(nid(6), Neighbor(ME, True))]
    assert r.core.passive_ids() == []  # 2 failed: not a candidate any more


def test_failed_neighbour_is_replaced_with_low_priority_otherwise() -> None:
    r = joined(2, 3, passive=(6,))
    outs = notimers(r.handle(LinkDown(nid(2))))
    assert outs == [NeighborDown(peer(2)), Connect(peer(6)), Send(nid(6), Neighbor(ME, False))]


def test_failed_candidate_moves_on_to_the_next() -> None:
    r = joined(2, passive=(6,), config=hv_cfg(active_size=1))
    r.handle(LinkDown(nid(2)))
    r.handle(MembershipHint(alive=peers(7)))  # no room for a second request
    assert ids(r.core.pending_ids()) == [6]
    outs = notimers(r.handle(LinkDown(nid(6))))
    assert outs == [Connect(peer(7)), Send(nid(7), Neighbor(ME, True))]


def test_unanswered_request_times_out_closes_and_moves_on() -> None:
    r = joined(2, 3, 4, passive=(6,))
    r.handle(LinkDown(nid(4)), now=1.0)
    r.handle(MembershipHint(alive=peers(7)))
    outs = notimers(r.fire(MeshTimerKind.NEIGHBOR_TIMEOUT))
    assert r.now == 4.0
    assert outs == [CloseLink(nid(6)), Connect(peer(7)), Send(nid(7), Neighbor(ME, False))]
    assert r.counter("neighbor_timeouts") == 1


def test_link_down_of_a_stranger_is_ignored() -> None:
    r = joined(2)
    assert r.handle(LinkDown(nid(9))) == []


def test_failing_contact_is_not_retried_before_its_cooldown() -> None:
    r = hv_rig()
    r.handle(JoinMesh(peers(2)), now=0.0)
    assert notimers(r.handle(LinkDown(nid(2)), now=0.5)) == []
    # A tick before the cooldown ends (at 10.5) does not hammer the dead contact.
    assert notimers(r.fire(MeshTimerKind.SHUFFLE)) == []
    assert r.now < 10.5
    outs = notimers(r.fire(MeshTimerKind.SHUFFLE))
    assert r.now > 10.5
    assert outs == [Connect(peer(2)), Send(nid(2), MeshJoin(ME))]


# --- hints -----------------------------------------------------------------------


def test_alive_hints_only_fill_free_passive_slots() -> None:
    r = joined(2, 3, 4)
    r.handle(MembershipHint(alive=peers(5, 6, 7, 8, 9, 10, 1, 2)))
    assert ids(r.core.passive_ids()) == [5, 6, 7, 8]


def test_alive_hints_fill_a_short_active_view() -> None:
    r = joined(2, 3)
    outs = notimers(r.handle(MembershipHint(alive=peers(5))))
    assert outs == [Connect(peer(5)), Send(nid(5), Neighbor(ME, False))]


def test_dead_hint_drops_a_neighbour_and_forgets_a_passive_peer() -> None:
    r = joined(2, 3, 4, passive=(6, 7))
    outs = notimers(r.handle(MembershipHint(dead=(nid(2), nid(6)))))
    assert outs[:2] == [NeighborDown(peer(2)), CloseLink(nid(2))]
    assert outs[2:] == [Connect(peer(7)), Send(nid(7), Neighbor(ME, False))]
    assert r.core.passive_ids() == []


def test_the_overlay_works_without_hints() -> None:
    r = hv_rig()
    r.handle(JoinMesh(peers(2)))
    r.recv(2, NeighborReply(True))
    assert ids(r.core.active_ids()) == [2]


# --- leave and robustness --------------------------------------------------------


def test_leave_tells_every_neighbour_and_closes_everything() -> None:
    r = joined(2, 3, passive=(6,))
    outs = notimers(r.handle(LeaveMesh()))
    assert outs == [
        Send(nid(2), Disconnect(False)),
        NeighborDown(peer(2)),
        CloseLink(nid(2)),
        Send(nid(3), Disconnect(False)),
        NeighborDown(peer(3)),
        CloseLink(nid(3)),
    ]
    assert r.core.active_ids() == [] and r.core.passive_ids() == []
    assert notimers(r.recv(5, Neighbor(peer(5), True))) == []
    assert r.counter("drop.left") == 1
    assert r.handle(JoinMesh(peers(5))) == []


def test_messages_from_ourselves_and_of_other_layers_are_dropped() -> None:
    r = joined(2)
    assert notimers(r.handle(MessageIn(nid(1), Neighbor(ME, True)))) == []
    assert r.counter("drop.from_self") == 1
    g = Gossip(bytes(16), nid(2), 1, Channel.USER, b"")
    assert notimers(r.recv(2, g)) == []
    assert r.counter("drop.not_hyparview") == 1


def test_views_stay_within_bounds_and_disjoint() -> None:
    r = joined(2, 3, 4, passive=(5, 6, 7, 8))
    for i in range(9, 30):
        r.recv(i, Neighbor(peer(i), i % 2 == 0))
        r.recv(i, ForwardJoin(peer(i + 100), 2))
        r.recv(2, ShuffleReply(peers(i + 200, i + 300)))
        active, passive = r.core.active_ids(), r.core.passive_ids()
        assert len(active) <= 3 and len(passive) <= 4
        assert not set(active) & set(passive)
        assert nid(1) not in active and nid(1) not in passive
