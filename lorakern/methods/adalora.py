"""AdaLoRA (Zhang et al. 2023): SVD-form adapters whose rank budget moves to the important triplets."""
from __future__ import annotations

import torch
from torch import nn

from lorakern.adapters import AdaptedLinear
from lorakern.methods.base import Method, TargetModules, check_float, check_int

__all__ = ["AdaLoRA", "TripletScores"]

_PARTS = ("A", "E", "B")


class TripletScores(nn.Module):
    """One layer's importance state: the smoothed sensitivity ``avg_*`` and uncertainty ``unc_*``
    of each entry of A [r, in], E [r] and B [out, r] (buffers, so they travel with the model)."""

    def __init__(self, layer: AdaptedLinear) -> None:
        super().__init__()
        for part, p in zip(_PARTS, _triplet(layer)):
            self.register_buffer(f"avg_{part}", torch.zeros_like(p, dtype=torch.float32))
            self.register_buffer(f"unc_{part}", torch.zeros_like(p, dtype=torch.float32))

    def reset(self) -> None:
        for buf in self.buffers():
            buf.zero_()


def _triplet(layer: AdaptedLinear) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return layer.lora_A, layer.rank_scale, layer.lora_B


def _zero_masked(layer: AdaptedLinear) -> None:
    """E = 0 on the masked triplets, as PEFT leaves them (the op ignores them either way)."""
    layer.rank_scale.data.masked_fill_(~layer.rank_mask, 0.0)


class AdaLoRA(Method):
    """``W x + alpha / (init_r + 1e-5) * B (E * m * (A x~))``, P = B, Lambda = E, Q = A, as PEFT.

    A and B start N(0, 0.02), E at 0. After each optimizer step (``attach``), the importance of
    every entry, ``|w * grad w|``, is smoothed (EMA ``beta1``) and its uncertainty tracked (EMA
    ``beta2``); a triplet's score is the mean over A's row plus the mean over B's column plus E's,
    each of sensitivity times uncertainty. The total budget falls cubically from
    ``init_r * layers`` to ``target_r * layers`` between steps ``tinit`` and
    ``total_step - tfinal``; every ``deltaT`` steps the lowest-scored triplets are masked through
    the op's ``rank_mask`` (updated in place, so masked ranks cost nothing) and their E zeroed.
    ``regularization`` is ``orth_reg_weight`` times the mean of ``||A A^T - I||_F`` and
    ``||B^T B - I||_F``. Budget and mask agree with PEFT's ``RankAllocator`` given the same
    scores. Unlike PEFT, a masked triplet gets no gradient at all (PEFT still trains E there).

    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    >>> m = AdaLoRA(init_r=6, target_r=2, total_step=10, target_modules=["0", "2"])
    >>> net = m.apply(net)
    >>> m.active_ranks(net), m.budget(5)
    (12, (5, True))
    """

    layer_type = AdaptedLinear
    e_init = 0.0

    def __init__(self, *, target_r: int = 8, init_r: int = 12, total_step: int, tinit: int = 0, tfinal: int = 0,
                 deltaT: int = 1, beta1: float = 0.85, beta2: float = 0.85, orth_reg_weight: float = 0.5,
                 lora_alpha: float = 8.0, lora_dropout: float = 0.0, target_modules: TargetModules = "all-linear",
                 backend: str = "auto") -> None:
        super().__init__(r=init_r, target_modules=target_modules, backend=backend)
        self.target_r = check_int("target_r", target_r, 0)
        if target_r > init_r:
            raise ValueError(f"target_r: expected at most init_r = {init_r}, got {target_r}")
        self.total_step = check_int("total_step", total_step, 1)
        self.tinit = check_int("tinit", tinit, 0)
        self.tfinal = check_int("tfinal", tfinal, 0)
        if tinit >= total_step - tfinal:
            raise ValueError(f"tinit: expected < total_step - tfinal = {total_step - tfinal} (a budgeting phase), "
                             f"got {tinit}")
        self.deltaT = check_int("deltaT", deltaT, 1)
        self.beta1 = check_float("beta1", beta1, 0.0, 1.0, low_open=True, high_open=True)
        self.beta2 = check_float("beta2", beta2, 0.0, 1.0, low_open=True, high_open=True)
        self.orth_reg_weight = check_float("orth_reg_weight", orth_reg_weight, 0.0, float("inf"))
        self.lora_alpha = check_float("lora_alpha", lora_alpha, 0.0, float("inf"), low_open=True)
        self.lora_dropout = check_float("lora_dropout", lora_dropout, 0.0, 1.0, high_open=True)

    def _make_layer(self, name: str, linear: nn.Linear) -> AdaptedLinear:
        layer = AdaptedLinear.from_linear(linear, r=self.r, lora_dropout=self.lora_dropout, backend=self.backend)
        layer.scaling = self.lora_alpha / (self.r + 1e-5)
        like = dict(device=linear.weight.device, dtype=linear.weight.dtype)
        layer.set_vector("rank_scale", torch.empty(self.r, **like), trainable=True)
        layer.set_vector("rank_mask", torch.ones(self.r, dtype=torch.bool, device=linear.weight.device),
                         trainable=False)
        self.reset_triplets(layer)
        layer.scores = TripletScores(layer)
        return layer

    @torch.no_grad()
    def reset_triplets(self, layer: AdaptedLinear) -> None:
        """A, B ~ N(0, 0.02) and E at its initial value, zero where masked."""
        nn.init.normal_(layer.lora_A, std=0.02)
        nn.init.normal_(layer.lora_B, std=0.02)
        layer.rank_scale.fill_(self.e_init)
        _zero_masked(layer)

    # ---------------------------------------------------------------- budget and allocation

    def _budgets(self) -> tuple[int, int]:
        layers = self.layers(self._model) if self._model is not None else []
        if not layers:
            raise RuntimeError(f"{type(self).__name__}: call apply(model) first")
        return sum(layer.r for _, layer in layers), self.target_r * len(layers)

    def budget(self, step: int) -> tuple[int, bool]:
        """``(total rank budget, whether to mask)`` at ``step``: PEFT's cubic schedule."""
        init_bgt, target_bgt = self._budgets()
        if step <= self.tinit:
            return init_bgt, False
        if step > self.total_step - self.tfinal:
            return target_bgt, True
        mul = 1 - (step - self.tinit) / (self.total_step - self.tfinal - self.tinit)
        return int((init_bgt - target_bgt) * (mul ** 3) + target_bgt), step % self.deltaT == 0

    @torch.no_grad()
    def update_scores(self) -> None:
        """Fold this step's ``|w * grad w|`` into every layer's EMAs (zero where no gradient)."""
        for _, layer in self.layers(self._model):
            for part, p in zip(_PARTS, _triplet(layer)):
                ipt = (p * p.grad).abs().float() if p.grad is not None else torch.zeros_like(p, dtype=torch.float32)
                avg, unc = getattr(layer.scores, f"avg_{part}"), getattr(layer.scores, f"unc_{part}")
                avg.mul_(self.beta1).add_(ipt, alpha=1 - self.beta1)
                unc.mul_(self.beta2).add_((ipt - avg).abs(), alpha=1 - self.beta2)

    def _element_score(self, avg: torch.Tensor, unc: torch.Tensor) -> torch.Tensor:
        return avg * unc

    def triplet_scores(self, layer: AdaptedLinear) -> torch.Tensor:
        """Score [r] of each triplet: E's + (A's row mean + B's column mean)."""
        s = {part: self._element_score(getattr(layer.scores, f"avg_{part}"), getattr(layer.scores, f"unc_{part}"))
             for part in _PARTS}
        return s["E"] + (s["A"].mean(dim=1) + s["B"].mean(dim=0))

    @torch.no_grad()
    def allocate(self, budget: int) -> None:
        """Keep the ``budget`` best-scored triplets over all layers: masks in place, E zeroed."""
        layers = [layer for _, layer in self.layers(self._model)]
        scores = [self.triplet_scores(layer) for layer in layers]
        k = sum(layer.r for layer in layers) - budget
        threshold = torch.kthvalue(torch.cat(scores), k=k)[0].item() if k > 0 else float("-inf")
        for layer, score in zip(layers, scores):
            layer.rank_mask.copy_(score > threshold)
            _zero_masked(layer)

    def update_and_allocate(self, step: int) -> None:
        """PEFT's ``update_and_allocate(step)``: what the post-step hook runs."""
        final = self.total_step - self.tfinal
        if step < final:
            self.update_scores()
            budget, mask_now = self.budget(step)
            if mask_now:
                self.allocate(budget)
        elif step == final:
            self.allocate(self.budget(step)[0])
            for _, layer in self.layers(self._model):
                layer.scores.reset()
        else:
            for _, layer in self.layers(self._model):
                _zero_masked(layer)

    def _after_step(self, optimizer: torch.optim.Optimizer, step: int) -> None:
        self.update_and_allocate(step)

    def active_ranks(self, model: nn.Module) -> int:
        """Number of unmasked ranks over all layers."""
        return sum(int(layer.rank_mask.sum()) for _, layer in self.layers(model))

    # ---------------------------------------------------------------- regularization

    def _orth_residual(self, cov: torch.Tensor) -> torch.Tensor:
        return cov - torch.eye(cov.shape[0], device=cov.device, dtype=cov.dtype)

    def regularization(self, model: nn.Module) -> torch.Tensor:
        """``orth_reg_weight`` times the mean over layers of ``||A A^T - I||_F`` and ``||B^T B - I||_F``."""
        terms = [torch.linalg.norm(self._orth_residual(cov))
                 for _, layer in self.layers(model) for cov in (layer.lora_A @ layer.lora_A.T,
                                                                 layer.lora_B.T @ layer.lora_B)]
        return self.orth_reg_weight * torch.stack(terms).mean()
