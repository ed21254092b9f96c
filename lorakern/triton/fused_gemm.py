"""Forward GEMM over the concatenated inner dimension: ``y = [x | t] . [W | v*B]^T + b``.

With a base scale c [N] the accumulator is multiplied by c between the K loop and the adapter
steps, so ``y = c * (x W^T) + t (v*B)^T + b`` still takes one pass.

The K loop runs over x / W tiles; the adapter adds one more inner step per adapter present in
the tile, reading t (from q, scaled by s * u per row) and B (scaled by v) from their own
pointers: the concatenation is never materialised and y is written once. With ``FUSE_Q`` the K
loop also accumulates ``q = x~ A^T`` from the x tile it already holds (one kernel for the whole
forward; the programs with pid_n == 0 write q); otherwise it reads the shrink's q, or sums the
shrink's per-K-slice partials in slice order and the programs with pid_n == 0 write the sum.
"""
from __future__ import annotations

import triton
import triton.language as tl

from lorakern.triton.dropout import keep_tile
from lorakern.triton.grouping import next_adapter, rank_block, row_block, row_factor, tile_adapters


@triton.jit
def grouped_pid(pid, num_m, num_n, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) with GROUP_M row blocks sharing each column sweep (L2 reuse of W)."""
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    return first_m + (pid % per_group) % size_m, (pid % per_group) // size_m


@triton.jit
def gemm_tile(PERM, RIDX, M, N_OUT, Ra, BM: tl.constexpr, BO: tl.constexpr, RP: tl.constexpr,
              GROUP_M: tl.constexpr, HAS_PERM: tl.constexpr, HAS_RIDX: tl.constexpr, TMA: tl.constexpr):
    """This program's [BM, BO] output tile of an [M, N_OUT] GEMM in grouped order: (pid_m, pid_o,
    row mask, rows, rank positions, rank mask, ranks, output columns, their mask)."""
    tl.static_assert(not (TMA and HAS_PERM), "TMA reads rows in order")
    pid_m, pid_o = grouped_pid(tl.program_id(0), tl.cdiv(M, BM), tl.cdiv(N_OUT, BO), GROUP_M)
    _, mmask, rows = row_block(PERM, pid_m * BM, M, BM, HAS_PERM)
    rr, rmask, ranks = rank_block(RIDX, Ra, RP, HAS_RIDX)
    ro = pid_o * BO + tl.arange(0, BO)
    return pid_m, pid_o, mmask, rows, rr, rmask, ranks, ro, ro < N_OUT


@triton.jit
def lora_fwd_kernel(
    X, W, XD, WD, BIAS, A, B, QP, Q, Y, RIDX, U, V, SG, IDX, PERM, BS,
    M, N, K, Ra, G, scaling, p, inv_keep, seed, n_split,
    sxm, sxk, swn, swk, sbias, sAg, sAr, sAk, sBg, sBn, sBr, sUg, sUr, sVg, sVn, sqs, sqm, sym, syn, sbs,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, RP: tl.constexpr, GROUP_M: tl.constexpr,
    FUSE_Q: tl.constexpr, TMA: tl.constexpr, DROPOUT: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_BS: tl.constexpr, HAS_RIDX: tl.constexpr, HAS_U: tl.constexpr, HAS_V: tl.constexpr, HAS_SG: tl.constexpr,
    BANKED: tl.constexpr, HAS_PERM: tl.constexpr, DOT_PREC: tl.constexpr,
):
    # Program: one [BM, BN] tile of y. Registers: the fp32 accumulator [BM, BN] (plus the fp32
    # q accumulator [BM, RP] with FUSE_Q), one x tile [BM, BK], one W tile [BK, BN] and one A
    # tile [BK, RP] per K step; then t [BM, RP] and one B tile [RP, BN] per adapter, multiplied in
    # B's dtype. TMA: x and W tiles come through tensor descriptors XD [M, K] and WD [N, K] (rows
    # in order: one adapter). With K = 0 (the fold-in plan) the K loop is empty and the program
    # writes the adapter's part bias + t (v*B)^T alone, onto which cuBLAS then adds x W^T.
    pid_m, pid_n, mmask, rows, rr, rmask, ranks, rn, nmask = gemm_tile(PERM, RIDX, M, N, Ra, BM, BN, RP, GROUP_M,
                                                                       HAS_PERM, HAS_RIDX, TMA)
    rk = tl.arange(0, BK)
    rn64 = rn.to(tl.int64)
    x_ptrs = X + rows[:, None] * sxm + rk[None, :].to(tl.int64) * sxk
    w_ptrs = W + rn64[None, :] * swn + rk[:, None].to(tl.int64) * swk
    a_ptrs = A + ranks[None, :] * sAr + rk[:, None].to(tl.int64) * sAk
    acc = tl.zeros((BM, BN), tl.float32)
    qacc = tl.zeros((BM, RP), tl.float32)
    for k0 in range(0, K, BK):
        kmask = rk + k0 < K
        if TMA:  # whole tiles by the copy engine, zero-filled past M, N and K
            x = XD.load([pid_m * BM, k0])
            w = tl.trans(WD.load([pid_n * BN, k0]))
        else:
            x = tl.load(x_ptrs, mask=mmask[:, None] & kmask[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=kmask[:, None] & nmask[None, :], other=0.0)
        acc = tl.dot(x, w, acc, input_precision=DOT_PREC)
        if FUSE_Q:
            a = tl.load(a_ptrs, mask=kmask[:, None] & rmask[None, :], other=0.0)
            if DROPOUT:
                x = tl.where(keep_tile(seed, rows, k0, K, p, BK), x, 0.0).to(X.dtype.element_ty)
            qacc = tl.dot(x, a, qacc, input_precision=DOT_PREC)
            a_ptrs += BK * sAk
        x_ptrs += BK * sxk
        w_ptrs += BK * swk
    if HAS_BS:
        acc = acc * tl.load(BS + rn64 * sbs, mask=nmask, other=0.0).to(tl.float32)[None, :]
    qmask = mmask[:, None] & rmask[None, :]
    q_ptrs = Q + rows[:, None] * sqm + rr[None, :]
    if FUSE_Q:
        q = qacc * inv_keep if DROPOUT else qacc
        tl.store(q_ptrs, q, mask=qmask & (pid_n == 0))
    else:  # the shrink's q: the sum of its n_split partials (QP [n_split, M, Ra]) in slice order
        qp_ptrs = QP + rows[:, None] * sqm + rr[None, :]
        q = tl.load(qp_ptrs, mask=qmask, other=0.0)
        for s in range(1, n_split):
            q += tl.load(qp_ptrs + s * sqs, mask=qmask, other=0.0)
        if n_split > 1:  # QP is a buffer of its own: write the sum to q (else QP is q itself)
            tl.store(q_ptrs, q, mask=qmask & (pid_n == 0))
    ad = tl.zeros((BM,), tl.int32)
    if BANKED:
        ad = tile_adapters(IDX, rows, mmask, G)
    t = q * row_factor(ad, ranks, rr, Ra, scaling, SG, U, sUg, sUr, BM, RP, HAS_SG, HAS_U, BANKED)
    b_ptrs = B + ranks[:, None] * sBr + rn64[None, :] * sBn
    bmask = rmask[:, None] & nmask[None, :]
    ct = B.dtype.element_ty  # the update's products in the adapters' dtype
    if BANKED:
        g = next_adapter(ad, -1, G)
        while g < G:
            g64 = g.to(tl.int64)
            b = tl.load(b_ptrs + g64 * sBg, mask=bmask, other=0.0)
            if HAS_V:
                v = tl.load(V + g64 * sVg + rn64 * sVn, mask=nmask, other=0.0)
                b = b.to(tl.float32) * v.to(tl.float32)[None, :]
            tg = t * (ad == g).to(tl.float32)[:, None]
            acc = tl.dot(tg.to(ct), b.to(ct), acc, input_precision=DOT_PREC)
            g = next_adapter(ad, g, G)
    else:
        b = tl.load(b_ptrs, mask=bmask, other=0.0)
        if HAS_V:
            v = tl.load(V + rn64 * sVn, mask=nmask, other=0.0)
            b = b.to(tl.float32) * v.to(tl.float32)[None, :]
        acc = tl.dot(t.to(ct), b.to(ct), acc, input_precision=DOT_PREC)
    if HAS_BIAS:
        acc += tl.load(BIAS + rn64 * sbias, mask=nmask, other=0.0).to(tl.float32)[None, :]
    y_ptrs = Y + rows[:, None] * sym + rn64[None, :] * syn
    tl.store(y_ptrs, acc.to(Y.dtype.element_ty), mask=mmask[:, None] & nmask[None, :])
