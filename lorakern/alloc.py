"""Output allocation for backends: ``torch.empty``, or NaN-filled when poisoning is on.

Tests turn poisoning on (``poisoned()`` or ``LORAKERN_POISON=1``) so that every element a
kernel should write but does not shows up as NaN.

>>> with poisoned():
...     empty((2, 3), dtype=torch.float32, device="cpu").isnan().all().item()
True
"""
from __future__ import annotations

import contextlib
import os

import torch

__all__ = ["empty", "poisoned"]

_POISON = [os.environ.get("LORAKERN_POISON") == "1"]


def empty(shape, *, dtype: torch.dtype, device) -> torch.Tensor:
    """An uninitialised output tensor (NaN-filled under poisoning; integers: all ones bits)."""
    t = torch.empty(shape, dtype=dtype, device=device)
    if _POISON[0]:
        t.fill_(float("nan") if t.is_floating_point() else -1)
    return t


@contextlib.contextmanager
def poisoned(on: bool = True):
    """Within the block, ``empty`` returns poisoned tensors."""
    old, _POISON[0] = _POISON[0], on
    try:
        yield
    finally:
        _POISON[0] = old
