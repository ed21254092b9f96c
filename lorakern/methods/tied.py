"""Tied-LoRA (Renduchintala et al. 2024): A and B tied across layers, per-layer u and v."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from lorakern.adapters import AdaptedLinear
from lorakern.methods.base import Method, TargetModules, check_float
from lorakern.modules import _kaiming_uniform_

__all__ = ["TiedLoRA"]

PRESETS = {"TL5": "AB", "TL6": "ABuv"}


class TiedLoRA(Method):
    """``y = W x + v * (B (u * s A x~))``: one A [r, in] and B [out, r] per targeted module name,
    tied across all layers (every layer's gradient sums into them), and per-layer u [r]
    (``rank_scale``) and v [out] (``out_scale``).

    ``trainable`` picks what trains: ``"TL5"`` (A and B; u = v = 1 frozen), ``"TL6"`` (all four,
    the default), or any letters of ``"ABuv"``. A is kaiming-uniform; the first trained one of
    B, v, u starts at zero (B = 0 when B trains) so that the model starts unchanged, frozen
    factors are kaiming-uniform and frozen vectors are 1 (passed to the op as absent).
    ``s = lora_alpha / r``, ``lora_alpha = r`` by default.

    >>> import torch
    >>> net = torch.nn.Sequential(*[torch.nn.Linear(16, 16) for _ in range(3)])
    >>> net = TiedLoRA(r=4, target_modules=["0", "1", "2"]).apply(net)
    >>> sum(p.numel() for p in net.parameters() if p.requires_grad)  # names differ: 3 * (64 + 64 + 20)
    444
    """

    layer_type = AdaptedLinear

    def __init__(self, *, r: int = 8, target_modules: TargetModules = "all-linear",
                 lora_alpha: Optional[float] = None, lora_dropout: float = 0.0, trainable: str = "TL6",
                 backend: str = "auto") -> None:
        super().__init__(r=r, target_modules=target_modules, backend=backend)
        self.lora_alpha = check_float("lora_alpha", r if lora_alpha is None else lora_alpha, 0.0, float("inf"),
                                      low_open=True)
        self.lora_dropout = check_float("lora_dropout", lora_dropout, 0.0, 1.0, high_open=True)
        letters = PRESETS.get(trainable, trainable) if isinstance(trainable, str) else None
        if not letters or set(letters) - set("ABuv") or not set(letters) & set("Buv"):
            raise ValueError(f"trainable: expected 'TL5', 'TL6' or letters of 'ABuv' including one of B, u, v, "
                             f"got {trainable!r}")
        self.trainable = frozenset(letters)
        self.zero_init = next(k for k in "Bvu" if k in self.trainable)
        self._tied: dict[str, tuple[nn.Parameter, nn.Parameter]] = {}

    def _prepare(self, model: nn.Module, linears: dict[str, nn.Linear]) -> None:
        self._tied = {}
        for name, linear in linears.items():
            key = name.rsplit(".", 1)[-1]
            shape = (linear.out_features, linear.in_features)
            if key in self._tied:
                A, B = self._tied[key]
                if (B.shape[0], A.shape[1]) != shape:
                    raise ValueError(f"target_modules: layers named {key!r} are tied, so they must share one shape; "
                                     f"expected [out, in] = {[B.shape[0], A.shape[1]]}, got {list(shape)} at {name!r}")
                continue
            like = dict(device=linear.weight.device, dtype=linear.weight.dtype)
            A = _kaiming_uniform_(torch.empty(self.r, linear.in_features, **like))
            B = torch.empty(linear.out_features, self.r, **like)
            B = B.zero_() if self.zero_init == "B" else _kaiming_uniform_(B)
            self._tied[key] = (nn.Parameter(A, requires_grad="A" in self.trainable),
                               nn.Parameter(B, requires_grad="B" in self.trainable))

    def _make_layer(self, name: str, linear: nn.Linear) -> AdaptedLinear:
        layer = AdaptedLinear.from_linear(linear, r=self.r, lora_alpha=self.lora_alpha,
                                          lora_dropout=self.lora_dropout, backend=self.backend)
        layer.lora_A, layer.lora_B = self._tied[name.rsplit(".", 1)[-1]]
        like = dict(device=linear.weight.device, dtype=linear.weight.dtype)
        for letter, vector, size in (("u", "rank_scale", self.r), ("v", "out_scale", linear.out_features)):
            if letter in self.trainable:
                value = torch.zeros(size, **like) if self.zero_init == letter else torch.ones(size, **like)
                layer.set_vector(vector, value, trainable=True)
        return layer
