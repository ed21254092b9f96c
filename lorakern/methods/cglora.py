"""CG-LoRA (Zheng and Proutiere 2026, arXiv 2603.29824): LoRA initialized along the rank-r
curvature-whitened (Newton-like, K-FAC) step, with or without shifting the base to compensate.

Only the paper's abstract and a summary of its results could be read here (not its method
section, equations or hyperparameters; the authors' code, github.com/fredML/CG-LoRA, was not
reachable). What is implemented is the construction the abstract describes, made exact below;
the points the paper may settle differently are named in ``CGLoRA``'s docstring.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Optional

import torch
from torch import nn

from lorakern.methods.base import check_float
from lorakern.methods.lora import LoRA
from lorakern.modules import LoRALinear

__all__ = ["CGLoRA"]


def _damped_inv_sqrt(S: torch.Tensor, damping: float) -> torch.Tensor:
    """``(S + damping * mean(diag S) I)^-1/2`` of a symmetric PSD matrix (float64)."""
    d = damping * float(S.diagonal().mean()) + torch.finfo(S.dtype).tiny
    lam, U = torch.linalg.eigh(S + d * torch.eye(S.shape[0], dtype=S.dtype, device=S.device))
    return (U * lam.clamp_min(d).rsqrt()) @ U.T


class _Curvature:
    """One layer's K-FAC statistics from forward and output-gradient hooks, in float64:
    ``S_in = sum x x^T`` over rows, ``S_out = sum (m g)(m g)^T`` with ``g`` the gradient of a
    batch's (mean) loss at the layer's output rows and ``m`` the batch's row count (so ``m g`` is
    a row's own loss gradient), and ``G = sum over batches of g^T x`` (the weight gradient)."""

    def __init__(self, layer: LoRALinear) -> None:
        K, N = layer.in_features, layer.out_features
        kw = dict(device=layer.weight.device, dtype=torch.float64)
        self.S_in, self.S_out, self.G = torch.zeros(K, K, **kw), torch.zeros(N, N, **kw), torch.zeros(N, K, **kw)
        self.rows = self.batches = 0
        self.handle = layer.register_forward_hook(self._forward)

    def _forward(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        x = inputs[0].detach().reshape(-1, module.in_features).double()
        self.S_in.addmm_(x.T, x)
        self.rows += x.shape[0]
        if output.requires_grad:
            output.register_hook(lambda g: self._backward(g.reshape(-1, module.out_features).double(), x))

    def _backward(self, g: torch.Tensor, x: torch.Tensor) -> None:
        self.S_out.addmm_(g.T, g, alpha=float(x.shape[0]) ** 2)
        self.G.addmm_(g.T, x)
        self.batches += 1


class CGLoRA(LoRA):
    """LoRA with a curvature-guided initialization: ``m.initialize(model, batches)`` after ``apply``.

    Curvature: for each target layer, K-FAC factors of the empirical Fisher (the labels' own
    gradients, tokens as examples), ``S_in = E[x x^T]`` over the layer's input rows and ``S_out =
    E[g g^T]`` over its rows' loss gradients, and the mean weight gradient ``G``, all from the same
    ``batches``, each factor damped by ``damping`` times its mean eigenvalue. The quadratic model
    ``<G, D> + 1/2 ||S_out^1/2 D S_in^1/2||_F^2`` is minimized over rank-r updates D by

        D_r = -S_out^-1/2 [M]_r S_in^-1/2,    M = S_out^-1/2 G S_in^-1/2 = U Sigma V^T,

    ``[M]_r`` its top-r SVD (the rank-r curvature-whitened step). The factors are

        B0 = -c S_out^-1/2 U_r Sigma_r^1/2 / sqrt(s),   A0 = c Sigma_r^1/2 V_r^T S_in^-1/2 / sqrt(s),

    then balanced per rank (``||B0[:, i]|| = ||A0[i]||``, the product unchanged), so ``s B0 A0 =
    c^2 D_r`` keeps the curvature's magnitudes, within and across layers. ``step`` sets ``c^2``:
    a float is that multiple of the full damped Newton step (``step=1``); ``None`` (default) takes
    one constant for the whole model such that its largest factor column or row has norm 1 (the
    scale of PEFT's kaiming-initialized factors): on few batches the Newton step is often far
    larger than W itself, along directions the K-FAC factors barely see.
    ``shift=True`` moves the frozen base to ``W0 - s B0 A0`` so that the model's output is
    unchanged at step 0 (as LoRA-GA); ``shift=False`` (the paper's "no shift" variant, the one it
    reports best on RoBERTa-base GLUE) keeps W0, so the model starts one step along D_r.

    How this may differ from the paper (unreadable here): whether it uses the empirical Fisher, the
    true Fisher (sampled labels) or the Gauss-Newton matrix; its damping; its split of ``B0 A0``
    between the factors and its scale (the ``step=None`` rule is this library's). Per-row loss
    gradients are taken as the row count times the gradient of each batch's mean loss (exact for a
    loss that is a mean over the layer's rows). Without ``initialize`` this is plain LoRA. Layers
    are ``LoRALinear`` (A [r, in], B [out, r] in the weight's dtype; statistics in float64). Takes
    LoRA's keyword arguments besides (``init_lora_weights`` True, False or ``"gaussian"``: not PiSSA); raises
    ValueError for bad arguments, for ``r > min(in, out)`` and for batches that give a layer no
    gradient.

    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Linear(16, 8))
    >>> m = CGLoRA(r=2, target_modules=["0"])
    >>> net = m.apply(net)
    >>> x = torch.randn(32, 16)
    >>> before = net(x)
    >>> net = m.initialize(net, [x], loss_fn=lambda model, batch: model(batch).square().mean())
    >>> torch.allclose(net(x), before, atol=1e-5), bool(net[0].lora_B.abs().sum() > 0)
    (True, True)
    """

    def __init__(self, *, damping: float = 1e-3, shift: bool = True, step: Optional[float] = None, **kwargs) -> None:
        super().__init__(**kwargs)
        if str(self.init_lora_weights).startswith("pissa"):
            raise ValueError(f"init_lora_weights: expected True, False or 'gaussian' for CGLoRA (it sets the factors "
                             f"itself), got {self.init_lora_weights!r}")
        self.damping = check_float("damping", damping, 0.0, float("inf"))
        if not isinstance(shift, bool):
            raise TypeError(f"shift: expected a bool, got {type(shift).__name__}")
        self.shift = shift
        self.step_scale = None if step is None else check_float("step", step, 0.0, float("inf"), low_open=True)

    def initialize(self, model: nn.Module, batches: Iterable[Any],
                   loss_fn: Optional[Callable[[nn.Module, Any], torch.Tensor]] = None) -> nn.Module:
        """Set every layer's B0, A0 from ``batches`` (and shift its base); returns ``model``.

        ``loss_fn(model, batch)`` gives a batch's loss; by default ``model(**batch).loss`` (a
        transformers model fed dicts with labels).
        """
        layers = self.layers(model)
        if not layers:
            raise ValueError(f"model: expected a model that {type(self).__name__}.apply has adapted, found no "
                             f"{self.layer_type.__name__}")
        for name, layer in layers:
            if self.r > min(layer.in_features, layer.out_features):
                raise ValueError(f"r: expected at most min(in, out) = {min(layer.in_features, layer.out_features)}"
                                 f" for {name!r}, got {self.r}")
        loss_fn = loss_fn or (lambda m, batch: m(**batch).loss)
        stats = {name: _Curvature(layer) for name, layer in layers}
        try:
            for batch in batches:
                loss_fn(model, batch).backward()
        finally:
            for st in stats.values():
                st.handle.remove()
        factors = {}
        for name, layer in layers:
            layer.lora_A.grad = layer.lora_B.grad = None
            factors[name] = self._whitened_factors(name, layer, stats[name])
        if self.step_scale is None:  # one constant for the model: its largest factor row / column has norm 1
            c = 1.0 / max(float(B.norm(dim=0).max()) for B, _ in factors.values())
        else:
            c = self.step_scale ** 0.5
        for name, layer in layers:
            B, A = factors[name]
            self._set_factors(layer, c * B, c * A)
        return model

    @torch.no_grad()
    def _whitened_factors(self, name: str, layer: LoRALinear, st: _Curvature) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, A)`` in float64 with ``s B A = D_r`` (the full step), balanced per rank."""
        if st.batches == 0 or not bool(st.G.any()):
            raise ValueError(f"batches: expected them to give layer {name!r} a nonzero gradient, got none")
        in_ihalf = _damped_inv_sqrt(st.S_in / st.rows, self.damping)
        out_ihalf = _damped_inv_sqrt(st.S_out / st.rows, self.damping)
        U, sigma, Vh = torch.linalg.svd(out_ihalf @ (st.G / st.batches) @ in_ihalf, full_matrices=False)
        root = (sigma[: self.r] / layer.scaling).sqrt()
        B = -(out_ihalf @ U[:, : self.r]) * root
        A = root[:, None] * (Vh[: self.r] @ in_ihalf)
        nB, nA = B.norm(dim=0), A.norm(dim=1)
        balance = torch.where((nB > 0) & (nA > 0), (nB / nA).sqrt(), torch.ones_like(nA))
        return B / balance, A * balance[:, None]

    @torch.no_grad()
    def _set_factors(self, layer: LoRALinear, B: torch.Tensor, A: torch.Tensor) -> None:
        total = layer.weight.double() + layer.delta_weight().double()  # W + s B A, which stays unless no shift
        layer.lora_A.copy_(A)
        layer.lora_B.copy_(B)
        if self.shift:
            total -= layer.scaling * (layer.lora_B.double() @ layer.lora_A.double())
        layer.weight.copy_(total)
