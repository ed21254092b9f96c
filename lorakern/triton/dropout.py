"""The dropout keep-mask of the native backends: four keep decisions per Philox call.

Element (row, col) of x is kept iff ``U(word col % 4 of Philox(seed, row * ceil(K / 4) + col // 4)) > p``:
Philox-4x32-10 with counter (c & 0xffffffff, c >> 32, 0, 0) for the int64 counter c and key
(seed & 0xffffffff, seed >> 32), each word turned into U[0, 1) as ``tl.rand`` does it
(ARCHITECTURE.md). ``row`` is the row of the flattened x whatever order a kernel visits rows in;
the groups of four never span rows, so a tile whose columns start at a multiple of 4 needs one
Philox call per four of its elements.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from lorakern import alloc


@triton.jit
def keep_tile(seed, rows, k0, K, p, BK: tl.constexpr):
    """bool [len(rows), BK]: the keep-mask at ``rows`` x columns k0 .. k0 + BK - 1 (k0 % 4 == 0).

    One Philox call per [row, group of 4 columns]: a [len(rows), BK / 4] block of calls, whose
    four output words are interleaved back into column order."""
    tl.static_assert(BK % 4 == 0, "keep_tile: BK must be a multiple of 4")
    groups = (k0 // 4 + tl.arange(0, BK // 4)).to(tl.int64)
    c = rows.to(tl.int64)[:, None] * ((K + 3) // 4) + groups[None, :]
    w0, w1, w2, w3 = tl.randint4x(seed, c)
    u0, u1 = tl.uint_to_uniform_float(w0), tl.uint_to_uniform_float(w1)
    u2, u3 = tl.uint_to_uniform_float(w2), tl.uint_to_uniform_float(w3)
    return tl.interleave(tl.interleave(u0, u2), tl.interleave(u1, u3)) > p


@triton.jit
def _keep_kernel(OUT, M, K, p, seed, BM: tl.constexpr, BK: tl.constexpr):
    # One [BM, BK] tile of the mask per program; nothing is kept beyond the tile in registers.
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    k0 = tl.program_id(1) * BK
    rk = k0 + tl.arange(0, BK)
    keep = keep_tile(seed, rm, k0, K, p, BK)
    ptrs = OUT + rm.to(tl.int64)[:, None] * K + rk[None, :]
    tl.store(ptrs, keep.to(tl.int8), mask=(rm[:, None] < M) & (rk[None, :] < K))


def dropout_keep(seed: int, M: int, K: int, p: float, device) -> torch.Tensor:
    """The keep-mask the triton kernels use, bool [M, K].

    >>> dropout_keep(7, 3, 5, 0.5, "cuda").shape  # doctest: +SKIP
    torch.Size([3, 5])
    """
    out = alloc.empty((M, K), dtype=torch.int8, device=device)
    if M and K:
        grid = (-(-M // 32), -(-K // 64))
        _keep_kernel[grid](out, M, K, float(p), int(seed), BM=32, BK=64)
    return out.bool()
