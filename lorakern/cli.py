"""``lorakern check | bench | demo``: the command line.

Each subcommand lives in its own module (``check`` here; ``lorakern.benchmark``; ``lorakern.demo``)
and takes its own arguments; this file only dispatches.
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import Optional, Sequence

import torch


def _median_ms(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return times[len(times) // 2]


def check(argv: Optional[Sequence[str]] = None) -> int:
    """Run the op on every backend available here: error against the float64 oracle, time against F.linear."""
    from lorakern.ops import BACKENDS, backend_status, lora_linear
    from lorakern.ops import get_backend
    from lorakern.reference import reference_lora_linear

    ap = argparse.ArgumentParser(prog="lorakern check")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("-M", type=int, default=1024)
    ap.add_argument("-K", type=int, default=1024)
    ap.add_argument("-N", type=int, default=1024)
    ap.add_argument("-r", type=int, default=16)
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    M, K, N, r = args.M, args.K, args.N, args.r
    torch.manual_seed(0)
    x = torch.randn(M, K, device=dev, dtype=dtype)
    W = torch.randn(N, K, device=dev, dtype=dtype) / K**0.5
    b = torch.randn(N, device=dev, dtype=dtype)
    A = torch.randn(r, K, device=dev, dtype=dtype) / K**0.5
    B = torch.randn(N, r, device=dev, dtype=dtype)
    print(f"lorakern check on {dev} ({torch.cuda.get_device_name(dev) if dev.type == 'cuda' else 'CPU'}), "
          f"{str(dtype)[6:]}, M={M} K={K} N={N} r={r}, dropout 0.1, forward+backward")
    print(f"{'backend':<8} {'status':<12} {'rel err fwd':>12} {'rel err dx':>12} {'ms':>9} {'x base':>8}")
    base_ms = _median_ms(lambda: _fwd_bwd(lambda xx: torch.nn.functional.linear(xx, W, b), x), 7)
    print(f"{'F.linear':<8} {'(floor)':<12} {'':>12} {'':>12} {base_ms:9.3f} {1.0:8.2f}")
    failed = False
    for name in BACKENDS:
        ok, why = backend_status(name)
        if ok and name != "torch" and dev.type != "cuda":
            ok, why = False, "unavailable: needs a CUDA device"
        if not ok:
            print(f"{name:<8} {why}")
            continue
        keep = get_backend(name).dropout_keep(7, M, K, 0.1, dev)
        xr = x.detach().double().requires_grad_()
        g = torch.randn(M, N, device=dev, dtype=dtype)
        ref = reference_lora_linear(xr, W, b, A, B, scaling=2.0, keep=keep, dropout_p=0.1)
        (dx_ref,) = torch.autograd.grad(ref, xr, g.double())
        xx = x.detach().requires_grad_()
        y = lora_linear(xx, W, b, A, B, scaling=2.0, dropout_p=0.1, seed=7, backend=name)
        (dx,) = torch.autograd.grad(y, xx, g)
        e_y = ((y.double() - ref).norm() / ref.norm()).item()
        e_dx = ((dx.double() - dx_ref).norm() / dx_ref.norm()).item()
        fn = lambda xx: lora_linear(xx, W, b, A, B, scaling=2.0, dropout_p=0.1, seed=7, backend=name)  # noqa: E731
        ms = _median_ms(lambda: _fwd_bwd(fn, x), 7)
        tol = 1e-2 if dtype != torch.float32 else 5e-4
        good = e_y <= tol and e_dx <= tol
        failed |= not good
        print(f"{name:<8} {'ok' if good else 'WRONG':<12} {e_y:12.2e} {e_dx:12.2e} {ms:9.3f} {ms / base_ms:8.2f}")
    return 1 if failed else 0


def _fwd_bwd(fn, x):
    xx = x.detach().requires_grad_()
    y = fn(xx)
    y.backward(torch.ones_like(y))


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("check", "bench", "demo"):
        print("usage: lorakern {check,bench,demo} [options]", file=sys.stderr)
        return 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "check":
        return check(rest)
    if cmd == "bench":
        from lorakern.benchmark import main as bench_main

        return bench_main(rest)
    from lorakern.demo import main as demo_main

    return demo_main(rest)


if __name__ == "__main__":
    sys.exit(main())
