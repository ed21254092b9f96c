"""Records in the schema of bench/README.md, and the ratios derived from a run's records.

>>> recs = [{"provider": p, "mode": "fwd", "M": 16, "K": 64, "N": 64, "r": 4, "dtype": "float32",
...          "dropout": 0.0, "masked": False, "adapters": 0, "median_ms": ms}
...         for p, ms in (("base", 1.0), ("peft", 1.5), ("addmm", 1.2), ("lorakern-auto", 1.1))]
>>> add_ratios(recs)
>>> round(recs[3]["ratio_to_base"], 3), round(recs[3]["speedup_vs_reference"], 3)
(1.1, 1.091)
"""
from __future__ import annotations

import statistics
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from lorakern.benchmark.measure import Item

__all__ = ["to_record", "add_ratios", "dtype_name", "REFERENCES"]

REFERENCES = ("peft", "addmm")  # what a user had before lorakern: the faster of the two is the bar


def dtype_name(dtype: torch.dtype) -> str:
    """``"bfloat16"`` for ``torch.bfloat16``."""
    return str(dtype).removeprefix("torch.")


def to_record(item: "Item", dtype: torch.dtype) -> dict:
    """The item's record in the schema of bench/README.md (ratios come from ``add_ratios``)."""
    c = item.case
    rec = {
        "provider": item.provider, "mode": c.mode, "M": c.shape.M, "K": c.shape.K, "N": c.shape.N,
        "r": c.shape.r, "dtype": dtype_name(dtype), "dropout": c.variant.dropout,
        "median_ms": item.ms, "peak_mem_mb": item.peak_mem_mb,
        "masked": c.variant.masked, "adapters": c.variant.adapters, "n_sets": len(item.steps),
    }
    optional = {"saved_bytes": item.saved_bytes, "cuda_graph": item.graph, "eager_ms": item.eager_ms,
                "graph_ms": item.graph_ms, "graph_error": item.graph_error or None}
    rec.update({k: v for k, v in optional.items() if v is not None})
    if item.samples_ms is not None:
        rec["n_rounds"] = len(item.samples_ms)
        rec["samples_ms"] = item.samples_ms
    return rec


def _shape_key(r: dict) -> tuple:
    return (r["mode"], r["M"], r["K"], r["N"], r["r"], r["dtype"])


def _case_key(r: dict) -> tuple:
    return _shape_key(r) + (r["dropout"], r["masked"], r["adapters"])


def add_ratios(records: list[dict]) -> None:
    """Adds, in place, where the other record exists:

    - ``ratio_to_base``: median over base's median of the same mode and shape;
    - ``paired_ratio_to_base`` (CPU, one interleaved group): the median over rounds of this
      round's time over base's time in the same round, which a machine whose load drifts
      between rounds moves less than the ratio of the two medians;
    - ``speedup_vs_peft``: PEFT's median over this one, same case;
    - ``speedup_vs_reference``: the faster of PEFT and the addmm style over this one, same case;
    - ``ratio_to_half_rank`` (masked records): over the same provider's plain record at half the rank.
    """
    base = {_shape_key(r): r for r in records if r["provider"] == "base"}
    refs: dict[tuple, dict[str, float]] = {}
    for r in records:
        if r["provider"] in REFERENCES:
            refs.setdefault(_case_key(r), {})[r["provider"]] = r["median_ms"]
    plain = {(r["provider"],) + _shape_key(r) + (r["dropout"], r["adapters"]): r["median_ms"] for r in records
             if not r["masked"]}
    for r in records:
        if r["masked"]:
            half = plain.get((r["provider"], r["mode"], r["M"], r["K"], r["N"], r["r"] // 2, r["dtype"],
                              r["dropout"], r["adapters"]))
            if half is not None:
                r["ratio_to_half_rank"] = r["median_ms"] / half
        b = base.get(_shape_key(r))
        if b is not None:
            r["ratio_to_base"] = r["median_ms"] / b["median_ms"]
            if "samples_ms" in r and len(r["samples_ms"]) == len(b.get("samples_ms", ())):
                r["paired_ratio_to_base"] = statistics.median(t / tb for t, tb in zip(r["samples_ms"], b["samples_ms"]))
        ref = refs.get(_case_key(r), {})
        if "peft" in ref:
            r["speedup_vs_peft"] = ref["peft"] / r["median_ms"]
        if ref:
            r["speedup_vs_reference"] = min(ref.values()) / r["median_ms"]
