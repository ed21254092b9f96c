"""LoRA (Hu et al. 2021, arXiv 2106.09685), with rsLoRA's scaling (arXiv 2312.03732) and PiSSA's
initialization (arXiv 2404.02948) as options, as PEFT's ``LoraConfig`` has them."""
from __future__ import annotations

from typing import Optional, Union

from torch import nn

from lorakern.methods.base import Method, TargetModules, check_float
from lorakern.modules import LoRALinear, check_init_lora_weights

__all__ = ["LoRA"]

_ALIASES = ("kaiming", "gaussian", "pissa", "pissa_niter_<n>")  # what ``init`` takes ("kaiming": PEFT's True)


def _init_lora_weights(init_lora_weights: Union[bool, str], init: Optional[str]) -> Union[bool, str]:
    """PEFT's ``init_lora_weights`` value from the two spellings: ``init_lora_weights`` itself, or
    the alias ``init`` (``"kaiming"`` for True, else the same strings), which wins only where
    ``init_lora_weights`` is left at its default True.

    Raises:
        ValueError: a value LoRALinear does not implement, or ``init`` and a non-default
            ``init_lora_weights`` that disagree.
    """
    peft_init = check_init_lora_weights(init_lora_weights)
    if init is None:
        return peft_init
    try:
        alias = True if init == "kaiming" else check_init_lora_weights(init) if isinstance(init, str) else None
    except ValueError:
        alias = None
    if alias is None:
        raise ValueError(f"init: expected one of {_ALIASES}, got {init!r}")
    if peft_init is not True and peft_init != alias:
        raise ValueError(f"init: expected it unset or equal to init_lora_weights, got init={init!r} and "
                         f"init_lora_weights={init_lora_weights!r}")
    return alias


class LoRA(Method):
    """``W x + s B A x~`` over the op: A kaiming-uniform (a = sqrt 5), B = 0, ``s = lora_alpha / r``.

    PEFT's ``LoraConfig`` names and defaults: ``r``, ``lora_alpha``, ``lora_dropout``,
    ``use_rslora`` (``s = lora_alpha / sqrt(r)``), ``target_modules`` and ``init_lora_weights``:
    True (A kaiming-uniform, B = 0), False (A and B both random, as PEFT's False: for tests, the
    adapter is not zero at the start), ``"gaussian"`` (A ~ N(0, 1/r)), ``"pissa"`` (A = S^1/2 V^T,
    B = U S^1/2 from the top-r SVD of W, each divided by sqrt(s), and the residual ``W - s B A``
    becomes the frozen base, as PEFT's ``pissa_init``) or ``"pissa_niter_[n]"`` (the same from
    ``torch.svd_lowrank(W, q=r, niter=n)``, PEFT's fast-SVD PiSSA: a randomized SVD, so seed
    torch for a repeatable start). ``init`` is an alias kept for older code (``"kaiming"`` for
    True, else the same strings). Layers are ``LoRALinear``, A [r, in] and B [out, r] in the
    weight's dtype (PiSSA's SVD in float32); raises ValueError for bad values (and
    ``r > min(in, out)`` with PiSSA), TypeError for bad types.

    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    >>> net = LoRA(r=4, lora_alpha=8, target_modules=["0", "2"], init_lora_weights="pissa_niter_4").apply(net)
    >>> sum(p.numel() for p in net.parameters() if p.requires_grad)  # 4 * (16 + 16) + 4 * (16 + 4)
    208
    """

    layer_type = LoRALinear

    def __init__(self, *, r: int = 8, target_modules: TargetModules = "all-linear", lora_alpha: float = 8.0,
                 lora_dropout: float = 0.0, use_rslora: bool = False, init_lora_weights: Union[bool, str] = True,
                 init: Optional[str] = None, backend: str = "auto") -> None:
        super().__init__(r=r, target_modules=target_modules, backend=backend)
        self.lora_alpha = check_float("lora_alpha", lora_alpha, 0.0, float("inf"), low_open=True)
        self.lora_dropout = check_float("lora_dropout", lora_dropout, 0.0, 1.0, high_open=True)
        if not isinstance(use_rslora, bool):
            raise TypeError(f"use_rslora: expected a bool, got {type(use_rslora).__name__}")
        self.use_rslora = use_rslora
        self.init_lora_weights = _init_lora_weights(init_lora_weights, init)

    def _make_layer(self, name: str, linear: nn.Linear) -> LoRALinear:
        try:
            return self.layer_type.from_linear(
                linear, r=self.r, lora_alpha=self.lora_alpha, lora_dropout=self.lora_dropout,
                use_rslora=self.use_rslora, init_lora_weights=self.init_lora_weights,
                backend=self.backend)
        except ValueError as e:
            raise ValueError(f"{e} (layer {name!r})") from e
