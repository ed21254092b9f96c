"""The op over a base layer it cannot compute: ``lora_update`` adds the adapter to the base's output.

A quantized base (bitsandbytes ``Linear4bit`` / ``Linear8bitLt``, torchao weights), a hooked or
custom base layer: the caller runs the base layer and hands its output; ``lora_update`` adds
``s * ((x~ A^T) * u) B^T`` into it in place, with the dropout keep-mask regenerated in backward
(never stored). It saves x (which the base layer saves too) and q [M, r]: nothing M x K of its own.
The gradient to x through the base is the base layer's own autograd; the op adds the adapter's
dx term. It runs the ``torch`` backend (``lorakern/backends/portable.py``) on any device.

>>> import torch
>>> from lorakern import lora_update
>>> x, W = torch.randn(4, 32), torch.randn(16, 32)
>>> A, B = torch.randn(8, 32), torch.randn(16, 8)
>>> y = lora_update(x, x @ W.T, A, B, scaling=2.0)
>>> torch.allclose(y, x @ W.T + 2.0 * (x @ A.T) @ B.T, atol=1e-4)
True
"""
from __future__ import annotations

from typing import Optional

import torch

from lorakern.backends import composed, portable
from lorakern.backends.interface import Needs, Operands, Problem
from lorakern.checks import adapter_dtypes, check_input, check_tensor, check_vector, shape_str

__all__ = ["lora_update"]


class _Update(torch.autograd.Function):
    """y += update(x, A, B) in place (y marked dirty); backward: g to y, the adapter's terms to x, A, B, u.
    y comes first: an in-place update of a view hands the view's gradient to the first input."""

    @staticmethod
    def forward(ctx, y, x, A, B, rank_scale, scaling, p, seed):
        M, K = x.shape
        pb = Problem(M=M, K=K, N=B.shape[0], R=A.shape[0], Ra=A.shape[0], G=1, banked=False, scaling=scaling,
                     dropout_p=p, seed=seed, deterministic=True)
        op = Operands(x, None, None, A, B, None, rank_scale, None, None, None, None, None, None)
        q = composed.add_update(pb, op, y, portable.PASSES) if M else y.new_empty(0, A.shape[0], dtype=torch.float32)
        ctx.mark_dirty(y)
        ctx.pb = pb
        ctx.save_for_backward(x, A, B, rank_scale, q)
        return y

    @staticmethod
    def backward(ctx, g):
        if torch.is_grad_enabled():  # its gradients would treat the saved q as a constant: refuse, never a wrong number
            raise NotImplementedError("lora_update: double backward (create_graph=True, torch.func) is not supported; "
                                      "lora_linear supports it")
        x, A, B, rank_scale, q = ctx.saved_tensors
        n = ctx.needs_input_grad
        needs = Needs(x=n[1], lora_A=n[2], lora_B=n[3], rank_scale=n[4])
        if not needs.any() or x.shape[0] == 0:
            return g, None, None, None, None, None, None, None
        op = Operands(x, None, None, A, B, None, rank_scale, None, None, None, None, None, None)
        gr = portable.backward(ctx.pb, op, g.contiguous(), q, needs)
        return g, gr.x, gr.lora_A, gr.lora_B, gr.rank_scale, None, None, None


def lora_update(
    x: torch.Tensor,
    base_output: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    *,
    scaling: float = 1.0,
    rank_scale: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    seed: Optional[int] = None,
) -> torch.Tensor:
    """``base_output += s * ((dropout(x) A^T) * u) B^T`` in place, and returned (autograd-aware).

    For a base layer the op cannot compute: QLoRA's 4-bit base (Dettmers et al. 2023, arXiv
    2305.14314; bitsandbytes ``Linear4bit``, PEFT's ``lora.bnb.Linear4bit``), an 8-bit or torchao
    base, a hooked or custom layer. ``s`` is ``scaling`` (LoRA's ``lora_alpha / r``), ``u``
    ``rank_scale``; several adapters at once are one adapter of their concatenated ranks, each
    rank scaled by its own ``s`` through ``u``.

    Shapes and dtypes: x [..., K] float16 / bfloat16 / float32 / float64; base_output [..., N], x's
    leading shape and dtype, contiguous (the base layer's output, e.g. ``layer.base_layer(x)``);
    lora_A [r, K] and lora_B [N, r] in one dtype, x's or float32 beside a half-precision x (then the
    update is computed in float32 and rounded once when added, and their gradients are float32);
    rank_scale u [r] in x's or the adapters' dtype. ``dropout_p`` drops the adapter's input only,
    keyed by ``seed`` (None: drawn from torch's generator), the mask regenerated in backward.

    Raises:
        TypeError: a non-tensor, or a dtype outside the above (the message names argument and dtypes).
        ValueError: shapes that do not match, a device other than x's, a non-contiguous base_output,
            ``dropout_p`` outside [0, 1), a bad seed.
        NotImplementedError: in backward, double backward (``create_graph=True``); torch.func
            transforms raise torch's own error (``lora_linear`` supports both).

    >>> base = torch.nn.Linear(32, 16)      # stands for bnb.nn.Linear4bit(32, 16)
    >>> x = torch.randn(2, 3, 32)
    >>> A = torch.randn(8, 32, requires_grad=True)
    >>> B = torch.zeros(16, 8, requires_grad=True)
    >>> y = lora_update(x, base(x), A, B, scaling=2.0, dropout_p=0.05)
    >>> y.shape, y.sum().backward(), tuple(A.grad.shape)
    (torch.Size([2, 3, 16]), None, (8, 32))
    """
    check_input(x)
    check_tensor("base_output", base_output, dims=(x.dim(),), like=x)
    if base_output.shape[:-1] != x.shape[:-1]:
        raise ValueError(f"base_output: expected shape [{', '.join(map(str, x.shape[:-1]))}, N] (x's leading "
                         f"dimensions), got {shape_str(base_output)}")
    if not base_output.is_contiguous():
        raise ValueError("base_output: expected a contiguous tensor (it is updated in place)")
    K, N = x.shape[-1], base_output.shape[-1]
    check_tensor("lora_A", lora_A, dims=(2,), like=x, dtypes=adapter_dtypes(x.dtype),
                  whose="that of x, or float32 beside a half-precision x")
    check_tensor("lora_B", lora_B, dims=(2,), like=x, dtypes=(lora_A.dtype,), whose="that of lora_A")
    R = lora_A.shape[0]
    if R < 1 or lora_A.shape[1] != K:
        raise ValueError(f"lora_A: expected shape [r, {K}] (r >= 1, x's in-features {K}), got {shape_str(lora_A)}")
    if tuple(lora_B.shape) != (N, R):
        raise ValueError(f"lora_B: expected shape [{N}, {R}] (base_output's {N} features, rank {R}), "
                         f"got {shape_str(lora_B)}")
    check_vector("rank_scale", rank_scale, R, False, 1, x, dtypes=(x.dtype, lora_A.dtype),
                  whose="that of x or of lora_A")
    if not isinstance(scaling, (int, float)) or isinstance(scaling, bool):
        raise TypeError(f"scaling: expected a float, got {type(scaling).__name__}")
    if not isinstance(dropout_p, (int, float)) or isinstance(dropout_p, bool) or not (0.0 <= dropout_p < 1.0):
        raise ValueError(f"dropout_p: expected a float in [0, 1), got {dropout_p!r}")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or not (0 <= seed < 2**62)):
        raise ValueError(f"seed: expected an int in [0, 2**62) or None, got {seed!r}")
    if dropout_p > 0 and seed is None:
        seed = int(torch.randint(0, 2**31 - 1, ()))
    _Update.apply(base_output.view(-1, N), x.reshape(-1, K), lora_A, lora_B, rank_scale, float(scaling),
                  float(dropout_p), seed or 0)
    return base_output
