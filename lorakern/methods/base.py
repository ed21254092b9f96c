"""What every method class shares: argument checks, target matching, ``apply`` and ``attach``.

A method subclasses ``Method`` and provides ``_make_layer`` (the lorakern module that replaces
one targeted ``nn.Linear``); optionally ``_prepare`` (state shared by its layers, such as banks),
``_before_step`` / ``_after_step`` (optimizer hooks, given the step index) and ``regularization``.
"""
from __future__ import annotations

import re
from typing import Optional, Sequence, Union

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

__all__ = ["Method", "TargetModules", "match_targets", "check_int", "check_float"]

TargetModules = Union[str, Sequence[str]]
STEP_BUFFER = "lorakern_step"


def check_int(name: str, value, low: int) -> int:
    """``value`` if it is an int >= ``low``, else a ValueError naming ``name``."""
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name}: expected an int >= {low}, got {value!r}")
    return value


def check_float(name: str, value, low: float, high: float, *, low_open: bool = False,
                high_open: bool = False) -> float:
    """``float(value)`` if it is a number in ``[low, high]`` (an end excluded where ``*_open``)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or not (low <= value <= high) or (low_open and value == low) or (high_open and value == high):
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ValueError(f"{name}: expected a float in {interval}, got {value!r}")
    return float(value)


def _output_embedding_name(model: nn.Module) -> Optional[str]:
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    return next((n for n, m in model.named_modules() if m is head), None) if head is not None else None


def match_targets(model: nn.Module, target_modules: TargetModules) -> list[str]:
    """Names of the ``nn.Linear`` modules of ``model`` that ``target_modules`` selects, as PEFT does.

    A string is a regular expression the full module name must match (``"all-linear"``: every
    linear layer but the output head); a list selects names equal to an entry or ending in
    ``"." + entry``.

    >>> net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    >>> match_targets(net, ["0", "2"])
    ['0', '2']
    """
    if isinstance(target_modules, str):
        if target_modules.lower() == "all-linear":
            head = _output_embedding_name(model)
            hit = lambda n, m: isinstance(m, nn.Linear) and n != head  # noqa: E731
        else:
            hit = lambda n, m: re.fullmatch(target_modules, n) is not None  # noqa: E731
    elif isinstance(target_modules, (list, tuple, set, frozenset)) and target_modules and all(
            isinstance(t, str) for t in target_modules):
        keys = set(target_modules)
        hit = lambda n, m: n in keys or any(n.endswith("." + k) for k in keys)  # noqa: E731
    else:
        raise TypeError(f"target_modules: expected a regex string or a non-empty list of module names, "
                        f"got {target_modules!r}")
    names = []
    for name, module in model.named_modules():
        if name and hit(name, module):
            if not isinstance(module, nn.Linear):
                raise TypeError(f"target_modules: {name!r} matched but is a {type(module).__name__}, "
                                f"expected an nn.Linear")
            names.append(name)
    if not names:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ValueError(f"target_modules: expected names of nn.Linear modules (the model has {linear}), "
                         f"got {target_modules!r}, which matches none")
    return names


class Method:
    """Base of the method classes. ``apply`` swaps the targeted layers, ``attach`` the optimizer hooks.

    Subclasses implement ``_make_layer(name, linear)``. A subclass that overrides ``_before_step``
    or ``_after_step`` gets a step counter, saved in the model's state dict as the buffer
    ``lorakern_step`` of the root module.
    """

    layer_type: type = nn.Module  # the module class ``_make_layer`` returns

    def __init__(self, *, r: int, target_modules: TargetModules, backend: str) -> None:
        self.r = check_int("r", r, 1)
        self.target_modules = target_modules
        self.backend = backend
        self._model: Optional[nn.Module] = None

    # ---------------------------------------------------------------- model side

    def apply(self, model: nn.Module) -> nn.Module:
        """Replace the targeted ``nn.Linear`` layers of ``model`` in place, freeze everything else."""
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
        names = match_targets(model, self.target_modules)
        if self._has_hooks() and hasattr(model, STEP_BUFFER):
            raise ValueError(f"model: already has a {STEP_BUFFER!r}; apply one method per model")
        model.requires_grad_(False)
        linears = {name: model.get_submodule(name) for name in names}
        self._prepare(model, linears)
        for name, linear in linears.items():
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, self._make_layer(name, linear))
        if self._has_hooks():
            model.register_buffer(STEP_BUFFER, torch.zeros((), dtype=torch.int64))
        self._model = model
        return model

    def _prepare(self, model: nn.Module, linears: dict[str, nn.Linear]) -> None:
        """Build what the layers share (banks, tied factors) before ``_make_layer`` runs."""

    def _make_layer(self, name: str, linear: nn.Linear) -> nn.Module:
        raise NotImplementedError

    def layers(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        """``(name, layer)`` for each layer of ``model`` this method's ``apply`` made."""
        return [(n, m) for n, m in model.named_modules() if type(m) is self.layer_type]

    def regularization(self, model: nn.Module) -> Union[torch.Tensor, float]:
        """The method's extra loss term (0.0 where it has none): add it to the loss."""
        return 0.0

    # ---------------------------------------------------------------- optimizer side

    def attach(self, optimizer: torch.optim.Optimizer) -> list[RemovableHandle]:
        """Register the method's optimizer-side logic as step hooks; returns their handles.

        >>> import torch
        >>> from lorakern.methods import LoRA
        >>> net = LoRA(r=2, target_modules=["0"]).apply(torch.nn.Sequential(torch.nn.Linear(4, 4)))
        >>> LoRA(r=2, target_modules=["0"]).attach(torch.optim.SGD(net.parameters(), lr=0.1))
        []
        """
        if not self._has_hooks():
            return []
        if self._model is None:
            raise RuntimeError(f"{type(self).__name__}.attach: call apply(model) first")
        handles = []
        if type(self)._before_step is not Method._before_step:
            handles.append(optimizer.register_step_pre_hook(
                lambda opt, args, kwargs: self._before_step(opt, self.step)))
        handles.append(optimizer.register_step_post_hook(lambda opt, args, kwargs: self._finish_step(opt)))
        return handles

    @property
    def step(self) -> int:
        """Optimizer steps taken since ``apply`` (restored with the model's state dict)."""
        if self._model is None:
            raise RuntimeError(f"{type(self).__name__}.step: call apply(model) first")
        return int(getattr(self._model, STEP_BUFFER))

    def _finish_step(self, optimizer: torch.optim.Optimizer) -> None:
        self._after_step(optimizer, self.step)
        getattr(self._model, STEP_BUFFER).add_(1)

    def _has_hooks(self) -> bool:
        cls = type(self)
        return cls._before_step is not Method._before_step or cls._after_step is not Method._after_step

    def _before_step(self, optimizer: torch.optim.Optimizer, step: int) -> None:
        """Runs before ``optimizer.step()``, gradients in place (step: its 0-based index)."""

    def _after_step(self, optimizer: torch.optim.Optimizer, step: int) -> None:
        """Runs after ``optimizer.step()``, before ``zero_grad`` (step: its 0-based index)."""
