"""DoRA (Liu et al. 2024): a trained magnitude times the normalized direction ``W + s B A``."""
from __future__ import annotations

from lorakern.adapters import DoRALinear
from lorakern.methods.lora import LoRA

__all__ = ["DoRA"]


class DoRA(LoRA):
    """``y = m / ||W + s B A||_row * (x W^T + s x~ A^T B^T) + b``, the norm detached (as PEFT).

    LoRA's hyperparameters and initializations, plus ``magnitude [out]`` per layer, which starts
    at the row norms of W. One call of the op per layer: the ratio is its ``base_scale`` and
    its ``out_scale``. Training-time dropout applies to the adapter path only (PEFT also feeds
    the dropped input to the base path).

    >>> import torch
    >>> net = DoRA(r=4, target_modules=["0"]).apply(torch.nn.Sequential(torch.nn.Linear(16, 8)))
    >>> sum(p.numel() for p in net.parameters() if p.requires_grad)  # 4 * (16 + 8) + 8
    104
    """

    layer_type = DoRALinear
