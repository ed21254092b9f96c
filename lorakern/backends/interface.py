"""The interface between the op (``lorakern/ops.py``) and its backends.

The op checks and normalises every argument, then builds one :class:`Problem` (the sizes and
scalars) and one :class:`Operands` (the tensors) per call and hands both to a :class:`Backend`.
A backend computes; it never checks arguments again, never syncs with the host, and allocates
what its kernels write through ``lorakern.alloc.empty``. ARCHITECTURE.md ("Backend interface")
gives each field's shape and meaning.

>>> from lorakern.backends import BACKENDS, interface
>>> all(isinstance(b, interface.Backend) for b in BACKENDS.values())
True
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Protocol, runtime_checkable

import torch

__all__ = ["Problem", "Needs", "Operands", "Grads", "Backend", "qdtype", "base_scale_grad", "adapters_as_x",
           "grads_as"]


class Needs(NamedTuple):
    """Which gradients backward computes, by the name of the input they belong to."""
    x: bool = False
    weight: bool = False
    bias: bool = False
    lora_A: bool = False
    lora_B: bool = False
    rank_scale: bool = False
    out_scale: bool = False
    base_scale: bool = False

    def any(self) -> bool:
        return any(self)


class Problem(NamedTuple):
    """Sizes and scalars of one call, built once by the op (a tuple: cheap to build, immutable).

    M rows of x (flattened), K in-features, N out-features, R ranks of A / B, Ra active ranks
    (R when no mask compacts them), G adapters (1 without banks). ``scaling`` is s (ignored when
    ``Operands.scaling_g`` gives one per adapter); ``seed`` is meaningful only when
    ``dropout_p`` > 0; ``deterministic`` asks for every sum in a fixed order.
    """
    M: int
    K: int
    N: int
    R: int
    Ra: int
    G: int
    banked: bool
    scaling: float
    dropout_p: float
    seed: int
    deterministic: bool


class Operands(NamedTuple):
    """The tensors of one call, as the op normalised them (ARCHITECTURE.md's table)."""
    x: torch.Tensor                          # [M, K], any strides
    weight: torch.Tensor                     # [N, K], any strides
    bias: Optional[torch.Tensor]             # [N]
    lora_A: torch.Tensor                     # [R, K] or [G, R, K], any strides; x's dtype or fp32
    lora_B: torch.Tensor                     # [N, R] or [G, N, R], any strides; lora_A's dtype
    scaling_g: Optional[torch.Tensor]        # [G] float32 (float64 for float64 x): per-adapter s
    rank_scale: Optional[torch.Tensor]       # [R] or [G, R]: u * m
    rank_idx: Optional[torch.Tensor]         # int64 [Ra]: the active ranks (None: all R)
    out_scale: Optional[torch.Tensor]        # [N] or [G, N]
    base_scale: Optional[torch.Tensor]       # [N]
    adapter_index: Optional[torch.Tensor]    # int64 [M], values in [-1, G) (banks only)
    row_order: Optional[torch.Tensor]        # int64 [M]: rows stably sorted by adapter (banks only)
    adapter_rows: Optional[torch.Tensor]     # CPU int64 [G + 1]: rows per adapter, -1 first (None
                                             # where counting would sync: torch.compile, graph capture)


class Grads(NamedTuple):
    """Gradients in the shapes of their inputs; None where ``Needs`` said False."""
    x: Optional[torch.Tensor] = None
    weight: Optional[torch.Tensor] = None
    bias: Optional[torch.Tensor] = None
    lora_A: Optional[torch.Tensor] = None
    lora_B: Optional[torch.Tensor] = None
    rank_scale: Optional[torch.Tensor] = None
    out_scale: Optional[torch.Tensor] = None
    base_scale: Optional[torch.Tensor] = None


@runtime_checkable
class Backend(Protocol):
    """What a backend module provides (module-level functions satisfy it)."""

    def available(self) -> tuple[bool, str]:
        """``(True, "")``, or ``(False, "unavailable: <one-line reason>")``."""

    def runs_on(self, device: torch.device, dtype: torch.dtype) -> bool:
        """Whether it computes tensors of ``dtype`` on ``device`` (asked only when available)."""

    def forward(self, pb: Problem, op: Operands) -> tuple[torch.Tensor, torch.Tensor]:
        """``(y, q)``: y [M, N] in x's dtype, q = x~ A^T over the active ranks, ``qdtype(x)`` [M, Ra]."""

    def backward(self, pb: Problem, op: Operands, grad_y: torch.Tensor, q: torch.Tensor, needs: Needs) -> Grads:
        """Gradients per docs/contract.md section 1; nothing is computed for what ``needs`` leaves False."""

    def dropout_keep(self, seed: int, M: int, K: int, p: float, device) -> torch.Tensor:
        """bool [M, K]: the keep-mask this backend regenerates (tests hand it to the oracle)."""


def qdtype(x: torch.Tensor) -> torch.dtype:
    """q's dtype: float32, or float64 for float64 inputs."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def base_scale_grad(g: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """dc = sum over rows of g * (x W^T) in ``qdtype(x)``: the base product is recomputed (one
    GEMM), not saved, and freed at once."""
    return torch.mm(x, weight.T).mul_(g).sum(0, dtype=qdtype(x))


def adapters_as_x(op: Operands) -> Operands:
    """``op`` with lora_A, lora_B, rank_scale and out_scale in x's dtype (``op`` itself when they are).

    For kernels that take one dtype (triton, cuda): fp32 adapters beside a half-precision x are
    rounded to x's dtype for the kernel; :func:`grads_as` returns their gradients in fp32.
    """
    cast = lambda t: t if t is None or t.dtype == op.x.dtype else t.to(op.x.dtype)  # noqa: E731
    if all(t is cast(t) for t in (op.lora_A, op.lora_B, op.rank_scale, op.out_scale)):
        return op
    return op._replace(lora_A=cast(op.lora_A), lora_B=cast(op.lora_B), rank_scale=cast(op.rank_scale),
                       out_scale=cast(op.out_scale))


def grads_as(grads: Grads, op: Operands) -> Grads:
    """``grads`` with each adapter gradient in its input's dtype in ``op`` (undoes :func:`adapters_as_x`)."""
    def cast(g, like):
        return g if g is None or like is None or g.dtype == like.dtype else g.to(like.dtype)

    return grads._replace(lora_A=cast(grads.lora_A, op.lora_A), lora_B=cast(grads.lora_B, op.lora_B),
                          rank_scale=cast(grads.rank_scale, op.rank_scale),
                          out_scale=cast(grads.out_scale, op.out_scale))
