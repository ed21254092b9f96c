"""The float64 oracle the tests trust, and the portable ``torch`` backend CPUs run.

``reference_lora_linear`` is written for clarity, straight from DESIGN.md section 1, with the
dropout keep-mask passed in explicitly. ``forward`` / ``backward`` below are the ``torch``
backend (the interface of ARCHITECTURE.md): aten ops only, no M x N temporaries beyond y and
dx themselves, the keep-mask regenerated from a seeded generator, never stored.
"""
from __future__ import annotations

from typing import Optional, Union

import torch

__all__ = ["reference_lora_linear", "forward", "backward", "dropout_keep", "available"]


def reference_lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    *,
    keep: Optional[torch.Tensor] = None,
    dtype: torch.dtype = torch.float64,
    scaling: Union[float, torch.Tensor] = 1.0,
    rank_scale: Optional[torch.Tensor] = None,
    rank_mask: Optional[torch.Tensor] = None,
    out_scale: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    adapter_index: Optional[torch.Tensor] = None,
    base_scale: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The op in ``dtype`` (float64 by default): differentiable, a loop over adapters.

    ``keep`` is the bool dropout keep-mask [M, K] (None: no dropout), in place of the op's
    ``seed``; the other keywords are ``lora_linear``'s, in its order.

    >>> x, W, A, B = torch.randn(3, 5), torch.randn(4, 5), torch.randn(2, 5), torch.randn(4, 2)
    >>> reference_lora_linear(x, W, None, A, B, scaling=0.5).dtype
    torch.float64
    """
    c = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    K = weight.shape[1]
    lead = x.shape[:-1]
    x2 = c(x).reshape(-1, K)
    y = x2 @ c(weight).T
    if base_scale is not None:
        y = y * c(base_scale)
    if bias is not None:
        y = y + c(bias)
    xd = x2 if keep is None else x2 * keep.reshape(x2.shape).to(dtype) / (1.0 - dropout_p)
    banked = lora_A.dim() == 3
    G = lora_A.shape[0] if banked else 1
    rows = torch.ones(x2.shape[0], dtype=torch.bool, device=x.device)
    for g in range(G):
        if banked:
            rows = (adapter_index == g).to(x.device)
        pick = (lambda t: None if t is None else (t[g] if banked and t.dim() >= 2 else t))  # noqa: E731
        A, B = c(pick(lora_A)), c(pick(lora_B))
        s = scaling[g] if isinstance(scaling, torch.Tensor) and scaling.dim() == 1 else scaling
        s = c(s) if isinstance(s, torch.Tensor) else s
        u, m, v = c(pick(rank_scale)), pick(rank_mask), c(pick(out_scale))
        q = xd[rows] @ A.T
        t = s * q
        if u is not None:
            t = t * u
        if m is not None:
            t = t * m.to(dtype)
        delta = t @ B.T
        if v is not None:
            delta = delta * v
        y = y.index_put((rows.nonzero().flatten(),), y[rows] + delta)
    return y.reshape(*lead, weight.shape[0])


# --------------------------------------------------------------------------- the torch backend


def available() -> tuple[bool, str]:
    return True, ""


def dropout_keep(seed: int, M: int, K: int, p: float, device) -> torch.Tensor:
    """The torch backend's keep-mask: bool [M, K], a pure function of (seed, M, K, p, device)."""
    gen = torch.Generator(device=device)
    gen.manual_seed(int(seed))
    return torch.rand(M, K, device=device, generator=gen) >= p


def _kept(x: torch.Tensor, p: float, seed: int):
    """(x * keep, keep, 1 / (1 - p)): the 1/(1-p) is applied to the small [M, Ra] side, not here."""
    if p == 0.0:
        return x, None, 1.0
    keep = dropout_keep(seed, x.shape[0], x.shape[1], p, x.device)
    return torch.where(keep, x, 0), keep, 1.0 / (1.0 - p)


def _qdtype(x: torch.Tensor) -> torch.dtype:
    """q's dtype: float32, or float64 for float64 inputs."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` in ``dtype``, without a dispatch when it already is (a no-op ``.to`` costs microseconds)."""
    return t if t.dtype == dtype else t.to(dtype)


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
    return _as(rank_scale, _qdtype(rank_scale)) * scaling


def _adapter_args(gi, scaling, scaling_g, u, v):
    """(s, u, v) of adapter gi (None: the single adapter); u and v may be shared [R] / [N] vectors."""
    if gi is None:
        return scaling, u, v
    s = scaling_g[gi] if scaling_g is not None else scaling
    pick = lambda t: None if t is None else (t[gi] if t.dim() == 2 else t)  # noqa: E731
    return s, pick(u), pick(v)


def _groups(adapter_index: torch.Tensor, G: int):
    """(g, rows) for every adapter that has rows."""
    order = torch.argsort(adapter_index, stable=True)
    counts = torch.bincount(adapter_index + 1, minlength=G + 1).tolist()
    start = counts[0]  # rows with -1 come first and are skipped
    for g in range(G):
        n = counts[g + 1]
        if n:
            yield g, order[start:start + n]
        start += n


def _base(x, weight, bias, base_scale):
    """c * (x W^T) + b, a fresh tensor."""
    if base_scale is None:
        return torch.addmm(bias, x, weight.T) if bias is not None else torch.mm(x, weight.T)
    y = torch.mm(x, weight.T).mul_(base_scale)
    return y if bias is None else y.add_(bias)


def forward(x, weight, bias, lora_A, lora_B, scaling, scaling_g, rank_scale, rank_idx, out_scale,
            dropout_p, seed, adapter_index, base_scale=None, deterministic=False):
    """(y, q): base GEMM into y, then the rank-r update added in place (addmm). Every sum here
    has a fixed order (index_add_ only ever adds one row into each element), so the backend is
    deterministic whatever ``deterministic`` says."""
    y = _base(x, weight, bias, base_scale)
    xk, _, inv = _kept(x, dropout_p, seed)
    A, B, u = _pick_ranks(lora_A, lora_B, rank_scale, rank_idx)
    if adapter_index is None:
        q = _as(torch.mm(xk, A.T), _qdtype(x)).mul_(inv)
        Bv = B if out_scale is None else B * out_scale[:, None]
        y.addmm_(_as(q * _rank_factor(scaling, u), y.dtype), Bv.T)
        return y, q
    q = torch.zeros(x.shape[0], A.shape[-2], device=x.device, dtype=_qdtype(x))
    for g, rows in _groups(adapter_index, lora_A.shape[0]):
        s, ug, vg = _adapter_args(g, scaling, scaling_g, u, out_scale)
        qg = torch.mm(xk[rows], A[g].T).to(q.dtype).mul_(inv)
        q[rows] = qg
        Bv = B[g] if vg is None else B[g] * vg[:, None]
        y.index_add_(0, rows, torch.mm((qg * _rank_factor(s, ug)).to(y.dtype), Bv.T))
    return y, q


def _adapter_grads(g, xk, q, A, B, s, u, v, inv, needs_x, needs_A, needs_B, needs_u, needs_v):
    """Gradients of one adapter over its rows: (dq / (1-p), dA, dB, du, dv) over the active ranks.

    ``xk`` is x times the keep-mask, unscaled; ``inv`` = 1 / (1 - p) is folded into dq instead.
    dt = g (v B) is computed only for what needs it (dx, dA, du).
    """
    f = _rank_factor(s, u)
    t = q * f
    dt = dqk = None
    if needs_x or needs_A or needs_u:
        Bv = B if v is None else B * v[:, None]
        dt = _as(torch.mm(g, _as(Bv, g.dtype)), q.dtype)
        dqk = dt * (f * inv)
    dA = torch.mm(_as(dqk.T, xk.dtype), xk) if needs_A else None
    dB = dv = None
    if needs_B or needs_v:
        P = _as(torch.mm(_as(t.T, g.dtype), g).T, q.dtype)  # g^T t, [N, Ra]: serves dB and dv
        if needs_B:
            dB = P if v is None else P * _as(v[:, None], P.dtype)
        if needs_v:
            dv = (P * _as(B, P.dtype)).sum(1)
    du = (dt * q).sum(0) * s if needs_u else None
    return dqk, dA, dB, du, dv


def base_scale_grad(g, x, weight):
    """dc = sum over rows of g * (x W^T), float32 (float64 for float64 inputs): the base product is
    recomputed (one GEMM), not saved, and freed at once."""
    z = torch.mm(x, weight.T)
    return z.mul_(g).sum(0, dtype=_qdtype(x))


def backward(grad_y, x, weight, lora_A, lora_B, scaling, scaling_g, rank_scale, rank_idx, out_scale,
             dropout_p, seed, adapter_index, base_scale, q, needs, deterministic=False):
    """Gradients per DESIGN.md section 1; nothing is computed for a frozen input."""
    n_x, n_w, n_b, n_A, n_B, n_u, n_v, n_c = needs
    g = grad_y
    dc = base_scale_grad(g, x, weight).to(base_scale.dtype) if n_c else None
    # the base path's upstream gradient
    gc = g * base_scale if base_scale is not None and (n_x or n_w) else g
    xk, keep, inv = _kept(x, dropout_p, seed)
    A, B, u = _pick_ranks(lora_A, lora_B, rank_scale, rank_idx)
    dx = torch.mm(gc, weight) if n_x else None
    if adapter_index is None and rank_idx is None:  # one adapter, every rank: its gradients as they come
        dqk, dA, dB, du, dv = _adapter_grads(g, xk, q, A, B, scaling, u, out_scale, inv, n_x, n_A, n_B, n_u, n_v)
        if dx is not None:
            _add_adapter_dx(dx, dqk, A, keep, None)
        dA = _as(dA, lora_A.dtype).contiguous() if dA is not None else None
        dB = _as(dB, lora_B.dtype).contiguous() if dB is not None else None
    else:
        dA, dB, du, dv = _scattered_adapter_grads(g, xk, keep, q, A, B, lora_A, lora_B, scaling, scaling_g, u,
                                                  rank_scale, rank_idx, out_scale, inv, adapter_index, dx, needs)
    dW = torch.mm(gc.T, x) if n_w else None
    db = g.sum(0) if n_b else None
    du = _as(du, rank_scale.dtype) if du is not None else None
    dv = _as(dv, out_scale.dtype) if dv is not None else None
    return dx, dW, db, dA, dB, du, dv, dc


def _add_adapter_dx(dx, dqk, A, keep, rows) -> None:
    """dx[rows] += (dq A) * keep (all rows when ``rows`` is None; no mask when ``keep`` is None), in place."""
    if keep is None and rows is None:
        dx.addmm_(_as(dqk, dx.dtype), A)
        return
    dxa = torch.mm(_as(dqk, dx.dtype), A)
    if keep is not None:
        dxa = torch.where(keep if rows is None else keep[rows], dxa, 0)
    if rows is None:
        dx.add_(dxa)
    else:
        dx.index_add_(0, rows, dxa)


def _scattered_adapter_grads(g, xk, keep, q, A, B, lora_A, lora_B, scaling, scaling_g, u, rank_scale, rank_idx,
                             out_scale, inv, adapter_index, dx, needs):
    """(dA, dB, du, dv) in the parameters' shapes, with the active ranks' gradients of each adapter
    (over its rows) scattered in; dx gets each adapter's term added in place."""
    _, _, _, n_A, n_B, n_u, n_v, _ = needs
    n_x = dx is not None
    zeros = lambda t, n, dt=None: torch.zeros(t.shape, dtype=dt or t.dtype, device=t.device) if n else None  # noqa: E731
    dA, dB = zeros(lora_A, n_A), zeros(lora_B, n_B)
    du = zeros(rank_scale, n_u, q.dtype)
    dv = zeros(out_scale, n_v, q.dtype)
    ridx = rank_idx if rank_idx is not None else torch.arange(A.shape[-2], device=g.device)

    def one(gi, rows):
        s, ug, vg = _adapter_args(gi, scaling, scaling_g, u, out_scale)
        Ag, Bg = (A, B) if gi is None else (A[gi], B[gi])
        sub = (lambda t: t) if rows is None else (lambda t: t[rows])  # noqa: E731
        dqk, dAg, dBg, dug, dvg = _adapter_grads(sub(g), sub(xk), sub(q), Ag, Bg, s, ug, vg, inv,
                                                 n_x, n_A, n_B, n_u, n_v)
        at = lambda t: t if gi is None else t[gi]  # noqa: E731
        if dAg is not None:
            at(dA).index_copy_(0, ridx, _as(dAg, dA.dtype))
        if dBg is not None:
            at(dB).index_copy_(1, ridx, _as(dBg, dB.dtype))
        if dug is not None:
            (du if du.dim() == 1 else du[gi]).index_add_(0, ridx, dug)
        if dvg is not None:
            (dv if dv.dim() == 1 else dv[gi]).add_(dvg)
        if dx is not None:
            _add_adapter_dx(dx, dqk, Ag, keep, rows)

    if adapter_index is None:
        one(None, None)
    else:
        for gi, rows in _groups(adapter_index, lora_A.shape[0]):
            one(gi, rows)
    return dA, dB, du, dv
