"""The one tool that writes lorakern's per-device tables, from what a GPU measured.

- ``lorakern/autotable.json`` (which backend ``backend="auto"`` tries first), from a ``lorakern
  bench --json`` file: for each dtype and token count M, the backend (any of
  ``lorakern.backends.NAMES``) with the smallest forward+backward median (plain adapter: no
  dropout, no mask, one adapter), summed over the (K, N) shapes measured, wins; rows become
  ``[M_max, backend]`` with M_max the midpoint to the next measured M.
- ``lorakern/launchplans.json`` (the triton kernels' launch plans, ``lorakern.triton.configs``),
  from a ``python3 -m bench.triton_tune --json`` sweep at M = 8192: per kernel kind, the fastest
  candidate's entries go into the large-M row of the GPU's own table (with dropout: its
  ``"dropout"`` entries), the other rows copied from ``"default"``.

    python3 bench/make_autotable.py bench/results/h100.json           # merges into autotable.json
    python3 bench/make_autotable.py --tune out/tune-h100.json         # merges into launchplans.json
"""
from __future__ import annotations

import argparse
import copy
import json
from collections import defaultdict
from pathlib import Path
from typing import Optional, Sequence

from lorakern import backends
from lorakern.triton import configs

AUTOTABLE = Path(__file__).resolve().parent.parent / "lorakern" / "autotable.json"


def _backend(provider: str) -> Optional[str]:
    name = provider.removeprefix("lorakern-")
    return name if provider.startswith("lorakern-") and name in backends.NAMES else None


def rows_for(records: list[dict]) -> dict[str, list[list]]:
    """{dtype: [[M_max, backend], ...]} from benchmark records."""
    total: dict = defaultdict(lambda: defaultdict(float))
    count: dict = defaultdict(lambda: defaultdict(int))
    for r in records:
        name = _backend(r["provider"])
        if r["mode"] != "fwdbwd" or r["dropout"] != 0.0 or r.get("masked") or r.get("adapters") or name is None:
            continue
        key = (r["dtype"], r["M"])
        total[key][name] += r["median_ms"]
        count[key][name] += 1
    by_dtype: dict = defaultdict(list)
    for (dtype, M), times in sorted(total.items()):
        full = max(count[(dtype, M)].values())
        complete = {b: t for b, t in times.items() if count[(dtype, M)][b] == full}
        by_dtype[dtype].append((M, min(complete, key=complete.get)))
    out = {}
    for dtype, pairs in by_dtype.items():
        out[dtype] = [[(M + pairs[i + 1][0]) // 2 if i + 1 < len(pairs) else 2**62, name]
                      for i, (M, name) in enumerate(pairs)]
    return out


def plans_for(sweep: list[dict], default: dict) -> dict[str, list[dict]]:
    """{kind: rows} for one GPU: ``default``'s rows, the large-M row (the one without M_max)
    updated with the fastest candidate per (kind, dropout); a candidate's entries were forced
    over the default plan, so that plan plus the entries is what was measured."""
    best: dict[tuple, dict] = {}
    for r in sweep:
        key = (r["kind"], r["dropout"])
        if key not in best or r["ms"] < best[key]["ms"]:
            best[key] = r
    out = {}
    for kind in sorted({k for k, _ in best}):
        rows = copy.deepcopy(default[kind])
        large = next(row for row in rows if "M_max" not in row)
        overlay = large.pop("dropout", {})
        measured = {**large, **overlay, **best[(kind, True)]["entries"]} if (kind, True) in best else None
        large.update(best[(kind, False)]["entries"] if (kind, False) in best else {})
        dropout = {k: v for k, v in (measured or {**large, **overlay}).items() if large.get(k) != v}
        if dropout:  # what a call with dropout runs: the plan it was measured with
            large["dropout"] = dropout
        out[kind] = rows
    return out


def dump_plans(tables: dict) -> str:
    """launchplans.json's text: one row a line, so that a diff shows which plan changed."""
    parts = []
    for name, kinds in tables.items():
        body = ",\n".join(f"  {json.dumps(kind)}: [\n" + ",\n".join("   " + json.dumps(row) for row in rows) + "\n  ]"
                          for kind, rows in kinds.items())
        parts.append(f" {json.dumps(name)}: {{\n{body}\n }}")
    return "{\n" + ",\n".join(parts) + "\n}\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Merge one GPU's measurements into the tables; prints what it wrote. Exit status 0."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n")[-1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", nargs="?", help="a lorakern bench --json file measured on one GPU kind")
    ap.add_argument("--tune", metavar="TUNE.json", help="a python3 -m bench.triton_tune --json sweep")
    ap.add_argument("--table", default=str(AUTOTABLE), help="autotable.json to merge into")
    ap.add_argument("--plans", default=str(configs.TABLES), help="launchplans.json to merge into")
    args = ap.parse_args(argv)
    if not args.results and not args.tune:
        ap.error("give a bench results file, --tune TUNE.json, or both")
    if args.results:
        res = json.loads(Path(args.results).read_text())
        table = json.loads(Path(args.table).read_text()) if Path(args.table).exists() else {}
        table[res["device"]] = rows_for(res["records"])
        Path(args.table).write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
        print(json.dumps({res["device"]: table[res["device"]]}, indent=1))
    if args.tune:
        tune = json.loads(Path(args.tune).read_text())
        plans = json.loads(Path(args.plans).read_text())
        plans[tune["device"]] = plans_for(tune["results"], plans["default"])
        Path(args.plans).write_text(dump_plans(plans))
        print(dump_plans({tune["device"]: plans[tune["device"]]}), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
