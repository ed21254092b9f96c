"""The op composed from aten ops, with its masked passes as parameters: shared by the ``torch`` and
``cpu`` backends (neither imports the other).

Forward: the base GEMM into y, then the rank-r update added in place (``addmm_``). Backward: the
dx GEMM, then each adapter's dx term added in place. No M x N temporary beyond y and dx. Every
sum has a fixed order (``index_add_`` only ever adds one row into each element), so the result is
deterministic whatever ``Problem.deterministic`` says. The passes that read x through the dropout
keep-mask come from the backend as a :class:`MaskedPasses`:

- ``kept(x, p, seed) -> (xk, keep, inv)``: the dropped input as the other two passes read it (the
  tensor x * keep, or x * keep / (1 - p) with inv = 1, or x itself for passes that apply the mask
  as they read), the mask handle (None without dropout), and the factor applied on the small
  [M, Ra] side;
- ``shrink(xk, keep, A, rows) -> q``: xk[rows] A^T, [m, Ra] in ``qdtype(x)`` (``aten_shrink``: a GEMM);
- ``x_grads(dx, dq, A, xk, keep, rows, need_dA) -> dA``: dx[rows] += (dq A) * keep in place (dx
  not None), and dA = dq^T xk[rows] [Ra, K] in A's dtype or float32 when ``need_dA`` (else None)
  (``aten_x_grads``: two GEMMs, the masked add by ``add_adapter_dx``).

>>> import torch
>>> from lorakern.backends import composed
>>> composed.add_adapter_dx(torch.zeros(2, 3), torch.ones(2, 1), torch.ones(1, 3), None, None)
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch

from lorakern.backends.interface import Grads, Needs, Operands, Problem, base_scale_grad, qdtype

__all__ = ["MaskedPasses", "base_product", "forward", "add_update", "backward", "add_adapter_dx", "aten_shrink",
           "aten_x_grads"]


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` in ``dtype``, without a dispatch when it already is (a no-op ``.to`` costs microseconds)."""
    return t if t.dtype == dtype else t.to(dtype)


def aten_shrink(xk: torch.Tensor, keep, A: torch.Tensor, rows: Optional[torch.Tensor]) -> torch.Tensor:
    """q = xk[rows] A^T (all rows when ``rows`` is None): xk [M, K] the dropped input as a tensor,
    A [Ra, K]; [m, Ra] in ``qdtype(xk)``, the GEMM in A's dtype. ``keep`` is not read (xk has it)."""
    xr = xk if rows is None else xk[rows]
    return _as(torch.mm(_as(xr, A.dtype), A.T), qdtype(xk))


def aten_x_grads(dx: Optional[torch.Tensor], dqk: torch.Tensor, A: torch.Tensor, xk: torch.Tensor, keep,
                 rows: Optional[torch.Tensor], need_dA: bool) -> Optional[torch.Tensor]:
    """dx[rows] += (dqk A) * keep in place (when dx is given: ``add_adapter_dx``); returns
    dA = dqk^T xk[rows], [Ra, K] in A's dtype, when ``need_dA`` (else None). dqk [m, Ra]."""
    if dx is not None:
        add_adapter_dx(dx, dqk, A, keep, rows)
    if not need_dA:
        return None
    xr = xk if rows is None else xk[rows]
    return torch.mm(_as(dqk.T, A.dtype), _as(xr, A.dtype))


class MaskedPasses(NamedTuple):
    """The passes that read x through the dropout keep-mask (see the module docstring); the
    products default to the aten ones."""
    kept: Callable
    shrink: Callable = aten_shrink
    x_grads: Callable = aten_x_grads


def _pick_ranks(A, B, rank_scale, rank_idx):
    """The active ranks of A [.., R, K], B [.., N, R], rank_scale [.., R] (small copies)."""
    if rank_idx is None:
        return A, B, rank_scale
    A = A.index_select(-2, rank_idx)
    B = B.index_select(-1, rank_idx)
    if rank_scale is not None:
        rank_scale = rank_scale.index_select(-1, rank_idx)
    return A, B, rank_scale


def _rank_factor(scaling, rank_scale):
    """s * u over the active ranks, in q's dtype [Ra] (or a float when there is no u)."""
    if rank_scale is None:
        return scaling
    return _as(rank_scale, qdtype(rank_scale)) * scaling


def _adapter_args(gi, scaling, scaling_g, u, v):
    """(s, u, v) of adapter gi (None: the single adapter); u and v may be shared [R] / [N] vectors."""
    if gi is None:
        return scaling, u, v
    s = scaling_g[gi] if scaling_g is not None else scaling
    pick = lambda t: None if t is None else (t[gi] if t.dim() == 2 else t)  # noqa: E731
    return s, pick(u), pick(v)


def _groups(op: Operands, G: int):
    """(g, rows) for every adapter that has rows, from the batch's sorted rows and counts."""
    rows_per = op.adapter_rows
    if rows_per is None:  # built where the host could not read the index (torch.compile): count now
        rows_per = torch.bincount(op.adapter_index + 1, minlength=G + 1).cpu()
    counts = rows_per.tolist()
    start = counts[0]  # rows with -1 come first and are skipped
    for g in range(G):
        n = counts[g + 1]
        if n:
            yield g, op.row_order[start:start + n]
        start += n


def _scaled(q: torch.Tensor, inv: float) -> torch.Tensor:
    """q * inv in place (no dispatch for inv = 1)."""
    return q if inv == 1.0 else q.mul_(inv)


def base_product(x, weight, bias, base_scale):
    """c * (x W^T) + b, a fresh tensor. With c, in PEFT's DoRA order, ``y + (c - 1) * (y - b)`` for
    ``y = x W^T + b``, so that c = 1 (DoRA right after initialisation) gives F.linear's bits."""
    y = torch.addmm(bias, x, weight.T) if bias is not None else torch.mm(x, weight.T)
    if base_scale is not None:
        z = y - bias if bias is not None else y.clone()
        y.add_(z.mul_(base_scale - 1))
    return y


def forward(pb: Problem, op: Operands, passes: MaskedPasses) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, q): base GEMM into y, then the rank-r update added in place."""
    y = base_product(op.x, op.weight, op.bias, op.base_scale)
    return y, add_update(pb, op, y, passes)


def add_update(pb: Problem, op: Operands, y: torch.Tensor, passes: MaskedPasses) -> torch.Tensor:
    """y [M, N] += the rank-r update, in place; returns q [M, Ra]. ``op.weight`` and ``op.bias``
    are not read (``lorakern.update`` hands the output of a base layer the op cannot compute)."""
    x = op.x
    xk, keep, inv = passes.kept(x, pb.dropout_p, pb.seed)
    A, B, u = _pick_ranks(op.lora_A, op.lora_B, op.rank_scale, op.rank_idx)
    if not pb.banked:
        q = _scaled(passes.shrink(xk, keep, A, None), inv)
        Bv = B if op.out_scale is None else B * op.out_scale[:, None]
        t = q * _rank_factor(pb.scaling, u)
        if Bv.dtype == y.dtype:
            y.addmm_(_as(t, y.dtype), Bv.T)
        else:  # adapters in their own dtype (fp32): the update in it, added to y and rounded once, as PEFT
            y.add_(torch.mm(_as(t, Bv.dtype), Bv.T))
        return q
    q = torch.zeros(x.shape[0], A.shape[-2], device=x.device, dtype=qdtype(x))
    for g, rows in _groups(op, pb.G):
        s, ug, vg = _adapter_args(g, pb.scaling, op.scaling_g, u, op.out_scale)
        qg = _scaled(passes.shrink(xk, keep, A[g], rows), inv)
        q[rows] = qg
        Bv = _as(B[g], q.dtype) if vg is None else _as(B[g], q.dtype) * _as(vg, q.dtype)[:, None]
        # the update in q's dtype, rounded once to y's when added (half-precision adapters too)
        y.index_add_(0, rows, _as(torch.mm(qg * _rank_factor(s, ug), Bv.T), y.dtype))
    return q


def _adapter_grads(g, q, A, B, s, u, v, inv, needs: Needs):
    """Gradients of one adapter over its rows: (dq * inv, dB, du, dv) over the active ranks (dA and
    dx's term are ``MaskedPasses.x_grads``' from dq * inv).

    ``inv`` is the factor ``kept`` left to the small side (1 / (1 - p) when xk is x times the mask,
    unscaled). dt = g (v B) is computed only for what needs it (dx, dA, du). The products run in the
    adapters' dtype ``A.dtype`` (x's, or fp32 beside a half-precision x, as PEFT's fp32 branch
    computes them).
    """
    wide = A.dtype
    f = _rank_factor(s, u)
    t = q * f
    dt = dqk = None
    if needs.x or needs.lora_A or needs.rank_scale:
        Bv = B if v is None else B * v[:, None]
        dt = _as(torch.mm(_as(g, wide), _as(Bv, wide)), q.dtype)
        dqk = dt * (f * inv)
    dB = dv = None
    if needs.lora_B or needs.out_scale:
        P = _as(torch.mm(_as(t.T, wide), _as(g, wide)).T, q.dtype)  # g^T t, [N, Ra]: serves dB and dv
        if needs.lora_B:
            dB = P if v is None else P * _as(v[:, None], P.dtype)
        if needs.out_scale:
            dv = (P * _as(B, P.dtype)).sum(1)
    du = (dt * q).sum(0) * s if needs.rank_scale else None
    return dqk, dB, du, dv


def add_adapter_dx(dx, dqk, A, keep, rows) -> None:
    """dx[rows] += (dq A) * keep (all rows when ``rows`` is None; no mask when ``keep`` is None), in place.

    dq A is computed in A's dtype (fp32 adapters beside a half-precision dx: in fp32, rounded once
    when added)."""
    if keep is None and rows is None and A.dtype == dx.dtype:
        dx.addmm_(_as(dqk, dx.dtype), A)
        return
    dxa = torch.mm(_as(dqk, A.dtype), A)
    if keep is not None:
        dxa = torch.where(keep if rows is None else keep[rows], dxa, 0)
    if rows is None:
        dx.add_(dxa)
    else:
        dx.index_add_(0, rows, _as(dxa, dx.dtype))


def backward(pb: Problem, op: Operands, grad_y: torch.Tensor, q: torch.Tensor, needs: Needs,
             passes: MaskedPasses) -> Grads:
    """Gradients per the op's formula; nothing is computed for a frozen input. Without a weight
    (``op.weight`` None: ``lorakern.update``), dx is the adapter's term alone."""
    x, weight, g = op.x, op.weight, grad_y
    dc = base_scale_grad(g, x, weight).to(op.base_scale.dtype) if needs.base_scale else None
    # the base path's upstream gradient
    gc = g * op.base_scale if op.base_scale is not None and (needs.x or needs.weight) else g
    xk, keep, inv = passes.kept(x, pb.dropout_p, pb.seed)
    A, B, u = _pick_ranks(op.lora_A, op.lora_B, op.rank_scale, op.rank_idx)
    dx = None
    if needs.x:
        dx = torch.mm(gc, weight) if weight is not None else torch.zeros(x.shape, dtype=x.dtype, device=x.device)
    if not pb.banked and op.rank_idx is None:  # one adapter, every rank: its gradients as they come
        dqk, dB, du, dv = _adapter_grads(g, q, A, B, pb.scaling, u, op.out_scale, inv, needs)
        dA = passes.x_grads(dx, dqk, A, xk, keep, None, needs.lora_A) if dqk is not None else None
        dA = _as(dA, op.lora_A.dtype).contiguous() if dA is not None else None
        dB = _as(dB, op.lora_B.dtype).contiguous() if dB is not None else None
    else:
        dA, dB, du, dv = _scattered_adapter_grads(pb, op, g, xk, keep, q, A, B, u, inv, dx, needs, passes.x_grads)
    dW = torch.mm(gc.T, x) if needs.weight else None
    db = g.sum(0) if needs.bias else None
    du = _as(du, op.rank_scale.dtype) if du is not None else None
    dv = _as(dv, op.out_scale.dtype) if dv is not None else None
    return Grads(dx, dW, db, dA, dB, du, dv, dc)


def _scattered_adapter_grads(pb: Problem, op: Operands, g, xk, keep, q, A, B, u, inv, dx,
                             needs: Needs, x_grads: Callable):
    """(dA, dB, du, dv) in the parameters' shapes, with the active ranks' gradients of each adapter
    (over its rows) scattered in; dx gets each adapter's term added in place."""
    def zeros(t: Optional[torch.Tensor], n: bool, dt=None):
        return torch.zeros(t.shape, dtype=dt or t.dtype, device=t.device) if n else None

    dA, dB = zeros(op.lora_A, needs.lora_A), zeros(op.lora_B, needs.lora_B)
    du = zeros(op.rank_scale, needs.rank_scale, q.dtype)
    dv = zeros(op.out_scale, needs.out_scale, q.dtype)
    ridx = op.rank_idx if op.rank_idx is not None else torch.arange(A.shape[-2], device=g.device)

    def one(gi, rows):
        s, ug, vg = _adapter_args(gi, pb.scaling, op.scaling_g, u, op.out_scale)
        Ag, Bg = (A, B) if gi is None else (A[gi], B[gi])
        sub = (lambda t: t) if rows is None else (lambda t: t[rows])  # noqa: E731
        dqk, dBg, dug, dvg = _adapter_grads(sub(g), sub(q), Ag, Bg, s, ug, vg, inv, needs)
        dAg = x_grads(dx, dqk, Ag, xk, keep, rows, needs.lora_A) if dqk is not None else None
        at = lambda t: t if gi is None else t[gi]  # noqa: E731
        if dAg is not None:
            at(dA).index_copy_(0, ridx, _as(dAg, dA.dtype))
        if dBg is not None:
            at(dB).index_copy_(1, ridx, _as(dBg, dB.dtype))
        if dug is not None:
            (du if du.dim() == 1 else du[gi]).index_add_(0, ridx, dug)
        if dvg is not None:
            (dv if dv.dim() == 1 else dv[gi]).add_(dvg)

    if not pb.banked:
        one(None, None)
    else:
        for gi, rows in _groups(op, pb.G):
            one(gi, rows)
    return dA, dB, du, dv
