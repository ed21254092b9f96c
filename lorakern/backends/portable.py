"""The ``torch`` backend: the op composed from aten ops (``composed.py``) on any device and dtype
(float64 included), its keep-mask made by torch's generator from the seed and regenerated in
backward, never stored.

>>> import torch
>>> from lorakern.backends import portable
>>> portable.dropout_keep(0, 2, 3, 0.5, "cpu").shape
torch.Size([2, 3])
"""
from __future__ import annotations

import torch

from lorakern.backends import composed
from lorakern.backends.interface import Grads, Needs, Operands, Problem

__all__ = ["available", "runs_on", "forward", "backward", "dropout_keep", "PASSES"]


def available() -> tuple[bool, str]:
    return True, ""


def runs_on(device: torch.device, dtype: torch.dtype) -> bool:
    return True


def dropout_keep(seed: int, M: int, K: int, p: float, device) -> torch.Tensor:
    """The torch backend's keep-mask: bool [M, K], a pure function of (seed, M, K, p, device)."""
    gen = torch.Generator(device=device)
    gen.manual_seed(int(seed))
    return torch.rand(M, K, device=device, generator=gen) >= p


def kept(x: torch.Tensor, p: float, seed: int):
    """(x * keep, keep, 1 / (1 - p)): the 1/(1-p) is applied to the small [M, Ra] side, not here."""
    if p == 0.0:
        return x, None, 1.0
    keep = dropout_keep(seed, x.shape[0], x.shape[1], p, x.device)
    return torch.where(keep, x, 0), keep, 1.0 / (1.0 - p)


PASSES = composed.MaskedPasses(kept)


def forward(pb: Problem, op: Operands) -> tuple[torch.Tensor, torch.Tensor]:
    return composed.forward(pb, op, PASSES)


def backward(pb: Problem, op: Operands, grad_y: torch.Tensor, q: torch.Tensor, needs: Needs) -> Grads:
    return composed.backward(pb, op, grad_y, q, needs, PASSES)
