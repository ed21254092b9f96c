"""The float64 oracle the tests trust: ``reference_lora_linear``.

Written for clarity, straight from the op's formula (ARCHITECTURE.md, "The op"), with the
dropout keep-mask passed in explicitly; the portable ``torch`` backend is
``lorakern/backends/portable.py``.
"""
from __future__ import annotations

from typing import Optional, Union

import torch

__all__ = ["reference_lora_linear"]


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
