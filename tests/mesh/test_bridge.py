"""HyParView after a partition heals: a burst of members that membership
had declared dead comes back in the same life (``revived``); one
high-priority neighbor request to one of them joins the two overlays the
partition left. Restarted nodes (plain ``alive``), one revival, or a second
burst within a shuffle interval ask nobody."""

from __future__ import annotations

from peerd.core.events import JoinMesh, MembershipHint, Send
from peerd.wire.messages import Neighbor

from .util import hv_rig, nid, of, peer, peers, with_active


def started():  # type: ignore[no-untyped-def]
    r = hv_rig()
    r.handle(JoinMesh(()), now=1.0)
    return with_active(r, 2, 3, 4)  # a full active view (3)


def neighbor_requests(outs):  # type: ignore[no-untyped-def]
    return [(s.dst, s.msg) for s in of(outs, Send) if isinstance(s.msg, Neighbor)]


def test_a_burst_of_revivals_gets_one_high_priority_neighbor_request() -> None:
    r = started()
    r.handle(MembershipHint(dead=(nid(10), nid(11), nid(12))), now=2.0)
    outs = r.handle(MembershipHint(revived=peers(10, 11, 12)), now=20.0)
    reqs = neighbor_requests(outs)
    assert len(reqs) == 1
    dst, msg = reqs[0]
    assert dst in (nid(10), nid(11), nid(12)) and msg == Neighbor(peer(1), True)
    assert r.counter("bridge_requests") == 1
    # Another burst within a shuffle interval (10 s): nobody else is asked.
    r.handle(MembershipHint(dead=(nid(20), nid(21), nid(22))), now=21.0)
    outs = r.handle(MembershipHint(revived=peers(20, 21, 22)), now=25.0)
    assert neighbor_requests(outs) == []
    # After it, the next burst may bridge again.
    r.handle(MembershipHint(dead=(nid(30), nid(31), nid(32))), now=30.5)
    outs = r.handle(MembershipHint(revived=peers(30, 31, 32)), now=31.0)
    assert len(neighbor_requests(outs)) == 1


def test_restarts_and_a_single_revival_are_not_bridged_to() -> None:
    r = started()
    # Restarted processes come back as plain alive hints: passive seeds only.
    r.handle(MembershipHint(dead=(nid(40), nid(41), nid(42))), now=2.0)
    assert neighbor_requests(r.handle(MembershipHint(alive=peers(40, 41, 42)), now=5.0)) == []
    assert nid(40) in r.core.passive_ids()
    # One refuted death is a false positive, not a heal.
    r.handle(MembershipHint(dead=(nid(10),)), now=6.0)
    assert neighbor_requests(r.handle(MembershipHint(revived=peers(10)), now=7.0)) == []
    assert r.counter("bridge_requests") == 0
