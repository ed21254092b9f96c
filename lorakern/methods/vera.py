"""VeRA (Kopiczko, Blankevoort, Asano, ICLR 2024, arXiv 2310.11454): one frozen random bank, trained
per-layer scaling vectors. Follows PEFT's ``peft.tuners.vera`` (``VeraConfig``, its bank and init)."""
from __future__ import annotations

import torch
from torch import nn

from lorakern.adapters import AdaptedLinear, ProjectionBank
from lorakern.methods.base import Method, TargetModules, check_float, check_int

__all__ = ["VeRA"]


class VeRA(Method):
    """``y = W x + b * (B_bank (d * (A_bank x~)))`` with the bank frozen, d [r] and b [out] trained.

    The bank ``A [r, max_in]``, ``B [max_out, r]`` is drawn kaiming-uniform from
    ``projection_prng_key`` exactly as PEFT's VeRA draws it; each layer reads the slice
    ``A[:, :in]``, ``B[:out]`` in place (a strided view, never copied). ``d`` starts at
    ``d_initial``, ``b`` at 0. PEFT's ``VeraConfig`` names and defaults: ``r=256``,
    ``projection_prng_key=0``, ``vera_dropout=0.0``, ``d_initial=0.1``, ``save_projection=True``:
    the bank is in the state dict (so a checkpoint reloads anywhere); with ``False`` it is left out
    and redrawn from the seed the state dict carries. Layers are ``AdaptedLinear`` reading the bank
    in the weight's dtype; raises ValueError / TypeError for bad values.

    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    >>> net = VeRA(r=8, target_modules=["0", "2"]).apply(net)
    >>> sum(p.numel() for p in net.parameters() if p.requires_grad)  # (8 + 16) + (8 + 4)
    36
    """

    layer_type = AdaptedLinear

    def __init__(self, *, r: int = 256, target_modules: TargetModules = "all-linear",
                 projection_prng_key: int = 0, save_projection: bool = True, vera_dropout: float = 0.0,
                 d_initial: float = 0.1, backend: str = "auto") -> None:
        super().__init__(r=r, target_modules=target_modules, backend=backend)
        self.projection_prng_key = check_int("projection_prng_key", projection_prng_key, 0)
        if not isinstance(save_projection, bool):
            raise TypeError(f"save_projection: expected a bool, got {type(save_projection).__name__}")
        self.save_projection = save_projection
        self.vera_dropout = check_float("vera_dropout", vera_dropout, 0.0, 1.0, high_open=True)
        self.d_initial = check_float("d_initial", d_initial, float("-inf"), float("inf"))
        self._bank: ProjectionBank | None = None

    def _prepare(self, model: nn.Module, linears: dict[str, nn.Linear]) -> None:
        w = next(iter(linears.values())).weight
        self._bank = ProjectionBank(
            self.r, max(m.in_features for m in linears.values()), max(m.out_features for m in linears.values()),
            self.projection_prng_key, save=self.save_projection, device=w.device, dtype=w.dtype)

    def _make_layer(self, name: str, linear: nn.Linear) -> AdaptedLinear:
        layer = AdaptedLinear.from_linear(linear, r=self.r, lora_dropout=self.vera_dropout, backend=self.backend)
        layer.scaling = 1.0
        layer.use_bank(self._bank)
        like = dict(device=linear.weight.device, dtype=linear.weight.dtype)
        layer.set_vector("rank_scale", torch.full((self.r,), self.d_initial, **like), trainable=True)
        layer.set_vector("out_scale", torch.zeros(linear.out_features, **like), trainable=True)
        return layer
