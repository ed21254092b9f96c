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

from dataclasses import dataclass
from typing import NamedTuple, Optional, Protocol, runtime_checkable

import torch

__all__ = ["Problem", "Needs", "Operands", "Grads", "Backend", "qdtype", "base_scale_grad"]


@dataclass(frozen=True)
class Needs:
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
        return any((self.x, self.weight, self.bias, self.lora_A, self.lora_B, self.rank_scale, self.out_scale,
                    self.base_scale))


@dataclass(frozen=True)
class Problem:
    """Sizes and scalars of one call, built once by the op.

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
    lora_A: torch.Tensor                     # [R, K] or [G, R, K], any strides
    lora_B: torch.Tensor                     # [N, R] or [G, N, R], any strides
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
        """Gradients per DESIGN.md section 1; nothing is computed for what ``needs`` leaves False."""

    def dropout_keep(self, seed: int, M: int, K: int, p: float, device) -> torch.Tensor:
        """bool [M, K]: the keep-mask this backend regenerates (tests hand it to the oracle)."""


def qdtype(x: torch.Tensor) -> torch.dtype:
    """q's dtype: float32, or float64 for float64 inputs."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def base_scale_grad(g: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """dc = sum over rows of g * (x W^T) in ``qdtype(x)``: the base product is recomputed (one
    GEMM), not saved, and freed at once."""
    return torch.mm(x, weight.T).mul_(g).sum(0, dtype=qdtype(x))
