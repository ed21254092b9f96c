"""Backward kernels: the pass over g (dt, g^T t, db), the dx GEMM, and dA = dq^T x~.

``dq = dt * s * u / (1 - p)`` is never stored: the dx and dA kernels rebuild it from dt with
the same per-row factor as the forward (the 1 / (1 - p) of dropout folded in), and regenerate
the keep-mask from the seed.
"""
from __future__ import annotations

import triton
import triton.language as tl

from lorakern.triton.dropout import keep_tile
from lorakern.triton.fused_gemm import gemm_tile
from lorakern.triton.grouping import next_adapter, rank_block, row_block, row_factor, tile_adapters


@triton.jit
def _gpass_adapter(gt, t, dt, sel, g64, b_ptrs, p_ptrs, V, rn64, nmask, rmask, N, Ra, sBg, sVg, sVn,
                   NEED_DT: tl.constexpr, NEED_P: tl.constexpr, HAS_V: tl.constexpr, BANKED: tl.constexpr,
                   DOT_PREC: tl.constexpr):
    """One adapter's share of a g tile: dt += g (v*B) over its rows; P[g] += g^T t (atomic), the
    products in B's dtype (g widened in registers beside fp32 adapters)."""
    dtype = b_ptrs.dtype.element_ty
    gt = gt.to(dtype)
    if BANKED:
        gt = tl.where(sel[:, None], gt, 0.0).to(dtype)
    if NEED_DT:
        vb = tl.load(b_ptrs + g64 * sBg, mask=nmask[:, None] & rmask[None, :], other=0.0)
        if HAS_V:
            v = tl.load(V + g64 * sVg + rn64 * sVn, mask=nmask, other=0.0)
            vb = vb.to(tl.float32) * v.to(tl.float32)[:, None]
        dt = tl.dot(gt, vb.to(dtype), dt, input_precision=DOT_PREC)
    if NEED_P:
        pt = tl.dot(tl.trans(gt), t.to(dtype), input_precision=DOT_PREC)
        tl.atomic_add(p_ptrs + g64 * N * Ra, pt, mask=nmask[:, None] & rmask[None, :])
    return dt


@triton.jit
def gpass_kernel(
    GY, B, V, Q, DT, P, DB, RIDX, U, SG, IDX, PERM,
    M, N, Ra, G, scaling, n_per_split,
    sgm, sgn, sBg, sBn, sBr, sUg, sUr, sVg, sVn, sqm, sdts, sdtm,
    BM: tl.constexpr, BN: tl.constexpr, RP: tl.constexpr,
    NEED_DT: tl.constexpr, NEED_P: tl.constexpr, NEED_DB: tl.constexpr,
    HAS_RIDX: tl.constexpr, HAS_U: tl.constexpr, HAS_V: tl.constexpr, HAS_SG: tl.constexpr,
    BANKED: tl.constexpr, HAS_PERM: tl.constexpr, DOT_PREC: tl.constexpr,
):
    # Program: BM rows x one slice of n_per_split columns of g, walked in BN steps; g is read
    # once over the grid. Registers: dt [BM, RP] fp32 (summed over the slice, then stored as
    # this slice's partial: DT is [slices, M, Ra], which the caller sums in slice order), t [BM, RP],
    # one g tile [BM, BN], one (v*B) tile [BN, RP]. Each step adds its g^T t tile [BN, RP] (P,
    # fp32 [G, N, Ra]) and the column sums of g (db) atomically.
    _, mmask, rows = row_block(PERM, tl.program_id(0) * BM, M, BM, HAS_PERM)
    rr, rmask, ranks = rank_block(RIDX, Ra, RP, HAS_RIDX)
    ad = tl.zeros((BM,), tl.int32)
    if BANKED:
        ad = tile_adapters(IDX, rows, mmask, G)
        first = next_adapter(ad, -1, G)
    qmask = mmask[:, None] & rmask[None, :]
    t = tl.zeros((BM, RP), tl.float32)
    if NEED_P:
        q = tl.load(Q + rows[:, None] * sqm + rr[None, :], mask=qmask, other=0.0)
        t = q * row_factor(ad, ranks, rr, Ra, scaling, SG, U, sUg, sUr, BM, RP, HAS_SG, HAS_U, BANKED)
    dt = tl.zeros((BM, RP), tl.float32)
    n_lo = tl.program_id(1) * n_per_split
    n_hi = tl.minimum(N, n_lo + n_per_split)
    for n0 in range(n_lo, n_hi, BN):
        rn = n0 + tl.arange(0, BN)
        nmask = rn < n_hi
        rn64 = rn.to(tl.int64)
        gt = tl.load(GY + rows[:, None] * sgm + rn64[None, :] * sgn,
                     mask=mmask[:, None] & nmask[None, :], other=0.0)
        if NEED_DB:
            tl.atomic_add(DB + rn, tl.sum(gt.to(tl.float32), axis=0), mask=nmask)
        b_ptrs = B + rn64[:, None] * sBn + ranks[None, :] * sBr
        p_ptrs = P + rn64[:, None] * Ra + rr[None, :]
        if BANKED:
            g = first
            while g < G:
                dt = _gpass_adapter(gt, t, dt, ad == g, g.to(tl.int64), b_ptrs, p_ptrs, V, rn64, nmask, rmask,
                                    N, Ra, sBg, sVg, sVn, NEED_DT, NEED_P, HAS_V, True, DOT_PREC)
                g = next_adapter(ad, g, G)
        else:
            dt = _gpass_adapter(gt, t, dt, mmask, 0, b_ptrs, p_ptrs, V, rn64, nmask, rmask,
                                N, Ra, sBg, sVg, sVn, NEED_DT, NEED_P, HAS_V, False, DOT_PREC)
    if NEED_DT:
        tl.store(DT + tl.program_id(1) * sdts + rows[:, None] * sdtm + rr[None, :], dt, mask=qmask)


@triton.jit
def dx_kernel(
    GY, W, GD, WD, A, DT, DX, X, DA, RIDX, U, SG, IDX, PERM, BS,
    M, N, K, Ra, G, scaling, p, seed,
    sgm, sgn, swn, swk, sAg, sAr, sAk, sUg, sUr, sdtm, sdxm, sdxk, sxm, sxk, sbs,
    BM: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr, RP: tl.constexpr, GROUP_M: tl.constexpr,
    FUSE_DA: tl.constexpr, TMA: tl.constexpr, HAS_BS: tl.constexpr, DROPOUT: tl.constexpr,
    HAS_RIDX: tl.constexpr, HAS_U: tl.constexpr, HAS_SG: tl.constexpr, BANKED: tl.constexpr, HAS_PERM: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    # Program: one [BM, BK] tile of dx = (g * c) W (c: the base scale, HAS_BS), the inner loop
    # over N in BN steps; then the adapter part (dq A) [BM, BK] per adapter in the tile, times
    # keep / (1 - p) (the 1 / (1 - p) is in dq), added in the epilogue. Registers: the fp32
    # accumulator [BM, BK] (and a second one for the adapter part with dropout, so configurations
    # halve BK then), one g tile [BM, BN], one W tile [BN, BK], then dq [BM, RP] and one A tile
    # [RP, BK], multiplied in A's dtype. With FUSE_DA the epilogue also reads the x tile [BM, BK]
    # and adds dq^T x~ [RP, BK] to dA (fp32, atomic), so the keep-mask is generated once for dx
    # and dA. TMA: g and W tiles come through tensor descriptors GD [M, N] and WD [N, K] (rows in
    # order: one adapter). With N = 0 (the fold-in plan) the N loop is empty and the program writes
    # the adapter's term (dq A) * keep / (1 - p) alone, onto which cuBLAS then adds g W.
    pid_m, pid_k, mmask, rows, rr, rmask, ranks, rk, kmask = gemm_tile(PERM, RIDX, M, K, Ra, BM, BK, RP, GROUP_M,
                                                                       HAS_PERM, HAS_RIDX, TMA)
    rn = tl.arange(0, BN)
    rk64 = rk.to(tl.int64)
    g_ptrs = GY + rows[:, None] * sgm + rn[None, :].to(tl.int64) * sgn
    w_ptrs = W + rn[:, None].to(tl.int64) * swn + rk64[None, :] * swk
    acc = tl.zeros((BM, BK), tl.float32)
    for n0 in range(0, N, BN):
        nmask = rn + n0 < N
        if TMA:  # whole tiles by the copy engine, zero-filled past M, N and K
            gt = GD.load([pid_m * BM, n0])
            w = WD.load([n0, pid_k * BK])
        else:
            gt = tl.load(g_ptrs, mask=mmask[:, None] & nmask[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=nmask[:, None] & kmask[None, :], other=0.0)
        if HAS_BS:
            c = tl.load(BS + (rn + n0).to(tl.int64) * sbs, mask=nmask, other=0.0).to(tl.float32)
            gt = (gt.to(tl.float32) * c[None, :]).to(GY.dtype.element_ty)
        acc = tl.dot(gt, w, acc, input_precision=DOT_PREC)
        g_ptrs += BN * sgn
        w_ptrs += BN * swn
    ad = tl.zeros((BM,), tl.int32)
    if BANKED:
        ad = tile_adapters(IDX, rows, mmask, G)
    inv_keep = 1.0 / (1.0 - p)
    dq = tl.load(DT + rows[:, None] * sdtm + rr[None, :], mask=mmask[:, None] & rmask[None, :], other=0.0)
    dq = dq * (row_factor(ad, ranks, rr, Ra, scaling, SG, U, sUg, sUr, BM, RP, HAS_SG, HAS_U, BANKED) * inv_keep)
    dtype = A.dtype.element_ty  # the adapter's products in A's dtype
    a_ptrs = A + ranks[:, None] * sAr + rk64[None, :] * sAk
    amask = rmask[:, None] & kmask[None, :]
    if DROPOUT:  # the adapter part needs its own accumulator for the mask
        keep = keep_tile(seed, rows, pid_k * BK, K, p, BK)
        part = tl.zeros((BM, BK), tl.float32)
    else:  # no mask: it rides the main accumulator (a second [BM, BK] fp32 tile would spill)
        part = acc
    if FUSE_DA:
        x = tl.load(X + rows[:, None] * sxm + rk64[None, :] * sxk, mask=mmask[:, None] & kmask[None, :],
                    other=0.0).to(dtype)
        if DROPOUT:
            x = tl.where(keep, x, 0.0).to(dtype)
        da_ptrs = DA + rr[:, None].to(tl.int64) * K + rk64[None, :]
    g = next_adapter(ad, -1, G)
    while g < G:
        g64 = g.to(tl.int64)
        dqg = tl.where((ad == g)[:, None], dq, 0.0).to(dtype)
        part = tl.dot(dqg, tl.load(a_ptrs + g64 * sAg, mask=amask, other=0.0), part, input_precision=DOT_PREC)
        if FUSE_DA:
            tl.atomic_add(da_ptrs + g64 * Ra * K, tl.dot(tl.trans(dqg), x, input_precision=DOT_PREC), mask=amask)
        g = next_adapter(ad, g, G)
    if DROPOUT:
        acc += tl.where(keep, part, 0.0)
    else:
        acc = part
    tl.store(DX + rows[:, None] * sdxm + rk64[None, :] * sdxk, acc.to(DX.dtype.element_ty),
             mask=mmask[:, None] & kmask[None, :])


@triton.jit
def dA_kernel(
    X, DT, DA, RIDX, U, SG, IDX, PERM,
    M, K, Ra, G, scaling, p, seed, rows_per_split,
    sxm, sxk, sUg, sUr, sdtm,
    BM: tl.constexpr, BK: tl.constexpr, RP: tl.constexpr,
    DROPOUT: tl.constexpr, HAS_RIDX: tl.constexpr, HAS_U: tl.constexpr, HAS_SG: tl.constexpr,
    BANKED: tl.constexpr, HAS_PERM: tl.constexpr, WIDE: tl.constexpr, DOT_PREC: tl.constexpr,
):
    # Program: one [RP, BK] column tile of dA (fp32 [G, Ra, K]) over one slice of rows_per_split
    # rows (visiting order), walked in BM steps. Registers: the fp32 accumulator [RP, BK] of the
    # current adapter, one x~ tile [BM, BK] (keep-mask regenerated) and dq [BM, RP]. Rows come
    # sorted by adapter, so the accumulator is added to DA (atomically) only when the adapter
    # changes and at the end. WIDE: the products in fp32 (fp32 adapters), x tiles widened.
    rr, rmask, ranks = rank_block(RIDX, Ra, RP, HAS_RIDX)
    rk = tl.program_id(0) * BK + tl.arange(0, BK)
    kmask = rk < K
    rk64 = rk.to(tl.int64)
    inv_keep = 1.0 / (1.0 - p)
    if WIDE:
        dtype = DA.dtype.element_ty
    else:
        dtype = X.dtype.element_ty
    da_ptrs = DA + rr[:, None].to(tl.int64) * K + rk64[None, :]
    da_mask = rmask[:, None] & kmask[None, :]
    m_lo = tl.program_id(1) * rows_per_split
    m_hi = tl.minimum(M, m_lo + rows_per_split)
    acc = tl.zeros((RP, BK), tl.float32)
    cur = tl.program_id(0) * 0 - (1 if BANKED else 0)  # adapter of acc (-1: none yet)
    for m0 in range(m_lo, m_hi, BM):
        _, mmask, rows = row_block(PERM, m0, m_hi, BM, HAS_PERM)
        x = tl.load(X + rows[:, None] * sxm + rk64[None, :] * sxk, mask=mmask[:, None] & kmask[None, :],
                    other=0.0).to(dtype)
        if DROPOUT:
            x = tl.where(keep_tile(seed, rows, tl.program_id(0) * BK, K, p, BK), x, 0.0).to(dtype)
        ad = tl.zeros((BM,), tl.int32)
        if BANKED:
            ad = tile_adapters(IDX, rows, mmask, G)
        dq = tl.load(DT + rows[:, None] * sdtm + rr[None, :], mask=mmask[:, None] & rmask[None, :], other=0.0)
        dq = dq * (row_factor(ad, ranks, rr, Ra, scaling, SG, U, sUg, sUr, BM, RP, HAS_SG, HAS_U, BANKED)
                   * inv_keep)
        if BANKED:
            g = next_adapter(ad, -1, G)
            while g < G:
                flush = (g != cur) & (cur >= 0)
                tl.atomic_add(da_ptrs + cur.to(tl.int64) * Ra * K, acc, mask=da_mask & flush)
                acc = tl.where(g != cur, 0.0, acc)
                cur = g
                acc = tl.dot(tl.trans(tl.where((ad == g)[:, None], dq, 0.0).to(dtype)), x, acc, input_precision=DOT_PREC)
                g = next_adapter(ad, g, G)
        else:
            acc = tl.dot(tl.trans(dq.to(dtype)), x, acc, input_precision=DOT_PREC)
    tl.atomic_add(da_ptrs + tl.maximum(cur, 0).to(tl.int64) * Ra * K, acc, mask=da_mask & (cur >= 0))
