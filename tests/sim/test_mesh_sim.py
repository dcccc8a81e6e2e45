"""The partial mesh in the simulator: the real HyParView + Plumtree cores
next to each membership core, links per the link contract, and the checks."""

from __future__ import annotations

import pytest

from peerd.core.mesh.mesh import Mesh
from peerd.sim.scenario import ScenarioError
from peerd.sim.workloads.mesh import bound_links
from tests.sim.helpers import run, scenario

# (every Peer joins the overlay at t=0, after its start's join, as daemons
# started together do: the overlay has formed within a few seconds)
MESH = """
[mesh]
broadcast_every_s = 1
broadcast_from_s = 8
settle_s = 2
"""


def active(w, i):  # type: ignore[no-untyped-def]
    return {p.node for p in w.hosts[i].cur.node.mesh.hyparview.active()}


def test_every_process_runs_a_mesh_and_broadcasts_reach_everyone() -> None:
    sc = scenario(
        MESH
        + """
[[expect]]
check = "broadcast_reliability"
after_s = 8
[[expect]]
check = "max_links_per_node"
[[expect]]
check = "broadcast_hops"
""",
        nodes=60,
        duration=20,
    )
    w, rec, summary = run(sc)
    assert all(isinstance(w.hosts[i].cur.node.mesh, Mesh) for i in range(60))
    m = summary["mesh"]
    assert m["broadcasts"] >= 10 and m["broadcast_reliability"]["min"] == 1.0
    assert 1 <= m["max_links_per_node"] <= bound_links(60)
    assert summary["passed"], summary["checks"]
    # the overlay is symmetric and the world's links are the active views
    for i in range(60):
        for p in active(w, i):
            j = w.index_of[p]
            assert w.hosts[i].node_id in active(w, j)
        assert w.links.link_count[i] == len(active(w, i))


def test_after_30pct_crash_the_tree_repairs_and_reaches_every_live_node() -> None:
    sc = scenario(
        MESH
        + """
[[fault]]
at_s = 10
kind = "crash"
nodes = 0.3
[[expect]]
check = "broadcast_reliability"
after_s = 16
""",
        nodes=80,
        duration=30,
    )
    w, rec, summary = run(sc)
    assert summary["passed"], summary["checks"]
    after = [r for r in rec.mesh_records if r.at >= 16]
    assert after and all(r.eligible == 55 for r in after)  # 80 - 24 crashed - the origin


def test_mesh_checks_fail_when_they_should() -> None:
    sc = scenario(
        MESH
        + """
[[fault]]
at_s = 8
kind = "partition"
groups = [0.5, 0.5]
[[expect]]
check = "broadcast_reliability"
after_s = 12
[[expect]]
check = "max_links_per_node"
max = 2
[[expect]]
check = "broadcast_redundancy"
max = 0.5
""",
        nodes=40,
        duration=25,
    )
    _, _, summary = run(sc)
    by = {c["name"].split("@")[0]: c for c in summary["checks"]}
    assert not by["broadcast_reliability"]["passed"]
    assert by["broadcast_reliability"]["value"] < 0.75  # half the nodes are out of reach
    assert not by["max_links_per_node"]["passed"]
    assert not by["broadcast_redundancy"]["passed"]


def test_mesh_can_be_off_and_then_its_checks_are_refused() -> None:
    sc = scenario("[mesh]\nenabled = false\n", nodes=10, duration=5)
    w, _, summary = run(sc)
    assert summary["mesh"] == {"enabled": False} and w.hosts[0].cur.node.mesh is None
    with pytest.raises(ScenarioError, match="needs the mesh"):
        scenario('[mesh]\nenabled = false\n[[expect]]\ncheck = "broadcast_hops"\n')
    with pytest.raises(ScenarioError, match="did you mean 'broadcast_every_s'"):
        scenario("[mesh]\nbroadcast_evry_s = 1\n")


def test_a_broadcast_whose_origin_crashes_at_that_instant_is_not_counted_lost() -> None:
    # seed 5: the broadcast at t=3 starts on a node that the crash at t=3
    # (later in the same instant) takes down before any copy leaves it
    sc = scenario(
        MESH.replace("broadcast_from_s = 8", "broadcast_from_s = 3")
        + """
[[fault]]
at_s = 3
kind = "crash"
nodes = 0.5
[[expect]]
check = "broadcast_reliability"
after_s = 3
""",
        nodes=10,
        duration=10,
        seed=5,
    )
    w, rec, summary = run(sc)
    assert w.mesh.origin_died == 1 and summary["mesh"]["broadcasts_origin_died"] == 1
    assert all(r.at != 3.0 for r in rec.mesh_records)  # not among the measured
    assert summary["passed"], summary["checks"]  # was 0.0: lost to every node


def test_broadcast_reliability_ignores_records_whose_origin_died() -> None:
    from peerd.sim.checks import CHECKS
    from peerd.sim.measure import Record
    from peerd.sim.scenario import Expect
    from peerd.sim.workloads.mesh import BroadcastRecord

    ok = BroadcastRecord(b"a", 0, 1.0, eligible=4, reached=4, copies=4)
    died = BroadcastRecord(b"b", 1, 2.0, eligible=4, reached=0, copies=0, origin_died=True)
    rec = Record(nodes=5, mesh_records=[ok, died])
    e = Expect(0, 1, "broadcast_reliability", 0.0, None, None, None, None)
    assert CHECKS["broadcast_reliability"].fn(rec, e) == (True, 1.0, 1.0)
