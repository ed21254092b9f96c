"""Correctness of the triton backend's paths against the float64 oracle (``lorakern.testing``).

Paths: q fused or not, dropout, rank_scale / mask / out_scale, banks with adapter_index (-1 rows
and an adapter without rows included), strided views; in bf16, fp16 and fp32, forward and every
gradient, within ``lorakern.testing``'s tolerances. Triton's compile time is what limits it: two
cases per dtype by default, all of them in bf16 with ``full``.
"""
from __future__ import annotations

import torch

import lorakern.triton
from lorakern.testing import check_against_oracle, random_problem
from lorakern.triton import configs

STRIDED = {"x": "columns", "lora_A": "columns", "lora_B": "column_major"}
CASES = [
    ("plain fused q, dA", dict(fuse=True)), ("plain separate passes", dict(fuse=False)),
    ("dropout 0.1", dict(p=0.1)), ("decode M=1 dropout", dict(M=1, p=0.1)),
    ("strided scales+mask+drop", dict(layouts=STRIDED, rank_scale=True, out_scale=True, rank_mask=True, p=0.2)),
    ("bank scales+mask+dropout", dict(G=5, rank_scale=True, out_scale=True, rank_mask=True, p=0.1)),
    ("bank strided decode", dict(G=3, layouts=STRIDED, M=16)), ("M=200 (q in the GEMM)", dict(M=200)),
]
EVERY_DTYPE = ("plain separate passes", "bank scales+mask+dropout")  # the rest in bf16 with --full-check


def short(e: Exception) -> str:
    """One line of an exception: the compiler's first 'error:' line if any, else the last line."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()] or [type(e).__name__]
    err = [ln for ln in lines if "error:" in ln]
    return f"{type(e).__name__}: {(err or lines)[0 if err else -1][:160]}"


def check_case(dt: torch.dtype, M: int = 1031, p: float = 0.0, fuse=None, **problem) -> float:
    """The worst relative error over y and every gradient of one problem (K=1000, N=777, R=13).

    Raises:
        AssertionError: an error past its tolerance, a NaN (an element left unwritten) or a wrong shape.
    """
    t, kw = random_problem(M, 1000, 777, 13, device="cuda", dtype=dt, scaling=None if "G" in problem else 0.5,
                           **problem)
    keep = lorakern.triton.dropout_keep(5, M, 1000, p, "cuda") if p else None
    forced = {} if fuse is None else dict(fwd={"FUSE_Q": fuse}, dx={"FUSE_DA": fuse})
    with configs.planning(**forced):
        result = check_against_oracle(t, kw, backend="triton", dropout_p=p, seed=5, keep=keep)
    return max(result.errors.values())


def correctness(full: bool) -> bool:
    """Print one line per (case, dtype); True when every case is within tolerance."""
    ok = True
    print(f"{'case':28s} {'dtype':9s} {'worst rel err':>13s}  (lorakern.testing's tolerances)")
    for dt in (torch.bfloat16, torch.float16, torch.float32):
        for name, case in CASES:
            if (dt != torch.bfloat16 or not full) and name not in EVERY_DTYPE:
                continue
            try:
                worst = check_case(dt, **case)
            except AssertionError as e:
                print(f"{name:28s} {str(dt)[6:]:9s} {'FAIL':>13s}  {e}")
                ok = False
            except Exception as e:  # a kernel that does not compile or launch: report it, go on
                print(f"{name:28s} {str(dt)[6:]:9s} {'ERROR':>13s}  {short(e)}")
                ok = False
            else:
                print(f"{name:28s} {str(dt)[6:]:9s} {worst:13.2e}  ok")
    return ok
