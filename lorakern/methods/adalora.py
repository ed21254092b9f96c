"""AdaLoRA (Zhang et al. 2023, arXiv 2303.10512): SVD-form adapters whose rank budget moves to the
important triplets. Follows the paper and PEFT's ``peft.tuners.adalora`` (``SVDLinear``,
``RankAllocator``, ``AdaLoraModel.update_and_allocate``)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from lorakern.adapters import AdaptedLinear
from lorakern.batch import ActiveRanks
from lorakern.methods.base import Method, TargetModules, check_float, check_int
from lorakern import lora_linear

__all__ = ["AdaLoRA", "SVDLinear", "TripletScores"]

_PARTS = ("A", "E", "B")


class SVDLinear(AdaptedLinear):
    """``y = x W^T + b + s * ((x~ A^T) * E') B^T``: P = B [out, r], Lambda = E [r] (``rank_scale``),
    Q = A [r, in], all in the weight's dtype.

    ``rank_mask`` [r] (bool buffer) records the current allocation (which triplets are kept); the
    op sees it only once :meth:`finalize` has run (the final, fixed allocation: ``mask_in_op``), so
    ``E' = E * m`` there and ``E' = E`` before. ``finalize`` compacts the kept ranks once
    (``final_ranks``, an :class:`~lorakern.ActiveRanks`, rebuilt when a state dict is loaded), so
    no call reads the mask on the host. While the budget still moves, a triplet is pruned by zeroing its
    E in place (paper, Sec. 3: the singular value is masked, "pruned triplets can still get
    updated and possibly reactivated"; PEFT's ``mask_to_budget`` does the same), so its E keeps
    its gradient and the next allocation can revive it. Once the allocation is final PEFT zeroes
    the masked E after every step, which is what the op's mask computes (with the masked ranks
    skipped): the two give the same outputs and the same updates of every kept parameter.

    >>> layer = SVDLinear.from_linear(nn.Linear(16, 8), r=4)
    >>> layer.set_vector("rank_scale", torch.ones(4), trainable=True)
    >>> layer.set_vector("rank_mask", torch.ones(4, dtype=torch.bool), trainable=False)
    >>> layer(torch.randn(3, 16)).shape
    torch.Size([3, 8])
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.final_ranks: Optional[ActiveRanks] = None
        self.register_load_state_dict_post_hook(SVDLinear._refinalize)

    @property
    def mask_in_op(self) -> bool:
        """Whether the allocation is final (the op skips the masked ranks)."""
        return self.final_ranks is not None

    def finalize(self) -> None:
        """Fix the allocation: the op skips the ranks ``rank_mask`` drops from now on (one host
        read of the mask here, none per call). Call it again after changing ``rank_mask``."""
        self.final_ranks = ActiveRanks(self.rank_mask)

    @staticmethod
    def _refinalize(module: "SVDLinear", incompatible_keys) -> None:
        if module.final_ranks is not None:
            module.finalize()

    def _op_mask(self) -> Optional[ActiveRanks]:
        return self.final_ranks

    def delta_weight(self) -> torch.Tensor:
        """``s * B diag(E') A``, [out, in]: what merging adds to the weight."""
        E = self.rank_scale.float()
        if self.mask_in_op:
            E = E * self.rank_mask.float()
        return ((self.lora_B.float() * (self.scaling * E)) @ self.lora_A.float()).to(self.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return nn.functional.linear(x, self.weight, self.bias)
        s = self.scaling * self.train_scale if self.training else self.scaling
        return lora_linear(x, self.weight, self.bias, self.lora_A, self.lora_B, scaling=s,
                           rank_scale=self.rank_scale, rank_mask=self._op_mask(),
                           dropout_p=self.lora_dropout if self.training else 0.0, backend=self.backend)


class TripletScores(nn.Module):
    """One layer's importance state: the smoothed sensitivity ``avg_*`` and uncertainty ``unc_*``
    of each entry of A [r, in], E [r] and B [out, r] (float32 buffers, so they travel with the model)."""

    def __init__(self, layer: SVDLinear) -> None:
        super().__init__()
        for part, p in zip(_PARTS, _triplet(layer)):
            self.register_buffer(f"avg_{part}", torch.zeros_like(p, dtype=torch.float32))
            self.register_buffer(f"unc_{part}", torch.zeros_like(p, dtype=torch.float32))

    def reset(self) -> None:
        for buf in self.buffers():
            buf.zero_()


def _triplet(layer: SVDLinear) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return layer.lora_A, layer.rank_scale, layer.lora_B


def _zero_pruned(layer: SVDLinear) -> None:
    """E = 0 on the triplets the allocation pruned (PEFT's ``masked_fill_`` of ``lora_E``)."""
    layer.rank_scale.data.masked_fill_(~layer.rank_mask, 0.0)


class AdaLoRA(Method):
    """AdaLoRA over the op: ``W x + lora_alpha / (init_r + 1e-5) * B (E * (A x~))`` (paper Sec. 3; PEFT).

    Hyperparameters are PEFT's ``AdaLoraConfig`` names and defaults: ``init_r`` (ranks at start),
    ``target_r`` (average final rank), ``tinit``, ``tfinal``, ``deltaT``, ``beta1``, ``beta2``,
    ``orth_reg_weight``, ``total_step`` (required), ``lora_alpha``, ``lora_dropout``. A and B start
    N(0, 0.02), E at 0. After each optimizer step (``attach``; PEFT's ``update_and_allocate(step)``),
    every entry's sensitivity ``|w * grad w|`` is smoothed (EMA ``beta1``) and its uncertainty
    tracked (EMA ``beta2``); a triplet's score is E's plus the means over A's row and B's column of
    sensitivity times uncertainty (the paper's importance metric). The total budget falls
    cubically from ``init_r`` to ``target_r`` ranks per layer between steps ``tinit`` and
    ``total_step - tfinal`` (the paper's global budget scheduler); every ``deltaT`` steps the
    lowest-scored triplets are pruned by zeroing their E (see ``SVDLinear``: they keep training
    and can come back). At step ``total_step - tfinal`` the allocation becomes final: from then on
    the op's ``rank_mask`` skips the pruned ranks. ``regularization(model)`` is
    ``orth_reg_weight`` times the mean of ``||A A^T - I||_F`` and ``||B^T B - I||_F`` (the
    orthogonality regularizer). Budget, scores and masks agree with PEFT's ``RankAllocator`` given
    the same weights and gradients, step by step.

    Layers are ``SVDLinear``: A [init_r, in], E [init_r], B [out, init_r] in the weight's dtype, the
    importance buffers float32; ``apply`` raises ValueError / TypeError
    for targets that are not ``nn.Linear``, ``attach`` RuntimeError before ``apply``.

    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    >>> m = AdaLoRA(init_r=6, target_r=2, total_step=10, target_modules=["0", "2"])
    >>> net = m.apply(net)
    >>> m.active_ranks(net), m.budget(5)
    (12, (5, True))
    """

    layer_type = SVDLinear
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

    def _make_layer(self, name: str, linear: nn.Linear) -> SVDLinear:
        layer = SVDLinear.from_linear(linear, r=self.r, lora_dropout=self.lora_dropout, backend=self.backend)
        layer.scaling = self.lora_alpha / (self.r + 1e-5)
        like = dict(device=linear.weight.device, dtype=linear.weight.dtype)
        layer.set_vector("rank_scale", torch.empty(self.r, **like), trainable=True)
        layer.set_vector("rank_mask", torch.ones(self.r, dtype=torch.bool, device=linear.weight.device),
                         trainable=False)
        self.reset_triplets(layer)
        layer.scores = TripletScores(layer)
        return layer

    @torch.no_grad()
    def reset_triplets(self, layer: SVDLinear) -> None:
        """A, B ~ N(0, 0.02) and E at its initial value, zero where pruned."""
        nn.init.normal_(layer.lora_A, std=0.02)
        nn.init.normal_(layer.lora_B, std=0.02)
        layer.rank_scale.fill_(self.e_init)
        _zero_pruned(layer)

    # ---------------------------------------------------------------- budget and allocation

    def _rank_cost(self, layer: SVDLinear) -> int:
        """What one rank of ``layer`` costs in the budget's unit (AdaLoRA: 1, a rank)."""
        return 1

    def _budgets(self) -> tuple[int, int]:
        layers = self.layers(self._model) if self._model is not None else []
        if not layers:
            raise RuntimeError(f"{type(self).__name__}: call apply(model) first")
        return (sum(layer.r * self._rank_cost(layer) for _, layer in layers),
                sum(self.target_r * self._rank_cost(layer) for _, layer in layers))

    def budget(self, step: int) -> tuple[int, bool]:
        """``(total budget, whether to prune)`` at ``step``: PEFT's cubic ``budget_schedule``."""
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

    def triplet_scores(self, layer: SVDLinear) -> torch.Tensor:
        """Score [r] of each triplet: E's + (A's row mean + B's column mean)."""
        s = {part: self._element_score(getattr(layer.scores, f"avg_{part}"), getattr(layer.scores, f"unc_{part}"))
             for part in _PARTS}
        return s["E"] + (s["A"].mean(dim=1) + s["B"].mean(dim=0))

    @torch.no_grad()
    def allocate(self, budget: int) -> None:
        """Keep the best-scored triplets over all layers within ``budget``: masks in place, pruned E zeroed.

        The triplets are sorted by score; the threshold is the score at which the pruned triplets'
        cost first reaches ``init budget - budget``; every triplet scored at or below it is pruned
        (with unit costs, PEFT's ``kthvalue`` threshold).
        """
        layers = [layer for _, layer in self.layers(self._model)]
        scores = [self.triplet_scores(layer) for layer in layers]
        to_prune = sum(layer.r * self._rank_cost(layer) for layer in layers) - budget
        threshold = float("-inf")
        if to_prune > 0:
            flat = torch.cat(scores)
            costs = torch.cat([torch.full((layer.r,), float(self._rank_cost(layer)), dtype=torch.float64)
                               for layer in layers])
            order = torch.argsort(flat.cpu(), stable=True)
            reach = torch.cumsum(costs[order], 0) >= to_prune
            threshold = flat[order[int(reach.nonzero()[0]) if reach.any() else -1]].item()
        for layer, score in zip(layers, scores):
            layer.rank_mask.copy_(score > threshold)
            _zero_pruned(layer)

    def update_and_allocate(self, step: int) -> None:
        """PEFT's ``update_and_allocate(step)``: what the post-step hook runs."""
        final = self.total_step - self.tfinal
        if step < final:
            self.update_scores()
            budget, mask_now = self.budget(step)
            if mask_now:
                self.allocate(budget)
            return
        if step == final:
            self.allocate(self.budget(step)[0])
            for _, layer in self.layers(self._model):
                layer.scores.reset()
        for _, layer in self.layers(self._model):
            _zero_pruned(layer)
            if not layer.mask_in_op:
                layer.finalize()

    def _after_step(self, optimizer: torch.optim.Optimizer, step: int) -> None:
        self.update_and_allocate(step)

    def active_ranks(self, model: nn.Module) -> int:
        """Number of kept triplets over all layers (the allocation's ``rank_mask``)."""
        return sum(self.ranks(model).values())

    def ranks(self, model: nn.Module) -> dict[str, int]:
        """``{layer name: kept triplets}`` (PEFT's ``rank_pattern``, counted)."""
        return {name: int(layer.rank_mask.sum()) for name, layer in self.layers(model)}

    # ---------------------------------------------------------------- regularization

    def _orth_residual(self, cov: torch.Tensor) -> torch.Tensor:
        return cov - torch.eye(cov.shape[0], device=cov.device, dtype=cov.dtype)

    def regularization(self, model: nn.Module) -> torch.Tensor:
        """``orth_reg_weight`` times the mean over layers of ``||A A^T - I||_F`` and ``||B^T B - I||_F``."""
        terms = [torch.linalg.norm(self._orth_residual(cov))
                 for _, layer in self.layers(model) for cov in (layer.lora_A @ layer.lora_A.T,
                                                                 layer.lora_B.T @ layer.lora_B)]
        return self.orth_reg_weight * torch.stack(terms).mean()
