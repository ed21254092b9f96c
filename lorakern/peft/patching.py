"""How PEFT's LoRA layers get the fused forward, and what their calls did.

``patch(model)`` swaps each layer's class to a fused subclass of its PEFT class (``unpatch``
swaps back); ``enable()`` / ``disable()`` switch PEFT's class forward for the whole process;
every call is counted per layer, and ``report(model)`` sums the counts with each layer's status.
``patch`` returns the layers that now run fused (patched, with adapters the op can fuse):

>>> import lorakern.peft
>>> lorakern.peft.patch(peft_model)   # doctest: +SKIP
14
"""
from __future__ import annotations

import logging
from typing import Any

import torch
from peft.tuners.lora.layer import LoraLayer
from torch import nn

from lorakern.peft.layer import (_OWN_FORWARD, _PEFT_FORWARD, PeftLoraLinear, _adapter, _wrap_adapter_names,
                                 fused_forward)

__all__ = ["patch", "unpatch", "enable", "disable", "is_enabled", "report", "Report", "FUSED"]

logger = logging.getLogger(__name__)

FUSED = "fused"


def _count(layer: nn.Module, outcome: str) -> None:
    """One more call of ``layer`` with ``outcome`` (FUSED or the fallback's reason), per mode, in the
    layer's own counters (``layer._lorakern_calls``: {(training, outcome): calls}); not while
    torch.compile traces (a mutated dict would be guarded on)."""
    if not torch.compiler.is_compiling():
        calls = layer.__dict__.setdefault("_lorakern_calls", {})
        key = (layer.training, outcome)
        calls[key] = calls.get(key, 0) + 1


def _static_reason(layer: PeftLoraLinear) -> str:
    """Why the layer's active adapters cannot be fused whatever x is ("" when they can)."""
    for name in (n for n in layer.active_adapters if n in layer.lora_A):
        ad, why = _adapter(layer, name, None)
        if ad is None:
            return why
    return ""


class Report:
    """What ``patch`` made of a model's LoRA layers, and what their calls did since.

    ``layers``: {outcome: layers}, outcome FUSED or the reason the layer cannot be fused (not
    patched, an unsupported adapter); ``calls``: {outcome: {"train": calls, "eval": calls}} summed
    over the layers' counters. ``str(report)`` is the table ``patch`` logs at INFO.
    """

    def __init__(self, layers: dict, calls: dict) -> None:
        self.layers, self.calls = layers, calls

    @property
    def fused(self) -> int:
        return self.layers.get(FUSED, 0)

    def fallbacks(self) -> int:
        """Calls (train and eval) that ran PEFT's own forward."""
        return sum(c["train"] + c["eval"] for k, c in self.calls.items() if k != FUSED)

    def __str__(self) -> str:
        rows = [f"{sum(self.layers.values())} LoRA layers: {self.fused} fused"]
        rows += [f"  {n} not fused: {why}" for why, n in self.layers.items() if why != FUSED]
        if self.calls:
            rows.append("  calls (train / eval):")
            rows += [f"    {c['train']} / {c['eval']}  {why}" for why, c in self.calls.items()]
        return "\n".join(rows)

    __repr__ = __str__


def report(model: nn.Module) -> Report:
    """The table of ``model``'s PEFT LoRA layers: how many run fused, the reasons for the rest, and the
    calls counted since ``patch`` (fused, and each fallback's reason, in training and in eval).

    >>> print(lorakern.peft.report(peft_model))  # doctest: +SKIP
    14 LoRA layers: 14 fused
      calls (train / eval):
        28 / 14  fused
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    layers: dict = {}
    calls: dict = {}
    for m in model.modules():
        if not isinstance(m, LoraLayer):
            continue
        if not (_is_patched(m) or (isinstance(m, PeftLoraLinear) and is_enabled())):
            why = f"not patched ({type(m).__module__}.{type(m).__qualname__} has its own forward)"
        else:
            why = _static_reason(m) or FUSED
        layers[why] = layers.get(why, 0) + 1
        for (training, outcome), n in m.__dict__.get("_lorakern_calls", {}).items():
            c = calls.setdefault(outcome, {"train": 0, "eval": 0})
            c["train" if training else "eval"] += n
    return Report(layers, calls)


def _forward(self: PeftLoraLinear, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """PEFT's ``lora.Linear.forward``, fused where the op can compute it exactly."""
    y, why = fused_forward(self, x, args, kwargs)
    _count(self, why or FUSED)
    if y is not None:
        return y
    if logger.isEnabledFor(logging.DEBUG):
        logger.debug("lora.Linear(%s -> %s): PEFT's own forward: %s", self.in_features, self.out_features, why)
    return _OWN_FORWARD.get(type(self).__dict__.get("_lorakern_peft_class"), _PEFT_FORWARD)(self, x, *args, **kwargs)


def _process_forward(self: PeftLoraLinear, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """PEFT's class forward while ``enable()`` is in effect. It reads the module global ``_ENABLED``,
    which torch.compile guards (a class attribute it does not), so ``disable()`` reaches compiled code."""
    if _ENABLED:
        return _forward(self, x, *args, **kwargs)
    return _PEFT_FORWARD(self, x, *args, **kwargs)


_ENABLED = False
_FUSED_CLASSES: dict = {}  # PEFT layer class -> its fused subclass


def _new_fused(cls: type) -> nn.Module:
    """An empty instance of ``cls``'s fused subclass: what unpickling and copying a patched layer make."""
    return object.__new__(_fused_class(cls))


def _reduce_ex(self: nn.Module, protocol: int):
    # the generated class has no importable name: rebuild it from PEFT's class, which has one
    _, _, *rest = object.__reduce_ex__(self, max(protocol, 2))
    return (_new_fused, (type(self).__dict__["_lorakern_peft_class"],), *rest)


def _fused_class(cls: type) -> type:
    """The subclass of PEFT's layer class ``cls`` whose forward is fused, made once per class.

    ``patch`` swaps a layer's class to it and ``unpatch`` back: nothing is stored in the instance
    (no reference cycle: a deleted model is freed at once), and copies (``copy``, ``deepcopy``,
    pickling, ``nn.DataParallel``'s replicas) run their own parameters fused.
    """
    fused = _FUSED_CLASSES.get(cls)
    if fused is None:
        fused = type(cls.__name__, (cls,), {"forward": _forward, "__reduce_ex__": _reduce_ex,
                                             "_lorakern_peft_class": cls, "__module__": cls.__module__,
                                             "__qualname__": cls.__qualname__, "__doc__": cls.__doc__})
        _FUSED_CLASSES[cls] = fused
    return fused


def _is_patched(module: nn.Module) -> bool:
    return "_lorakern_peft_class" in type(module).__dict__


def patch(model: nn.Module) -> int:
    """Run every PEFT LoRA layer of ``model`` over an ``nn.Linear`` (or GPT-2 ``Conv1D``) fused, in place.

    Returns the number of patched layers whose active adapters the op can fuse: the layers that
    now run fused (a layer patched but holding, say, a ``lora_bias`` adapter counts 0: it runs
    PEFT's own forward; ``report(model)`` gives the same count as ``.fused``). Calling it twice is
    harmless. When some LoRA layers will not run fused (an adapter the op has no term for, a layer
    with its own forward), one WARNING on the ``lorakern.peft.patching`` logger names how many and
    why; when ``model`` has no PEFT LoRA layer at all, one WARNING says so and 0 is returned. The
    whole table (``report(model)``) is logged at INFO. Layers added later (new target modules) are
    not covered: patch again, or use ``enable()``.

    Each layer's class becomes a fused subclass of its PEFT class (nothing is stored in the
    layer), so a patched model is freed at ``del``, and ``copy`` / ``deepcopy``, pickling,
    ``torch.save`` and ``nn.DataParallel`` replicas stay patched with their own parameters; it
    works under torch.compile (tensor scalings included), ``torch.func``, ``torch.jit.trace`` and
    autocast. Whether an adapter can be fused is judged in ``model``'s current mode (DoRA with
    dropout is fused in eval only).

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.

    >>> n = lorakern.peft.patch(peft_model)  # doctest: +SKIP
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    patched = fused = 0
    for m in model.modules():
        if not isinstance(m, tuple(_OWN_FORWARD)):
            continue
        if not _is_patched(m):
            if type(m).forward not in (_OWN_FORWARD.get(type(m), _PEFT_FORWARD), _process_forward):
                continue  # its own forward: left alone (report() says so)
            m.__class__ = _fused_class(type(m))
        patched += 1
        fused += not _static_reason(m)
    if patched and _wrap_adapter_names not in model._forward_pre_hooks.values():
        model.register_forward_pre_hook(_wrap_adapter_names, with_kwargs=True)
    rep = report(model)
    slow = {why: n for why, n in rep.layers.items() if why != FUSED}
    if not rep.layers:
        logger.warning("lorakern.peft.patch: no PEFT LoRA layers found in %s: nothing patched "
                       "(patch the model get_peft_model returns)", type(model).__name__)
    elif slow:
        logger.warning("lorakern.peft.patch: %d of %d PEFT LoRA layers will not run fused (PEFT computes them: "
                       "correct, not faster): %s", sum(slow.values()), sum(rep.layers.values()),
                       "; ".join(f"{n} x {why}" for why, n in slow.items()))
    logger.info("lorakern.peft.patch: %s", rep)
    return fused


def unpatch(model: nn.Module) -> int:
    """Undo ``patch(model)``; returns the number of layers restored to PEFT's own forward.

    >>> lorakern.peft.unpatch(peft_model)  # doctest: +SKIP
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    count = 0
    for m in model.modules():
        if _is_patched(m):
            m.__class__ = type(m).__dict__["_lorakern_peft_class"]
            count += 1
    for key in [k for k, hook in model._forward_pre_hooks.items() if hook is _wrap_adapter_names]:
        del model._forward_pre_hooks[key]
        model._forward_pre_hooks_with_kwargs.pop(key, None)
    return count


def enable() -> None:
    """Fuse every PEFT ``lora.Linear`` in this process, present and future (PEFT's class is patched).

    For scripts built on ``Trainer`` or TRL that never hold the model: call it before training.

    >>> lorakern.peft.enable()  # doctest: +SKIP
    """
    global _ENABLED
    _ENABLED = True
    PeftLoraLinear.forward = _process_forward


def disable() -> None:
    """Undo ``enable()``: PEFT's ``lora.Linear`` runs its own forward again (patched models stay
    patched). Compiled models see it too: the class keeps the forward ``enable()`` installed, which
    reads a flag torch.compile guards and, with the flag off, calls PEFT's forward (compiled code
    traced under either setting then recompiles when it changes)."""
    global _ENABLED
    _ENABLED = False


def is_enabled() -> bool:
    """Whether ``enable()`` is in effect."""
    return _ENABLED
