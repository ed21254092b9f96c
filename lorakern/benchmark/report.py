"""What a run prints and draws: the table of ratios, the targets and gates, a plot.

>>> recs = [{"provider": p, "mode": "fwd", "M": 16, "K": 64, "N": 64, "r": 4, "dtype": "float32",
...          "dropout": 0.0, "masked": False, "adapters": 0, "median_ms": ms, "ratio_to_base": ms}
...         for p, ms in (("base", 1.0), ("lorakern-torch", 1.25))]
>>> print_table(recs, ["base", "lorakern-torch"])  # doctest: +NORMALIZE_WHITESPACE
time / base (x); vs ref: faster of PEFT and addmm / lorakern-auto (else the best lorakern); g: CUDA graph, e: eager
mode       M     K     N   r variant              base ms   lk-torch   vs ref
fwd       16    64    64   4 p=0                   1.0000       1.25        -
"""
from __future__ import annotations

import sys
from typing import Optional, Sequence, TextIO

from lorakern.benchmark import gates
from lorakern.benchmark.cases import MODES, Variant
from lorakern.benchmark.providers import LORAKERN, PROVIDERS
from lorakern.extras import require

__all__ = ["print_table", "plot", "summary"]


def _fmt(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.2f}"


def _vs_reference(provs: dict[str, dict], others: Sequence[str]) -> Optional[float]:
    """lorakern-auto's speedup over the faster of PEFT and addmm; without auto, the best lorakern's."""
    auto = provs.get(LORAKERN + "auto", {}).get("speedup_vs_reference")
    if auto is not None:
        return auto
    lk = [provs[p]["speedup_vs_reference"] for p in others
          if p.startswith(LORAKERN) and "speedup_vs_reference" in provs.get(p, {})]
    return max(lk) if lk else None


def print_table(records: Sequence[dict], providers: Sequence[str], out: Optional[TextIO] = None) -> None:
    """Per case, to ``out`` (default stdout): base ms, each provider's time over base, lorakern's
    speedup over the faster of PEFT and the addmm style."""
    out = out or sys.stdout
    rows: dict[tuple, dict[str, dict]] = {}
    for r in records:
        key = (r["mode"], r["M"], r["K"], r["N"], r["r"], r["dropout"], r["masked"], r["adapters"])
        rows.setdefault(key, {})[r["provider"]] = r
    base = {k[:5]: v["base"] for k, v in rows.items() if "base" in v}
    others = [p for p in providers if p != "base"]
    head = f"{'mode':<6} {'M':>5} {'K':>5} {'N':>5} {'r':>3} {'variant':<18} {'base ms':>9} "
    head += " ".join(f"{p.replace(LORAKERN, 'lk-'):>10}" for p in others) + f" {'vs ref':>8}"
    print("time / base (x); vs ref: faster of PEFT and addmm / lorakern-auto (else the best lorakern); "
          "g: CUDA graph, e: eager", file=out)
    print(head, file=out)
    for key in sorted(rows):
        provs = rows[key]
        b = base.get(key[:5])
        label = Variant(key[5], key[6], key[7]).label
        line = f"{key[0]:<6} {key[1]:>5} {key[2]:>5} {key[3]:>5} {key[4]:>3} {label:<18} "
        line += f"{b['median_ms']:9.4f} " if b else f"{'-':>9} "
        cells = []
        for p in others:
            rec = provs.get(p)
            mark = "" if rec is None or rec.get("cuda_graph") is None else ("g" if rec["cuda_graph"] else "e")
            cells.append(f"{_fmt(rec and rec.get('ratio_to_base')) + mark:>10}")
        line += " ".join(cells) + f" {_fmt(_vs_reference(provs, others)):>8}"
        print(line, file=out)


def plot(records: Sequence[dict], providers: Sequence[str], path: str, title: str) -> None:
    """Ratio to base by shape, one panel per mode, into the PNG ``path``; solid lines without
    dropout, dashed with.

    Raises:
        MissingDependency: matplotlib is not installed.
    """
    matplotlib = require("matplotlib", "lorakern bench --plot")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plain = [r for r in records if not r["masked"] and not r["adapters"] and "ratio_to_base" in r]
    modes = [m for m in MODES if any(r["mode"] == m for r in plain)]
    fig, axes = plt.subplots(len(modes), 1, figsize=(12, 3.6 * len(modes)), squeeze=False)
    for ax, mode in zip(axes[:, 0], modes):
        recs = [r for r in plain if r["mode"] == mode]
        shapes = sorted({(r["M"], r["K"], r["N"], r["r"]) for r in recs})
        xs = {s: i for i, s in enumerate(shapes)}
        for color, prov in enumerate(p for p in providers if p != "base"):
            for p in sorted({r["dropout"] for r in recs}):
                pts = sorted((xs[(r["M"], r["K"], r["N"], r["r"])], r["ratio_to_base"]) for r in recs
                             if r["provider"] == prov and r["dropout"] == p)
                if pts:
                    ax.plot(*zip(*pts), "-" if p == 0 else "--", color=f"C{color}", marker="o",
                            label=f"{prov} p={p:g}")
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks(range(len(shapes)))
        ax.set_xticklabels([f"{M}x{K}x{N}\nr{r}" for M, K, N, r in shapes], fontsize=7)
        ax.set_yscale("log")
        ax.set_ylabel("time / F.linear")
        ax.set_title(f"{title}: {mode}")
        ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary(result: dict, out: Optional[TextIO] = None) -> int:
    """Print (to ``out``, default stdout) what was skipped and why, the table, and the targets
    and gates; returns the number of failed gate checks. ``result`` is what ``lorakern bench
    --json`` writes."""
    out = out or sys.stdout
    print(f"{result['device']}, commit {result['commit']}, torch {result['torch']}, triton {result['triton']}, "
          f"{result['date']}", file=out)
    for p, reasons in result["skipped"].items():
        for why in reasons:
            print(f"skipped {p}: {why}", file=out)
    errors = {(r["provider"], r["graph_error"]) for r in result["records"] if r.get("graph_error")}
    for prov, err in sorted(errors):
        print(f"no CUDA graph for {prov}: {err}", file=out)
    present = {r["provider"] for r in result["records"]}
    print_table(result["records"], [p for p in PROVIDERS if p in present], out=out)
    device_type = "cpu" if result.get("slug", "cpu") == "cpu" else "cuda"
    verdicts = gates.evaluate(result["records"], device_type)
    for line in gates.report_lines(verdicts):
        print(line, file=out)
    bad = gates.failed(verdicts)
    print(f"{len(result['records'])} records in {result['wall_s']} s; "
          f"{'no gate failed' if not bad else f'{len(bad)} gate checks FAILED'}", file=out)
    return len(bad)
