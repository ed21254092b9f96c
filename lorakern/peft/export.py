"""Save a method's adapters as a PEFT checkpoint that ``peft.PeftModel.from_pretrained`` loads.

``save_peft(method, model, path)`` writes ``adapter_config.json`` and
``adapter_model.safetensors`` as PEFT's ``save_pretrained`` writes them for the equivalent PEFT
config (adapter ``"default"``, no ``task_type``), for the methods PEFT has: LoRA (rsLoRA,
Gaussian and PiSSA initializations), VeRA, AdaLoRA and DoRA; RefLoRA and CG-LoRA train plain LoRA
layers, so they are saved as LoRA (CG-LoRA only on request, see ``save_peft``).
"""
from __future__ import annotations

import os
from typing import Callable, Optional, Union

import torch
from torch import nn

from lorakern.methods.adalora import AdaLoRA
from lorakern.methods.base import Method
from lorakern.methods.cglora import CGLoRA
from lorakern.methods.dora import DoRA
from lorakern.methods.igulora import IGULoRA
from lorakern.methods.lora import LoRA
from lorakern.methods.reflora import RefLoRA
from lorakern.methods.tied import TiedLoRA
from lorakern.methods.vera import VeRA

try:
    from peft import AdaLoraConfig, LoraConfig, PeftConfig, VeraConfig
    from safetensors.torch import save_file
except ImportError as e:  # pragma: no cover - peft is an optional dependency
    raise ImportError("lorakern.peft.export needs the peft package (pip install peft)") from e

__all__ = ["save_peft"]

PREFIX = "base_model.model."  # what PEFT's state dict keys start with (PeftModel -> tuner -> model)
_UNSUPPORTED = {
    TiedLoRA: "PEFT has no Tied-LoRA: its A and B are one parameter shared by all layers of a name, scaled per "
              "layer by u and v, which no PEFT config describes",
    IGULoRA: "PEFT has no IGU-LoRA: an AdaLoRA config would misdescribe its integrated-gradient scores, its "
             "initial E and its retraining",
}

Exported = tuple[PeftConfig, dict[str, torch.Tensor]]


def _targets(method: Method) -> Union[str, list[str]]:
    t = method.target_modules
    return t if isinstance(t, str) else sorted(t)


def _lora(method: LoRA, model: nn.Module) -> Exported:
    config = LoraConfig(r=method.r, lora_alpha=method.lora_alpha, lora_dropout=method.lora_dropout,
                        target_modules=_targets(method), use_rslora=method.use_rslora,
                        init_lora_weights=method.init_lora_weights, use_dora=isinstance(method, DoRA))
    tensors = {}
    for name, layer in method.layers(model):
        tensors[f"{PREFIX}{name}.lora_A.weight"] = layer.lora_A
        tensors[f"{PREFIX}{name}.lora_B.weight"] = layer.lora_B
        if config.use_dora:
            tensors[f"{PREFIX}{name}.lora_magnitude_vector"] = layer.magnitude
    return config, tensors


def _vera(method: VeRA, model: nn.Module) -> Exported:
    layers = method.layers(model)
    bank = layers[0][1].bank  # its seed is the one the state dict carries (loading may have changed it)
    config = VeraConfig(r=method.r, target_modules=_targets(method), projection_prng_key=int(bank.seed),
                        save_projection=bank.save, vera_dropout=method.vera_dropout, d_initial=method.d_initial)
    tensors = {}
    for name, layer in layers:
        tensors[f"{PREFIX}{name}.vera_lambda_b"] = layer.out_scale
        tensors[f"{PREFIX}{name}.vera_lambda_d"] = layer.rank_scale
    if bank.save:
        tensors["base_model.vera_A"], tensors["base_model.vera_B"] = bank.lora_A, bank.lora_B
    return config, tensors


def _adalora(method: AdaLoRA, model: nn.Module) -> Exported:
    """PEFT's format once it has masked: ``rank_pattern`` (the kept ranks of each ``lora_E``) in the
    config and only the kept triplets in the tensors; no pattern while nothing is masked."""
    tensors, pattern = {}, {}
    for name, layer in method.layers(model):
        keep = layer.rank_mask
        pattern[f"{name}.lora_E"] = keep.tolist()
        tensors[f"{PREFIX}{name}.lora_A"] = layer.lora_A[keep]
        tensors[f"{PREFIX}{name}.lora_B"] = layer.lora_B[:, keep]
        tensors[f"{PREFIX}{name}.lora_E"] = layer.rank_scale[keep, None]
    masked = not all(all(kept) for kept in pattern.values())
    config = AdaLoraConfig(init_r=method.r, target_r=method.target_r, tinit=method.tinit, tfinal=method.tfinal,
                           deltaT=method.deltaT, beta1=method.beta1, beta2=method.beta2,
                           orth_reg_weight=method.orth_reg_weight, total_step=method.total_step,
                           rank_pattern=pattern if masked else None, lora_alpha=method.lora_alpha,
                           lora_dropout=method.lora_dropout, target_modules=_targets(method))
    return config, tensors


_EXPORTERS: dict[type, Callable[..., Exported]] = {
    LoRA: _lora, DoRA: _lora, RefLoRA: _lora, CGLoRA: _lora, VeRA: _vera, AdaLoRA: _adalora}


def save_peft(method: Method, model: nn.Module, path: Union[str, os.PathLike], *,
              base_model_name_or_path: Optional[str] = None, allow_shifted_base: bool = False) -> None:
    """Write ``model``'s adapters (``method.apply`` made them) to the folder ``path`` as PEFT saves them.

    ``adapter_model.safetensors`` holds PEFT's keys (``base_model.model.<module>.lora_A.weight``
    ...) and ``adapter_config.json`` the equivalent ``LoraConfig`` / ``VeraConfig`` /
    ``AdaLoraConfig``, ``inference_mode`` on and ``base_model_name_or_path`` this argument or the
    model's ``name_or_path``. ``PeftModel.from_pretrained(base, path)`` then computes what
    ``model`` computes, ``base`` being the model before ``apply``, except:

    - ``LoRA(init_lora_weights="pissa")``: the config says ``init_lora_weights="pissa"``, as PEFT's own save
      does, and PEFT recomputes the residual base from the original weights while loading;
    - ``CGLoRA``: saved as LoRA only with ``allow_shifted_base=True``, and loads correctly only onto
      the shifted base ``W0 - s B0 A0``, i.e. the targeted layers' frozen ``weight`` in ``model``;
      PEFT cannot compute that shift.

    ``RefLoRA`` is saved as LoRA (its balancing only changes how it trains). Adapters are saved in
    their own dtype. Raises NotImplementedError for methods PEFT does not have (``TiedLoRA``,
    ``IGULoRA``, any other class), ValueError for a model without this method's layers or with a
    merged one.

    >>> import tempfile, torch
    >>> m = LoRA(r=4, target_modules=["0"])
    >>> net = m.apply(torch.nn.Sequential(torch.nn.Linear(16, 8)))
    >>> with tempfile.TemporaryDirectory() as path:
    ...     save_peft(m, net, path)
    """
    cls = type(method)
    if cls not in _EXPORTERS:
        why = _UNSUPPORTED.get(cls, "no PEFT export is defined for this class")
        raise NotImplementedError(f"save_peft: cannot save {cls.__name__} for PEFT: {why}")
    if cls is CGLoRA and not allow_shifted_base:
        raise NotImplementedError(
            "save_peft: cannot save CGLoRA for PEFT as is: PEFT has no CG-LoRA, and its initialization moved the "
            "frozen base to W0 - s B0 A0, which PEFT cannot recompute. Pass allow_shifted_base=True to save the "
            "adapters as LoRA, to be loaded onto the shifted base (this model's frozen weights)")
    layers = method.layers(model)
    if not layers:
        raise ValueError(f"model: expected a model that {cls.__name__}.apply adapted, found no "
                         f"{method.layer_type.__name__}")
    merged = [name for name, layer in layers if layer.merged]
    if merged:
        raise ValueError(f"model: expected unmerged layers (merged weights are no PEFT base), got merged {merged}")
    config, tensors = _EXPORTERS[cls](method, model)
    config.base_model_name_or_path = base_model_name_or_path or getattr(model, "name_or_path", None) or None
    config.inference_mode = True
    os.makedirs(path, exist_ok=True)
    save_file({k: t.detach().contiguous() for k, t in tensors.items()},
              os.path.join(path, "adapter_model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(str(path), auto_mapping_dict={"base_model_class": type(model).__name__,
                                                         "parent_library": type(model).__module__})
