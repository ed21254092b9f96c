"""The dropout keep-mask of the native backends: ``keep = tl.rand(seed, row * K + col) > p``.

The offset is computed in int64, so the stream is Philox-4x32-10 with counter
(off & 0xffffffff, off >> 32, 0, 0) and key (seed & 0xffffffff, seed >> 32), as ARCHITECTURE.md
fixes it; ``row`` is the row of the flattened x whatever order a kernel visits rows in.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from lorakern import alloc


@triton.jit
def keep_tile(seed, rows, cols, K, p):
    """bool [len(rows), len(cols)]: the keep-mask at (rows, cols); rows and cols are int vectors."""
    off = rows.to(tl.int64)[:, None] * K + cols.to(tl.int64)[None, :]
    return tl.rand(seed, off) > p


@triton.jit
def _keep_kernel(OUT, M, K, p, seed, BM: tl.constexpr, BK: tl.constexpr):
    # One [BM, BK] tile of the mask per program; nothing is kept beyond the tile in registers.
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rk = tl.program_id(1) * BK + tl.arange(0, BK)
    keep = keep_tile(seed, rm, rk, K, p)
    ptrs = OUT + rm.to(tl.int64)[:, None] * K + rk[None, :]
    tl.store(ptrs, keep.to(tl.int8), mask=(rm[:, None] < M) & (rk[None, :] < K))


def dropout_keep(seed: int, M: int, K: int, p: float, device) -> torch.Tensor:
    """The keep-mask the triton kernels use, bool [M, K].

    >>> dropout_keep(7, 3, 5, 0.5, "cuda").shape  # doctest: +SKIP
    torch.Size([3, 5])
    """
    out = alloc.empty((M, K), dtype=torch.int8, device=device)
    if M and K:
        grid = (triton.cdiv(M, 32), triton.cdiv(K, 64))
        _keep_kernel[grid](out, M, K, float(p), int(seed), BM=32, BK=64)
    return out.bool()
