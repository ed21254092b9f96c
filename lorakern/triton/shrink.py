"""Shrink: ``q = x~ A^T`` in fp32 (per K slice), one pass over x with dropout applied in the kernel.

Used by the forward when the GEMM does not compute q itself (per-row adapters, or where the
configuration table says a separate pass is faster).
"""
from __future__ import annotations

import triton
import triton.language as tl

from lorakern.triton.dropout import keep_tile
from lorakern.triton.grouping import next_adapter, rank_block, row_block, tile_adapters


@triton.jit
def shrink_kernel(
    X, A, Q, RIDX, IDX, PERM,
    M, K, Ra, G, p, inv_keep, seed, k_per_split,
    sxm, sxk, sAg, sAr, sAk, sqs, sqm,
    BM: tl.constexpr, BK: tl.constexpr, RP: tl.constexpr,
    DROPOUT: tl.constexpr, HAS_RIDX: tl.constexpr, BANKED: tl.constexpr, HAS_PERM: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    # Program: BM rows (in visiting order) x all RP compacted ranks over one slice of
    # k_per_split columns, walked in BK steps. With several slices each writes its partial q
    # (Q is [slices, M, Ra]; the GEMM sums them in slice order: no memset, no atomics, the same
    # bits every run), so that few rows still fill the GPU (the keep mask of decode-size inputs
    # is the cost, not the bytes). Registers: the fp32 accumulator [BM, RP], one x tile
    # [BM, BK] (in A's dtype: fp32 adapters get fp32 products) and one A tile [BK, RP]. Per-row adapters: each K step
    # dots the x tile (other adapters' rows zeroed) with the A tile of every adapter present.
    _, mmask, rows = row_block(PERM, tl.program_id(0) * BM, M, BM, HAS_PERM)
    rr, rmask, ranks = rank_block(RIDX, Ra, RP, HAS_RIDX)
    k_lo = tl.program_id(1) * k_per_split
    k_hi = tl.minimum(K, k_lo + k_per_split)
    rk = tl.arange(0, BK)
    x_ptrs = X + rows[:, None] * sxm + (rk + k_lo)[None, :].to(tl.int64) * sxk
    a_ptrs = A + ranks[None, :] * sAr + (rk + k_lo)[:, None].to(tl.int64) * sAk
    if BANKED:
        ad = tile_adapters(IDX, rows, mmask, G)
        first = next_adapter(ad, -1, G)
    ct = A.dtype.element_ty  # the products in the adapters' dtype (fp32 adapters: x widened in registers)
    acc = tl.zeros((BM, RP), tl.float32)
    for k0 in range(k_lo, k_hi, BK):
        kmask = rk + k0 < k_hi
        x = tl.load(x_ptrs, mask=mmask[:, None] & kmask[None, :], other=0.0).to(ct)
        if DROPOUT:
            x = tl.where(keep_tile(seed, rows, k0, K, p, BK), x, 0.0).to(ct)
        amask = kmask[:, None] & rmask[None, :]
        if BANKED:
            g = first
            while g < G:
                a = tl.load(a_ptrs + g.to(tl.int64) * sAg, mask=amask, other=0.0)
                acc = tl.dot(tl.where((ad == g)[:, None], x, 0.0).to(ct), a, acc, input_precision=DOT_PREC)
                g = next_adapter(ad, g, G)
        else:
            a = tl.load(a_ptrs, mask=amask, other=0.0)
            acc = tl.dot(x, a, acc, input_precision=DOT_PREC)
        x_ptrs += BK * sxk
        a_ptrs += BK * sAk
    if DROPOUT:
        acc = acc * inv_keep
    q_ptrs = Q + tl.program_id(1) * sqs + rows[:, None] * sqm + rr[None, :]
    tl.store(q_ptrs, acc, mask=mmask[:, None] & rmask[None, :])
