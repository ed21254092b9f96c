"""Tied-LoRA (Renduchintala, Konuk, Kuchaiev, NAACL 2024, arXiv 2311.09578): A and B tied across
layers, per-layer scaling vectors u and v, each of the four trained or frozen."""
from __future__ import annotations

import re
from typing import Iterable, Optional

import torch
from torch import nn

from lorakern.adapters import AdaptedLinear
from lorakern.methods.base import Method, TargetModules, check_float
from lorakern.modules import _kaiming_uniform_

__all__ = ["TiedLoRA", "tie_role", "PRESETS"]

# configurations of the paper named there: trained letters (frozen A or B is tied all the same)
PRESETS = {"TL5": "AB", "TL6": "ABuv"}
_INDEX = re.compile(r"^\d+$")


def tie_role(name: str) -> str:
    """The role of a module: its name with every integer component (layer, block, sublayer index) a ``*``.

    >>> tie_role("model.layers.11.self_attn.o_proj"), tie_role("decoder.block.3.layer.1.EncDecAttention.o")
    ('model.layers.*.self_attn.o_proj', 'decoder.block.*.layer.*.EncDecAttention.o')
    """
    return ".".join("*" if _INDEX.match(part) else part for part in name.split("."))


class TiedLoRA(Method):
    """``y = W x + v * (B (u * (s A x~)))`` (the paper's formulation): one A [r, in] and B [out, r]
    per tie group, shared by all its layers (the same ``nn.Parameter``, so every layer's gradient
    sums into them), and per-layer u [r] (``rank_scale``) and v [out] (``out_scale``), all in the
    weight's dtype.

    A tie group is a role and a shape: layers whose names are equal up to their integer components
    (``tie_role``) and whose ``[out, in]`` agree. So the q projections of all decoder layers share
    one pair, while an attention output and a cross-attention output, or the encoder's and the
    decoder's layers of a T5-like model, get pairs of their own, as do layers of one role whose
    shapes differ.

    ``trainable`` says which of A, B, u, v train: a name from the paper's table of configurations
    or the letters themselves. ``"TL5"`` trains A and B (u = v = 1), ``"TL6"`` (the default, the
    paper's best) trains all four; ``"ABuv"``, ``"Buv"``, ``"Au"``... build any other row (one of
    B, u, v must train). The table's rows TL1-TL4 could not be read here (only the abstract and secondary
    summaries, which name TL5 and TL6 and their trained sets), so they are not named: build them by
    their letters. Trainable parameters, for tie groups g of ``L_g`` layers ``[out_g, in_g]``
    (``parameter_count``)::

        sum over g of  [A] r in_g + [B] out_g r + L_g ([u] r + [v] out_g)

    which for the paper's one group of L square ``d x d`` layers is ``2dr`` (TL5) and
    ``2dr + L(r + d)`` (TL6), against LoRA's ``2Ldr``.

    Initialization (the paper's column could not be read here): A kaiming-uniform (a = sqrt 5) as
    PEFT's LoRA; the first trained one of B, v, u starts at zero so that the model starts
    unchanged; a frozen B is kaiming-uniform; frozen u and v are 1 (passed to the op as absent).
    ``s = lora_alpha / r`` with ``lora_alpha = r`` by default (the paper sets alpha = r). The
    paper's own runs share one A among the fused q, k and v projections of its models; here q, k,
    v are separate roles. Layers are ``AdaptedLinear``; raises ValueError for a bad ``trainable``
    or ``lora_alpha``/``lora_dropout`` out of range.

    >>> import torch
    >>> net = torch.nn.Sequential(*[torch.nn.Linear(16, 16) for _ in range(3)])
    >>> m = TiedLoRA(r=4, target_modules=["0", "1", "2"])
    >>> net = m.apply(net)
    >>> sum(p.numel() for p in net.parameters() if p.requires_grad), m.parameter_count([(16, 16, 3)])
    (188, 188)
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
            raise ValueError(f"trainable: expected one of {sorted(PRESETS)} or letters of 'ABuv' including one of "
                             f"B, u, v, got {trainable!r}")
        self.trainable = frozenset(letters)
        self.zero_init = next(k for k in "Bvu" if k in self.trainable)
        self._tied: dict[tuple[str, int, int], tuple[nn.Parameter, nn.Parameter]] = {}

    @staticmethod
    def _group(name: str, linear: nn.Linear) -> tuple[str, int, int]:
        return tie_role(name), linear.out_features, linear.in_features

    def _prepare(self, model: nn.Module, linears: dict[str, nn.Linear]) -> None:
        self._tied = {}
        for name, linear in linears.items():
            key = self._group(name, linear)
            if key in self._tied:
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
        layer.lora_A, layer.lora_B = self._tied[self._group(name, linear)]
        like = dict(device=linear.weight.device, dtype=linear.weight.dtype)
        for letter, vector, size in (("u", "rank_scale", self.r), ("v", "out_scale", linear.out_features)):
            if letter in self.trainable:
                value = torch.zeros(size, **like) if self.zero_init == letter else torch.ones(size, **like)
                layer.set_vector(vector, value, trainable=True)
        return layer

    def groups(self, model: nn.Module) -> dict[tuple[str, int, int], list[str]]:
        """``{(role, out, in): [layer names]}``: the tie groups of a model this method adapted."""
        out: dict[tuple[str, int, int], list[str]] = {}
        for name, layer in self.layers(model):
            out.setdefault(self._group(name, layer), []).append(name)
        return out

    def parameter_count(self, groups: Iterable[tuple[int, int, int]]) -> int:
        """Trainable parameters for tie groups given as ``(in, out, layers)`` (the formula above)."""
        t = self.trainable
        return sum(("A" in t) * self.r * k + ("B" in t) * n * self.r + L * (("u" in t) * self.r + ("v" in t) * n)
                   for k, n, L in groups)
