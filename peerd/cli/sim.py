"""``peerd sim SCENARIO.toml``: run a scenario in the simulator.

Exit status: 0 every expectation held, 1 one failed, 2 a bad scenario file
(or bad arguments), with the line and the reason on stderr.
"""

from __future__ import annotations

import argparse
import sys

from peerd.cli.format import error_json

EXIT_OK, EXIT_FAILED, EXIT_BAD_SCENARIO = 0, 1, 2


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("scenario", metavar="SCENARIO.toml", help="scenario file (see scenarios/)")
    p.add_argument("--nodes", type=int, metavar="N", help="override the number of nodes")
    p.add_argument("--seed", type=int, metavar="S", help="override the seed")
    p.add_argument(
        "--duration", type=float, metavar="S", help="override the virtual duration, in seconds"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object (no progress bar)")
    p.add_argument(
        "--plot",
        metavar="FILE.png",
        help="draw the membership timeline (needs matplotlib: peerd[plot])",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _fail(args: argparse.Namespace, message: str) -> int:
    """A bad scenario or option: one line on stderr, or under --json the
    CLI's JSON error on stdout; exit 2 either way."""
    if getattr(args, "json", False):
        print(error_json("usage", message))
    else:
        print(f"peerd sim: {message}", file=sys.stderr)
    return EXIT_BAD_SCENARIO


def cmd_sim(args: argparse.Namespace) -> int:
    from peerd.sim import report
    from peerd.sim.scenario import ScenarioError, load

    try:
        sc = load(args.scenario).with_overrides(
            nodes=args.nodes, seed=args.seed, duration_s=args.duration
        )
    except ScenarioError as exc:
        return _fail(args, f"bad scenario: {exc}")
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            return _fail(args, "--plot needs matplotlib (pip install 'peerd[plot]')")
    bar = None
    if not args.json and not args.quiet:
        bar = report.ProgressBar(sys.stderr, sc.duration_s)
    summary, rec = report.run(sc, progress=bar)
    if args.plot:
        report.plot(rec, summary, args.plot)
    if args.json:
        print(report.to_json(summary))
    else:
        print(report.text_report(summary))
    return EXIT_OK if summary["passed"] else EXIT_FAILED
