"""The op's plainest call as three differentiable aten ops, so that autograd's C++ engine runs its
backward: no Python in backward, no custom-function bookkeeping (host time is what a small layer's
eager step costs; ARCHITECTURE.md "Host time").

:func:`call` takes a call of ``lorakern.lora_linear`` before its general checks when the backend
would compute it with aten anyway (``auto`` on a CPU, ``torch`` on a CPU or CUDA GPU) and nothing
is fused: one adapter, no dropout, every rank, no ``rank_scale`` / ``out_scale`` / ``base_scale``,
a float ``scaling``, every tensor plain, of x's dtype and device, with matching shapes, outside
autocast, torch.compile and jit tracing; and where it is cheaper (:func:`pays`): without a
gradient to compute, or for small x (autograd adds the two terms of dx as one more M x K pass,
where the op's backward accumulates the adapter's term in place: at M = 4096, K = N = 2048 on
one CPU core that pass costs more than the Python it saves). Anything else returns None and
takes the op's general path, which checks and names a bad argument. It runs the ``composed``
backend's forward ops in the same order (its ``base_product``, then the update: the same bits in
forward), and autograd saves what the op saves: q (here ``t = s q``, [M, r]) beside x, W, A and B, which are inputs.

>>> import torch
>>> x, W, A, B = torch.randn(3, 4), torch.randn(5, 4), torch.randn(2, 4), torch.randn(5, 2)
>>> torch.allclose(lora_linear(x, W, None, A, B, 2.0), x @ W.T + 2.0 * (x @ A.T) @ B.T, atol=1e-5)
True
"""
from __future__ import annotations

from typing import Optional

import torch

from lorakern.backends import composed

__all__ = ["SMALL_MK", "call", "pays", "lora_linear"]

_PLAIN = (torch.Tensor, torch.nn.Parameter)  # bias's types (the caller tests the other tensors')
SMALL_MK = 1 << 16  # M * K up to which the extra dx pass costs less than the custom function's Python


def pays(M: int, K: int, *tensors: Optional[torch.Tensor]) -> bool:
    """Whether the aten composition is the cheaper way for x [M, K]: small, or nothing of
    ``tensors`` (x, W, b, A, B) needs a gradient.

    >>> pays(4096, 2048, torch.randn(2, 2)), pays(16, 256, torch.randn(2, 2, requires_grad=True))
    (True, True)
    """
    if M * K <= SMALL_MK or not torch.is_grad_enabled():
        return True
    return not any(t is not None and t.requires_grad for t in tensors)


def lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], lora_A: torch.Tensor,
                lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """``y = x W^T + b + (s (x A^T)) B^T`` for x [M, K], W [N, K], b [N] or None, A [r, K], B [N, r],
    all one dtype, already checked by ``lorakern.lora_linear``: y [M, N], differentiable in each."""
    y = composed.base_product(x, weight, bias, None)
    t = torch.mm(x, lora_A.T) * scaling
    return y.addmm_(t, lora_B.T)


def call(x, weight, bias, lora_A, lora_B, scaling, backend: str) -> Optional[torch.Tensor]:
    """y [..., N] of ``lorakern.lora_linear(x, weight, bias, lora_A, lora_B, scaling=scaling,
    backend=backend)`` with every other argument at its default, when the plainest case applies
    (the module docstring), else None (nothing computed). x, weight, lora_A and lora_B are plain
    eager tensors outside torch.compile and jit tracing (the caller's test)."""
    if type(scaling) not in (float, int) or x.dim() < 1:
        return None
    dev, dt = x.device, x.dtype
    if not (dev.type == "cpu" and backend in ("auto", "torch") or dev.type == "cuda" and backend == "torch"):
        return None
    if not dt.is_floating_point or weight.dtype != dt or lora_A.dtype != dt or lora_B.dtype != dt \
            or weight.dim() != 2 or lora_A.dim() != 2 or lora_B.dim() != 2:
        return None
    (N, K), r = weight.shape, lora_A.shape[0]
    if x.shape[-1] != K or lora_A.shape[1] != K or lora_B.shape[0] != N or lora_B.shape[1] != r or r < 1:
        return None
    if weight.device != dev or lora_A.device != dev or lora_B.device != dev:
        return None
    if bias is not None and (type(bias) not in _PLAIN or bias.dtype != dt or bias.shape != (N,) or bias.device != dev):
        return None
    if torch.is_autocast_enabled(dev.type):
        return None
    M = x.numel() // K if K else 0
    if not pays(M, K, x, weight, bias, lora_A, lora_B):
        return None
    if x.dim() == 2:
        return lora_linear(x, weight, bias, lora_A, lora_B, float(scaling))
    return lora_linear(x.reshape(M, K), weight, bias, lora_A, lora_B, float(scaling)).reshape(*x.shape[:-1], N)
