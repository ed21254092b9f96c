"""The ``torch`` backend: the op composed from aten ops (``composed.py``) on any device and dtype
(float64 included), its keep-mask drawn by torch's generator (one per thread and device, reseeded
per call) from the seed and regenerated in backward, never stored.

>>> import torch
>>> from lorakern.backends import portable
>>> portable.dropout_keep(0, 2, 3, 0.5, "cpu").shape
torch.Size([2, 3])
"""
from __future__ import annotations

import threading

import torch

from lorakern.backends import composed
from lorakern.backends.interface import Grads, Needs, Operands, Problem

__all__ = ["available", "runs_on", "forward", "backward", "dropout_keep", "PASSES"]


def available() -> tuple[bool, str]:
    return True, ""


def runs_on(device: torch.device, dtype: torch.dtype) -> bool:
    return True


_LOCAL = threading.local()  # .generators: {device: torch.Generator}, this thread's


def _generator(device) -> torch.Generator:
    """This thread's generator for ``device``, made on its first use there.

    One per (thread, device), never one per call: making a CUDA generator costs more than a
    decode-size layer (run B: dropout at M = 1 was 57x the base on an H100). Per thread, so that
    reseeding and drawing never interleave with another thread's; keyed by the device with its
    index (``"cuda"`` means the current device), so each GPU draws from its own.
    """
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    gens = getattr(_LOCAL, "generators", None)
    if gens is None:
        gens = _LOCAL.generators = {}
    gen = gens.get(device)
    if gen is None:
        gen = gens[device] = torch.Generator(device=device)
    return gen


def dropout_keep(seed: int, M: int, K: int, p: float, device) -> torch.Tensor:
    """The torch backend's keep-mask: bool [M, K], a pure function of (seed, M, K, p, device):
    ``manual_seed`` resets the reused generator (its CUDA Philox offset too) before each draw.

    CUDA graphs: torch refuses to reseed a generator during capture unless the seed is unchanged,
    so the torch backend with dropout is not capturable (the native backends take the seed as a
    kernel argument and are); without dropout no generator is touched.
    """
    gen = _generator(device)
    gen.manual_seed(int(seed))
    # drawn straight into a bool tensor (one byte an element): no float uniforms written and compared
    return torch.empty(M, K, dtype=torch.bool, device=device).bernoulli_(1.0 - p, generator=gen)


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
