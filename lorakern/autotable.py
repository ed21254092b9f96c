"""Which native backend ``backend="auto"`` tries first on a CUDA GPU, per device kind, dtype and shape.

The table is measured on each GPU kind and committed as ``autotable.json`` beside this file:
``{"<device name>": {"<dtype>": [[M_max, "backend"], ...]}}`` with rows sorted by M_max; the
first row whose M_max >= M names the faster backend. Without an entry, triton goes first.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

import torch

_TABLE = Path(__file__).with_name("autotable.json")
_DEFAULT = ("triton", "cuda", "torch")


@functools.lru_cache(maxsize=None)
def _load() -> dict:
    return json.loads(_TABLE.read_text()) if _TABLE.exists() else {}


@functools.lru_cache(maxsize=None)
def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device)


def devices() -> tuple[str, ...]:
    """The GPU names the table has measured rows for."""
    return tuple(_load())


def preference(device: torch.device, dtype: torch.dtype, M: int, K: int, N: int, R: int) -> tuple[str, ...]:
    """Backends in the order ``auto`` tries them for this call."""
    return order(_device_name(device), str(dtype).replace("torch.", ""), M)


def order(device_name: str, dtype: str, M: int) -> tuple[str, ...]:
    """Backends in the order ``auto`` tries them on a GPU named ``device_name`` for ``dtype``
    (``"bfloat16"``, ...) and M rows (``lorakern.costmodel`` asks without a GPU).

    >>> order("no such GPU", "bfloat16", 8192)
    ('triton', 'cuda', 'torch')
    """
    for m_max, name in _load().get(device_name, {}).get(dtype, []):
        if M <= m_max:
            return (name,) + tuple(b for b in _DEFAULT if b != name)
    return _DEFAULT
