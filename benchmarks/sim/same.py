"""Run every shipped scenario and keep its summary, to show that a change
preserved behaviour: the same seed must give the same summary apart from
``wall_s`` and ``peak_rss_mib``.

    python benchmarks/sim/same.py --out DIR [--src TREE] [--only NAME ...]
    python benchmarks/sim/same.py --diff DIR_BEFORE DIR_AFTER

``--src`` runs the peerd of another checkout (a ``git worktree`` of the commit
before a change), so before and after run side by side on one machine. The
10,000-node scenarios run at the sizes in ``SIZES`` (their full size costs
hours); each run's CPU seconds and simulated node-seconds are written beside
the summary, for the cost per simulated node-second.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# Benchmark-size scenarios, run smaller so the whole set takes minutes.
SIZES = {
    "crash-under-loss-2k": 300,
    "grow-10k": 200,
    "mass-join-10k": 1003,
    "mesh-10k": 1000,
    "registry-10k": 1000,
    "scale-10k": 1000,
}
VOLATILE = ("wall_s", "peak_rss_mib")


def run_one(path: Path, out: Path, src: Path) -> dict[str, object]:
    name = path.stem
    cmd = [sys.executable, "-m", "peerd", "sim", str(path.resolve()), "--json"]
    if name in SIZES:
        cmd += ["--nodes", str(SIZES[name])]
    env = dict(os.environ, PYTHONPATH=str(src))
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.monotonic()
    # run from inside the tree: `python -m` puts the working directory first on
    # sys.path, ahead of PYTHONPATH, so another directory could shadow --src
    proc = subprocess.run(
        cmd, env=env, cwd=src.resolve(), capture_output=True, text=True, timeout=7200
    )
    wall = time.monotonic() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if proc.returncode not in (0, 1):
        raise SystemExit(f"{name}: exit {proc.returncode}\n{proc.stderr[-2000:]}")
    summary = json.loads(proc.stdout)
    for key in VOLATILE:
        summary.pop(key, None)
    (out / f"{name}.json").write_text(json.dumps(summary, indent=1, sort_keys=True) + "\n")
    nodes = summary.get("nodes", SIZES.get(name))
    node_s = float(nodes or 0) * float(summary.get("virtual_s") or 0)
    cost = {
        "scenario": name,
        "exit": proc.returncode,
        "cpu_s": round(cpu, 2),
        "wall_s": round(wall, 2),
        "node_s": node_s,
        "cpu_us_per_node_s": round(cpu / node_s * 1e6, 1) if node_s else None,
    }
    (out / f"{name}.cost.json").write_text(json.dumps(cost) + "\n")
    return cost


def diff(a: Path, b: Path) -> int:
    bad = 0
    for fa in sorted(a.glob("*.json")):
        if fa.name.endswith(".cost.json"):
            continue
        fb = b / fa.name
        if not fb.exists():
            print(f"{fa.stem}: missing after")
            bad += 1
            continue
        ja, jb = json.loads(fa.read_text()), json.loads(fb.read_text())
        if ja == jb:
            ca = json.loads((a / f"{fa.stem}.cost.json").read_text())
            cb = json.loads((b / f"{fa.stem}.cost.json").read_text())
            print(
                f"{fa.stem}: identical; cpu {ca['cpu_s']} s -> {cb['cpu_s']} s"
                f" ({ca['cpu_us_per_node_s']} -> {cb['cpu_us_per_node_s']} us/node-s)"
            )
            continue
        bad += 1
        print(f"{fa.stem}: DIFFERENT")
        for path, va, vb in _walk(ja, jb, ""):
            print(f"  {path}: {va!r} -> {vb!r}")
    return 1 if bad else 0


def _walk(x: object, y: object, path: str):  # type: ignore[no-untyped-def]
    if isinstance(x, dict) and isinstance(y, dict):
        for k in sorted(set(x) | set(y)):
            yield from _walk(x.get(k), y.get(k), f"{path}.{k}")
    elif isinstance(x, list) and isinstance(y, list) and len(x) == len(y):
        for i, (u, v) in enumerate(zip(x, y, strict=True)):
            yield from _walk(u, v, f"{path}[{i}]")
    elif x != y:
        yield path, x, y


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path)
    p.add_argument("--src", type=Path, default=ROOT)
    p.add_argument("--only", nargs="*")
    p.add_argument("--diff", nargs=2, type=Path, metavar=("BEFORE", "AFTER"))
    args = p.parse_args()
    if args.diff:
        return diff(*args.diff)
    if args.out is None:
        p.error("--out DIR or --diff A B")
    args.out.mkdir(parents=True, exist_ok=True)
    for path in sorted((args.src / "scenarios").glob("*.toml")):
        if args.only and path.stem not in args.only:
            continue
        cost = run_one(path, args.out, args.src)
        print(json.dumps(cost), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
