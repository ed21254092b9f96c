"""The op's output composed from differentiable torch ops: what double backward and forward-mode AD
differentiate (``ops._backward`` with ``create_graph=True`` or under ``torch.func``, ``ops._Direct.jvp``).

The backends' backward passes are not themselves differentiable; where a graph of the gradients is
asked for, the op takes them from ``vjp`` below instead, exact whichever backend ran the forward
(the dropout mask is that backend's own).

>>> import torch
>>> x, W, A, B = torch.randn(3, 4), torch.randn(5, 4), torch.randn(2, 4), torch.randn(5, 2)
>>> op_output(x, W, None, A, B, 1.0, None, None, None, None, 0.0, None, None, None, None, None, "torch",
...           False).shape
torch.Size([3, 5])
"""
from __future__ import annotations

from typing import Sequence

import torch

from lorakern import backends
from lorakern.backends.interface import qdtype

__all__ = ["op_output", "vjp"]


def op_output(x, weight, bias, lora_A, lora_B, scaling, scaling_g, rank_scale, rank_idx, out_scale, dropout_p,
              seed, adapter_index, row_order, adapter_rows, base_scale, backend, deterministic) -> torch.Tensor:
    """y of the op (``_forward_impl``'s arguments) composed from differentiable torch ops, with the
    backend's own dropout mask and the adapter branch in ``qdtype(x)``: what double backward and
    forward-mode AD differentiate. Banks cost one [M, N] product per adapter here."""
    qd = qdtype(x)
    y = torch.mm(x, weight.T)
    if base_scale is not None:
        y = y * base_scale
    if bias is not None:
        y = y + bias
    xk = x.to(qd)
    if dropout_p > 0.0:
        keep = backends.get(backend).dropout_keep(int(seed), x.shape[0], x.shape[1], dropout_p, x.device)
        xk = torch.where(keep, xk, 0) / (1.0 - dropout_p)
    if rank_idx is not None:
        lora_A, lora_B = lora_A.index_select(-2, rank_idx), lora_B.index_select(-1, rank_idx)
        rank_scale = None if rank_scale is None else rank_scale.index_select(-1, rank_idx)

    def delta(A, B, s, u, v):
        t = torch.mm(xk, A.to(qd).T) * s
        t = t if u is None else t * u.to(qd)
        B = B if v is None else B * v[:, None]
        return torch.mm(t.to(y.dtype), B.to(y.dtype).T)

    if lora_A.dim() == 2:
        return y + delta(lora_A, lora_B, scaling, rank_scale, out_scale)
    for g in range(lora_A.shape[0]):
        pick = lambda t: t if t is None or t.dim() == 1 else t[g]  # noqa: E731
        s = scaling if scaling_g is None else scaling_g[g]
        d = delta(lora_A[g], lora_B[g], s, pick(rank_scale), pick(out_scale))
        y = y + torch.where((adapter_index == g)[:, None], d, 0)
    return y


def vjp(inputs: Sequence, wrt: Sequence[int], grad_y: torch.Tensor):
    """The gradients of ``op_output(*inputs)`` for the inputs at positions ``wrt`` given grad_y, by
    ``torch.func.vjp`` (so they compose with autograd's create_graph and with torch.func)."""
    if not wrt:
        return ()

    def f(*args):
        full = list(inputs)
        for i, a in zip(wrt, args):
            full[i] = a
        return op_output(*full)

    _, vjp = torch.func.vjp(f, *(inputs[i] for i in wrt))
    return vjp(grad_y)
