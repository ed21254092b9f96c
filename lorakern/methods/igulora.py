"""IGU-LoRA: AdaLoRA's budgeting driven by integrated-gradient importance and its signal-to-noise."""
from __future__ import annotations

import torch
from torch.utils.hooks import RemovableHandle

from lorakern.methods.adalora import AdaLoRA, _triplet
from lorakern.methods.base import check_int

__all__ = ["IGULoRA"]


class IGULoRA(AdaLoRA):
    """AdaLoRA's SVD form, mask, cubic schedule and budget, with E starting at 0.1 and:

    - each training step runs at a point ``alpha`` of the straight path from a zero adapter,
      drawn uniformly from ``{1/n, ..., 1}`` (``n = ig_steps``): the adapter path is scaled by
      alpha in training mode, so ``|w * grad w|`` averaged over steps estimates the integrated
      gradient. Once the budget is final, alpha is 1;
    - an entry's score is the EMA of ``|w * grad w|`` divided by the EMA of its deviation (a
      signal-to-noise ratio), summed per triplet as AdaLoRA does;
    - ``regularization`` penalizes only the off-diagonal of ``A A^T`` and ``B^T B``;
    - ``retrain=True``: when the mask becomes final, the kept triplets restart from their
      initialization (and their optimizer state is dropped) and train with the mask fixed.

    Takes AdaLoRA's keyword arguments besides (``orth_reg_weight`` defaults to 0.1 here).

    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Linear(16, 16))
    >>> m = IGULoRA(init_r=4, target_r=2, total_step=10, target_modules=["0"])
    >>> net = m.apply(net)
    >>> m.active_ranks(net), round(net[0].rank_scale[0].item(), 6)
    (4, 0.1)
    """

    e_init = 0.1

    def __init__(self, *, ig_steps: int = 20, retrain: bool = False, orth_reg_weight: float = 0.1, **kwargs) -> None:
        super().__init__(orth_reg_weight=orth_reg_weight, **kwargs)
        self.ig_steps = check_int("ig_steps", ig_steps, 1)
        if not isinstance(retrain, bool):
            raise TypeError(f"retrain: expected a bool, got {type(retrain).__name__}")
        self.retrain = retrain
        self.alpha = 1.0

    def _element_score(self, avg: torch.Tensor, unc: torch.Tensor) -> torch.Tensor:
        return avg / (unc + 1e-12)

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
            layer.train_scale = self.alpha

    def _after_step(self, optimizer: torch.optim.Optimizer, step: int) -> None:
        super()._after_step(optimizer, step)
        if self.retrain and step == self.total_step - self.tfinal:
            for _, layer in self.layers(self._model):
                self.reset_triplets(layer)
                for p in _triplet(layer):
                    optimizer.state.pop(p, None)
        self._set_path_point(step + 1)
