"""CG-LoRA: LoRA initialized along the curvature-whitened gradient, the base shifted to compensate."""
from __future__ import annotations

from typing import Any, Callable, Iterable, Optional

import torch
from torch import nn

from lorakern.methods.base import check_float
from lorakern.methods.lora import LoRA
from lorakern.modules import LoRALinear

__all__ = ["CGLoRA"]


def _inv_sqrt(S: torch.Tensor, damping: float) -> torch.Tensor:
    """``(S + damping * mean(diag S) I)^-1/2`` of a symmetric PSD matrix."""
    d = damping * float(S.diagonal().mean()) + torch.finfo(S.dtype).tiny
    lam, U = torch.linalg.eigh(S + d * torch.eye(S.shape[0], dtype=S.dtype, device=S.device))
    return (U * lam.clamp_min(d).rsqrt()) @ U.T


class _Curvature:
    """Accumulates one layer's K-FAC statistics: ``S_in = E[x x^T]``, ``S_out = E[g g^T]`` and
    the weight gradient ``G = sum g^T x``, from forward and output-gradient hooks."""

    def __init__(self, layer: LoRALinear) -> None:
        K, N = layer.in_features, layer.out_features
        kw = dict(device=layer.weight.device, dtype=torch.float32)
        self.S_in, self.S_out, self.G = torch.zeros(K, K, **kw), torch.zeros(N, N, **kw), torch.zeros(N, K, **kw)
        self.rows = 0
        self.handle = layer.register_forward_hook(self._forward)

    def _forward(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        x = inputs[0].detach().reshape(-1, module.in_features).float()
        self.S_in.addmm_(x.T, x)
        self.rows += x.shape[0]
        if output.requires_grad:
            output.register_hook(lambda g: self._backward(g.reshape(-1, module.out_features).float(), x))

    def _backward(self, g: torch.Tensor, x: torch.Tensor) -> None:
        self.S_out.addmm_(g.T, g)
        self.G.addmm_(g.T, x)


class CGLoRA(LoRA):
    """LoRA with a curvature-guided initialization, ``m.initialize(model, batches)`` after ``apply``.

    From a few batches, each target layer accumulates its input-activation and output-gradient
    covariances ``S_in``, ``S_out`` (K-FAC) and its weight gradient G. The whitened gradient
    ``S_out^-1/2 G S_in^-1/2 = U Sigma V^T`` (covariances damped by ``damping`` times their
    mean diagonal) gives the top-r directions of the natural gradient ``S_out^-1/2 u_i`` and
    ``v_i^T S_in^-1/2``: B0's columns and A0's rows, each scaled to norm
    ``sqrt(sigma_i / sigma_1)``. The frozen base becomes ``W0 - s B0 A0``, so the model's output
    is unchanged at step 0. Without ``initialize`` it is plain LoRA. Takes LoRA's keyword
    arguments besides (``init`` must stay ``"kaiming"`` or ``"gaussian"``).

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

    def __init__(self, *, damping: float = 1e-3, **kwargs) -> None:
        super().__init__(**kwargs)
        if self.init == "pissa":
            raise ValueError("init: expected 'kaiming' or 'gaussian' for CGLoRA (it sets the factors itself), "
                             "got 'pissa'")
        self.damping = check_float("damping", damping, 0.0, float("inf"))

    def initialize(self, model: nn.Module, batches: Iterable[Any],
                   loss_fn: Optional[Callable[[nn.Module, Any], torch.Tensor]] = None) -> nn.Module:
        """Set every layer's B0, A0 from ``batches`` and shift its base; returns ``model``.

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
        for name, layer in layers:
            layer.lora_A.grad = layer.lora_B.grad = None
            self._initialize_layer(name, layer, stats[name])
        return model

    @torch.no_grad()
    def _initialize_layer(self, name: str, layer: LoRALinear, st: _Curvature) -> None:
        if st.rows == 0 or not bool(st.G.any()):
            raise ValueError(f"batches: expected them to give layer {name!r} a nonzero gradient, got none")
        in_ihalf = _inv_sqrt(st.S_in / st.rows, self.damping)
        out_ihalf = _inv_sqrt(st.S_out / st.rows, self.damping)
        U, sigma, Vh = torch.linalg.svd(out_ihalf @ st.G @ in_ihalf, full_matrices=False)
        norms = (sigma[: self.r] / sigma[0]).sqrt()
        B0 = out_ihalf @ U[:, : self.r]
        A0 = Vh[: self.r] @ in_ihalf
        B0 = B0 * (norms / B0.norm(dim=0))
        A0 = A0 * (norms / A0.norm(dim=1))[:, None]
        total = layer.weight.float() + layer.delta_weight().float()  # W + s B A, which stays
        layer.lora_A.copy_(A0)
        layer.lora_B.copy_(B0)
        layer.weight.copy_(total - layer.scaling * (layer.lora_B.float() @ layer.lora_A.float()))
