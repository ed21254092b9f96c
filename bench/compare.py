"""Compare a fresh ``lorakern bench --json`` run with the committed results for the same GPU kind.

    python bench/compare.py out/fresh.json                     # against bench/results/<gpu>.json
    python bench/compare.py out/fresh.json bench/results/h100.json --threshold 0.10

A case (provider, mode, shape, dtype, dropout, masked, adapters) regresses when its fresh median
is more than ``threshold`` over the committed one. Only lorakern's own providers fail the run
(exit 1); base, PEFT and addmm are reported beside them, since they move only with the machine,
the driver or torch. Exit 2 when there is nothing to compare with.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Optional, Sequence

RESULTS = Path(__file__).resolve().parent / "results"
KEY = ("provider", "mode", "M", "K", "N", "r", "dtype", "dropout", "masked", "adapters")


def _key(rec: dict) -> tuple:
    return tuple(rec.get(k) for k in KEY)


def _label(key: tuple) -> str:
    rec = dict(zip(KEY, key))
    extra = (" masked" if rec["masked"] else "") + (f" {rec['adapters']} adapters" if rec["adapters"] else "")
    return (f"{rec['provider']:<16} {rec['mode']:<6} M={rec['M']:<5} K={rec['K']:<5} N={rec['N']:<5} r={rec['r']:<3} "
            f"p={rec['dropout']:g}{extra}")


def compare(fresh: dict, old: dict, threshold: float, metric: str = "median_ms") -> tuple[list, list, list]:
    """(regressions, improvements, unchanged): lists of (key, old value, new value, new/old).

    >>> a = {"records": [{"provider": "lorakern-triton", "mode": "fwd", "M": 1, "K": 8, "N": 8, "r": 4,
    ...                   "dtype": "bfloat16", "dropout": 0.0, "masked": False, "adapters": 0, "median_ms": 1.0}]}
    >>> b = {"records": [dict(a["records"][0], median_ms=1.2)]}
    >>> [round(c[3], 2) for c in compare(b, a, 0.10)[0]]
    [1.2]
    """
    before = {_key(r): r for r in old["records"] if r.get(metric) is not None}
    regressions, improvements, unchanged = [], [], []
    for rec in fresh["records"]:
        prev = before.get(_key(rec))
        if prev is None or rec.get(metric) is None:
            continue
        ratio = rec[metric] / prev[metric]
        row = (_key(rec), prev[metric], rec[metric], ratio)
        if ratio > 1.0 + threshold:
            regressions.append(row)
        elif ratio < 1.0 - threshold:
            improvements.append(row)
        else:
            unchanged.append(row)
    return regressions, improvements, unchanged


def _print_rows(title: str, rows: list, metric: str) -> None:
    if not rows:
        return
    print(f"{title} ({len(rows)}): {metric} committed -> fresh")
    for key, a, b, ratio in sorted(rows, key=lambda row: -abs(row[3] - 1.0)):
        print(f"  {_label(key)}  {a:.4g} -> {b:.4g}  ({ratio:.2f}x)")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Print the comparison; exit 1 on a lorakern regression, 2 when there is nothing to compare."""
    ap = argparse.ArgumentParser(prog="bench/compare.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("fresh", help="JSON written by `lorakern bench --json` on this GPU")
    ap.add_argument("committed", nargs="?", help="default: bench/results/<gpu>.json for the fresh run's GPU kind")
    ap.add_argument("--threshold", type=float, default=0.10, help="relative change that counts (default 0.10)")
    ap.add_argument("--metric", default="median_ms", choices=("median_ms", "ratio_to_base"),
                    help="ratio_to_base factors out a machine that is uniformly faster or slower")
    args = ap.parse_args(argv)
    fresh = json.loads(Path(args.fresh).read_text())
    path = Path(args.committed) if args.committed else RESULTS / f"{fresh['slug']}.json"
    if not path.exists():
        print(f"compare: no committed results for {fresh['device']} at {path}: nothing to compare", file=sys.stderr)
        return 2
    old = json.loads(path.read_text())
    if old["device"] != fresh["device"]:
        print(f"compare: {path} is from {old['device']!r}, the fresh run from {fresh['device']!r}", file=sys.stderr)
        return 2
    regressions, improvements, unchanged = compare(fresh, old, args.threshold, args.metric)
    n = len(regressions) + len(improvements) + len(unchanged)
    if not n:
        print(f"compare: no case of {args.fresh} is in {path}", file=sys.stderr)
        return 2
    print(f"{fresh['device']}: fresh {fresh['commit']} (torch {fresh['torch']}) vs committed {old['commit']} "
          f"(torch {old['torch']}), {n} common cases, threshold {args.threshold:.0%} on {args.metric}")
    base = [ratio for key, _, _, ratio in regressions + improvements + unchanged if key[0] == "base"]
    if base:
        print(f"base (F.linear) fresh/committed: median {statistics.median(base):.3f}x over {len(base)} cases "
              "(the machine's own drift)")
    ours = [row for row in regressions if row[0][0].startswith("lorakern-")]
    _print_rows("lorakern regressions", ours, args.metric)
    _print_rows("reference providers slower (not failing)", [r for r in regressions if r not in ours], args.metric)
    _print_rows("faster", improvements, args.metric)
    print(f"{len(ours)} lorakern regressions over {args.threshold:.0%}")
    return 1 if ours else 0


if __name__ == "__main__":
    sys.exit(main())
