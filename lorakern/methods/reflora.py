"""RefLoRA (Zhang, Li, Giannakis, NeurIPS 2025, arXiv 2505.18877): LoRA stepped in its balanced
factorization. Follows the paper and the authors' ``reflora/reflora.py`` (``Refactorer``,
github.com/zhangyilang/RefLoRA).

``W + s B A`` is unchanged by ``B -> B P``, ``A -> P^-1 A``; RefLoRA takes each step in the
factorization where ``A A^T = B^T B``. With ``S (A A^T) S = B^T B`` (``P = S^-1/2``), a gradient
step there, mapped back, is the step on the original factors with ``grad_A <- S^-1 grad_A`` and
``grad_B <- grad_B S``: the full variant applies that before each optimizer step. RefLoRA-S
balances with a scalar instead, ``A -> c A``, ``B -> B / c``, ``c = sqrt(||B|| / ||A||)``, after
each step, and rescales the optimizer's moments to the new factors.

Reference options: ``warmup_steps`` (``reflora_warmup``, 100 in its README and GLUE script),
``interval`` (``reflora_interval``: refactor every that many steps) and ``re_init`` (the
reference's ``re_init``, which its fine-tuning script turns on with a zero warm-up: A and B both
kaiming-uniform and the base shifted by ``-s B A``, so B starts nonzero and balancing can act from
step 0 while the model's output is unchanged).
"""
from __future__ import annotations

import torch
from torch import nn

from lorakern.methods.base import check_float, check_int
from lorakern.methods.lora import LoRA
from lorakern.modules import LoRALinear, _kaiming_uniform_

__all__ = ["RefLoRA", "balancing_matrix"]

_VARIANTS = ("full", "s")
# optimizer state that transforms like the gradient (power 1) or its square (power 2)
_MOMENT_POWER = {"exp_avg": 1, "momentum_buffer": 1, "exp_avg_sq": 2, "max_exp_avg_sq": 2}


def _sym_pow(M: torch.Tensor, floor: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(M^1/2, M^-1/2)`` of a symmetric matrix, eigenvalues floored at ``floor``."""
    lam, U = torch.linalg.eigh(M)
    root = lam.clamp_min(floor).sqrt()
    return (U * root) @ U.T, (U / root) @ U.T


def balancing_matrix(A: torch.Tensor, B: torch.Tensor, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """``(S, S^-1)`` in float64 with ``S (A A^T + d I) S = B^T B + d I``, ``d = eps * mean eigenvalue``.

    Two r x r eigendecompositions: ``S = M^-1/2 (M^1/2 N M^1/2)^1/2 M^-1/2``.

    >>> A, B = torch.randn(3, 10, dtype=torch.float64), torch.randn(7, 3, dtype=torch.float64)
    >>> S, _ = balancing_matrix(A, B, eps=0.0)
    >>> torch.allclose(S @ A @ A.T @ S, B.T @ B)
    True
    """
    M = (A @ A.T).double()
    N = (B.T @ B).double()
    r = M.shape[0]
    d = eps * float(M.trace() + N.trace()) / (2 * r)
    eye = torch.eye(r, dtype=torch.float64, device=M.device)
    tiny = torch.finfo(torch.float64).tiny
    M_half, M_ihalf = _sym_pow(M + d * eye, max(d, tiny))
    C_half, C_ihalf = _sym_pow(M_half @ (N + d * eye) @ M_half, max(d * d, tiny))
    return M_ihalf @ C_half @ M_ihalf, M_half @ C_ihalf @ M_half


class RefLoRA(LoRA):
    """LoRA's parameters and initialization, stepped in the balanced factorization (module doc).

    ``variant="full"`` (RefLoRA): an optimizer pre-step hook preconditions the gradients with the
    balancing matrix S (float64, damped by ``eps`` times the mean eigenvalue; the reference adds
    the dtype's machine epsilon to the singular values instead). ``variant="s"`` (RefLoRA-S): a
    post-step hook rebalances A and B by a scalar and rescales Adam's (or SGD's) moments to match.
    Either acts at steps ``warmup_steps, warmup_steps + interval, ...`` (0-based; the reference's
    counter, except that its RefLoRA-S counts one call at ``integrate_into_optimizer`` and so
    acts one step earlier). ``re_init=True`` (``init_lora_weights`` must be True) starts from
    kaiming-uniform A and B with the base shifted by ``-s B A``. Layers are ``LoRALinear`` (A [r, in],
    B [out, r]; S and its inverse [r, r] in float64). Takes LoRA's keyword arguments besides; raises
    ValueError for bad values.

    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Linear(16, 8))
    >>> m = RefLoRA(r=4, target_modules=["0"], variant="s", warmup_steps=0, re_init=True)
    >>> net = m.apply(net)
    >>> bool(net[0].lora_B.abs().sum() > 0), len(m.attach(torch.optim.AdamW(net.parameters(), lr=1e-2)))
    (True, 2)
    """

    def __init__(self, *, variant: str = "full", warmup_steps: int = 100, interval: int = 1, re_init: bool = False,
                 eps: float = 1e-6, **kwargs) -> None:
        super().__init__(**kwargs)
        if variant not in _VARIANTS:
            raise ValueError(f"variant: expected one of {_VARIANTS}, got {variant!r}")
        self.variant = variant
        self.warmup_steps = check_int("warmup_steps", warmup_steps, 0)
        self.interval = check_int("interval", interval, 1)
        if not isinstance(re_init, bool):
            raise TypeError(f"re_init: expected a bool, got {type(re_init).__name__}")
        if re_init and self.init_lora_weights is not True:
            raise ValueError(f"re_init: expected init_lora_weights=True with re_init=True (the reference "
                             f"re-initializes only then), got init_lora_weights={self.init_lora_weights!r}")
        self.re_init = re_init
        self.eps = check_float("eps", eps, 0.0, float("inf"))

    def _make_layer(self, name: str, linear: nn.Linear) -> LoRALinear:
        layer = super()._make_layer(name, linear)
        if self.re_init:
            _re_init_(layer)
        return layer

    def acts_at(self, step: int) -> bool:
        """Whether the refactoring hook acts at (0-based) optimizer step ``step``."""
        return step >= self.warmup_steps and (step - self.warmup_steps) % self.interval == 0

    @torch.no_grad()
    def precondition(self) -> None:
        """``grad_A <- S^-1 grad_A``, ``grad_B <- grad_B S`` in every layer (the full variant's hook)."""
        for _, layer in self.layers(self._model):
            A, B = layer.lora_A, layer.lora_B
            if A.grad is None or B.grad is None:
                continue
            S, S_inv = balancing_matrix(A, B, self.eps)
            A.grad.copy_(S_inv.to(A.grad.dtype) @ A.grad)
            B.grad.copy_(B.grad @ S.to(B.grad.dtype))

    @torch.no_grad()
    def rebalance(self, optimizer: torch.optim.Optimizer) -> None:
        """``A -> c A``, ``B -> B / c`` with ``||cA|| = ||B/c||`` in every layer (``B A`` unchanged),
        and the optimizer's moments of A and B rescaled as their gradients are (RefLoRA-S's hook)."""
        for _, layer in self.layers(self._model):
            A, B = layer.lora_A, layer.lora_B
            nA, nB = float(A.norm()), float(B.norm())
            if nA == 0.0 or nB == 0.0:
                continue
            c = (nB / nA) ** 0.5
            for p, factor in ((A, c), (B, 1.0 / c)):
                p.mul_(factor)
                for key, value in optimizer.state.get(p, {}).items():
                    if key in _MOMENT_POWER:
                        value.div_(factor ** _MOMENT_POWER[key])

    def _before_step(self, optimizer: torch.optim.Optimizer, step: int) -> None:
        if self.variant == "full" and self.acts_at(step):
            self.precondition()

    def _after_step(self, optimizer: torch.optim.Optimizer, step: int) -> None:
        if self.variant == "s" and self.acts_at(step):
            self.rebalance(optimizer)


@torch.no_grad()
def _re_init_(layer: LoRALinear) -> None:
    """The reference's ``re_init``: A and B kaiming-uniform (a = sqrt 5), the base shifted by ``-s B A``."""
    _kaiming_uniform_(layer.lora_A)
    _kaiming_uniform_(layer.lora_B)
    layer.weight.copy_(layer.weight.double() - layer.scaling * (layer.lora_B.double() @ layer.lora_A.double()))
