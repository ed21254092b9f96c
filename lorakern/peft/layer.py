"""What a PEFT LoRA layer's forward becomes: the fused op where it computes exactly what PEFT does.

``fused_forward(layer, x, args, kwargs)`` returns the output, or why PEFT's own forward must run;
``patching.py`` installs it (``patch`` / ``enable``) and counts the outcomes.

The layers keep their own parameters (the same objects), so state_dict keys, ``save_pretrained``
/ ``from_pretrained``, ``merge_and_unload``, ``disable_adapter``, ``set_adapter``, several
active adapters and ``adapter_names`` mixed batches keep working. Only ``forward`` changes:

>>> import lorakern.peft
>>> from peft import LoraConfig, get_peft_model
>>> model = get_peft_model(base, LoraConfig(r=16, target_modules="all-linear"))  # doctest: +SKIP
>>> lorakern.peft.patch(model)          # these layers, in place; returns how many  # doctest: +SKIP
>>> lorakern.peft.enable()              # or: every PEFT LoRA Linear, present and future  # doctest: +SKIP

DoRA (one active adapter, without dropout or in eval) is fused too: PEFT's own weight norm (its
cache included) gives the ratio ``m / ||W + s B A||``, which enters the op as ``base_scale`` and
``out_scale``. PEFT's default precision (a bf16 / fp16 base, fp32 adapters, no autocast) is fused
as PEFT computes it (the op's mixed precision). A base layer the op cannot compute (a quantized
``nn.Linear`` subclass such as bitsandbytes' ``Linear4bit`` / ``Linear8bitLt``, a hooked or custom
base) runs itself, and ``lorakern.lora_update`` adds the adapters into its output (dropout fused,
nothing M x K saved); PEFT's own bitsandbytes LoRA layers (``lora.bnb.Linear4bit`` /
``Linear8bitLt``) are patched too. A call that cannot be fused
runs PEFT's own forward, is counted in the layer's counters (``report(model)`` gives the table;
``patch`` logs it at INFO) and says why in a debug log line: DoRA with dropout in training (PEFT
feeds the dropped input to the base path too), DoRA with fp32 adapters beside a half-precision
x, other LoRA variants, ``lora_bias``, dropout modules other than ``nn.Dropout``, several active
adapters with dropout, extra forward arguments, merged or disabled adapters (the base alone runs
then), and over a base the op cannot compute: autocast, DoRA, ``adapter_names``. GPT-2's
``Conv1D`` base layers (``fan_in_fan_out``) are fused exactly, through a transposed view.
"""
from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import nn

from lorakern.batch import AdapterBatch
from lorakern.checks import adapter_dtypes
from lorakern.ops import autocast_dtype, lora_linear
from lorakern.update import lora_update

try:
    from peft.tuners.lora.layer import Linear as PeftLoraLinear
except ImportError as e:  # pragma: no cover - peft is an optional dependency
    raise ImportError("lorakern.peft needs the peft package (pip install peft)") from e

try:
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is optional
    Conv1D = None

__all__ = ["fused_forward", "AdapterNames"]

_PEFT_FORWARD = PeftLoraLinear.forward


def _quantized_classes() -> dict:
    """PEFT's LoRA layers over bitsandbytes bases (``lora.bnb.Linear4bit`` / ``Linear8bitLt``), where
    bitsandbytes is installed: {class: its own forward}. They fuse through ``lora_update``."""
    try:
        from peft.import_utils import is_bnb_available

        if not is_bnb_available():
            return {}
        from peft.tuners.lora import bnb
    except ImportError:  # pragma: no cover - depends on the peft / bitsandbytes installed
        return {}
    return {c: c.forward for c in (getattr(bnb, "Linear4bit", None), getattr(bnb, "Linear8bitLt", None)) if c}


_OWN_FORWARD = {PeftLoraLinear: _PEFT_FORWARD, **_quantized_classes()}  # PEFT layer class -> PEFT's forward


def _plain(module: nn.Module) -> bool:
    """No hooks and no per-instance forward: calling it is exactly its class's forward (read from the
    instance dict: every fused call asks it of four modules)."""
    d = module.__dict__
    return "forward" not in d and not (d.get("_forward_hooks") or d.get("_forward_pre_hooks")
                                       or d.get("_backward_hooks") or d.get("_backward_pre_hooks"))


def _base_weight(base: nn.Module) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """The base layer's (weight as [out, in] (a view), bias), or (None, None) where the base cannot be
    fused."""
    if isinstance(base, nn.Linear) and type(base).forward is nn.Linear.forward:
        w = base._parameters.get("weight")
        weight = w
    elif Conv1D is not None and isinstance(base, Conv1D) and type(base).forward is Conv1D.forward:
        w = base._parameters.get("weight")  # [in, out]: Conv1D computes x @ w + b
        weight = None if w is None else w.T
    else:
        return None, None
    if type(w) not in (torch.Tensor, nn.Parameter) or not w.is_floating_point() or not _plain(base):
        return None, None
    return weight, base._parameters.get("bias")


def _dropout_p(module: nn.Module) -> Optional[float]:
    """The dropout probability this forward applies, or None for a module the op cannot reproduce."""
    if type(module) is nn.Identity:
        return 0.0
    if type(module) is nn.Dropout and module.p < 1.0:
        return float(module.p) if module.training else 0.0
    return None


def _is_dora(layer: PeftLoraLinear, name: str) -> bool:
    d = layer.__dict__
    variant = d.get("lora_variant", {}).get(name)
    return d.get("use_dora", {}).get(name, False) and (variant is None or type(variant).__name__ == "DoraLinearVariant")


def _dora_ratio(layer: PeftLoraLinear, name: str, x: torch.Tensor, scaling: float) -> torch.Tensor:
    """DoRA's ``m / ||W + s B A||_row`` (the norm detached), computed by PEFT's DoRA layer as its forward does."""
    dora = layer.lora_magnitude_vector[name]
    lora_weight = dora.get_lora_weight(lora_A=layer.lora_A[name], lora_B=layer.lora_B[name], adapter_name=name)
    norm = dora.get_weight_norm(weight=layer.get_base_layer().weight.to(x.dtype),
                                lora_weight=lora_weight.to(x.dtype).detach(), scaling=scaling, adapter_name=name)
    return (dora.weight / norm.detach()).to(x.dtype)


def _adapter(layer: PeftLoraLinear, name: str, x: torch.Tensor) -> tuple[Any, str]:
    """``((A, B, scaling, p, dora), "")`` for adapter ``name`` of ``layer``, or ``(None, reason)``."""
    dora = _is_dora(layer, name)
    d, mods = layer.__dict__, layer._modules  # plain dict reads: nn.Module.__getattr__ costs a microsecond each
    if name in d.get("lora_variant", {}) and not dora:
        return None, f"adapter {name!r} is a LoRA variant other than DoRA"
    if d.get("lora_bias", {}).get(name, False):
        return None, f"adapter {name!r} has lora_bias"
    a, b, drop = (mods[k]._modules[name] for k in ("lora_A", "lora_B", "lora_dropout"))
    if type(a) is not nn.Linear or type(b) is not nn.Linear:
        return None, f"adapter {name!r} is not a pair of bias-free nn.Linear"
    pa, pb = a._parameters, b._parameters
    if pa.get("bias") is not None or pb.get("bias") is not None:
        return None, f"adapter {name!r} is not a pair of bias-free nn.Linear"
    if not (_plain(a) and _plain(b) and _plain(drop)):
        return None, f"adapter {name!r} has hooks"
    p = _dropout_p(drop)
    if p is None:
        return None, f"adapter {name!r} has dropout module {type(drop).__name__}"
    if dora and p > 0 and layer.training:
        return None, f"DoRA adapter {name!r} with dropout in training (PEFT drops the base path's input too)"
    A, B = pa["weight"], pb["weight"]
    if x is not None and (A.device != x.device or B.device != A.device):
        return None, f"adapter {name!r} is on {A.device}, x on {x.device}"
    s = layer.scaling[name]  # a tensor (PEFT's compiled hot-swapping) stays one: no host read, no guard
    return (A, B, s if isinstance(s, torch.Tensor) else float(s), p, dora), ""


def _dtype_reason(x: torch.Tensor, weight: Optional[torch.Tensor], As, Bs, dora: bool) -> str:
    """Why the op cannot take these dtypes outside autocast ("" when it can): x and the base weight in
    one dtype; the adapters in one dtype, x's or fp32 beside a half-precision x (PEFT's default);
    DoRA in one dtype throughout."""
    if weight is not None and weight.dtype != x.dtype:
        return f"x in {str(x.dtype)[6:]}, base weight in {str(weight.dtype)[6:]}, outside autocast"
    if len(As) == 1 and As[0].dtype == Bs[0].dtype == x.dtype:
        return ""
    ad = {t.dtype for t in (*As, *Bs)}
    if len(ad) > 1 or next(iter(ad)) not in adapter_dtypes(x.dtype):
        dts = ", ".join(sorted(str(d)[6:] for d in ad))
        return f"adapters in {dts} beside x in {str(x.dtype)[6:]}, outside autocast"
    if dora and ad != {x.dtype}:
        return f"DoRA with adapters in {str(As[0].dtype)[6:]} beside x in {str(x.dtype)[6:]}, outside autocast"
    return ""


def _on_base_output(layer: PeftLoraLinear, x: torch.Tensor, As, Bs, scalings, ps) -> tuple[Optional[torch.Tensor], str]:
    """A base layer the op cannot compute (quantized, hooked, custom): it runs as PEFT runs it, and
    ``lora_update`` adds the adapters into its output."""
    if autocast_dtype(x) is not None:
        return None, "a base layer the op cannot compute, under autocast"
    if any(isinstance(s, torch.Tensor) for s in scalings):
        return None, "a tensor scaling over a base layer the op cannot compute"
    y = layer.base_layer(x)
    if not isinstance(y, torch.Tensor) or y.dtype != x.dtype or y.shape[:-1] != x.shape[:-1]:
        return None, f"base layer {type(layer.base_layer).__name__} returns other than x's dtype and rows"
    if y._is_view() or not y.is_contiguous():  # a view cannot be updated in place (bitsandbytes returns some)
        y = y.clone(memory_format=torch.contiguous_format)
    A, B, s, u = _as_one_adapter(As, Bs, scalings, x.device)
    return lora_update(x, y, A, B, scaling=s, rank_scale=u, dropout_p=ps[0]), ""


def _as_one_adapter(As, Bs, scalings, device) -> tuple:
    """(A, B, scaling, rank_scale): several adapters at once are one adapter of the concatenated
    ranks, each rank scaled by its own adapter's s."""
    if len(As) == 1:
        return As[0], Bs[0], scalings[0], None
    A, B = torch.cat(As), torch.cat(Bs, dim=1)
    if len(set(scalings)) == 1:
        return A, B, scalings[0], None
    u = torch.tensor([s for s, a in zip(scalings, As) for _ in range(a.shape[0])], device=device, dtype=A.dtype)
    return A, B, 1.0, u


def fused_forward(layer: PeftLoraLinear, x: torch.Tensor, args: tuple, kwargs: dict) -> tuple[Optional[torch.Tensor], str]:
    """``(y, "")`` computed by the op, or ``(None, reason)`` when PEFT's own forward must run."""
    adapter_names = kwargs.get("adapter_names")
    if args or (kwargs and any(v is not None for k, v in kwargs.items() if k != "adapter_names")):
        return None, "extra forward arguments"
    if layer.disable_adapters or layer.merged:
        return None, "adapters disabled or merged: the base alone runs"
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < (1 if adapter_names is None else 2):
        return None, "x is not a floating tensor of the right rank"
    weight, bias = _base_weight(layer._modules["base_layer"])  # None: the base runs itself (_on_base_output)
    if weight is not None and weight.device != x.device:
        return None, f"base weight on {weight.device}, x on {x.device}"
    loras = layer._modules["lora_A"]
    if adapter_names is None:
        names = [n for n in layer.active_adapters if n in loras]
    else:
        layer._check_forward_args(x, adapter_names=adapter_names)
        names = [n for n in dict.fromkeys(adapter_names) if n in loras]
    if not names:
        return None, "no adapter applies: the base alone runs"
    adapters = []
    for name in names:
        ad, why = _adapter(layer, name, x)
        if ad is None:
            return None, why
        adapters.append(ad)
    As, Bs, scalings, ps, doras = zip(*adapters)
    if any(doras) and (len(adapters) > 1 or adapter_names is not None):
        return None, "DoRA with several adapters in one call"
    if autocast_dtype(x) is None:
        why = _dtype_reason(x, weight, As, Bs, any(doras))
        if why:
            return None, why
    if len(adapters) > 1 and any(ps) and adapter_names is None:
        return None, "several active adapters with dropout (PEFT draws one mask per adapter)"
    if weight is None:
        if any(doras) or adapter_names is not None:
            return None, "DoRA or adapter_names over a base layer the op cannot compute"
        return _on_base_output(layer, x, As, Bs, scalings, ps)
    if adapter_names is not None:
        return _mixed_batch(x, weight, bias, names, As, Bs, scalings, ps, adapter_names)
    if doras[0]:
        ratio = _dora_ratio(layer, names[0], x, scalings[0])
        return lora_linear(x, weight, bias, As[0], Bs[0], scaling=scalings[0], base_scale=ratio, out_scale=ratio), ""
    A, B, s, u = _as_one_adapter(As, Bs, scalings, x.device)
    return lora_linear(x, weight, bias, A, B, scaling=s, rank_scale=u, dropout_p=ps[0]), ""


class AdapterNames(list):
    """PEFT's ``adapter_names`` of one forward call, with the :class:`AdapterBatch` its layers share.

    ``patch(model)`` puts a forward pre-hook on the model that wraps the list the caller passed,
    so the first fused layer builds the batch (one host read of the index on a GPU) and every
    other layer of that call reuses it. Without the wrapper (``enable()``, ``generate``), each
    layer builds its own.
    """

    __slots__ = ("batches",)

    def __init__(self, names) -> None:
        super().__init__(names)
        self.batches: dict = {}  # (adapters of the layer, rows per sample, device) -> AdapterBatch


def _wrap_adapter_names(module: nn.Module, args: tuple, kwargs: dict):
    """Forward pre-hook of a patched model: its ``adapter_names`` list becomes an ``AdapterNames``."""
    names = kwargs.get("adapter_names")
    if type(names) is list:
        return args, {**kwargs, "adapter_names": AdapterNames(names)}
    return None


def _adapter_batch(adapter_names, names, rows_per_sample: int, device: torch.device) -> AdapterBatch:
    """Each sample's position in ``names`` (-1: none), one per row, prepared once per forward call."""
    key = (tuple(names), rows_per_sample, device)
    batches = getattr(adapter_names, "batches", None)
    if batches is not None and key in batches:
        return batches[key]
    pos = {n: i for i, n in enumerate(names)}
    per_sample = torch.tensor([pos.get(n, -1) for n in adapter_names], device=device)
    batch = AdapterBatch(per_sample.repeat_interleave(rows_per_sample), num_adapters=len(names))
    if batches is not None:
        batches[key] = batch
    return batch


def _mixed_batch(x, weight, bias, names, As, Bs, scalings, ps, adapter_names) -> tuple[Optional[torch.Tensor], str]:
    """One adapter per sample (PEFT's ``adapter_names``) as banks and ``adapter_index``."""
    if len(set(ps)) > 1:
        return None, "adapter_names mixes adapters of different dropout"
    R = max(a.shape[0] for a in As)
    pad = lambda t, dim: t if t.shape[dim] == R else torch.cat(  # noqa: E731
        [t, t.new_zeros(*t.shape[:dim], R - t.shape[dim], *t.shape[dim + 1:])], dim=dim)
    A = torch.stack([pad(a, 0) for a in As])
    B = torch.stack([pad(b, 1) for b in Bs])
    batch = _adapter_batch(adapter_names, names, math.prod(x.shape[1:-1]), x.device)
    s = torch.tensor(scalings, device=x.device, dtype=torch.float32)
    return lora_linear(x, weight, bias, A, B, scaling=s, dropout_p=ps[0], adapter_index=batch), ""
