"""The ``triton`` backend (ARCHITECTURE.md's interface): fused LoRA-family kernels in Triton.

>>> from lorakern.triton import available
>>> available()[0] in (True, False)
True
"""
from __future__ import annotations

import torch

from lorakern.triton.backend import backward, forward
from lorakern.triton.configs import interpreting
from lorakern.triton.dropout import dropout_keep

__all__ = ["available", "runs_on", "forward", "backward", "dropout_keep"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def available() -> tuple[bool, str]:
    """``(True, "")`` on a CUDA GPU, or on CPU under TRITON_INTERPRET=1; else why not, in one line."""
    if interpreting():
        return True, ""
    if not torch.cuda.is_available():
        return False, "unavailable: no CUDA device (set TRITON_INTERPRET=1 to run the kernels on CPU)"
    return True, ""


def runs_on(device: torch.device, dtype: torch.dtype) -> bool:
    """CUDA devices, and the CPU under TRITON_INTERPRET=1; float16, bfloat16 and float32."""
    return dtype in _DTYPES and (device.type == "cuda" or (device.type == "cpu" and interpreting()))
