"""The registry workload in the simulator: its ground truth against the
replicas, its checks (each can fail), determinism and scenario errors."""

from __future__ import annotations

import pytest

from peerd.core.registry.service import RegistryService
from peerd.sim.scenario import ScenarioError
from peerd.wire.messages import RegKind
from tests.sim.helpers import run, scenario

WORKLOAD = """
[registry]
names_per_node = 3
groups = 4
joins_per_node = 2
churn_per_node_s = 0.05
churn_from_s = 3
churn_until_s = 12
"""

CHECKS = """
[[expect]]
check = "registry_converged"
after_s = 12
within_s = 15
[[expect]]
check = "lost_live_entries"
after_s = 12
within_s = 15
[[expect]]
check = "stale_entries"
after_s = 12
within_s = 15
"""


def replica_pids(world, i: int) -> set[int]:  # type: ignore[no-untyped-def]
    state = world.hosts[i].cur.node.registry.state
    return {c.entry.pid for c in state.entries()}


def test_ground_truth_matches_every_replica_and_checks_pass() -> None:
    sc = scenario(
        WORKLOAD
        + """
[[fault]]
at_s = 5
kind = "crash"
nodes = 2
[[fault]]
at_s = 8
kind = "restart"
nodes = 1
"""
        + CHECKS,
        nodes=25,
        duration=30,
    )
    w, rec, summary = run(sc)
    reg = w.reg
    assert reg is not None
    live = {e.pid for e in reg.entries if e.died is None}
    running = w.running_indices()
    assert len(running) == 23
    for i in running:
        # what the tracker believes each node holds is what its replica holds
        held = {reg.entries[idx].pid for idx in range(len(reg.entries)) if reg._held(i, idx)}
        assert held == replica_pids(w, i)
        assert held == live
    r = summary["registry"]
    assert r["registered"] > 0 and r["exits"] == r["churn"] > 0
    assert r["node_down"] == 2 * 5 + 5  # two crashed nodes and one restart, 5 entries each
    assert r["missing_at_end"] == r["stale_at_end"] == r["duplicates_at_end"] == 0
    assert r["visible_all_s"]["max"] is not None and r["visible_all_s"]["max"] < 2.0
    assert summary["passed"], summary["checks"]


def test_same_scenario_same_registry_summary() -> None:
    sc = scenario(WORKLOAD + CHECKS, nodes=20, duration=20)
    a = run(sc)[2]
    b = run(sc)[2]
    a.pop("wall_s"), b.pop("wall_s"), a.pop("peak_rss_mib"), b.pop("peak_rss_mib")
    assert a == b and "registry" in a


def test_preloaded_registry_equals_one_registered_at_run_time() -> None:
    pre = scenario(
        WORKLOAD.replace("churn_per_node_s = 0.05", "churn_per_node_s = 0"), nodes=15, duration=10
    )
    live = scenario(
        WORKLOAD.replace("churn_per_node_s = 0.05", "churn_per_node_s = 0")
        + "preload = false\nstart_s = 3\nover_s = 1\n",
        nodes=15,
        duration=10,
    )
    w1, _, s1 = run(pre)
    w2, _, s2 = run(live)

    def names(w, i):  # type: ignore[no-untyped-def]
        st = w.hosts[i].cur.node.registry.state
        return sorted((c.entry.kind, c.entry.name, c.origin) for c in st.entries())

    for i in range(15):
        assert names(w1, i) == names(w2, i)
        assert len(names(w1, i)) == 15 * 5
    assert s1["registry"]["preloaded"] == 75 and s2["registry"]["registered"] == 75


def test_lost_live_entries_and_convergence_fail_while_a_node_is_cut_off() -> None:
    sc = scenario(
        WORKLOAD
        + """
[[fault]]
at_s = 2
kind = "block"
from = [3]
to = "all"
symmetric = true
"""
        + CHECKS,
        nodes=12,
        duration=30,
    )
    _, _, summary = run(sc)
    by = {c["name"].split("@")[0]: c for c in summary["checks"]}
    assert not by["registry_converged"]["passed"]
    assert not by["lost_live_entries"]["passed"] and by["lost_live_entries"]["value"] > 0


def test_stale_entries_fail_when_a_dead_node_is_not_noticed_in_time() -> None:
    # A host that dies silently (no ICMP, no closed links) is only found by
    # probing; checked 0.5 s later, its entries are still everywhere.
    sc = scenario(
        WORKLOAD.replace("churn_per_node_s = 0.05", "churn_per_node_s = 0")
        + """
[[fault]]
at_s = 5
kind = "crash"
nodes = 1
icmp = false
[[expect]]
check = "stale_entries"
after_s = 5
within_s = 0.5
""",
        nodes=12,
        duration=8,
    )
    _, _, summary = run(sc)
    (check,) = summary["checks"]
    assert not check["passed"] and check["value"] == 11 * 5


def test_duplicates_after_heal_counts_claims_the_conflict_rule_left(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    body = (
        WORKLOAD.replace("churn_per_node_s = 0.05", "churn_per_node_s = 0")
        + """
[[fault]]
at_s = 2
kind = "partition"
groups = [0.5, 0.5]
[[fault]]
at_s = 25
kind = "register"
nodes = "all"
names = 2
prefix = "lead"
[[fault]]
at_s = 30
kind = "heal"
[[expect]]
check = "duplicates_after_heal"
after_s = 30
within_s = 25
"""
    )
    sc = scenario(body, nodes=10, duration=60)
    _, _, ok = run(sc)
    assert ok["passed"], ok["checks"]
    r = ok["registry"]
    # every node claimed both names at once: one winner per name is left
    assert r["registered"] == 20 and r["conflicts"] == 18 and r["duplicates_at_end"] == 0
    monkeypatch.setattr(RegistryService, "_resolve_conflicts", lambda self, s, n: None)
    _, _, bad = run(sc)
    (check,) = bad["checks"]
    assert not check["passed"] and check["value"] == 10 * 2  # every node, both names


@pytest.mark.parametrize(
    "text, reason",
    [
        ('[[expect]]\ncheck = "stale_entries"\nwithin_s = 5\n', "needs a [registry] workload"),
        (
            '[[fault]]\nat_s = 1\nkind = "register"\nnodes = 1\nnames = 1\n',
            "needs a [registry] workload",
        ),
        ("[registry]\nnames_per_nod = 3\n", "did you mean 'names_per_node'"),
        ("[registry]\njoins_per_node = 2\n", "needs 'groups'"),
        ("[registry]\nnames_per_node = 1\nstart_s = 3\n", "preload = false"),
        (
            '[registry]\nnames_per_node = 1\n[[fault]]\nat_s = 1\nkind = "register"\nnodes = 1\n',
            "needs 'names'",
        ),
    ],
)
def test_registry_scenario_errors(text: str, reason: str) -> None:
    with pytest.raises(ScenarioError) as err:
        scenario(text)
    assert reason in str(err.value)


def test_kind_names_of_the_workload() -> None:
    sc = scenario(WORKLOAD, nodes=3, duration=1)
    w, _, _ = run(sc)
    st = w.hosts[0].cur.node.registry.state
    assert {
        (c.entry.kind, c.entry.name) for c in st.entries() if c.origin == w.hosts[0].node_id
    } >= {(RegKind.NAME, "n0.0"), (RegKind.GROUP, "g0")}


def test_nodes_that_join_register_their_workload_once_up() -> None:
    """on_start_s: a node that joins (or restarts) registers its names and
    groups that long after its daemon starts, and they reach every node."""
    sc = scenario(
        "[registry]\nnames_per_node = 2\ngroups = 3\njoins_per_node = 1\npreload = false\n"
        "on_start_s = 0.5\n[mesh]\nenabled = false\n"
        '[[fault]]\nat_s = 1\nkind = "join"\nnodes = "all"\nover_s = 4\n'
        '[[expect]]\ncheck = "registry_converged"\nafter_s = 8\nwithin_s = 10\n',
        nodes=20,
        duration=20,
        extra_top="start_nodes = 4",
    )
    w, _rec, s = run(sc)
    assert w.reg is not None
    # the 4 nodes of t=0 register theirs at start_s (preload = false), the
    # 16 joiners once up: 2 names and 1 group each, every one accepted
    assert w.reg.counts["registered"] == 20 * 3
    assert w.reg.counts["rejected"] == 0
    assert s["passed"], s["checks"]
