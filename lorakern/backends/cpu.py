"""The ``cpu`` backend: the op composed from aten ops (``composed.py``) with its masked passes native (csrc/cpu/).

Everything that is not a masked pass is ``composed``'s code. With dropout, x~ = x * keep / (1 - p)
is never written: ``kept`` hands the other passes x itself and the mask's (p, seed), and each
pass regenerates the Philox keep-mask of ARCHITECTURE.md in SIMD lanes as it reads x (about 0.5
ns an element on one AVX-512 core, where the torch backend's ``torch.rand`` + ``torch.where``
cost ~5 + 1), row block by row block, the rank-r products in BLAS:

- ``shrink``: q = x~[rows] A^T in one pass over x (``lorakern_cpu.shrink``);
- ``x_grads``: dA = dq^T x~[rows] and dx[rows] += (dq A) * keep / (1 - p) in one pass over x and
  dx, each row's mask made once (``lorakern_cpu.masked_At_add_``; ``masked_At`` / ``add_masked_``
  when only one of them is needed).

Against writing x~ and handing it to BLAS (this backend until 2026-11-30; bench/cpu_kernels.py, ns
an element of x, fp32, r = 16): shrink is on a par at M = 1024, K = 256 / 704 on one thread and
faster at 4096 x 2048 (1.2 against 1.7 on one thread); masked_At_add_ beats both the x~ path and
its two separate passes everywhere (1.5 / 1.9 / 1.7 against 2.1 / 2.8 / 3.1 for x~).

The 1 / (1 - p) is applied inside the passes, so the factor composed applies on the [M, Ra] side
is 1. Without dropout the passes are composed's aten ones (no mask at all), so the backend
computes exactly what the torch backend does. fp32 and bf16 on the CPU (``runs_on``), where the
CPU has AVX2 or AVX-512; the torch backend covers the rest.

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
    """What ``kept`` hands the passes in place of a keep tensor: the mask's (p, seed)."""
    p: float
    seed: int


def kept(x: torch.Tensor, p: float, seed: int):
    """(x, the mask's stream, 1.0): the passes read x through the mask; (x, None, 1.0) without dropout."""
    if p == 0.0:
        return x, None, 1.0
    return x, _Stream(p, seed), 1.0


def shrink(x: torch.Tensor, keep: Optional[_Stream], A: torch.Tensor, rows: Optional[torch.Tensor]) -> torch.Tensor:
    """q = x~[rows] A^T, float32 [m, Ra] (x [M, K] f32 / bf16, A [Ra, K] x's dtype or f32), x~ never written."""
    if keep is None:
        return composed.aten_shrink(x, None, A, rows)
    return cpu_ext.ops().shrink(x, A, rows, keep.p, keep.seed)


def x_grads(dx: Optional[torch.Tensor], dqk: torch.Tensor, A: torch.Tensor, x: torch.Tensor,
            keep: Optional[_Stream], rows: Optional[torch.Tensor], need_dA: bool) -> Optional[torch.Tensor]:
    """dx[rows] += (dqk A) * keep / (1 - p) in place (dx given) and dA = dqk^T x~[rows], float32
    [Ra, K] (when ``need_dA``, else None), in one pass over x; dqk float32 [m, Ra]."""
    if keep is None:
        return composed.aten_x_grads(dx, dqk, A, x, None, rows, need_dA)
    ops = cpu_ext.ops()
    if dx is None:
        return ops.masked_At(dqk, x, rows, keep.p, keep.seed) if need_dA else None
    if need_dA:
        return ops.masked_At_add_(dx, dqk, x, A, rows, keep.p, keep.seed)
    ops.add_masked_(dx, dqk, A, rows, keep.p, keep.seed)
    return None


PASSES = composed.MaskedPasses(kept, shrink, x_grads)


def forward(pb: Problem, op: Operands) -> tuple[torch.Tensor, torch.Tensor]:
    return composed.forward(pb, op, PASSES)


def backward(pb: Problem, op: Operands, grad_y: torch.Tensor, q: torch.Tensor, needs: Needs) -> Grads:
    return composed.backward(pb, op, grad_y, q, needs, PASSES)
