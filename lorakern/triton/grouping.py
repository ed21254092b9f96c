"""Per-row adapters: rows sorted by adapter on the device, and the helpers every kernel shares.

Kernels walk tiles of rows in sorted order (``perm``), so a tile holds few distinct adapters;
a tile that straddles segments loops over the adapters it holds (``next_adapter``) with the
other rows masked out, so no segment is padded to a full block and nothing syncs with the host.
An index outside [0, G) reads as -1: the row gets the base only.
"""
from __future__ import annotations

import triton
import triton.language as tl

SORT_MIN_ROWS = 64  # below this every tile is one of a handful: visiting rows in order costs more than it saves


@triton.jit
def tile_rows(PERM, pm, mmask, HAS_PERM: tl.constexpr):
    """int64 rows of x (flattened) for tile positions ``pm`` in the visiting order."""
    if HAS_PERM:
        return tl.load(PERM + pm, mask=mmask, other=0).to(tl.int64)
    return pm.to(tl.int64)


@triton.jit
def row_block(PERM, m0, M, BM: tl.constexpr, HAS_PERM: tl.constexpr):
    """(positions, mask, rows): the BM tile positions from m0, which of them are below M, and the
    int64 rows of x behind them."""
    pm = m0 + tl.arange(0, BM)
    mmask = pm < M
    return pm, mmask, tile_rows(PERM, pm, mmask, HAS_PERM)


@triton.jit
def rank_block(RIDX, Ra, RP: tl.constexpr, HAS_RIDX: tl.constexpr):
    """(positions, mask, ranks): the RP compacted rank positions, which of them are below Ra, and
    the int64 ranks of A / B behind them."""
    rr = tl.arange(0, RP)
    return rr, rr < Ra, tile_ranks(RIDX, rr, Ra, HAS_RIDX)


@triton.jit
def tile_adapters(IDX, rows, mmask, G):
    """int32 adapter of each row; -1 for rows outside the tile and for indices outside [0, G)."""
    a = tl.load(IDX + rows, mask=mmask, other=-1)
    return tl.where((a >= 0) & (a < G), a, -1).to(tl.int32)


@triton.jit
def next_adapter(ad, cur, G):
    """The smallest adapter in ``ad`` above ``cur``, or G when there is none."""
    return tl.min(tl.where(ad > cur, ad, G), axis=0)


@triton.jit
def tile_ranks(RIDX, rr, Ra, HAS_RIDX: tl.constexpr):
    """int64 rank of A/B behind each compacted rank position ``rr`` (0 past Ra)."""
    if HAS_RIDX:
        return tl.load(RIDX + rr, mask=rr < Ra, other=0).to(tl.int64)
    return rr.to(tl.int64)


@triton.jit
def row_factor(ad, ranks, rr, Ra, scaling, SG, U, sUg, sUr, BM: tl.constexpr, RP: tl.constexpr,
               HAS_SG: tl.constexpr, HAS_U: tl.constexpr, BANKED: tl.constexpr):
    """fp32 [BM, RP]: s * u[rank] of each row's adapter (t = q * factor); 0 off-adapter and past Ra."""
    rmask = rr < Ra
    if BANKED:
        on = (ad >= 0).to(tl.float32)  # arithmetic, not a select: see NOTES_triton.md (triton 3.6)
        a = tl.maximum(ad, 0).to(tl.int64)
        if HAS_SG:
            s = tl.load(SG + a).to(tl.float32) * on
        else:
            s = scaling * on
        if HAS_U:
            u = tl.load(U + a[:, None] * sUg + ranks[None, :] * sUr, mask=rmask[None, :], other=0.0).to(tl.float32)
        else:
            u = rmask.to(tl.float32)[None, :] + tl.zeros((BM, RP), tl.float32)
        return s[:, None] * u
    if HAS_U:
        u = tl.load(U + ranks * sUr, mask=rmask, other=0.0).to(tl.float32)
    else:
        u = tl.where(rmask, 1.0, 0.0)
    return scaling * u[None, :] + tl.zeros((BM, RP), tl.float32)
