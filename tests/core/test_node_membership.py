"""Dead, left and leave; tags; address changes; name conflicts."""

from __future__ import annotations

import pytest

from peerd.core.events import (
    EventKind,
    IncarnationChanged,
    Leave,
    LeaveDone,
    MemberEvent,
    MemberInfo,
    SetTags,
    SetTimer,
    TimerKind,
    Unreachable,
    WatchLinks,
)
from peerd.core.timers import membership_timer
from peerd.wire.messages import Alive, Dead, Died, Left, Ping, Status, Suspect

from .util import (
    Rig,
    addr,
    alive,
    armed_at,
    cfg,
    events,
    first_gossip_at,
    name,
    nid,
    nologs,
    of,
    sends,
    sent_msgs,
)


def started(*peers: int, **kw: object) -> Rig:
    r = Rig.make(**kw)  # type: ignore[arg-type]
    r.start()
    r.join(*peers, now=0.0)
    r.drain()
    return r


def gossip(r: Rig) -> list:
    outs = r.drain()
    return sends(outs)[0][1] if outs else []


def info(
    i: int,
    status: Status = Status.ALIVE,
    inc: int = 0,
    *,
    tags: tuple = (),
    at: tuple[str, int] | None = None,
    nm: str | None = None,
    gen: int = 0,
) -> MemberInfo:
    return MemberInfo(nid(i), nm or name(i), at or addr(i), status, inc, gen, tags)


# --- dead and left -----------------------------------------------------------------


def test_dead_message_marks_dead() -> None:
    r = started(2, 3)
    outs = r.recv(3, Dead(nid(2), 0, nid(3)), now=1.0)
    assert of(outs, MemberEvent) == [MemberEvent(EventKind.DEAD, info(2, Status.DEAD))]
    assert r.status(2) is Status.DEAD
    assert r.node.live_count() == 2
    assert r.counter("dead") == 1
    assert gossip(r) == [Died(nid(2), 0)]  # gossiped without the sender
    # Once dead, more news of its death changes nothing.
    assert nologs(r.recv(3, Dead(nid(2), 0, nid(3)), now=2.0)) == []
    assert nologs(r.recv(3, Suspect(nid(2), 0, nid(3)), now=2.0)) == []


def test_stale_dead_is_ignored() -> None:
    r = started(2, 3)
    r.recv(2, alive(2, inc=2), now=1.0)
    r.drain()
    assert nologs(r.recv(3, Dead(nid(2), 1, nid(3)), now=2.0)) == []
    assert r.status(2) is Status.ALIVE


def test_dead_about_unknown_node_is_ignored() -> None:
    r = started(2)
    assert r.recv(2, Dead(nid(9), 0, nid(2)), now=1.0) == []
    assert r.node.member(nid(9)) is None


def test_dead_clears_a_running_suspicion() -> None:
    r = started(2, 3)
    r.recv(3, Suspect(nid(2), 0, nid(3)), now=1.0)
    outs = r.recv(3, Dead(nid(2), 0, nid(3)), now=2.0)
    assert events(outs) == [(EventKind.DEAD, nid(2))]
    assert nologs(r.fire(TimerKind.SUSPICION)) == []  # disarmed: stale
    assert r.counter("dead") == 1


def test_left_marks_left_not_dead() -> None:
    r = started(2, 3)
    outs = r.recv(2, Left(nid(2), 1), now=1.0)
    assert of(outs, MemberEvent) == [MemberEvent(EventKind.LEFT, info(2, Status.LEFT, 1))]
    assert r.status(2) is Status.LEFT
    assert (r.counter("left"), r.counter("dead")) == (1, 0)
    assert gossip(r) == [Left(nid(2), 1)]
    assert nologs(r.recv(2, Left(nid(2), 1), now=2.0)) == []  # already left
    assert nologs(r.recv(3, Dead(nid(2), 1, nid(3)), now=2.0)) == []  # left is final
    assert r.status(2) is Status.LEFT


def test_stale_left_is_ignored() -> None:
    r = started(2)
    r.recv(2, alive(2, inc=3), now=1.0)
    assert nologs(r.recv(2, Left(nid(2), 2), now=2.0)) == []
    assert r.status(2) is Status.ALIVE


def test_left_after_dead_turns_dead_into_left() -> None:
    r = started(2, 3)
    r.recv(3, Dead(nid(2), 0, nid(3)), now=1.0)
    outs = r.recv(3, Left(nid(2), 1), now=2.0)
    assert events(outs) == [(EventKind.LEFT, nid(2))]


def test_dead_node_returns_with_higher_incarnation() -> None:
    r = started(2, 3)
    r.recv(3, Dead(nid(2), 0, nid(3)), now=1.0)
    r.drain()
    assert nologs(r.recv(2, alive(2, inc=0), now=2.0)) == []  # stale
    outs = r.recv(2, alive(2, inc=1), now=3.0)
    # the same life (generation) back: a refuted death, flagged for the mesh
    assert of(outs, MemberEvent) == [MemberEvent(EventKind.ALIVE, info(2, inc=1), revived=True)]
    assert r.node.live_count() == 3


def test_a_restarted_node_back_from_the_dead_is_alive_but_not_revived() -> None:
    r = started(2, 3)
    r.recv(3, Dead(nid(2), 0, nid(3)), now=1.0)
    r.drain()
    outs = r.recv(2, alive(2, inc=1, gen=1), now=3.0)
    assert of(outs, MemberEvent) == [MemberEvent(EventKind.ALIVE, info(2, inc=1, gen=1))]


# --- leave -----------------------------------------------------------------------


def test_leave_announces_at_once_then_reports_done() -> None:
    r = started(2, 3)
    outs = r.handle(Leave(), now=5.0)

    me_left = info(1, Status.LEFT, 1)
    assert nologs(outs)[0] == IncarnationChanged(1)
    assert of(outs, MemberEvent) == [MemberEvent(EventKind.LEFT, me_left)]
    # Gossiped now, not at the next tick, to every peer (fanout 3 > 2 peers).
    assert sorted(sends(outs)) == [(addr(2), [Left(nid(1), 1)]), (addr(3), [Left(nid(1), 1)])]
    assert armed_at(outs) == [(TimerKind.GOSSIP, first_gossip_at(5.0)), (TimerKind.LEAVE, 6.0)]
    assert of(outs, WatchLinks) == [WatchLinks(())]  # no more watching
    assert r.node.local_member().status is Status.LEFT

    assert r.fire(TimerKind.LEAVE) == [LeaveDone()]
    assert r.handle(Leave(), now=7.0) == []  # only once


def test_leaving_node_does_not_refute() -> None:
    r = started(2)
    r.handle(Leave(), now=5.0)
    r.drain()
    assert nologs(r.recv(2, Suspect(nid(1), 1, nid(2)), now=5.1)) == []
    assert nologs(r.recv(2, Dead(nid(1), 1, nid(2)), now=5.2)) == []
    assert nologs(r.recv(2, alive(1, inc=1, at=("10.9.9.9", 7946)), now=5.3)) == []
    assert nologs(r.recv(2, Left(nid(1), 1), now=5.4)) == []
    assert r.node.incarnation == 1
    assert r.counter("refutations") == 0


def test_leaving_node_stops_probing_and_syncing() -> None:
    r = started(2)
    r.handle(Leave(), now=5.0)
    r.drain()
    for kind, interval in (
        (TimerKind.PROBE, 1.0),
        (TimerKind.PUSH_PULL, 30.0),
        (TimerKind.RECONNECT, 10.0),
    ):
        outs = r.fire(kind)
        assert outs == [SetTimer(r.now + interval, membership_timer(kind, outs[0].timer.token))]  # type: ignore[union-attr]


# --- tags --------------------------------------------------------------------------


def test_set_tags_bumps_incarnation_and_spreads() -> None:
    r = started(2)
    tags = (("dc", "fra1"), ("role", "db"))
    outs = r.handle(SetTags(tags), now=2.0)
    assert nologs(outs)[0] == IncarnationChanged(1)
    assert of(outs, MemberEvent) == [MemberEvent(EventKind.UPDATED, info(1, inc=1, tags=tags))]
    assert armed_at(outs) == [(TimerKind.GOSSIP, first_gossip_at(2.0))]
    assert gossip(r) == [alive(1, inc=1, tags=tags)]
    assert r.node.local_member().tags == tags
    # The same tags again change nothing.
    assert r.handle(SetTags(tags), now=3.0) == []
    assert r.node.incarnation == 1


@pytest.mark.parametrize(
    ("config", "tags"),
    [
        (cfg(max_tags=2), (("a", "1"), ("b", "2"), ("c", "3"))),
        (cfg(max_tags_bytes=10), (("key", "12345678"),)),  # 3 + 8 = 11 bytes
        (cfg(), (("", "x"),)),  # empty key
    ],
)
def test_tags_over_the_bounds_are_dropped(config: object, tags: tuple) -> None:
    r = started(2, config=config)
    outs = r.handle(SetTags(tags), now=2.0)
    assert nologs(outs) == []
    assert r.counter("drop.bad_tags") == 1
    assert r.node.local_member().tags == ()
    assert r.node.incarnation == 0
    assert r.node.queued_broadcasts() == 0


def test_tags_at_the_bounds_are_accepted() -> None:
    r = started(2, config=cfg(max_tags=2, max_tags_bytes=11))
    outs = r.handle(SetTags((("a", "1"), ("key", "123456"))), now=2.0)
    assert events(outs) == [(EventKind.UPDATED, nid(1))]


# The codec's own limits (64-byte keys, 512-byte values) hold whatever the
# configured totals allow: beyond them SetTags is a counted drop, not an
# EncodeError out of the core. Lengths are in UTF-8 bytes ("é" is 2).
@pytest.mark.parametrize(
    "tags",
    [
        (("blob", "x" * 513),),
        (("k" * 65, "v"),),
        (("é" * 33, "v"),),  # 33 characters, 66 bytes
        (("a", "1"), ("blob", "é" * 257)),  # 514 bytes
    ],
)
def test_set_tags_beyond_the_wire_limits_is_dropped_not_raised(tags: tuple) -> None:
    r = started(2)  # max_tags_bytes 1024 leaves room for these
    outs = r.handle(SetTags(tags), now=2.0)
    assert nologs(outs) == []
    assert r.counter("drop.bad_tags") == 1
    assert r.node.local_member().tags == ()
    assert r.node.incarnation == 0
    assert r.node.queued_broadcasts() == 0


def test_set_tags_at_the_wire_limits_is_accepted_and_encodable() -> None:
    tags = (("k" * 64, "x" * 512), ("é" * 32, "é" * 256))  # 64 + 512 bytes each
    r = started(2, config=cfg(max_tags_bytes=2 * (64 + 512)))
    outs = r.handle(SetTags(tags), now=2.0)
    assert of(outs, MemberEvent) == [MemberEvent(EventKind.UPDATED, info(1, inc=1, tags=tags))]
    assert r.counter("drop.bad_tags") == 0
    assert gossip(r) == [alive(1, inc=1, tags=tags)]


@pytest.mark.parametrize(
    ("config", "tags"),
    [
        pytest.param(cfg(), (("a", "1"), ("a", "2")), id="duplicate-key"),
        pytest.param(
            cfg(max_tags=100),
            tuple((f"k{i:02}", "") for i in range(65)),
            id="more-than-the-codec-allows",
        ),
    ],
)
def test_set_tags_the_codec_rejects_is_dropped_not_raised(config: object, tags: tuple) -> None:
    r = started(2, config=config)
    outs = r.handle(SetTags(tags), now=2.0)
    assert nologs(outs) == []
    assert r.counter("drop.bad_tags") == 1
    assert r.node.local_member().tags == ()
    assert r.node.incarnation == 0


def test_remote_tags_change_is_an_update() -> None:
    r = started(2)
    tags = (("role", "web"),)
    outs = r.recv(2, alive(2, inc=1, tags=tags), now=2.0)
    assert of(outs, MemberEvent) == [MemberEvent(EventKind.UPDATED, info(2, inc=1, tags=tags))]
    assert gossip(r) == [alive(2, inc=1, tags=tags)]
    # The same incarnation with other tags is not news.
    assert nologs(r.recv(2, alive(2, inc=1, tags=(("role", "db"),)), now=3.0)) == []
    assert r.node.member(nid(2)).tags == tags  # type: ignore[union-attr]
    # A higher incarnation with nothing changed is passed on, but no event.
    outs = r.recv(2, alive(2, inc=2, tags=tags), now=4.0)
    assert events(outs) == []
    assert gossip(r) == [alive(2, inc=2, tags=tags)]


# --- addresses ---------------------------------------------------------------------


def test_node_moving_to_a_new_address() -> None:
    r = started(2, 3)
    new = ("10.0.1.2", 8000)
    outs = r.recv(new, alive(2, inc=1, at=new), now=2.0)
    assert of(outs, MemberEvent) == [MemberEvent(EventKind.UPDATED, info(2, inc=1, at=new))]
    assert r.node.member(nid(2)).addr == new  # type: ignore[union-attr]
    assert gossip(r) == [alive(2, inc=1, at=new)]
    # A closed port at the old address is no longer about n2; at the new one it is.
    assert nologs(r.handle(Unreachable(addr(2)), now=3.0)) == []
    outs = r.handle(Unreachable(new), now=3.0)
    assert events(outs) == [(EventKind.SUSPECT, nid(2))]
    assert sent_msgs(outs, Ping)[0][0] == new


def test_same_incarnation_at_a_new_address_is_ignored() -> None:
    r = started(2)
    new = ("10.0.1.2", 8000)
    assert nologs(r.recv(new, alive(2, inc=0, at=new), now=2.0)) == []
    assert r.node.member(nid(2)).addr == addr(2)  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "bad",
    [
        ("0.0.0.0", 7946),
        ("::", 7946),
        ("224.0.0.1", 7946),
        ("ff02::1", 7946),
        ("255.255.255.255", 7946),
        ("10.0.0.9", 0),
    ],
)
def test_alive_with_unusable_address_is_rejected(bad: tuple[str, int]) -> None:
    r = started(2)
    outs = r.recv(2, Alive(nid(9), "n9", bad, 0, 0, ()), now=1.0)
    assert nologs(outs) == []
    assert r.counter("drop.bad_addr") == 1
    assert r.node.member(nid(9)) is None
    assert r.node.queued_broadcasts() == 0
    # Nor can a known member move there.
    r.recv(2, Alive(nid(2), "n2", bad, 5, 0, ()), now=2.0)
    assert r.counter("drop.bad_addr") == 2
    assert r.node.member(nid(2)).addr == addr(2)  # type: ignore[union-attr]
    assert r.node.queued_broadcasts() == 0


# --- names ---------------------------------------------------------------------


def test_second_node_claiming_a_name_is_a_conflict_and_both_are_kept() -> None:
    r = started(2)
    outs = r.recv(9, alive(9, nm="n2"), now=1.0)
    assert of(outs, MemberEvent) == [
        MemberEvent(EventKind.NAME_CONFLICT, info(9, nm="n2"), info(2)),
        MemberEvent(EventKind.JOINED, info(9, nm="n2")),
    ]
    assert r.counter("name_conflicts") == 1
    assert r.node.live_count() == 3
    assert r.status(2) is Status.ALIVE and r.status(9) is Status.ALIVE


def test_claiming_our_name_is_a_conflict() -> None:
    r = started(2)
    outs = r.recv(9, alive(9, nm="n1"), now=1.0)
    assert of(outs, MemberEvent)[0] == MemberEvent(
        EventKind.NAME_CONFLICT, info(9, nm="n1"), info(1)
    )


def test_name_of_a_dead_node_can_be_taken() -> None:
    r = started(2, 3)
    r.recv(3, Dead(nid(2), 0, nid(3)), now=1.0)
    outs = r.recv(9, alive(9, nm="n2"), now=2.0)
    assert events(outs) == [(EventKind.JOINED, nid(9))]
    assert r.counter("name_conflicts") == 0


def test_renaming_into_a_taken_name_is_a_conflict() -> None:
    r = started(2, 3)
    outs = r.recv(3, alive(3, inc=1, nm="n2"), now=1.0)
    assert [
        (e.kind, e.member.node, e.other.node if e.other else None) for e in of(outs, MemberEvent)
    ] == [(EventKind.NAME_CONFLICT, nid(3), nid(2)), (EventKind.UPDATED, nid(3), None)]
