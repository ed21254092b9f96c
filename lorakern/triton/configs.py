"""Block sizes per kernel, keyed on (M bucket, N, K, Ra): a small table tuned on an H100.

``TMA`` (forward and dx GEMMs, one adapter only): x / g and W tiles through tensor descriptors
where their layout allows (ARCHITECTURE.md); off in the table until timed on a GPU.

Under ``TRITON_INTERPRET=1`` every kernel runs one small configuration (16-wide blocks, so
tests cross block boundaries on tiny shapes). ``OVERRIDE`` lets tests and
``bench/triton_tune.py`` force entries: ``OVERRIDE["fwd"] = {"FUSE_Q": False}``.
"""
from __future__ import annotations

import os

OVERRIDE: dict[str, dict] = {}


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _with_override(kind: str, cfg: dict, inner: str, esize: int) -> dict:
    """``cfg`` with fp32 inputs' inner (reduction) block halved, so the shared-memory stages fit
    (227 KB on an H100), then the overrides for ``kind``."""
    if esize == 4 and not interpreting():
        cfg = {**cfg, inner: max(16, cfg[inner] // 2)}
    return {**cfg, **OVERRIDE.get(kind, {})}


def fwd(M: int, N: int, K: int, Ra: int, banked: bool, dropout: bool, esize: int) -> dict:
    """The forward GEMM (and whether it computes q itself, FUSE_Q; never with per-row adapters)."""
    if interpreting():
        cfg = dict(BM=16, BN=16, BK=16, GROUP_M=2, num_warps=4, num_stages=1, FUSE_Q=not banked)
    elif M <= 16:  # decode: W-bandwidth bound, N / 32 programs, q inside the GEMM (one launch)
        cfg = dict(BM=16, BN=32, BK=256, GROUP_M=1, num_warps=4, num_stages=4, FUSE_Q=not dropout)
    elif M <= 64:
        cfg = dict(BM=64, BN=32, BK=128, GROUP_M=1, num_warps=4, num_stages=4, FUSE_Q=not dropout)
    elif M <= 256:
        cfg = dict(BM=128, BN=32, BK=128, GROUP_M=8, num_warps=4, num_stages=4, FUSE_Q=not dropout)
    elif M <= 1024:
        cfg = dict(BM=128, BN=128, BK=64, GROUP_M=8, num_warps=8, num_stages=4, FUSE_Q=not dropout)
    else:  # q inside the GEMM (an N=16 MMA beside each N=256 one) beats a separate pass over x
        cfg = dict(BM=128, BN=256, BK=64, GROUP_M=8, num_warps=8, num_stages=3, FUSE_Q=not dropout)
    cfg = _with_override("fwd", {"TMA": False, **cfg}, "BK", esize)
    if banked:
        cfg["FUSE_Q"] = False
    return cfg


def shrink(M: int, K: int, Ra: int, sms: int, esize: int) -> dict:
    """The shrink pass; SPLIT_K column slices (partial q each, summed by the GEMM) so that few rows
    fill the GPU."""
    if interpreting():
        return _with_override("shrink", dict(BM=16, BK=16, num_warps=4, num_stages=1, SPLIT_K=2), "BK", esize)
    if M > 1024:
        cfg = dict(BM=64, BK=128, num_warps=4, num_stages=4)
    elif M > 64:
        cfg = dict(BM=32, BK=128, num_warps=4, num_stages=3)
    else:
        cfg = dict(BM=16, BK=64, num_warps=4, num_stages=3)
    blocks = -(-M // cfg["BM"])
    cfg["SPLIT_K"] = max(1, min(-(-K // cfg["BK"]), -(-2 * sms // blocks)))
    return _with_override("shrink", cfg, "BK", esize)


def gpass(M: int, N: int, Ra: int, sms: int, esize: int) -> dict:
    """The pass over g; SPLIT_N column slices so that the grid fills the GPU. P_APART: g^T t by
    the row-reduction kernel (a second read of g, Ra * N * SPLIT_M atomics) instead of atomics
    here (Ra * N * M / BM of them). CUBLAS (one adapter only): dt and g^T t as two skinny torch
    products instead (measured on an H100: the g-pass's dt part ran ~200 us at M = 8192)."""
    if interpreting():
        cfg = dict(BM=16, BN=16, num_warps=4, num_stages=1, SPLIT_N=2, P_APART=False, CUBLAS=False)
    else:
        bm = 128 if M > 1024 else 64 if M > 64 else 16
        cfg = dict(BM=bm, BN=128, num_warps=8 if bm == 128 else 4, num_stages=3)
        rows = -(-M // bm)
        cfg["SPLIT_N"] = max(1, min(-(-N // 512), -(-2 * sms // rows)))
        cfg["P_APART"] = False
        cfg["CUBLAS"] = True
    return _with_override("gpass", cfg, "BN", esize)


def dx(M: int, N: int, K: int, Ra: int, dropout: bool, esize: int) -> dict:
    """The dx GEMM; FUSE_DA: dA in its epilogue too (one keep-mask generation for both)."""
    if interpreting():
        cfg = dict(BM=16, BK=16, BN=16, GROUP_M=2, num_warps=4, num_stages=1)
    elif M <= 64:  # W-bandwidth bound: K / 32 programs
        cfg = dict(BM=max(16, 1 << (M - 1).bit_length()), BK=32, BN=128, GROUP_M=1, num_warps=4, num_stages=4)
    elif M <= 256:
        cfg = dict(BM=128, BK=32, BN=128, GROUP_M=8, num_warps=4, num_stages=4)
    elif M <= 1024:
        cfg = dict(BM=128, BK=128, BN=64, GROUP_M=8, num_warps=8, num_stages=4)
    elif dropout:  # two [BM, BK] accumulators (dx, and the masked adapter part)
        cfg = dict(BM=128, BK=128, BN=64, GROUP_M=8, num_warps=8, num_stages=4)
    else:
        cfg = dict(BM=128, BK=256, BN=64, GROUP_M=8, num_warps=8, num_stages=3)
    cfg["FUSE_DA"] = dropout
    return _with_override("dx", {"TMA": False, **cfg}, "BN", esize)


def dA(M: int, K: int, Ra: int, sms: int, esize: int) -> dict:
    """dA = dq^T x~; SPLIT_M row slices so that the grid fills the GPU."""
    if interpreting():
        cfg = dict(BM=16, BK=16, num_warps=4, num_stages=1, SPLIT_M=2)
    else:
        cfg = dict(BM=64, BK=128, num_warps=4, num_stages=3)
        cols = -(-K // cfg["BK"])
        cfg["SPLIT_M"] = max(1, min(-(-M // 256), -(-2 * sms // cols)))
    return _with_override("dA", cfg, "BM", esize)
