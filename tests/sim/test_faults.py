"""Each fault kind changes what it should, and nothing else."""

from __future__ import annotations

from peerd.core.events import PacketIn
from peerd.sim.measure import V_ALIVE, V_DEAD, V_LEFT
from peerd.sim.world import World
from peerd.wire.messages import Status

from .helpers import run, scenario


def fault(text: str) -> str:
    return "[[fault]]\n" + text + "\n"


def test_steady_state_has_no_faults_and_stays_converged() -> None:
    w, rec, s = run(scenario(nodes=20, duration=20))
    assert rec.convergence == [(0.0, True)]
    assert s["membership"]["false_suspicions"] == 0
    assert s["network"]["dropped_loss"] == 0 and s["network"]["dropped_partition"] == 0
    assert w.running == 20


def test_crash_is_detected_and_counted() -> None:
    w, rec, s = run(scenario(fault('at_s = 5\nkind = "crash"\nnodes = [3, 7]'), duration=25))
    assert [c.node for c in rec.crashes] == [3, 7]
    assert all(c.all_s is not None and c.all_s < 5 for c in rec.crashes)
    assert s["membership"]["false_positives"] == 0
    assert w.hosts[3].cur is None and w.running == 28
    views = w.views[0]
    assert views is not None and views[3] == V_DEAD and views[7] == V_DEAD
    # a process crash on a live host: ICMP hints and closed watch links
    assert s["network"]["unreachable_hints"] + s["network"]["link_closed_hints"] > 0


def test_host_crash_is_silent_and_found_by_probing() -> None:
    w, rec, s = run(
        scenario(fault('at_s = 5\nkind = "crash"\nnodes = [3]\nicmp = false'), duration=60)
    )
    assert s["network"]["unreachable_hints"] == 0 and s["network"]["link_closed_hints"] == 0
    assert rec.crashes[0].all_s is not None and rec.crashes[0].all_s > 1.0


def test_pause_defers_inputs_until_resume() -> None:
    sc = scenario(fault('at_s = 5\nkind = "pause"\nnodes = [4]\nduration_s = 8'), duration=30)
    w = World(sc)
    w.setup()
    w.run_until(6.0)
    node = w.hosts[4].cur
    assert node is not None and node.paused
    handled = node.node.counters["packets_in"]
    w.run_until(12.9)
    assert node.node.counters["packets_in"] == handled  # frozen: nothing processed
    assert node.backlog  # but its socket buffered datagrams
    w.run_until(14.0)
    assert not node.paused and not node.backlog
    assert node.node.counters["packets_in"] > handled
    w.run_until(30.0)
    rec = w.finish()
    imp = rec.impairments[0]
    assert imp.kind == "pause" and imp.suspected_at is not None and imp.cleared_s is not None
    assert w.running == 30  # a pause is not a crash


def test_slow_node_processes_late() -> None:
    sc = scenario(
        fault('at_s = 2\nkind = "slow"\nnodes = [2]\ndelay_ms = 400\nduration_s = 10'),
        nodes=10,
        duration=20,
    )
    w = World(sc)
    w.setup()
    w.run_until(2.0)
    proc = w.hosts[2].cur
    assert proc is not None
    w.run_until(6.0)
    assert proc.delay == 0.4 and proc.busy_until > 6.0  # a queue has built up
    w.run_until(20.0)
    assert proc.delay == 0.0


def test_restart_is_a_new_generation_with_the_persisted_incarnation() -> None:
    w, rec, s = run(
        scenario(fault('at_s = 5\nkind = "restart"\nnodes = [6]\ndown_s = 2'), duration=30)
    )
    h = w.hosts[6]
    assert h.gen == 2 and h.cur is not None
    assert h.cur.node.local_member().generation == 2
    assert h.inc >= 1  # refuted its old life's death
    seen = w.hosts[0].cur.node.member(h.node_id)  # type: ignore[union-attr]
    assert seen is not None and seen.status is Status.ALIVE and seen.generation == 2
    assert s["membership"]["false_positives"] == 0


def test_leave_is_seen_as_left() -> None:
    w, rec, s = run(scenario(fault('at_s = 5\nkind = "leave"\nnodes = [5]'), duration=20))
    assert w.hosts[5].cur is None
    views = w.views[1]
    assert views is not None and views[5] == V_LEFT
    assert rec.leaves[0].all_s is not None and s["membership"]["false_positives"] == 0


def test_join_wave_through_seeds() -> None:
    sc = scenario(
        fault('at_s = 1\nkind = "join"\nnodes = "all"\nover_s = 5'),
        nodes=25,
        duration=40,
        extra_top="start_nodes = 5",
    )
    w, rec, s = run(sc)
    assert w.running == 25
    views = w.views[24]
    assert views is not None and all(views[i] == V_ALIVE for i in range(25))
    assert rec.converged_at_end() is not None and s["network"]["joins_ok"] >= 20


def test_partition_drops_across_groups_then_heals() -> None:
    body = fault('at_s = 5\nkind = "partition"\ngroups = [0.5, 0.5]') + fault(
        'at_s = 30\nkind = "heal"'
    )
    w = World(scenario(body, duration=70))
    w.setup()
    w.run_until(29.0)
    assert w.group is not None and w.counts["dropped_partition"] > 0
    a = w.group.index(0)
    b = w.group.index(1)
    va = w.views[a]
    assert va is not None and va[b] == V_DEAD  # each side holds the other dead
    w.run_until(70.0)
    rec = w.finish()
    assert w.group is None and rec.converged_at_end() is not None


def test_global_loss_window() -> None:
    w = World(scenario(fault('at_s = 2\nkind = "loss"\nloss = 0.5\nduration_s = 3'), duration=10))
    w.setup()
    w.run_until(1.9)
    assert w.counts["dropped_loss"] == 0
    w.run_until(5.0)
    lost = w.counts["dropped_loss"]
    assert lost > 0 and w.loss == 0.0
    w.run_until(10.0)
    assert w.counts["dropped_loss"] == lost


def test_node_loss_only_touches_that_node() -> None:
    sc = scenario(fault('at_s = 0\nkind = "loss"\nnodes = [0]\nloss = 1.0'), nodes=10, duration=15)
    w = World(sc)
    w.setup()
    w.run_until(15.0)
    # node 0 hears nothing: everyone else holds it suspect or dead, and it them
    assert all(w.views[i][0] != V_ALIVE for i in range(1, 10))  # type: ignore[index]


def test_one_way_block() -> None:
    sc = scenario(fault('at_s = 0\nkind = "block"\nfrom = [0]\nto = [1]'), nodes=5, duration=5)
    w = World(sc)
    w.setup()
    got: list[tuple[int, int]] = []
    orig = w._send

    def spy(proc, dst, data, t):  # type: ignore[no-untyped-def]
        before = w.counts["dropped_partition"]
        orig(proc, dst, data, t)
        if w.counts["dropped_partition"] > before:
            got.append((proc.host.index, w.by_addr[dst].index))

    w._send = spy  # type: ignore[method-assign]
    w.run_until(5.0)
    assert got and set(got) == {(0, 1)}  # 1 -> 0 still flows


def test_network_duplicates_reorders_and_mtu() -> None:
    dup = scenario(duration=5).network.__class__  # NetworkSpec
    assert dup is not None
    sc = scenario("duplicate = 0.3\nreorder = 0.3\nmtu = 200\n", nodes=10, duration=10)
    _w, _rec, s = run(sc)
    assert s["network"]["duplicated"] > 0
    assert s["network"]["dropped_mtu"] == 0  # small probes fit
    # (deaths gossiped, not sent over the mesh's tree: swim.treecast)
    big = scenario(
        "mtu = 200\n"
        + fault('at_s = 2\nkind = "crash"\nnodes = 0.3')
        + "\n[config]\ntree_dissemination = false\n",
        nodes=60,
        duration=10,
    )
    _w, _rec, s = run(big)
    assert s["network"]["dropped_mtu"] > 0  # gossip-filled datagrams do not


def test_sealed_network_opens_every_datagram() -> None:
    w, rec, s = run(
        scenario(
            "seal = true\n" + fault('at_s = 3\nkind = "crash"\nnodes = [2]'), nodes=10, duration=15
        )
    )
    assert s["network"]["seal_rejected"] == 0
    assert rec.crashes[0].all_s is not None
    assert w.hosts[0].cur is not None and w.hosts[0].cur.sealer is not None


def test_packets_carry_real_encoded_bytes() -> None:
    w = World(scenario(nodes=5, duration=3))
    w.setup()
    seen: list[bytes] = []
    node = w.hosts[1].cur
    assert node is not None
    orig = node.node.handle

    def spy(now, inp):  # type: ignore[no-untyped-def]
        if isinstance(inp, PacketIn):
            seen.append(inp.data)
        return orig(now, inp)

    node.node.handle = spy  # type: ignore[method-assign]
    w.run_until(3.0)
    from peerd.wire import codec

    assert seen and all(codec.decode_packet(d)[0] for d in seen)


def test_plot_draws_the_timeline(tmp_path: object) -> None:
    import pathlib

    import pytest

    pytest.importorskip("matplotlib", reason="--plot needs matplotlib: pip install '.[plot]'")
    from peerd.sim.report import plot

    body = fault('at_s = 3\nkind = "partition"\ngroups = [0.5, 0.5]') + fault(
        'at_s = 8\nkind = "heal"'
    )
    _w, rec, s = run(scenario(body, nodes=10, duration=12))
    assert rec.fault_windows[0] == (3.0, 8.0, "partition")  # shaded until the heal
    out = pathlib.Path(str(tmp_path)) / "t.png"
    plot(rec, s, str(out))
    assert out.stat().st_size > 1000


def test_links_have_their_own_fixed_delay() -> None:
    w = World(scenario("link_ms = 40\n", nodes=10, duration=5))
    delays = {w.link_delay(a, b) for a in range(10) for b in range(a + 1, 10)}
    assert len(delays) > 30 and all(0.0 <= d <= 0.04 for d in delays)
    assert w.link_delay(3, 7) == w.link_delay(7, 3) == World(w.sc).link_delay(3, 7)
    _w, _rec, s = run(w.sc)
    assert s["membership"]["false_suspicions"] == 0
