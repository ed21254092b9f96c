"""LoRA (Hu et al. 2021), with rsLoRA's scaling and PiSSA's initialization as options."""
from __future__ import annotations

import torch
from torch import nn

from lorakern.methods.base import Method, TargetModules, check_float
from lorakern.modules import LoRALinear

__all__ = ["LoRA"]

_INITS = ("kaiming", "gaussian", "pissa")


class LoRA(Method):
    """``W x + s B A x``: A kaiming-uniform (a = sqrt 5), B = 0, ``s = lora_alpha / r``.

    ``use_rslora``: ``s = lora_alpha / sqrt(r)``. ``init="gaussian"``: A ~ N(0, 1/r).
    ``init="pissa"``: A = S^1/2 V^T, B = U S^1/2 from the top-r SVD of W (each divided by
    sqrt(s)), and the residual ``W - s B A`` becomes the frozen base, as PEFT's ``"pissa"``.

    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    >>> net = LoRA(r=4, lora_alpha=8, target_modules=["0", "2"]).apply(net)
    >>> sum(p.numel() for p in net.parameters() if p.requires_grad)  # 4 * (16 + 16) + 4 * (16 + 4)
    208
    """

    layer_type = LoRALinear

    def __init__(self, *, r: int = 8, target_modules: TargetModules = "all-linear", lora_alpha: float = 8.0,
                 lora_dropout: float = 0.0, use_rslora: bool = False, init: str = "kaiming",
                 backend: str = "auto") -> None:
        super().__init__(r=r, target_modules=target_modules, backend=backend)
        self.lora_alpha = check_float("lora_alpha", lora_alpha, 0.0, float("inf"), low_open=True)
        self.lora_dropout = check_float("lora_dropout", lora_dropout, 0.0, 1.0, high_open=True)
        if not isinstance(use_rslora, bool):
            raise TypeError(f"use_rslora: expected a bool, got {type(use_rslora).__name__}")
        self.use_rslora = use_rslora
        if init not in _INITS:
            raise ValueError(f"init: expected one of {_INITS}, got {init!r}")
        self.init = init

    def _make_layer(self, name: str, linear: nn.Linear) -> LoRALinear:
        layer = self.layer_type.from_linear(
            linear, r=self.r, lora_alpha=self.lora_alpha, lora_dropout=self.lora_dropout,
            use_rslora=self.use_rslora, init_lora_weights="gaussian" if self.init == "gaussian" else True,
            backend=self.backend)
        if self.init == "pissa":
            _pissa_(layer, name)
        return layer


@torch.no_grad()
def _pissa_(layer: LoRALinear, name: str) -> None:
    """PiSSA in place: principal factors into A and B, the residual into the frozen weight."""
    if layer.r > min(layer.in_features, layer.out_features):
        raise ValueError(f"r: expected at most min(in, out) = {min(layer.in_features, layer.out_features)} "
                         f"for init='pissa' on {name!r}, got {layer.r}")
    W = layer.weight.float()
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    root = (S[: layer.r] / layer.scaling).sqrt()
    A = root[:, None] * Vh[: layer.r]
    B = U[:, : layer.r] * root
    layer.lora_A.copy_(A)
    layer.lora_B.copy_(B)
    layer.weight.copy_(W - layer.scaling * (B @ A))
