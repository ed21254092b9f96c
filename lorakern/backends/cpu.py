"""The ``cpu`` backend: the op composed from aten ops (``composed.py``) with its masked passes native (csrc/cpu/).

Everything that is not a masked pass is ``composed``'s code, called with two native passes:

- ``kept``: the dropped input x~ = x * keep / (1 - p) in one pass (``lorakern_cpu.dropout``: the
  Philox keep-mask of ARCHITECTURE.md made in SIMD lanes, about 0.5 ns an element on one AVX-512
  core, where the torch backend's ``torch.rand`` + ``torch.where`` cost ~5 + 1); its 1 / (1 - p)
  is folded into x~, so the factor composed applies on the [M, Ra] side is 1;
- ``add_dx``: dx[rows] += (dq A) * keep / (1 - p) in place (``lorakern_cpu.add_masked_``), the
  mask regenerated row by row, never stored.

Without dropout both are the plain ones (no mask at all), so the backend computes exactly what
the torch backend does. fp32 and bf16 on the CPU (``runs_on``), where the CPU has AVX2 or AVX-512;
the torch backend covers the rest.

>>> from lorakern.backends import cpu
>>> cpu.available()                      # doctest: +SKIP
(True, '')
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from lorakern import cpu_ext
from lorakern.backends import composed
from lorakern.backends.interface import Grads, Needs, Operands, Problem

__all__ = ["available", "runs_on", "forward", "backward", "dropout_keep"]

_DTYPES = (torch.float32, torch.bfloat16)


def available() -> tuple[bool, str]:
    """The CPU extension's status (the first call loads it, or builds it once); unavailable on a CPU
    with neither AVX2 nor AVX-512, whose portable kernels (scalar Philox, ~7 ns an element) are
    slower than the torch backend's torch.rand."""
    ok, why = cpu_ext.available()
    if ok and cpu_ext.isas()[0] == "generic":
        return False, "unavailable: no AVX2 or AVX-512 on this CPU (its scalar kernels are slower than the torch backend)"
    return ok, why


def runs_on(device: torch.device, dtype: torch.dtype) -> bool:
    return device.type == "cpu" and dtype in _DTYPES


def dropout_keep(seed: int, M: int, K: int, p: float, device) -> torch.Tensor:
    """bool [M, K]: the Philox stream's keep-mask (the triton and cuda backends' own, bit for bit)."""
    return cpu_ext.ops().dropout_keep(int(seed), int(M), int(K), float(p)).to(device)


class _Stream(NamedTuple):
    """What ``kept`` hands ``add_dx`` in place of a keep tensor: the mask's (p, seed)."""
    p: float
    seed: int


def kept(x: torch.Tensor, p: float, seed: int):
    """(x~, the mask's stream, 1.0), x~ = x * keep / (1 - p) made natively."""
    if p == 0.0:
        return x, None, 1.0
    return cpu_ext.ops().dropout(x, p, seed), _Stream(p, seed), 1.0


def add_dx(dx: torch.Tensor, dqk: torch.Tensor, A: torch.Tensor, keep: Optional[_Stream],
           rows: Optional[torch.Tensor]) -> None:
    """dx[rows] += (dqk A) * keep / (1 - p), in place (the plain add without dropout)."""
    if keep is None:
        composed.add_adapter_dx(dx, dqk, A, None, rows)
    else:
        cpu_ext.ops().add_masked_(dx, dqk, A, rows, keep.p, keep.seed)


PASSES = composed.MaskedPasses(kept, add_dx)


def forward(pb: Problem, op: Operands) -> tuple[torch.Tensor, torch.Tensor]:
    return composed.forward(pb, op, PASSES)


def backward(pb: Problem, op: Operands, grad_y: torch.Tensor, q: torch.Tensor, needs: Needs) -> Grads:
    return composed.backward(pb, op, grad_y, q, needs, PASSES)
