"""F.linear, the addmm style and the triton backend at K = N = 4096, r = 16, bf16: ``lorakern bench``'s
run (inputs rotated past L2, decode sizes also as CUDA-graph replays) and its table."""
from __future__ import annotations

import torch

from lorakern import benchmark as bm

PROVIDERS = ("base", "addmm", "lorakern-triton")


def timings(Ms=(1, 16, 128, 2048, 8192), K: int = 4096, N: int = 4096, R: int = 16) -> list[dict]:
    """Time fwd and fwd+bwd with dropout 0 and 0.1 on the GPU, print the table; returns the records."""
    device = torch.device("cuda")
    cases = [bm.Case(mode, bm.Shape(M, K, N, R), bm.Variant(dropout=p))
             for mode in ("fwd", "fwdbwd") for M in Ms for p in (0.0, 0.1)]
    settings = bm.Settings(l2_bytes=bm.l2_bytes(device))
    records, skipped = bm.run(cases, PROVIDERS, device, torch.bfloat16, settings, log=lambda s: None)
    for prov, reasons in skipped.items():
        print(f"skipped {prov}: {'; '.join(reasons)}")
    print(f"\nbf16 K={K} N={N} r={R}:")
    bm.print_table(records, PROVIDERS)
    return records
