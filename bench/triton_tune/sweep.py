"""The triton backend's kernels at M = 8192 (bf16, dropout 0 and 0.1): a breakdown by gradient, then
candidate launch plans per kernel kind, forced through ``configs.planning``, until a deadline.

``sweep`` returns (and ``--json`` writes) every timing as ``{"kind", "dropout", "entries", "ms"}``;
``bench/make_autotable.py --tune`` turns the fastest entries per kind into the GPU's table of
``lorakern/launchplans.json``.
"""
from __future__ import annotations

import time
from typing import Callable

import torch
import torch.nn.functional as F

import lorakern
from lorakern.benchmark import timing
from lorakern.benchmark.cases import Shape, Variant
from lorakern.benchmark.providers import make_inputs
from lorakern.triton import configs

from .check import short

_FWD = dict(BM=128, BN=256, BK=64, GROUP_M=8, num_warps=8)
_DX = dict(BM=128, BK=256, BN=64, GROUP_M=8, num_warps=8)
CANDIDATES: dict[str, list[dict]] = {
    "fwd": [dict(_FWD, num_stages=3, FUSE_Q=True), dict(_FWD, num_stages=3, FUSE_Q=True, TMA=True),
            dict(_FWD, num_stages=4, FUSE_Q=True, TMA=True), dict(_FWD, num_stages=3, FUSE_Q=False),
            dict(_FWD, BN=128, num_stages=4, FUSE_Q=False), dict(_FWD, BM=256, BN=128, num_stages=3, FUSE_Q=False),
            dict(_FWD, num_stages=4, FUSE_Q=False)],
    "dx": [dict(_DX, num_stages=3, FUSE_DA=False), dict(_DX, num_stages=3, FUSE_DA=False, TMA=True),
           dict(_DX, num_stages=4, FUSE_DA=False, TMA=True), dict(_DX, num_stages=3, FUSE_DA=True),
           dict(_DX, BK=128, num_stages=4, FUSE_DA=False), dict(_DX, BM=256, BK=128, num_stages=3, FUSE_DA=False)],
    "gpass": [dict(CUBLAS=True), dict(BM=128, BN=128, num_warps=8, num_stages=3, CUBLAS=False),
              dict(BM=128, BN=128, num_warps=8, num_stages=3, P_APART=True, CUBLAS=False),
              dict(BM=64, BN=128, num_warps=4, num_stages=3, CUBLAS=False),
              dict(BM=128, BN=64, num_warps=4, num_stages=4, CUBLAS=False)],
    "dA": [dict(BM=64, BK=128, num_warps=4, num_stages=3), dict(BM=128, BK=64, num_warps=4, num_stages=3),
           dict(BM=64, BK=64, num_warps=4, num_stages=4)],
    "shrink": [dict(BM=64, BK=128, num_warps=4, num_stages=4), dict(BM=128, BK=64, num_warps=4, num_stages=4),
               dict(BM=32, BK=256, num_warps=4, num_stages=3)],
}
# what else a kind's candidates need forced to run at all, and which breakdown row times them
NEEDS = {"fwd": ({}, "forward"), "shrink": ({"fwd": {"FUSE_Q": False}}, "forward"), "dx": ({}, "full bwd"),
         "gpass": ({}, "dB (g-pass P)"), "dA": ({"dx": {"FUSE_DA": False}}, "dA (+g-pass dt)")}


def _steps(M: int, K: int, N: int, R: int, p: float) -> tuple[dict[str, Callable[[], object]], Callable, Callable]:
    """({breakdown row: step}, F.linear step, g @ W step) over one bf16 problem."""
    inp = make_inputs(Shape(M, K, N, R), Variant(), torch.bfloat16, torch.device("cuda"))
    x, W, A, B, g = inp.x, inp.W, inp.A, inp.B, inp.grad_y

    def op():
        return lorakern.lora_linear(x, W, None, A, B, scaling=2.0, dropout_p=p, seed=5, backend="triton")

    def forward():
        with torch.no_grad():
            op()

    def grads(*wrt):  # the backward alone, over a graph made once
        y = op()
        return lambda: torch.autograd.grad(y, list(wrt), g, retain_graph=True)

    rows = {"forward": forward, "dx (+g-pass dt)": grads(x), "dA (+g-pass dt)": grads(A),
            "dB (g-pass P)": grads(B), "full bwd": grads(x, A, B)}
    return rows, lambda: F.linear(x, W), lambda: torch.mm(g, W)


def sweep(deadline: float, full: bool, M: int = 8192, K: int = 4096, N: int = 4096, R: int = 16) -> list[dict]:
    """Print the breakdown and the candidates' times (two per kind, all with ``full``) until
    ``deadline`` (``time.time()``); returns ``[{"kind", "dropout", "entries", "ms"}, ...]``.
    Ratios are to F.linear (forward rows) or to g @ W (backward rows: the backward alone)."""
    dev = torch.device("cuda")
    results: list[dict] = []
    for p in (0.0, 0.1):
        rows, base, dgrad = _steps(M, K, N, R, p)
        tb, tdx = timing.median_ms(base, dev), timing.median_ms(dgrad, dev)
        print(f"\nkernels at M={M} K={K} N={N} r={R} bf16 p={p}: F.linear {tb:.4f} ms, g@W {tdx:.4f} ms")
        for name, fn in rows.items():
            ref = tb if name == "forward" else tdx
            try:
                t = timing.median_ms(fn, dev)
                print(f"p={p} {name:16s} {t:8.4f} ms ({t / ref:4.2f})", flush=True)
            except Exception as e:  # report, keep going
                print(f"p={p} {name:16s} ERROR {short(e)}")
        for kind, cands in CANDIDATES.items():
            forced, row = NEEDS[kind]
            ref = tb if row == "forward" else tdx
            for c in cands if full else cands[:2]:
                if time.time() > deadline:
                    print("(deadline: rest of the sweep skipped)")
                    return results
                try:
                    with configs.planning(**{**forced, kind: c}):
                        t = timing.median_ms(rows[row], dev)
                except Exception as e:  # a plan that does not fit (shared memory): say so, go on
                    print(f"p={p} {kind:6s} failed {c}: {short(e)}")
                    continue
                results.append({"kind": kind, "dropout": p > 0, "entries": c, "ms": t})
                print(f"p={p} {kind:6s} {t:8.4f} ms ({t / ref:4.2f}) {c}", flush=True)
    return results
