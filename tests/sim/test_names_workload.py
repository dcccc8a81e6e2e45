"""The names workload's measurement, fed synthetic events (its driver comes
with names messaging in the core), and its scenario section and checks."""

from __future__ import annotations

import pytest

from peerd.sim.checks import CHECKS
from peerd.sim.measure import Record
from peerd.sim.scenario import Expect, ScenarioError
from peerd.sim.workloads.names import NameRecorder, hist_pct
from tests.sim.helpers import run, scenario


def _check(name: str, rec: Record, **kw: float) -> tuple[bool, object, object]:
    e = Expect(
        0,
        1,
        name,
        kw.get("after_s", 0.0),
        None,
        kw.get("max"),
        kw.get("min"),
        None,
        kw.get("max_ms"),
        kw.get("until_s"),
    )
    return CHECKS[name].fn(rec, e)


def _record(r: NameRecorder, end: float) -> Record:
    rec = Record(nodes=10)
    rec.names = r.finish(end)
    rec.names_at = dict(r.totals)
    return rec


def test_delivered_failed_and_lost_are_told_apart() -> None:
    r = NameRecorder(settle_s=2.0, reply=False)
    r.sent(1, 0.0, sender=0, name="a", owner=3, owner_gen=1, owner_live=True)
    r.delivered(1, 0.004, node=3)
    r.sent(2, 0.1, sender=1, name="b", owner=4, owner_gen=1, owner_live=True)
    r.failed(2, 0.2, "mailbox_full")  # an error: the sender knows, not lost
    r.sent(3, 0.2, sender=2, name="c", owner=5, owner_gen=1, owner_live=True)
    # message 3: neither delivered nor failed: it vanished
    s = r.finish(10.0)
    assert (s["sent"], s["delivered"], s["failed"], s["lost"]) == (3, 1, 1, 1)
    assert s["errors"] == {"mailbox_full": 1}
    assert s["eligible"] == 3 and s["eligible_delivered"] == 1
    assert s["latency_ms"]["p99"] == 4.0
    rec = _record(r, 10.0)
    assert _check("lost_messages", rec) == (False, 1, 0)
    assert _check("name_delivery", rec)[:2] == (False, round(1 / 3, 6))


def test_owner_crash_within_the_second_after_send_excludes_the_message() -> None:
    r = NameRecorder(settle_s=3.0, reply=False)
    r.sent(1, 5.0, sender=0, name="a", owner=7, owner_gen=2, owner_live=True)
    r.process_ended(7, 2, 5.5)  # the owner crashes 0.5 s after the send
    r.failed(1, 6.0, "owner_gone")
    r.sent(2, 5.0, sender=0, name="b", owner=8, owner_gen=1, owner_live=True)
    r.delivered(2, 5.01, node=8)
    r.process_ended(8, 1, 6.5)  # 1.5 s after: the message stays eligible
    s = r.finish(20.0)
    assert s["eligible"] == 1 and s["eligible_delivered"] == 1 and s["owner_died"] == 1
    assert s["lost"] == 0
    rec = _record(r, 20.0)
    assert _check("name_delivery", rec) == (True, 1.0, 0.999)
    assert _check("lost_messages", rec) == (True, 0, 0)


def test_an_earlier_life_of_the_owner_ending_does_not_count() -> None:
    r = NameRecorder(settle_s=1.0, reply=False)
    r.process_ended(7, 1, 0.5)
    r.sent(1, 1.0, sender=0, name="a", owner=7, owner_gen=2, owner_live=True)
    r.delivered(1, 1.002, node=7)
    assert r.finish(5.0)["eligible_delivered"] == 1


def test_messages_are_judged_at_settle_and_then_forgotten() -> None:
    r = NameRecorder(settle_s=1.0, reply=True)
    for i in range(1000):
        t = i * 0.01
        r.sent(i, t, sender=0, name="a", owner=1, owner_gen=1, owner_live=True)
        r.delivered(i, t + 0.002, node=1)
        r.replied(i, t + 0.005)
        assert len(r._open) <= 101  # bounded: only the last settle_s of sends
    r.delivered(0, 9.0, node=1)  # long judged: a late event, counted apart
    s = r.finish(None)
    assert s["sent"] == 1000 and s["delivered"] == 1000 and s["lost"] == 0
    assert s["replies"] == 1000 and s["reply_rtt_ms"]["p99"] == 5.0
    assert s["late_events"] == 1 and s["open_at_end"] == 0


def test_windows_count_only_messages_sent_within_them() -> None:
    r = NameRecorder(settle_s=1.0, reply=False, windows=[(10.0, None), (0.0, 5.0), (10.0, 20.0)])
    r.sent(1, 1.0, sender=0, name="a", owner=1, owner_gen=1, owner_live=True)  # lost, early
    r.sent(2, 12.0, sender=0, name="a", owner=1, owner_gen=1, owner_live=True)
    r.delivered(2, 12.02, node=1)
    rec = _record(r, 30.0)
    assert _check("lost_messages", rec) == (False, 1, 0)
    assert _check("lost_messages", rec, after_s=10.0) == (True, 0, 0)
    assert _check("name_latency", rec, after_s=10.0, max_ms=50.0) == (True, 20.0, 50.0)
    assert _check("name_latency", rec, after_s=10.0, max_ms=10.0)[0] is False
    assert _check("lost_messages", rec, until_s=5.0) == (False, 1, 0)
    assert _check("lost_messages", rec, after_s=10.0, until_s=20.0) == (True, 0, 0)
    r.sent(3, 22.0, sender=0, name="a", owner=1, owner_gen=1, owner_live=True)  # lost, late
    rec = _record(r, 40.0)
    assert _check("lost_messages", rec, after_s=10.0) == (False, 1, 0)
    assert _check("lost_messages", rec, after_s=10.0, until_s=20.0) == (True, 0, 0)


def test_no_message_sent_fails_rather_than_passes() -> None:
    rec = _record(NameRecorder(settle_s=1.0, reply=False), 10.0)
    assert _check("lost_messages", rec) == (False, None, 0)
    assert _check("name_delivery", rec) == (False, None, 0.999)


def test_hist_pct_is_nearest_rank() -> None:
    h = {10: 98, 20: 1, 500: 1}  # buckets of 0.1 ms
    assert hist_pct(h, 0.5) == 1.0 and hist_pct(h, 0.99) == 2.0 and hist_pct(h, 1.0) == 50.0
    assert hist_pct({}, 0.99) is None


NAMES = """
[names]
names_per_node = 2
send_every_s = 0.5
reply = true
settle_s = 3
[[expect]]
check = "name_delivery"
after_s = 2
[[expect]]
check = "name_latency"
max_ms = 100
[[expect]]
check = "lost_messages"
"""


def test_the_section_parses_and_the_workload_runs_through_the_peers() -> None:
    sc = scenario(NAMES, nodes=5, duration=12)
    assert sc.names is not None and sc.names.reply and sc.names.settle_s == 3.0
    assert sc.expects[1].max_ms == 100.0
    _w, _rec, summary = run(sc)
    n = summary["names"]
    # a message every 0.5 s from t=0 until the end minus settle_s: all delivered
    # to their owners through the Peers' names messaging, and answered
    assert n["sent"] == 19 and n["delivered"] == 19 and n["lost"] == 0 and n["failed"] == 0
    assert n["replies"] == 19 and n["replies_missing"] == 0 and n["no_result"] == 0
    assert n["calls"]["results"] == n["calls"]["calls"] + n["calls"]["reply_calls"]
    assert summary["passed"], summary["checks"]


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ("[names]\nsend_every_s = 1\n", "needs names"),
        ("[names]\nnames_per_node = 1\nsettle_s = 0.5\n", "'settle_s' must be >= 1"),
        ("[names]\nnames_per_node = 1\nsend_evry_s = 1\n", "send_every_s"),
        ('[[expect]]\ncheck = "lost_messages"\n', "needs a [names] workload"),
        ('[names]\nnames_per_node = 1\n[[expect]]\ncheck = "name_latency"\n', "max_ms"),
    ],
)
def test_section_errors(body: str, reason: str) -> None:
    with pytest.raises(ScenarioError, match=reason.replace("[", r"\[").replace("]", r"\]")):
        scenario(body, nodes=5, duration=5)


def test_registry_names_can_be_reused() -> None:
    sc = scenario("[registry]\nnames_per_node = 2\n[names]\nsend_every_s = 2\n", nodes=5)
    assert sc.names is not None and sc.names.names_per_node == 0


def test_the_world_reports_process_ends_to_the_recorder() -> None:
    sc = scenario(
        '[names]\nnames_per_node = 1\n[[fault]]\nat_s = 2\nkind = "crash"\nnodes = [3]\n',
        nodes=5,
        duration=4,
    )
    w, _rec, _summary = run(sc)
    assert w.names is not None and w.names._ended == {(3, 1): 2.0}


def test_owners_that_crash_fail_the_sends_to_them_and_nothing_vanishes() -> None:
    # no mesh: names messages go on direct links alone; 30% of the daemons
    # crash (host up: links reset) and 20% of the hosts vanish (links hang
    # until SWIM says dead or TCP gives up)
    sc = scenario(
        """
[mesh]
enabled = false
[names]
names_per_node = 2
send_every_s = 0.02
reply = true
settle_s = 12
[[fault]]
at_s = 4
kind = "crash"
nodes = 0.3
[[fault]]
at_s = 6
kind = "crash"
nodes = 0.2
icmp = false
[[expect]]
check = "lost_messages"
[[expect]]
check = "name_delivery"
""",
        nodes=30,
        duration=30,
    )
    w, _rec, summary = run(sc)
    n = summary["names"]
    # (the workload targets live names only: the crashed owners' names are
    # dead in the ground truth from the crash on; what it proves is that
    # every call got its result although links reset or hung under it)
    assert n["sent"] > 500 and n["lost"] == 0 and n["no_result"] == 0
    assert n["calls"]["results"] + n["calls"]["sender_gone"] == (
        n["calls"]["calls"] + n["calls"]["reply_calls"]
    )
    assert w.links is not None and w.links.names_counts["msgs"] > 0
    assert summary["passed"], summary["checks"]


def test_the_pool_picks_uniformly_and_removes_in_constant_time() -> None:
    import random

    from peerd.sim.workloads.names import Pool

    p = Pool()
    for x in range(10):
        p.add(x)
    p.add(3)
    for x in (0, 9, 4):
        p.discard(x)
    p.discard(42)
    assert sorted(p.items) == [1, 2, 3, 5, 6, 7, 8] and len(p) == 7
    assert all(p.items[i] == x for x, i in p.pos.items())
    rng = random.Random(1)
    assert {p.pick(rng) for _ in range(200)} == set(p.items)
