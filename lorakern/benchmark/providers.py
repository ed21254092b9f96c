"""Who is measured: the frozen base, PEFT's layer, the addmm style and lorakern, over fresh inputs.

Providers: ``base`` (``F.linear``, the floor), ``peft`` (PEFT's real ``lora.Linear``; AdaLoRA's
``SVDLinear`` for masked ranks; ``adapter_names=`` for a bank), ``addmm`` (base GEMM, then
``out.addmm_(dropout(x) A^T, B^T)``), ``lorakern-auto`` (what users get) and
``lorakern-<name>`` for every backend of ``lorakern.backends.NAMES`` (a backend added to that
table becomes a provider here).

>>> from lorakern.benchmark.cases import Shape, Variant
>>> inp = make_inputs(Shape(4, 8, 6, 2), Variant(), torch.float32, torch.device("cpu"))
>>> build("base", inp, Shape(4, 8, 6, 2), Variant()).fn(inp.x).shape
torch.Size([4, 6])
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from lorakern import backends
from lorakern.benchmark.cases import Shape, Variant
from lorakern.extras import quiet, require
from lorakern.ops import lora_linear

__all__ = ["PROVIDERS", "ALPHA_PER_RANK", "Inputs", "Built", "Skip", "make_inputs", "set_bytes", "build",
           "available_providers", "default_dtype"]

LORAKERN = "lorakern-"
PROVIDERS = ("base", "peft", "addmm", LORAKERN + "auto") + tuple(LORAKERN + b for b in backends.NAMES)
ALPHA_PER_RANK = 2.0  # lora_alpha = 2 r, so scaling = 2


def default_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 on CUDA, float32 elsewhere (docs/contract.md section 6)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


@dataclass
class Inputs:
    """One input set: fresh random tensors, never zeros."""

    x: torch.Tensor            # [M, K], requires grad
    W: torch.Tensor            # [N, K], frozen
    b: torch.Tensor            # [N], frozen
    A: torch.Tensor            # [r, K] or [G, r, K]
    B: torch.Tensor            # [N, r] or [G, N, r]
    E: Optional[torch.Tensor]  # [r] rank scale (AdaLoRA's lambda) with masked ranks
    mask: Optional[torch.Tensor]   # bool [r], half of it True
    index: Optional[torch.Tensor]  # int64 [M] in [0, G)
    grad_y: torch.Tensor       # [M, N]

    def tensors(self) -> list[torch.Tensor]:
        values = (getattr(self, f.name) for f in dataclasses.fields(self))
        return [t for t in values if isinstance(t, torch.Tensor)]

    def adapter(self) -> list[torch.Tensor]:
        return [t for t in (self.A, self.B, self.E) if t is not None]


def make_inputs(shape: Shape, variant: Variant, dtype: torch.dtype, device: torch.device) -> Inputs:
    """A fresh input set of ``shape`` for ``variant`` (torch's global generator)."""
    M, K, N, r = shape.M, shape.K, shape.N, shape.r
    G = variant.adapters
    lead = (G,) if G else ()
    rnd = lambda *s, scale=1.0: (torch.randn(*s, device=device, dtype=torch.float32) * scale).to(dtype)  # noqa: E731
    E = mask = index = None
    if variant.masked:
        E = (rnd(r) + 1.0).requires_grad_()
        mask = torch.zeros(r, dtype=torch.bool, device=device)
        mask[torch.randperm(r, device=device)[: r // 2]] = True
    if G:
        index = torch.randint(0, G, (M,), device=device)
    return Inputs(
        x=rnd(M, K).requires_grad_(), W=rnd(N, K, scale=K**-0.5), b=rnd(N),
        A=rnd(*lead, r, K, scale=K**-0.5).requires_grad_(), B=rnd(*lead, N, r, scale=r**-0.5).requires_grad_(),
        E=E, mask=mask, index=index, grad_y=rnd(M, N),
    )


def set_bytes(inp: Inputs) -> int:
    """Bytes of every tensor of the set."""
    return sum(t.numel() * t.element_size() for t in inp.tensors())


class Skip(Exception):
    """A provider cannot run a case; the message says why, in one line."""


@dataclass
class Built:
    """A provider's ``y = fn(x)`` over one input set."""

    fn: Callable[[torch.Tensor], torch.Tensor]
    grads_of: list[torch.Tensor]  # the trainable tensors (x comes first)
    frozen: list[torch.Tensor]    # parameters and buffers: not new activations


def _peft_layer(inp: Inputs, shape: Shape, variant: Variant) -> tuple[nn.Module, list[torch.Tensor]]:
    """PEFT's own layer around a Linear that shares the set's base weight, with the set's adapter copied in."""
    peft = require("peft", "the peft provider of lorakern bench", extra="bench")
    r = shape.r
    lin = nn.Linear(shape.K, shape.N, device="meta")
    lin.weight = nn.Parameter(inp.W, requires_grad=False)
    lin.bias = nn.Parameter(inp.b, requires_grad=False)
    wrapper = nn.Sequential()
    wrapper.add_module("lin", lin)
    common = dict(lora_alpha=ALPHA_PER_RANK * r, lora_dropout=variant.dropout, target_modules=["lin"])
    if variant.masked:
        cfg = peft.AdaLoraConfig(init_r=r, target_r=max(1, r // 2), total_step=1, **common)
    else:
        cfg = peft.LoraConfig(r=r, **common)
    names = [f"a{g}" for g in range(max(1, variant.adapters))]
    with quiet():
        model = peft.get_peft_model(wrapper, cfg, adapter_name=names[0], autocast_adapter_dtype=False)
        for name in names[1:]:
            model.add_adapter(name, cfg)
    layer = model.base_model.model.lin
    layer.train()
    trainable = []
    with torch.no_grad():
        for g, name in enumerate(names):
            pick = (lambda t: t[g]) if variant.adapters else (lambda t: t)  # noqa: E731
            if variant.masked:
                a, b_, e = layer.lora_A[name], layer.lora_B[name], layer.lora_E[name]
                e.copy_((inp.E * inp.mask).detach()[:, None])
                trainable.append(e)
            else:
                a, b_ = layer.lora_A[name].weight, layer.lora_B[name].weight
            a.copy_(pick(inp.A).detach())
            b_.copy_(pick(inp.B).detach())
            trainable += [a, b_]
    for t in trainable:
        t.requires_grad_(True)
    return layer, trainable


def build(provider: str, inp: Inputs, shape: Shape, variant: Variant) -> Built:
    """The provider's ``y = f(x)`` over one input set.

    Raises:
        Skip: the provider cannot do the variant (the addmm style has no per-row adapters).
        MissingDependency: ``peft`` without PEFT installed.
    """
    s = ALPHA_PER_RANK
    W, b, A, B = inp.W, inp.b, inp.A, inp.B
    sets = inp.tensors()
    if provider == "base":
        return Built(lambda x: F.linear(x, W, b), [inp.x], sets)
    if provider == "peft":
        layer, trainable = _peft_layer(inp, shape, variant)
        frozen = sets + list(layer.parameters()) + list(layer.buffers())
        if variant.adapters:
            names = [f"a{g}" for g in inp.index.tolist()]
            return Built(lambda x: layer(x, adapter_names=names), [inp.x] + trainable, frozen)
        return Built(layer, [inp.x] + trainable, frozen)
    if provider == "addmm":
        if variant.adapters:
            raise Skip("one adapter per call: no per-row adapter choice")
        p, E, mask = variant.dropout, inp.E, inp.mask

        def addmm(x):
            t = (F.dropout(x, p) if p else x) @ A.T
            if E is not None:
                t = t * (E * mask)
            return F.linear(x, W, b).addmm_(t, B.T, alpha=s)

        return Built(addmm, [inp.x] + inp.adapter(), sets)
    backend = provider.removeprefix(LORAKERN)

    def fused(x):
        return lora_linear(x, W, b, A, B, scaling=s, rank_scale=inp.E, rank_mask=inp.mask,
                           dropout_p=variant.dropout, adapter_index=inp.index, backend=backend)

    return Built(fused, [inp.x] + inp.adapter(), sets)


def _why_not(provider: str, device: torch.device, dtype: torch.dtype) -> Optional[str]:
    """None if ``provider`` runs ``dtype`` on ``device`` here, else the reason in one line."""
    if provider == "peft":
        try:
            require("peft", "the peft provider", extra="bench")
        except ImportError as e:
            return str(e)
    if not provider.startswith(LORAKERN) or provider == LORAKERN + "auto":
        return None
    name = provider.removeprefix(LORAKERN)
    with quiet():
        ok, why = backends.status(name)
        if ok and not backends.runs_on(name, device, dtype):
            why = f"does not run {str(dtype).removeprefix('torch.')} on {device.type}"
    return None if ok and not why else why


def available_providers(device: torch.device, dtype: Optional[torch.dtype] = None) -> tuple[list[str], dict[str, str]]:
    """Providers that run ``dtype`` (default: ``default_dtype(device)``) on ``device``, and a
    one-line reason for each that does not.

    >>> runs, why = available_providers(torch.device("cpu"))
    >>> "base" in runs and "lorakern-torch" in runs and "lorakern-auto" in runs
    True
    """
    dtype = dtype or default_dtype(device)
    runs, why = [], {}
    for prov in PROVIDERS:
        reason = _why_not(prov, device, dtype)
        if reason is None:
            runs.append(prov)
        else:
            why[prov] = reason
    return runs, why
