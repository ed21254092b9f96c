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
from lorakern.reference import reference_lora_linear


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    if torch.isnan(out).any():
        return float("nan")
    return ((out.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def check(dt: torch.dtype, M: int, K: int, N: int, R: int, G: int, *, p: float, strided: bool, extras: bool) -> float:
    """Worst relative error of y and every gradient against the float64 oracle."""
    dev = "cuda"
    rnd = lambda *s: torch.randn(*s, device=dev, dtype=dt)  # noqa: E731
    x, W = rnd(M, K), rnd(N, K) / K**0.5
    A = rnd(*((G,) if G else ()), R, K) / K**0.5
    B = rnd(*((G,) if G else ()), N, R)
    if strided:
        x = torch.cat([x, x], 1)[:, ::2]
        A = A.transpose(-1, -2).contiguous().transpose(-1, -2)
    b = rnd(N) if extras else None
    u = rnd(*((G,) if G else ()), R) if extras else None
    v = rnd(N) if extras else None
    mask = (torch.rand(R, device=dev) > 0.3) if extras else None
    if mask is not None:
        mask[0] = True
    ai = torch.randint(-1, G, (M,), device=dev) if G else None
    scaling = torch.rand(G, device=dev) + 0.5 if G else 0.7
    leaves = [t.requires_grad_(True) for t in (x, W, b, A, B, u, v) if t is not None]
    kw = dict(scaling=scaling, rank_scale=u, rank_mask=mask, out_scale=v, adapter_index=ai)
    y = lorakern.lora_linear(x, W, b, A, B, dropout_p=p, seed=77, backend="cuda", **kw)
    keep = cuda.dropout_keep(77, M, K, p, dev) if p > 0 else None
    d64 = [t.detach().double().requires_grad_(True) for t in leaves]
    it = iter(d64)
    x6, W6 = next(it), next(it)
    b6 = next(it) if b is not None else None
    A6, B6 = next(it), next(it)
    u6 = next(it) if u is not None else None
    v6 = next(it) if v is not None else None
    ref = reference_lora_linear(x6, W6, b6, A6, B6, keep=keep, dropout_p=p, **dict(kw, rank_scale=u6, out_scale=v6))
    gy = torch.randn_like(y)
    errs = [_rel(y, ref.detach())]
    grads = torch.autograd.grad(y, leaves, gy)
    refs = torch.autograd.grad(ref, d64, gy.double())
    errs += [_rel(g, r) for g, r in zip(grads, refs)]
    return max(errs) if all(e == e for e in errs) else float("nan")


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

    return {name: (timing.median_ms(f, dev), timing.median_ms(fb(f), dev)) for name, f in (("base", base), ("cuda", ours))}


def stage_paths(dt: torch.dtype) -> int:
    tol = {torch.bfloat16: 2e-2, torch.float16: 2e-2, torch.float32: 1e-3}[dt]
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
        e = check(dt, *c[:5], p=c[5], strided=c[6], extras=c[7])
        torch.cuda.synchronize()
        ok = e <= tol
        bad += not ok
        worst = max(worst, e) if e == e else float("nan")
        print(f"rel {e:.2e} {'ok' if ok else 'FAIL'}", flush=True)
    print(f"check {str(dt)[6:]}: {len(cases)} cases, worst rel err {worst:.2e} (tol {tol:.0e}), {bad} failed")
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
