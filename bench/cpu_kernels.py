"""Microbenchmark of the CPU extension's masked passes (csrc/cpu/) against the torch path and nn.Dropout.

Per element of x (ns / (M K)), median of timed repeats after warm-up, inputs rotated over several
fresh draws, fp32, r = 16, dropout 0.1, for 1 and 2 threads (torch.set_num_threads):

- mask:   the keep-mask alone. ext: ``dropout_keep`` (bool [M, K] written), the mask's share of
          ``shrink`` (p = 0.1 minus p = 0) and ``dropout`` (x~ written: what the cpu backend's
          ``kept`` hook makes); torch: ``torch.rand(M, K) >= p`` (the torch backend); peft:
          ``nn.Dropout`` forward (``bernoulli_`` and the multiply).
- fwd:    the adapter's forward masked pass, q = x~ A^T. ext: ``shrink`` (what the cpu backend
          runs); x~: ``dropout`` (x~ written) then mm (the cpu backend before shrink was wired);
          torch: rand, where, mm; peft: nn.Dropout, mm.
- bwd:    dx += (dq A) * keep / (1 - p) and dA = dq^T x~. ext: ``masked_At_add_`` (one pass, what
          the cpu backend runs); 2 passes: ``add_masked_`` + ``masked_At``; x~: ``dropout``, mm,
          ``add_masked_`` (the backend before); torch: rand, where, mm, mm, where, add_ (the torch
          backend regenerates the mask); peft: the saved dropout output and mask (autograd of
          nn.Dropout: mul), mm, mm, add_.
- fwd+bwd: the sum (ext, x~, torch, peft), and the ext's ratio to x~, torch and peft.

    python bench/cpu_kernels.py [--reps 15] [--shapes 1024x256,1024x704,4096x2048] [--threads 1,2]
                                [--clock wall|cpu] [--isa avx512|avx2|generic]
"""
from __future__ import annotations

import argparse
import functools
import time

import torch

from lorakern import cpu_ext
from lorakern.benchmark import timing

P, R, SEED = 0.1, 16, 1234


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
CPU = torch.device("cpu")


def _median_ns(fn, inputs, reps: int, clock) -> float:
    """Median time of fn(*inputs[i % len(inputs)]) in ns (the one timing loop, inputs rotated)."""
    step = timing.rotate([functools.partial(fn, *args) for args in inputs])
    return timing.median_ms(step, CPU, warmup_ms=0, rep_ms=0, min_reps=reps, clock=clock) * 1e6


def _inputs(M: int, K: int, sets: int):
    """``sets`` fresh draws of (x, A, dq, dx, dropout mask for the peft backward)."""
    out = []
    for _ in range(sets):
        x = torch.randn(M, K)
        out.append((x, torch.randn(R, K) / K**0.5, torch.randn(M, R), torch.randn(M, K),
                    torch.nn.functional.dropout(torch.ones(M, K), P)))
    return out


def _torch_keep(M, K, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(M, K, generator=gen) >= P


def _torch_fwd(x, A, dq, dx, mask):
    keep = _torch_keep(*x.shape, SEED)
    return torch.mm(torch.where(keep, x, 0), A.T).mul_(1 / (1 - P))


def _torch_bwd(x, A, dq, dx, mask):
    keep = _torch_keep(*x.shape, SEED)
    dqs = dq * (1 / (1 - P))
    dA = torch.mm(dqs.T, torch.where(keep, x, 0))
    dx.add_(torch.where(keep, torch.mm(dqs, A), 0))
    return dA


def _xk_fwd(x, A, dq, dx, mask):
    return torch.mm(cpu_ext.ops().dropout(x, P, SEED), A.T)


def _xk_bwd(x, A, dq, dx, mask):
    ops = cpu_ext.ops()
    dA = torch.mm(dq.T, ops.dropout(x, P, SEED))
    ops.add_masked_(dx, dq, A, None, P, SEED)
    return dA


def _ext_bwd(x, A, dq, dx, mask):
    return cpu_ext.ops().masked_At_add_(dx, dq, x, A, None, P, SEED)


def _ext_bwd_two(x, A, dq, dx, mask):
    ops = cpu_ext.ops()
    ops.add_masked_(dx, dq, A, None, P, SEED)
    return ops.masked_At(dq, x, None, P, SEED)


def _peft_fwd(x, A, dq, dx, mask):
    return torch.mm(torch.nn.functional.dropout(x, P), A.T)


def _peft_bwd(x, A, dq, dx, mask):
    dropped = x * mask  # autograd saved nn.Dropout's output; its backward multiplies by the saved mask
    dA = torch.mm(dq.T, dropped)
    dx.add_(torch.mm(dq, A).mul_(mask))
    return dA


def run(shapes, threads, reps: int, clock: str, isa: str) -> None:
    ops = cpu_ext.ops()
    if isa:
        ops.isa(isa)
    print(f"CPU extension: {ops.isa()} (of {', '.join(ops.isas())}); torch {torch.__version__}; fp32, r = {R}, "
          f"p = {P}; ns per element of x, median of {reps}, {clock} clock")
    head = (f"{'shape':>10} {'thr':>3} | {'mask: ext':>9} {'in shrink':>9} {'x~':>5} {'torch':>6} {'peft':>6} | "
            f"{'fwd: ext':>8} {'x~':>5} {'torch':>6} {'peft':>6} | {'bwd: ext':>8} {'2 passes':>8} {'x~':>5} "
            f"{'torch':>6} {'peft':>6} | {'f+b: ext':>8} {'x~':>5} {'torch':>6} {'peft':>6} | "
            f"{'ext/x~':>6} {'/torch':>6} {'/peft':>6}")
    print(head)
    print("-" * len(head))
    saved = torch.get_num_threads()
    try:
        for M, K in shapes:
            inputs = _inputs(M, K, 4 if M * K < 2**22 else 2)
            n = M * K
            for t in threads:
                torch.set_num_threads(t)
                ns = lambda fn: _median_ns(fn, inputs, reps, CLOCKS[clock]) / n  # noqa: E731
                keep_ext = ns(lambda x, *_: ops.dropout_keep(SEED, M, K, P))
                keep_torch = ns(lambda x, *_: _torch_keep(M, K, SEED))
                keep_peft = ns(lambda x, *_: torch.nn.functional.dropout(x, P))
                fwd_ext = ns(lambda x, A, *_: ops.shrink(x, A, None, P, SEED))
                in_shrink = fwd_ext - ns(lambda x, A, *_: ops.shrink(x, A, None, 0.0, SEED))
                dropped = ns(lambda x, *_: ops.dropout(x, P, SEED))
                fwd = (fwd_ext, ns(_xk_fwd), ns(_torch_fwd), ns(_peft_fwd))
                bwd_two = ns(_ext_bwd_two)
                bwd = (ns(_ext_bwd), ns(_xk_bwd), ns(_torch_bwd), ns(_peft_bwd))
                fb = [f + b for f, b in zip(fwd, bwd)]
                print(f"{M:>5}x{K:<4} {t:>3} | {keep_ext:>9.2f} {in_shrink:>9.2f} {dropped:>5.2f} {keep_torch:>6.2f} "
                      f"{keep_peft:>6.2f} | {fwd[0]:>8.2f} {fwd[1]:>5.2f} {fwd[2]:>6.2f} {fwd[3]:>6.2f} | "
                      f"{bwd[0]:>8.2f} {bwd_two:>8.2f} {bwd[1]:>5.2f} {bwd[2]:>6.2f} {bwd[3]:>6.2f} | "
                      f"{fb[0]:>8.2f} {fb[1]:>5.2f} {fb[2]:>6.2f} {fb[3]:>6.2f} | "
                      f"{fb[0] / fb[1]:>6.2f} {fb[0] / fb[2]:>6.2f} {fb[0] / fb[3]:>6.2f}", flush=True)
    finally:
        torch.set_num_threads(saved)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--shapes", default="1024x256,1024x704,4096x2048", help="MxK,...")
    ap.add_argument("--threads", default="1,2", help="thread counts, comma-separated")
    ap.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                    help="wall time, or the process's CPU time (all its threads: steadier on a shared machine)")
    ap.add_argument("--isa", default="", help="the row kernels' instruction set (default: the best this CPU runs)")
    a = ap.parse_args(argv)
    shapes = [tuple(int(v) for v in s.split("x")) for s in a.shapes.split(",")]
    run(shapes, [int(t) for t in a.threads.split(",")], a.reps, a.clock, a.isa)


if __name__ == "__main__":
    main()
