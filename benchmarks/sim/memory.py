"""Where a simulation's memory goes, per (node, node) pair.

    python benchmarks/sim/memory.py SCENARIO.toml --nodes N [--duration S] [--top K]

Runs the scenario in this process under ``tracemalloc`` (2-3x slower than
``peerd sim``), then prints the traced heap at the end and its largest
allocation sites, each divided by N^2: the cost that grows with the square of
the cluster (one node's view of another) shows as bytes per pair, and
per-node constants fade as N grows. Run it at two sizes to tell them apart.
"""

from __future__ import annotations

import argparse
import gc
import time
import tracemalloc

from peerd.sim.scenario import load
from peerd.sim.world import World


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("scenario")
    ap.add_argument("--nodes", type=int, required=True)
    ap.add_argument("--duration", type=float, default=None)
    ap.add_argument("--top", type=int, default=20)
    args = ap.parse_args()
    n = args.nodes
    sc = load(args.scenario).with_overrides(nodes=n, duration_s=args.duration)
    tracemalloc.start(1)
    t0 = time.process_time()
    world = World(sc)
    world.setup()
    world.run_until(sc.duration_s)
    gc.collect()
    snap = tracemalloc.take_snapshot()
    cur, peak = tracemalloc.get_traced_memory()
    pairs = n * n
    print(
        f"{sc.name} at {n} nodes, {sc.duration_s:g} s: traced {cur / 2**20:.1f} MiB "
        f"(peak {peak / 2**20:.1f}), {cur / pairs:.0f} B per pair; "
        f"{time.process_time() - t0:.0f} s CPU"
    )
    for st in snap.statistics("lineno")[: args.top]:
        frame = st.traceback[0]
        where = frame.filename.split("peerd/", 1)[-1]
        print(f"{st.size / pairs:9.1f} B/pair {st.count:10d} blocks  {where}:{frame.lineno}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
