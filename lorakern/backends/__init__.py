"""The backends the op can run, as a static table: the one place that names them.

``BACKENDS[name]`` is a module implementing :class:`lorakern.backends.interface.Backend`. A
backend whose imports fail (triton not installed) is replaced by :class:`Missing`, which says why.

>>> from lorakern.backends import status
>>> status("torch")
(True, '')
"""
from __future__ import annotations

import torch

from lorakern.backends import cpu, portable
from lorakern.backends.interface import Backend

__all__ = ["BACKENDS", "NAMES", "Missing", "get", "status", "runs_on"]


class Missing:
    """A backend that cannot be imported here: ``available()`` gives the reason."""

    def __init__(self, name: str, error: BaseException) -> None:
        self._why = f"unavailable: {name} could not be imported ({type(error).__name__}: {error})"

    def available(self) -> tuple[bool, str]:
        return False, self._why

    def runs_on(self, device: torch.device, dtype: torch.dtype) -> bool:
        return False


try:
    from lorakern import triton as _triton
except ImportError as e:  # triton is optional (no wheel for the platform)
    _triton = Missing("triton", e)

from lorakern import cuda as _cuda  # noqa: E402  (loads nothing until asked)

BACKENDS: dict[str, Backend] = {"torch": portable, "cpu": cpu, "triton": _triton, "cuda": _cuda}
NAMES: tuple[str, ...] = tuple(BACKENDS)


def get(name: str) -> Backend:
    """The backend called ``name``; ``ValueError`` naming the choices for any other name."""
    try:
        return BACKENDS[name]
    except KeyError:
        raise ValueError(f"backend: expected one of {('auto',) + NAMES}, got {name!r}") from None


def status(name: str) -> tuple[bool, str]:
    """``(True, "")`` if backend ``name`` can run here, else ``(False, reason)`` in one line."""
    return get(name).available()


def runs_on(name: str, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether backend ``name`` is available and computes ``dtype`` tensors on ``device``."""
    b = get(name)
    return b.available()[0] and b.runs_on(device, dtype)
