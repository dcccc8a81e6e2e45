"""Bad packets are counted drops, never exceptions; edge cases and determinism."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import cbor2
import pytest

from peerd.core.events import (
    EventKind,
    IncarnationChanged,
    Leave,
    SetTags,
    TimerFired,
    TimerKind,
)
from peerd.core.timers import membership_timer
from peerd.wire import codec
from peerd.wire.codec import MAX_U64
from peerd.wire.messages import Ack, Dead, Left, Ping, Status, Suspect

from .util import Rig, addr, alive, armed_at, decode, events, nid, nologs, of, sends

ROOT = Path(__file__).resolve().parents[2]


def started(*peers: int) -> Rig:
    r = Rig.make()
    r.start()
    r.join(*peers, now=0.0)
    r.drain()
    return r


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "bad_cbor"),
        (b"\xff garbage \x00", "bad_cbor"),
        (b"\x80\x00", "bad_cbor"),  # trailing bytes after the datagram
        (b"\x01", "not_packet"),
        (cbor2.dumps({"a": 1}), "not_packet"),
    ],
)
def test_garbage_datagram_is_a_counted_drop(data: bytes, reason: str) -> None:
    r = started(2)
    packets, size = r.counter("packets_in"), r.counter("bytes_in")
    assert nologs(r.recv_raw(2, data, now=1.0)) == []
    assert r.counter(f"drop.{reason}") == 1
    assert r.counter("packets_in") == packets + 1
    assert r.counter("bytes_in") == size + len(data)


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        (cbor2.dumps([99, 1, 2]), "unknown_type"),
        (cbor2.dumps([Ping.TYPE, 5]), "bad_arity"),
        (cbor2.dumps([Ping.TYPE, 5, b"short"]), "bad_field"),
        (cbor2.dumps([Ping.TYPE, -1, nid(1)]), "bad_field"),
        (cbor2.dumps("hello"), "not_message"),
        (cbor2.dumps([]), "not_message"),
    ],
)
def test_bad_message_is_skipped_and_the_rest_processed(bad: bytes, reason: str) -> None:
    r = started(2)
    data = codec.pack([codec.encode(alive(3)), bad, codec.encode(Ping(5, nid(1)))])
    outs = r.recv_raw(2, data, now=1.0)
    assert r.counter(f"drop.{reason}") == 1
    assert sends(outs)[0] == (addr(2), [Ack(5), alive(3)])
    assert r.status(3) is Status.ALIVE


def test_misdirected_ping_is_dropped_not_acked() -> None:
    r = started(2)
    outs = r.recv(2, Ping(5, nid(7)), now=1.0)
    assert nologs(outs) == []
    assert r.counter("drop.misdirected_ping") == 1
    assert r.counter("msg_in.ping") == 1


def test_newer_peer_fields_are_ignored() -> None:
    # A newer version may append fields to a message: still understood.
    r = started(2)
    outs = r.recv_raw(2, codec.pack([cbor2.dumps([Ping.TYPE, 5, nid(1), "extra", 7])]), now=1.0)
    assert sends(outs) == [(addr(2), [Ack(5)])]


@pytest.mark.parametrize(
    "accusation",
    [
        Suspect(nid(1), MAX_U64, nid(2)),
        Dead(nid(1), MAX_U64, nid(2)),
        Left(nid(1), MAX_U64),
        alive(1, MAX_U64, tags=(("forged", "1"),)),
    ],
)
def test_accusation_at_max_incarnation_does_not_break_the_node(accusation: object) -> None:
    r = started(2)
    # Nobody can outbid MAX_U64: the node does not refute (a counted drop)
    # rather than overflow the wire or raise.
    outs = r.recv(2, accusation, now=1.0)  # type: ignore[arg-type]
    assert not of(outs, IncarnationChanged)
    assert sends(outs) == []
    assert r.counter("drop.incarnation_exhausted") == 1
    assert r.counter("refutations") == 0
    assert r.node.incarnation == 0
    assert r.node.queued_broadcasts() == 0
    assert r.node.local_member().status is Status.ALIVE
    # ... and the node keeps working: it still answers pings and changes tags.
    assert sends(r.recv(2, Ping(5, nid(1)), now=2.0)) == [(addr(2), [Ack(5)])]
    outs = r.handle(SetTags((("k", "v"),)), now=3.0)
    assert of(outs, IncarnationChanged) == [IncarnationChanged(1)]
    assert r.counter("drop.incarnation_exhausted") == 1


def test_accusation_just_below_max_incarnation_is_refuted_at_max() -> None:
    r = started(2)
    outs = r.recv(2, Suspect(nid(1), MAX_U64 - 1, nid(2)), now=1.0)
    assert of(outs, IncarnationChanged) == [IncarnationChanged(MAX_U64)]
    assert r.counter("refutations") == 1
    assert sends(r.drain())[0] == (addr(2), [alive(1, MAX_U64)])  # gossiped, and encodable
    # From there on nothing can be outbid: a second accusation is a counted drop.
    outs = r.recv(2, Suspect(nid(1), MAX_U64, nid(2)), now=2.0)
    assert not of(outs, IncarnationChanged)
    assert r.counter("drop.incarnation_exhausted") == 1
    assert r.node.incarnation == MAX_U64


def test_set_tags_at_max_incarnation_is_a_counted_drop() -> None:
    r = Rig.make(incarnation=MAX_U64)
    r.start()
    r.join(2, now=0.0)
    r.drain()
    outs = r.handle(SetTags((("k", "v"),)), now=1.0)
    assert nologs(outs) == []
    assert r.counter("drop.incarnation_exhausted") == 1
    assert r.node.local_member().tags == ()
    assert r.node.incarnation == MAX_U64


def test_leave_at_max_incarnation_does_not_raise() -> None:
    r = Rig.make(incarnation=MAX_U64)
    r.start()
    r.join(2, now=0.0)
    r.drain()
    outs = r.handle(Leave(), now=1.0)
    assert events(outs) == [(EventKind.LEFT, nid(1))]
    assert r.node.incarnation <= MAX_U64
    sends(outs)


@pytest.mark.parametrize("wrong", [TimerKind.GOSSIP, TimerKind.SUSPICION, TimerKind.LEAVE])
def test_timer_with_the_right_token_but_the_wrong_kind_is_ignored(wrong: TimerKind) -> None:
    r = started(2)
    probe = r.timer(TimerKind.PROBE)
    assert (
        nologs(r.handle(TimerFired(membership_timer(wrong, probe.timer.token)), now=probe.at)) == []
    )
    assert r.counter("probes") == 0
    # The real timer is still armed and works.
    outs = r.fire(probe)
    assert r.counter("probes") == 1
    assert [k for k, _ in armed_at(outs)] == [TimerKind.PROBE, TimerKind.PROBE_TIMEOUT]
    # ... and once fired, its token is spent whatever the kind.
    assert r.handle(TimerFired(probe.timer), now=r.now) == []
    assert r.handle(TimerFired(membership_timer(wrong, probe.timer.token)), now=r.now) == []
    assert r.counter("probes") == 1


def test_timer_never_armed_is_ignored() -> None:
    r = started(2)
    for kind in TimerKind:
        assert r.handle(TimerFired(membership_timer(kind, 999)), now=1.0) == []


_RECONNECT_CHOICE = textwrap.dedent("""
    from peerd.core.events import OpenStream, TimerKind
    from peerd.wire.messages import MemberState, PushPull, Status
    from tests.core.util import Rig, addr, name, nid

    r = Rig.make(seed=3)
    r.start()
    dead = tuple(MemberState(nid(i), name(i), addr(i), 0, 0, (), Status.DEAD)
                 for i in range(2, 12))
    r.stream_in(1, 2, PushPull(False, dead), now=0.1)
    outs = r.fire(TimerKind.RECONNECT)
    print([o.dst for o in outs if isinstance(o, OpenStream)])
""")


def test_same_seed_same_choices_across_processes() -> None:
    choices = set()
    for hash_seed in ("1", "2", "3", "4"):
        env = dict(os.environ, PYTHONHASHSEED=hash_seed, PYTHONPATH=str(ROOT))
        out = subprocess.run(
            [sys.executable, "-c", _RECONNECT_CHOICE],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        )
        choices.add(out.stdout.strip())
    assert len(choices) == 1, choices


def test_decode_helper_rejects_bad_packets() -> None:
    with pytest.raises(codec.DecodeError):
        decode(b"\xff")
