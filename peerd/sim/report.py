"""Running a scenario and reporting it: the JSON summary, the readable report,
the progress bar and the optional timeline plot.

The summary is deterministic (same scenario and seed, same bytes) except for
``wall_s`` and ``peak_rss_mib``, which are measured on the host.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from typing import IO, Any

from peerd.sim import checks
from peerd.sim.measure import Record, stats3
from peerd.sim.scenario import Scenario
from peerd.sim.world import World


def peak_rss_mib() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return round(ru / 1024 / (1024 if sys.platform == "darwin" else 1), 1)


class ProgressBar:
    """A one-line progress bar on a terminal stream (redrawn in place)."""

    def __init__(self, stream: IO[str], total_s: float) -> None:
        self.stream = stream
        self.total = total_s
        self.start = time.monotonic()
        self.last = 0.0

    def __call__(self, world: World) -> None:
        now = time.monotonic()
        if now - self.last < 0.2 and world.now < self.total:
            return
        self.last = now
        frac = min(1.0, world.now / self.total) if self.total else 1.0
        width = 30
        fill = int(frac * width)
        bar = "#" * fill + "-" * (width - fill)
        line = (
            f"\r[{bar}] {world.now:7.1f}/{self.total:g} s virtual  "
            f"{now - self.start:6.1f} s wall  running={world.running} "
            f"wrong-views={world.wrong}"
        )
        self.stream.write(line)
        self.stream.flush()

    def done(self) -> None:
        self.stream.write("\r\033[K" if self.stream.isatty() else "\n")
        self.stream.flush()


def run(sc: Scenario, *, progress: ProgressBar | None = None) -> tuple[dict[str, Any], Record]:
    """Run ``sc``; return (summary, record)."""
    t0 = time.monotonic()
    world = World(sc, progress=progress)
    rec = world.run()
    wall = time.monotonic() - t0
    if progress is not None:
        progress.done()
    return summarize(sc, rec, wall), rec


def summarize(sc: Scenario, rec: Record, wall_s: float) -> dict[str, Any]:
    results = checks.evaluate(rec, sc.expects)
    # converged_s counts from the end of the last fault (a pause's resume, a
    # join wave's last start), or from 0 without faults
    last_fault = max((end for _start, end, _kind in rec.fault_windows), default=0.0)
    conv_end = rec.converged_at_end()
    crashes = rec.crashes
    first = [c.first_s for c in crashes if c.first_s is not None]
    alls = [c.all_s for c in crashes if c.all_s is not None]
    first_fault = min((f.at_s for f in sc.faults), default=sc.duration_s)
    steady = rec.traffic(0.0, first_fault) if first_fault >= 2.0 else None
    traffic: dict[str, Any] = {k: round(v, 3) for k, v in rec.traffic().items()}
    if steady is not None:
        traffic["before_first_fault"] = {k: round(v, 3) for k, v in steady.items()}
    summary: dict[str, Any] = {
        "scenario": sc.name,
        "nodes": sc.nodes,
        "seed": sc.seed,
        "preset": sc.preset,
        "virtual_s": sc.duration_s,
        "wall_s": round(wall_s, 2),
        "peak_rss_mib": peak_rss_mib(),
        "passed": all(r["passed"] for r in results),
        "checks": results,
        "membership": {
            "converged_s": None if conv_end is None else round(max(0.0, conv_end - last_fault), 3),
            "converged_at_end": conv_end is not None,
            "false_positives": len(rec.false_positive_times),
            "false_suspicions": len(rec.false_suspicion_times),
            "crashed": len(crashes),
            "undetected": sum(1 for c in crashes if c.all_s is None),
            "detection_first_s": stats3(first),
            "detection_all_s": stats3(alls),
            "left": len(rec.leaves),
            "copies_per_update": rec.copies_per_update(),
        },
        "traffic": traffic,
        **({"registry": rec.registry} if rec.registry is not None else {}),
        "mesh": rec.mesh if rec.mesh is not None else {"enabled": False},
        **({"names": rec.names} if rec.names is not None else {}),
        "network": rec.counts,
        "core": {
            k: v
            for k, v in rec.core_counters.items()
            if not k.startswith(("msg_in.", "update_copies", "update_news"))
        },
    }
    return summary


def to_json(summary: dict[str, Any]) -> str:
    return json.dumps(summary, sort_keys=False, separators=(", ", ": "))


def text_report(summary: dict[str, Any]) -> str:
    s = summary
    m = s["membership"]
    t = s["traffic"]
    lines = [
        f"scenario {s['scenario']}: {s['nodes']} nodes, seed {s['seed']}, preset {s['preset']}, "
        f"{s['virtual_s']:g} s virtual in {s['wall_s']:.1f} s wall, "
        f"peak RSS {s['peak_rss_mib']:.0f} MiB",
        "",
        "checks:",
    ]
    for c in s["checks"]:
        mark = "PASS" if c["passed"] else "FAIL"
        lines.append(f"  {mark}  {c['name']:<28} value={_fmt(c['value'])} limit={_fmt(c['limit'])}")
    if not s["checks"]:
        lines.append("  (none)")
    df, da = m["detection_first_s"], m["detection_all_s"]
    lines += [
        "",
        "membership:",
        f"  converged {_fmt(m['converged_s'])} s after the end of the last fault"
        + ("" if m["converged_at_end"] else " (NOT converged at the end)"),
        f"  false positives {m['false_positives']}, false suspicions {m['false_suspicions']}",
        f"  crashed {m['crashed']} (undetected {m['undetected']}), left {m['left']}",
        f"  copies received per membership update: {_fmt(m['copies_per_update'])}",
        f"  detection first: median {_fmt(df['median'])} p99 {_fmt(df['p99'])} "
        f"max {_fmt(df['max'])} s",
        f"  detection all:   median {_fmt(da['median'])} p99 {_fmt(da['p99'])} "
        f"max {_fmt(da['max'])} s",
        "",
        "traffic per node per second:",
        f"  {t['msgs_per_node_s']:.2f} msgs, {t['bytes_per_node_s']:.0f} bytes "
        f"(datagrams {t['datagrams_per_node_s']:.2f} / {t['datagram_bytes_per_node_s']:.0f} B, "
        f"stream frames {t['stream_frames_per_node_s']:.3f} / "
        f"{t['stream_bytes_per_node_s']:.0f} B)",
    ]
    if "before_first_fault" in t:
        b = t["before_first_fault"]
        lines.append(
            f"  before the first fault: {b['msgs_per_node_s']:.2f} msgs, "
            f"{b['bytes_per_node_s']:.0f} bytes"
        )
    r = s.get("registry")
    if r is not None:
        va, rm, rn = r["visible_all_s"], r["removed_all_s"], r["removed_with_node_s"]
        lines += [
            "",
            "registry:",
            f"  {r['entries']} entries ({r['preloaded']} preloaded, {r['registered']} registered "
            f"at run time, {r['rejected']} rejected), {r['live_at_end']} live at the end",
            f"  {r['exits']} process exits, {r['node_down']} with their node, "
            f"{r['conflicts']} lost a conflict",
            f"  visible on every node: median {_fmt(va['median'])} p99 {_fmt(va['p99'])} "
            f"max {_fmt(va['max'])} s after register returned",
            f"  gone from every node: median {_fmt(rm['median'])} p99 {_fmt(rm['p99'])} "
            f"max {_fmt(rm['max'])} s after the process exited; with a dead node: "
            f"median {_fmt(rn['median'])} p99 {_fmt(rn['p99'])} s after the crash",
            f"  at the end: {r['missing_at_end']} missing, {r['stale_at_end']} stale, "
            f"{r['duplicates_at_end']} duplicate claims"
            + ("" if r["converged_at_end"] else " (NOT converged)"),
        ]
    me = s.get("mesh")
    if me is not None and me.get("enabled", True):
        rel, red, hops = (
            me["broadcast_reliability"],
            me["broadcast_redundancy"],
            me["broadcast_hops"],
        )
        ar = me["all_reached_s"]
        lines += [
            "",
            "mesh:",
            f"  links per node: max {me['max_links_per_node']} (bound {me['links_bound']}), "
            f"at the end max {me['links_at_end']['max']} mean {me['links_at_end']['mean']}",
            f"  {me['broadcasts']} broadcasts: reliability min {_fmt(rel['min'])} "
            f"mean {_fmt(rel['mean'])}, redundancy mean {_fmt(red['mean'])} "
            f"max {_fmt(red['max'])}, hops p50 {_fmt(hops['p50'])} p99 {_fmt(hops['p99'])}",
            f"  all reached in: median {_fmt(ar['median'])} p99 {_fmt(ar['p99'])} "
            f"max {_fmt(ar['max'])} s; {me['msgs_per_node_s']:.2f} msgs, "
            f"{me['bytes_per_node_s']:.0f} bytes per node per second on links",
        ]
        tree = me.get("tree")
        if tree is not None:
            lines.append(
                f"  tree: {tree['grafts']} repair grafts, {tree['moves']} moves "
                f"({tree['moves_dropped']} dropped), {tree['regrafts']} re-grafts"
            )
    n = s["network"]
    lines += [
        "",
        f"network: {n['datagrams']} datagrams ({n['dropped_loss']} lost, "
        f"{n['dropped_partition']} blocked, {n['dropped_mtu']} over MTU, "
        f"{n['duplicated']} duplicated), {n['streams']} streams ({n['streams_failed']} failed), "
        f"{n['unreachable_hints']} ICMP hints, {n['link_closed_hints']} closed links",
        "",
        "PASSED" if s["passed"] else "FAILED",
    ]
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def plot(rec: Record, summary: dict[str, Any], path: str) -> None:
    """Draw the timeline: how many nodes each node sees alive / suspect / dead
    (mean over running nodes, with the min-max band), fault windows shaded."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise RuntimeError("--plot needs matplotlib: pip install 'peerd[plot]'") from exc
    tl = rec.timeline
    ts = [r[0] for r in tl]
    fig, axes = plt.subplots(3, 1, figsize=(10, 8), sharex=True)
    series = [("alive", 3, "tab:green"), ("suspect", 6, "tab:orange"), ("dead/left", 9, "tab:red")]
    for ax, (label, col, color) in zip(axes, series, strict=True):
        ax.plot(ts, [r[col] for r in tl], color=color, label=f"{label} (mean)")
        ax.fill_between(
            ts,
            [r[col + 1] for r in tl],
            [r[col + 2] for r in tl],
            color=color,
            alpha=0.25,
            label="min-max over nodes",
        )
        ax.set_ylabel(f"nodes seen {label}")
        for start, end, _kind in rec.fault_windows:
            ax.axvspan(start, max(end, start + 0.2), color="grey", alpha=0.2)
        ax.legend(loc="upper right", fontsize="small")
    axes[0].plot(ts, [r[1] for r in tl], color="black", linestyle=":", label="running")
    for start, _end, kind in rec.fault_windows:
        axes[0].annotate(
            kind, (start, axes[0].get_ylim()[1]), fontsize="x-small", rotation=90, va="top"
        )
    axes[-1].set_xlabel("virtual time (s)")
    fig.suptitle(f"{summary['scenario']}: {summary['nodes']} nodes, seed {summary['seed']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
