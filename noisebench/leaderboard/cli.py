"""``noisebench-leaderboard``: rebuild the leaderboards from the result records on demand."""
from __future__ import annotations

import argparse
import sys

from .build import build_leaderboards


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="noisebench-leaderboard",
                                description="Rebuild <out>/<testbed>.md (+ PNG plots) from the result records.")
    p.add_argument("--results", default="results", help="folder searched for record.json files (default: results)")
    p.add_argument("--out", default="leaderboards", help="output folder for the boards (default: leaderboards)")
    p.add_argument("--testbed", action="append", default=None,
                   help="only this testbed (repeatable; default: every testbed found)")
    p.add_argument("--bootstrap", type=int, default=2000, 
                   help="bootstrap resamples for single-seed pairs' items-only CIs (default: 2000)")
    p.add_argument("--seed", type=int, default=0, help="RNG seed of the bootstraps (default: 0)")
    p.add_argument("--reference", default=None, help="folder of external reference YAMLs (default: <out>/reference)")
    p.add_argument("--margin", type=float, default=None,
                   help="equivalence margin in points (default: the records' leaderboard.margin_pts, else 2)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    return p.parse_args(argv)


def main(argv=None) -> int:
    """Entry point; returns 0 on success, 1 when no records were found, 2 on bad arguments."""
    args = parse_args(argv)
    try:
        paths = build_leaderboards(args.results, args.out, n_boot=args.bootstrap, seed=args.seed,
                                   testbeds=args.testbed, reference_dir=args.reference, plots=not args.no_plots,
                                   margin_pts=args.margin)
    except ValueError as exc:
        print(f"noisebench-leaderboard: {exc}", file=sys.stderr)
        return 2
    if not paths:
        print(f"noisebench-leaderboard: no result records under {args.results}", file=sys.stderr)
        return 1
    for p in paths:
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
