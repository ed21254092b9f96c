"""Standalone GPU check of the ``cuda`` backend: JIT build, every path vs the float64 oracle, timings.

    PYTHONPATH=$PWD python3 bench/cuda_check.py [--quick]

Builds the extension (ninja, cached), checks forward and every gradient in bf16/fp16/fp32 on
plain, masked, strided, dropout and banked problems against ``reference_lora_linear``, then
times fwd and fwd+bwd at M in {1, 16, 128, 2048, 8192}, K = N = 4096, r = 16, dropout 0 and 0.1,
bf16, against ``F.linear`` (``lorakern.benchmark.timing``: do_bench medians, ms) and prints a compact table.
"""
from __future__ import annotations

import os
import sys
import time

import torch
import torch.nn.functional as F

import lorakern
from lorakern import cuda
from lorakern.benchmark import timing
from lorakern.testing import GRAD_ARGS, GRAD_FACTOR, check_against_oracle, random_problem, tolerance


def check(dt: torch.dtype, M: int, K: int, N: int, R: int, G: int, *, p: float, strided: bool, extras: bool) -> float:
    """The worst relative error of y and every gradient (the base weight's too) against the float64
    oracle (``lorakern.testing.check_against_oracle``); AssertionError past the bounds of docs/contract.md
    section 5 or on a NaN. G = 0: one adapter; ``strided``: x every other column, A column-major;
    ``extras``: bias, per-adapter rank_scale, shared out_scale and rank mask."""
    extra = lambda kind: kind if extras else None  # noqa: E731
    layouts = dict(x="columns", lora_A="column_major") if strided else None
    t, kw = random_problem(M, K, N, R, G=G or None, bias=extras, rank_scale=extra("per_adapter"),
                           out_scale=extra("shared"), rank_mask=extra("shared"), idle_adapter=False,
                           scaling=None if G else 0.7, layouts=layouts, seed=M, device="cuda", dtype=dt)
    keep = cuda.dropout_keep(77, M, K, p, "cuda") if p > 0 else None
    r = check_against_oracle(t, kw, backend="cuda", dropout_p=p, seed=77, keep=keep, grad_args=("weight",) + GRAD_ARGS)
    return max(r.errors.values())


def bench(M: int, K: int, N: int, R: int, p: float):
    """{"base" | "cuda": (fwd ms, fwd+bwd ms)}: medians of ``lorakern.benchmark.timing``."""
    dt, dev = torch.bfloat16, torch.device("cuda")
    x = torch.randn(M, K, device=dev, dtype=dt, requires_grad=True)
    W = torch.randn(N, K, device=dev, dtype=dt) / K**0.5
    A = (torch.randn(R, K, device=dev, dtype=dt) / K**0.5).requires_grad_(True)
    B = (torch.randn(N, R, device=dev, dtype=dt) * 0.01).requires_grad_(True)
    gy = torch.randn(M, N, device=dev, dtype=dt)
    base = lambda: F.linear(x, W)  # noqa: E731
    ours = lambda: lorakern.lora_linear(x, W, None, A, B, scaling=2.0, dropout_p=p, seed=3, backend="cuda")  # noqa: E731

    def fb(f):
        def run():
            torch.autograd.grad(f(), [x, A, B] if f is ours else [x], gy)
        return run

    return {name: (timing.median_ms(f, dev), timing.median_ms(fb(f), dev))
            for name, f in (("base", base), ("cuda", ours))}


def stage_paths(dt: torch.dtype) -> int:
    tol = tolerance("cuda", "cuda", dt)
    cases = [  # M, K, N, R, G, p, strided, extras
        (1, 4096, 4096, 16, 0, 0.0, False, False), (5, 264, 136, 8, 0, 0.1, False, True),
        (16, 520, 300, 16, 0, 0.0, True, True), (67, 131, 97, 5, 0, 0.2, False, True),
        (300, 256, 130, 20, 0, 0.1, True, True), (3, 72, 40, 6, 3, 0.0, False, True),
        (13, 136, 61, 9, 4, 0.2, False, True), (130, 80, 33, 17, 5, 0.15, True, False),
        (2048, 512, 384, 16, 0, 0.1, False, True),
    ]
    bad, worst = 0, 0.0
    for c in cases:
        tag = f"{str(dt)[6:]} M,K,N,R,G={c[:5]} p={c[5]} strided={c[6]} extras={c[7]}"
        print(f"  {tag}: ", end="", flush=True)
        try:
            e = check(dt, *c[:5], p=c[5], strided=c[6], extras=c[7])
            torch.cuda.synchronize()
        except AssertionError as err:  # an error past its bound, or a NaN
            bad += 1
            print(f"FAIL {err}", flush=True)
            continue
        worst = max(worst, e)
        print(f"rel {e:.2e} ok", flush=True)
    print(f"check {str(dt)[6:]}: {len(cases)} cases, worst rel err {worst:.2e} (tol {tol:.0e}, gradients "
          f"{GRAD_FACTOR}x), {bad} failed")
    return bad


def stage_bench(quick: bool) -> None:
    print(f"{'M':>5} {'p':>4} | {'F.linear fwd':>12} {'cuda fwd':>9} {'x':>5} | {'F.linear f+b':>12} "
          f"{'cuda f+b':>9} {'x':>5}   (ms, median, bf16, K=N=4096, r=16)", flush=True)
    for M in ((1, 128) if quick else (1, 16, 128, 2048, 8192)):
        for p in (0.0, 0.1):
            r = bench(M, 4096, 4096, 16, p)
            (bf, bb), (cf, cb) = r["base"], r["cuda"]
            print(f"{M:5d} {p:4.1f} | {bf:12.4f} {cf:9.4f} {cf / bf:5.2f} | {bb:12.4f} {cb:9.4f} {cb / bb:5.2f}",
                  flush=True)


def _stage(name: str) -> int:
    ok, why = cuda.available()
    if not ok:
        print(why)
        return 1
    if name.startswith("paths-"):
        return stage_paths(getattr(torch, name[6:]))
    stage_bench(name == "bench-quick")
    return 0


def main() -> int:
    """Build in this process, then run each stage in its own process so a crash is isolated and shown."""
    import subprocess

    if "--stage" in sys.argv:
        return _stage(sys.argv[sys.argv.index("--stage") + 1])
    t0 = time.time()
    os.environ.setdefault("CUDA_HOME", "/usr/local/cuda")
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}", flush=True)
    path = cuda.build()
    ok, why = cuda.available()
    print(f"build {time.time() - t0:.0f} s: {path}  available={ok} {why}", flush=True)
    if not ok:
        return 1
    stages = ["paths-bfloat16", "paths-float16", "paths-float32",
              "bench-quick" if "--quick" in sys.argv else "bench"]
    failed = []
    for st in stages:
        print(f"[{st}]", flush=True)
        r = subprocess.run([sys.executable, "-X", "faulthandler", __file__, "--stage", st], text=True,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=240)
        out = r.stdout.rstrip().splitlines()
        if r.returncode < 0 or "Fatal Python error" in r.stdout:  # crashed: the fault and the Python stack
            out = [ln for ln in out if ln.strip() and not ln.startswith("Extension modules")][:8]
        print("\n".join(out), flush=True)
        if r.returncode != 0:
            failed.append(f"{st} (rc {r.returncode})")
    print(f"\n{'OK' if not failed else 'FAILED: ' + ', '.join(failed)}; total {time.time() - t0:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
