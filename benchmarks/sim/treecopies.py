"""Copies of each membership update a node receives, with membership news
over the mesh's broadcast tree and without (issue 15).

    python benchmarks/sim/treecopies.py SCENARIO.toml [--nodes N] [--tree on|off]
        [--mesh on|off] [--seed S]

Prints one JSON line: the scenario's pass/fail, detection, false positives,
traffic, CPU per simulated node-second, and ``copies_per_news``: membership
update items (Alive, Dead, Died, DiedRef, Left) received by datagram or by
the tree, per item that was news to its receiver (the core counters
``msg_in.*``, which the summary leaves out; nodes whose process ended take
their counts with them).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from peerd.sim import report  # noqa: E402
from peerd.sim.scenario import load  # noqa: E402

KINDS = ("alive", "dead", "died", "diedref", "left")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("scenario")
    ap.add_argument("--nodes", type=int)
    ap.add_argument("--seed", type=int)
    ap.add_argument("--tree", choices=("on", "off"), default="on")
    ap.add_argument("--mesh", choices=("on", "off"))
    args = ap.parse_args()
    sc = load(args.scenario).with_overrides(nodes=args.nodes, seed=args.seed)
    if "tree_dissemination" in {f.name for f in dataclasses.fields(sc.config)}:
        sc = dataclasses.replace(sc, config=sc.config.replace(tree_dissemination=args.tree == "on"))
    if args.mesh is not None:
        sc = dataclasses.replace(sc, mesh=dataclasses.replace(sc.mesh, enabled=args.mesh == "on"))
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    summary, rec = report.run(sc)
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    c = rec.core_counters
    received = sum(c.get(f"msg_in.{k}", 0) for k in KINDS) + c.get("msg_in.tree_items", 0)
    news = c.get("msg_in.news", 0)
    m = summary["membership"]
    out = {
        "scenario": sc.name,
        "nodes": sc.nodes,
        "mesh": sc.mesh.enabled,
        "tree": args.tree,
        "passed": summary["passed"],
        "failed": [ch["name"] for ch in summary["checks"] if not ch["passed"]],
        "copies_per_news": round(received / news, 2) if news else None,
        "items_received": received,
        "news": news,
        "tree_items": c.get("msg_in.tree_items", 0),
        "suspect_items": c.get("msg_in.suspect", 0),
        "tree_casts": c.get("tree_casts", 0),
        "tree_relays": c.get("tree_relays", 0),
        "detection_all_max_s": m.get("detection_all_s", {}).get("max"),
        "false_positives": m.get("false_positives"),
        "converged_s": m.get("converged_s"),
        "bytes_per_node_s": summary["traffic"]["bytes_per_node_s"],
        "mesh_bytes_per_node_s": summary["mesh"].get("bytes_per_node_s"),
        "cpu_s": round(cpu, 1),
        "cpu_us_per_node_s": round(cpu / rec.node_seconds * 1e6, 1) if rec.node_seconds else None,
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
