"""Where the eager host time of a lorakern call goes, on a CUDA GPU: one command, under a minute.

    PYTHONPATH=$PWD python3 bench/host_profile.py [--M 16] [--K 4096] [--backend triton]
    python3 bench/host_profile.py --device cpu --backend torch --K 256   # the same report on a CPU

At M = 16 (K = N = 4096, r = 16, bf16) the GPU work is a few microseconds, so a loop of eager
calls runs at the speed of the host: the per-call wall times below are host costs. Printed: the
frozen base F.linear, a PEFT-style chain (F.linear + the two skinny products), and lorakern's
forward and forward+backward; then the top of a cProfile of lorakern's forward+backward, which
names the Python and launch costs (triton's launcher appears as ``jit.py:run``).
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import sys

import torch
import torch.nn.functional as F

import lorakern
from lorakern.benchmark.cases import Shape, Variant
from lorakern.benchmark.providers import default_dtype, make_inputs
from lorakern.benchmark.timing import loop_us, sync


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--M", type=int, default=16)
    ap.add_argument("--K", type=int, default=4096, help="K = N")
    ap.add_argument("--backend", default="triton")
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA GPU (--device cpu --backend torch runs the same report on a CPU)")
        return 2
    M, K, N, R = args.M, args.K, args.K, 16
    dt = default_dtype(dev)
    inp = make_inputs(Shape(M, K, N, R), Variant(), dt, dev)
    x, W, A, B, g = inp.x, inp.W, inp.A, inp.B, inp.grad_y

    def chain():
        return F.linear(x, W) + (x @ A.T) @ B.T * 2.0

    def ours():
        return lorakern.lora_linear(x, W, None, A, B, scaling=2.0, backend=args.backend)

    rows = [("F.linear fwd", lambda: F.linear(x, W)),
            ("PEFT-style fwd", chain), ("PEFT-style fwd+bwd", lambda: torch.autograd.backward(chain(), g)),
            (f"lorakern-{args.backend} fwd", ours),
            (f"lorakern-{args.backend} fwd+bwd", lambda: torch.autograd.backward(ours(), g))]
    where = torch.cuda.get_device_name() if dev.type == "cuda" else "CPU"
    print(f"{where}, M={M} K={K} N={N} r={R} {str(dt)[6:]}: eager wall time per call")
    for name, fn in rows:
        print(f"  {name:<28} {loop_us(fn, dev):8.1f} us")
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(200):
        torch.autograd.backward(ours(), g)
    sync(dev)
    pr.disable()
    print(f"\ncProfile of 200 lorakern-{args.backend} fwd+bwd calls, by own time:")
    pstats.Stats(pr, stream=sys.stdout).sort_stats("tottime").print_stats(25)
    return 0


if __name__ == "__main__":
    sys.exit(main())
