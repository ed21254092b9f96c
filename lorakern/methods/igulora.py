"""IGU-LoRA (Cui et al., ICLR 2026, arXiv 2603.13792): AdaLoRA's budgeting driven by
integrated-gradient importance and its signal-to-noise ratio.

Follows the authors' reference code (github.com/withyou12/igulora: ``iglora/lora_module.py``,
``iglora/rank_allocator.py``, ``iglora/run_pruning_sft.py``). Only the paper's abstract could be read
here, not its method section or hyperparameter tables, so where the two could differ the code is
followed and the point is named below.
"""
from __future__ import annotations

import torch
from torch.utils.hooks import RemovableHandle

from lorakern.methods.adalora import AdaLoRA, SVDLinear, _triplet
from lorakern.methods.base import check_int

__all__ = ["IGULoRA"]


class IGULoRA(AdaLoRA):
    """AdaLoRA's SVD form (``SVDLinear``), pruning by zeroing E (pruned triplets keep training and
    can be revived, as the reference zeroes ``lora_E`` only) and cubic schedule, with:

    - the integrated-gradient path: each training step runs at a point ``alpha`` of the straight
      path from a zero adapter to the current one in parameter space, ``(A, E, B) -> alpha (A, E,
      B)``, so the product ``B E A`` is scaled by ``alpha ** 3`` in training mode (the reference's
      ``weight_coeff ** 3``); alpha is drawn uniformly from ``{1/n, ..., 1}`` (``n = ig_steps``,
      the reference's 20 points) once per optimizer step, so ``|w * grad w|`` averaged over steps
      estimates the integrated gradient. The abstract speaks of a composite trapezoidal rule; the
      reference samples these right-end points, as here. Once the allocation is final, alpha is 1
      (the reference keeps drawing it during its pruning run's last phase and retrains at 1);
    - an entry's score is ``(EMA of |w * grad w| + 1e-6) / (EMA of its deviation + 1e-6)`` (a
      signal-to-noise ratio, reference ``calculate_score``), summed per triplet as AdaLoRA does.
      Where ``|w * grad w|`` stays far below 1e-6 an entry scores about 1 and a pruned triplet
      (E = 0, so no gradient in A, B, E) exactly 3; ties at the threshold are all pruned (the
      reference's ``<=``, as PEFT's), so on small models the allocation can collapse (the method
      bench's allocation task shows it, docs/methods.md);
    - the budget is in parameters: one rank of a layer costs ``in + out`` (its row of A and column
      of B), so the final budget is what ``target_r`` ranks on every layer cost, and pruning walks
      the triplets by rising score until the pruned cost reaches ``initial - budget`` (the
      reference weights an MLP rank by ``(DIM_MULTIPLIER + 1) / 2`` attention ranks, the same
      ratio for a Llama without grouped KV heads);
    - ``regularization`` penalizes the off-diagonal of ``A A^T`` and ``B^T B`` only, weight
      ``orth_reg_weight`` (reference ``compute_svd_orth_regu``, added with weight 1);
    - ``retrain=True``: when the allocation becomes final, the kept triplets restart from their
      initialization (their optimizer state dropped) and train with the mask fixed, as the
      reference's second stage (``run_final_sft.py``) does in a fresh run.

    Defaults are the reference's: E starts at 0.1, A and B N(0, 0.02); ``lora_alpha=1`` (its
    ``SVDLoRAModule`` default, the only value its scripts reach: scaling ``1 / (init_r + 1e-5)``),
    ``lora_dropout=0.3``, ``orth_reg_weight=1.0``, ``deltaT=50`` (``prune_every_steps``), ``beta1 =
    beta2 = 0.85``. ``tinit`` and ``tfinal`` keep AdaLoRA's 0 so that any ``total_step`` works; the
    reference's are 100 each (``start_prune_steps``, ``end_prune_steps``; its scripts use 100 and
    6000). Takes AdaLoRA's other keyword arguments (``init_r``, ``target_r``, ``total_step`` ...).
    Raises as AdaLoRA does, and ValueError for ``ig_steps < 1``.

    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Linear(16, 16))
    >>> m = IGULoRA(init_r=4, target_r=2, total_step=10, tinit=0, tfinal=2, deltaT=1, target_modules=["0"])
    >>> net = m.apply(net)
    >>> m.active_ranks(net), round(net[0].rank_scale[0].item(), 6), m.budget(0)
    (4, 0.1, (128, False))
    """

    e_init = 0.1

    def __init__(self, *, ig_steps: int = 20, retrain: bool = False, orth_reg_weight: float = 1.0,
                 lora_alpha: float = 1.0, lora_dropout: float = 0.3, deltaT: int = 50, **kwargs) -> None:
        super().__init__(orth_reg_weight=orth_reg_weight, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                         deltaT=deltaT, **kwargs)
        self.ig_steps = check_int("ig_steps", ig_steps, 1)
        if not isinstance(retrain, bool):
            raise TypeError(f"retrain: expected a bool, got {type(retrain).__name__}")
        self.retrain = retrain
        self.alpha = 1.0

    def _rank_cost(self, layer: SVDLinear) -> int:
        return layer.in_features + layer.out_features

    def _element_score(self, avg: torch.Tensor, unc: torch.Tensor) -> torch.Tensor:
        return (avg + 1e-6) / (unc + 1e-6)

    def _orth_residual(self, cov: torch.Tensor) -> torch.Tensor:
        return cov - torch.diag_embed(torch.diagonal(cov))

    def attach(self, optimizer: torch.optim.Optimizer) -> list[RemovableHandle]:
        """AdaLoRA's hook, which also draws each step's path point; the first is drawn here."""
        handles = super().attach(optimizer)
        self._set_path_point(self.step)
        return handles

    def _set_path_point(self, step: int) -> None:
        final = step >= self.total_step - self.tfinal
        self.alpha = 1.0 if final else int(torch.randint(1, self.ig_steps + 1, ())) / self.ig_steps
        for _, layer in self.layers(self._model):
            layer.train_scale = self.alpha ** 3

    def _after_step(self, optimizer: torch.optim.Optimizer, step: int) -> None:
        super()._after_step(optimizer, step)
        if self.retrain and step == self.total_step - self.tfinal:
            for _, layer in self.layers(self._model):
                self.reset_triplets(layer)
                for p in _triplet(layer):
                    optimizer.state.pop(p, None)
        self._set_path_point(step + 1)
