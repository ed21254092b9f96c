"""Build ``lorakern/autotable.json`` (what ``backend="auto"`` tries first) from a ``lorakern bench`` JSON.

For each dtype and token count M of the results, the backend with the smallest forward+backward
median (plain adapter: no dropout, no mask, one adapter), summed over the (K, N) shapes measured,
wins; rows become ``[M_max, backend]`` with M_max the midpoint to the next measured M.

    python3 bench/make_autotable.py bench/results/h100.json   # merges into lorakern/autotable.json
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

TABLE = Path(__file__).resolve().parent.parent / "lorakern" / "autotable.json"
PROVIDERS = {"lorakern-triton": "triton", "lorakern-cuda": "cuda", "lorakern-torch": "torch"}


def rows_for(records: list[dict]) -> dict[str, list[list]]:
    """{dtype: [[M_max, backend], ...]} from benchmark records."""
    total: dict = defaultdict(lambda: defaultdict(float))
    count: dict = defaultdict(lambda: defaultdict(int))
    for r in records:
        if (r["mode"] != "fwdbwd" or r["dropout"] != 0.0 or r.get("masked") or r.get("adapters")
                or r["provider"] not in PROVIDERS):
            continue
        key = (r["dtype"], r["M"])
        total[key][PROVIDERS[r["provider"]]] += r["median_ms"]
        count[key][PROVIDERS[r["provider"]]] += 1
    by_dtype: dict = defaultdict(list)
    for (dtype, M), times in sorted(total.items()):
        full = max(count[(dtype, M)].values())
        complete = {b: t for b, t in times.items() if count[(dtype, M)][b] == full}
        by_dtype[dtype].append((M, min(complete, key=complete.get)))
    out = {}
    for dtype, pairs in by_dtype.items():
        rows = []
        for i, (M, name) in enumerate(pairs):
            m_max = (M + pairs[i + 1][0]) // 2 if i + 1 < len(pairs) else 2**62
            rows.append([m_max, name])
        out[dtype] = rows
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", help="a lorakern bench --json file measured on one GPU kind")
    ap.add_argument("--table", default=str(TABLE))
    args = ap.parse_args()
    res = json.loads(Path(args.results).read_text())
    table = json.loads(Path(args.table).read_text()) if Path(args.table).exists() else {}
    table[res["device"]] = rows_for(res["records"])
    Path(args.table).write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    print(json.dumps({res["device"]: table[res["device"]]}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
