"""Modules over the op: ``LoRALinear`` (a drop-in ``nn.Linear``) and ``AdapterBank``.

Modules call ``lorakern.ops.lora_linear`` and know nothing of kernels.
"""
from __future__ import annotations

import math
import re
from typing import Optional, Union

import torch
from torch import nn

from lorakern.batch import AdapterBatch
from lorakern.ops import lora_linear

__all__ = ["LoRALinear", "AdapterBank", "check_init_lora_weights"]

_PISSA_NITER = re.compile(r"^pissa_niter_(\d+)$")


def check_init_lora_weights(value: Union[bool, str]) -> Union[bool, str]:
    """``value`` if it is one of PEFT's ``init_lora_weights`` that LoRALinear implements: True,
    False, ``"gaussian"``, ``"pissa"``, ``"pissa_niter_[n]"``; else ValueError naming the argument.

    >>> check_init_lora_weights("pissa_niter_4")
    'pissa_niter_4'
    """
    if value is True or value is False or value in ("gaussian", "pissa") or (
            isinstance(value, str) and _PISSA_NITER.match(value)):
        return value
    raise ValueError("init_lora_weights: expected True, False, 'gaussian', 'pissa' or 'pissa_niter_<n>', "
                     f"got {value!r}")


def _kaiming_uniform_(t: torch.Tensor) -> torch.Tensor:
    return nn.init.kaiming_uniform_(t, a=math.sqrt(5))


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a trainable low-rank update, computed by the fused op.

    ``y = x W^T + b + s * dropout(x) A^T B^T`` with ``s = lora_alpha / r`` (``lora_alpha /
    sqrt(r)`` with rsLoRA): LoRA (Hu et al. 2021, arXiv 2106.09685) as PEFT's ``lora.Linear``
    computes it, with PEFT's ``LoraConfig`` keyword names. Parameters are named as in
    ``nn.Linear`` (``weight`` [out, in], ``bias`` [out], both frozen) plus ``lora_A`` [r, in] and
    ``lora_B`` [out, r], so an ``nn.Linear`` state dict loads into it (``strict=False``).
    ``merge()`` folds ``s B A`` into the weight, ``unmerge()`` takes it out.

    >>> layer = LoRALinear(64, 32, r=8, lora_alpha=16)
    >>> layer(torch.randn(2, 5, 64)).shape
    torch.Size([2, 5, 32])
    >>> wrapped = LoRALinear.from_linear(nn.Linear(64, 32), r=4)
    >>> wrapped.weight is not None and not wrapped.weight.requires_grad
    True
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        r: int = 8,
        lora_alpha: float = 8,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        init_lora_weights: Union[bool, str] = True,
        backend: str = "auto",
        device=None,
        dtype=None,
    ) -> None:
        """A layer of ``in_features`` -> ``out_features`` with a rank-``r`` adapter.

        The base weight and bias get ``nn.Linear``'s initialization and are frozen (use
        :meth:`from_linear` to wrap existing weights); ``lora_A`` / ``lora_B`` are trainable.

        Args:
            in_features: K, the size of x's last dimension.
            out_features: N, the size of y's last dimension.
            bias: whether the base layer has a bias [out_features].
            r: the adapter's rank, an int >= 1 (PEFT's ``r``).
            lora_alpha: the scale's numerator: ``s = lora_alpha / r`` (PEFT's ``lora_alpha``).
            lora_dropout: probability in [0, 1) of dropping x's elements on the adapter branch in
                training (the mask is regenerated in backward, never stored); 0 in eval.
            use_rslora: ``s = lora_alpha / sqrt(r)`` (rsLoRA, arXiv 2312.03732; PEFT's ``use_rslora``).
            init_lora_weights: PEFT's values ``True`` (A kaiming-uniform with a = sqrt(5), B = 0:
                the layer starts as the base), ``"gaussian"`` (A ~ N(0, 1/r), B = 0), ``False``
                (both random: for tests), ``"pissa"`` (PiSSA, arXiv 2404.02948, as PEFT's
                ``pissa_init``: A = S^1/2 V^T / sqrt(s), B = U S^1/2 / sqrt(s) from the top-r SVD
                of W, which keeps the residual W - s B A; the output is unchanged) or
                ``"pissa_niter_[n]"`` (the same from ``torch.svd_lowrank(W, q=r, niter=n)``, a
                randomized SVD: seed torch for a repeatable start). PiSSA's SVD runs in float32.
            backend: the op's backend: ``"auto"``, ``"torch"``, ``"cpu"``, ``"triton"``, ``"cuda"``.
            device, dtype: of every parameter, as in ``nn.Linear``.

        Raises:
            ValueError: ``r`` not an int >= 1, ``lora_dropout`` outside [0, 1), an
                ``init_lora_weights`` not listed above, or PiSSA with ``r > min(in, out)``.

        >>> round(LoRALinear(16, 8, bias=False, r=2, lora_alpha=4, use_rslora=True).scaling, 4)  # 4 / sqrt(2)
        2.8284
        """
        super().__init__()
        if not isinstance(r, int) or r < 1:
            raise ValueError(f"r: expected an int >= 1, got {r!r}")
        if not (0.0 <= lora_dropout < 1.0):
            raise ValueError(f"lora_dropout: expected a float in [0, 1), got {lora_dropout!r}")
        check_init_lora_weights(init_lora_weights)
        kw = {"device": device, "dtype": dtype}
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **kw), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, **kw), requires_grad=False) if bias else None
        self.lora_A = nn.Parameter(torch.empty(r, in_features, **kw))
        self.lora_B = nn.Parameter(torch.empty(out_features, r, **kw))
        self.r, self.lora_alpha, self.lora_dropout = r, lora_alpha, float(lora_dropout)
        self.use_rslora, self.backend = use_rslora, backend
        self.scaling = lora_alpha / (math.sqrt(r) if use_rslora else r)
        self.merged = False
        self._reset_base()
        self.reset_lora_parameters(init_lora_weights)

    def _reset_base(self) -> None:
        _kaiming_uniform_(self.weight)
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features) if self.in_features else 0
            nn.init.uniform_(self.bias, -bound, bound)

    @torch.no_grad()
    def reset_lora_parameters(self, init_lora_weights: Union[bool, str] = True) -> None:
        """PEFT's init (see ``__init__``): True: A kaiming-uniform (a = sqrt 5), B = 0; "gaussian":
        A ~ N(0, 1/r); "pissa" / "pissa_niter_[n]": the principal factors, the residual into
        ``weight`` (in place: a shared weight changes too, as PEFT's does)."""
        check_init_lora_weights(init_lora_weights)
        if init_lora_weights is False:
            _kaiming_uniform_(self.lora_A)
            _kaiming_uniform_(self.lora_B)
            return
        if isinstance(init_lora_weights, str) and init_lora_weights.startswith("pissa"):
            niter = _PISSA_NITER.match(init_lora_weights)
            self._pissa_(int(niter.group(1)) if niter else None)
            return
        if init_lora_weights == "gaussian":
            nn.init.normal_(self.lora_A, std=1 / self.r)
        else:
            _kaiming_uniform_(self.lora_A)
        nn.init.zeros_(self.lora_B)

    def _pissa_(self, niter: Optional[int]) -> None:
        """PiSSA in place: principal factors into A and B, the residual into the frozen weight
        (``niter``: from ``torch.svd_lowrank`` with that many subspace iterations, else the full SVD)."""
        if self.r > min(self.in_features, self.out_features):
            raise ValueError(f"r: expected at most min(in_features, out_features) = "
                             f"{min(self.in_features, self.out_features)} for PiSSA, got {self.r}")
        W = self.weight.float()
        if niter is None:
            U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        else:
            U, S, V = torch.svd_lowrank(W, q=self.r, niter=niter)
            Vh = V.T
        root = (S[: self.r] / self.scaling).sqrt()
        A = root[:, None] * Vh[: self.r]
        B = U[:, : self.r] * root
        self.lora_A.copy_(A)
        self.lora_B.copy_(B)
        self.weight.copy_(W - self.scaling * (B @ A))

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, r: int = 8, **kwargs) -> "LoRALinear":
        """Wrap ``linear``: the new layer shares (does not copy) its weight and bias, frozen.

        The adapter is created in the weight's dtype and device; ``kwargs`` are ``__init__``'s
        keywords (``lora_alpha``, ``lora_dropout``, ``use_rslora``, ``init_lora_weights``,
        ``backend``). Raises TypeError when ``linear`` is not an ``nn.Linear``, and what
        ``__init__`` raises.

        >>> base = nn.Linear(16, 8)
        >>> layer = LoRALinear.from_linear(base, r=2, lora_alpha=4)
        >>> layer.weight is base.weight, tuple(layer.lora_A.shape), tuple(layer.lora_B.shape)
        (True, (2, 16), (8, 2))
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear: expected an nn.Linear, got {type(linear).__name__}")
        w = linear.weight
        init = check_init_lora_weights(kwargs.pop("init_lora_weights", True))
        with torch.device("meta"):
            layer = cls(linear.in_features, linear.out_features, linear.bias is not None, r=r,
                        init_lora_weights=False, **kwargs)
        layer.weight = linear.weight
        layer.weight.requires_grad_(False)
        layer.bias = linear.bias
        if layer.bias is not None:
            layer.bias.requires_grad_(False)
        layer.lora_A = nn.Parameter(torch.empty(r, linear.in_features, device=w.device, dtype=w.dtype))
        layer.lora_B = nn.Parameter(torch.empty(linear.out_features, r, device=w.device, dtype=w.dtype))
        layer.reset_lora_parameters(init)
        return layer

    def delta_weight(self) -> torch.Tensor:
        """``s * B A``, [out, in]: what merging adds to the weight."""
        return (self.lora_B.float() @ self.lora_A.float() * self.scaling).to(self.weight.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into the frozen weight; forward then runs the base alone."""
        if not self.merged:
            self.weight.add_(self.delta_weight())
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo ``merge``."""
        if self.merged:
            self.weight.sub_(self.delta_weight())
            self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in_features] -> y [..., out_features] in x's dtype (see :func:`lorakern.lora_linear`)."""
        if self.merged:
            return nn.functional.linear(x, self.weight, self.bias)
        return lora_linear(
            x, self.weight, self.bias, self.lora_A, self.lora_B, scaling=self.scaling,
            dropout_p=self.lora_dropout if self.training else 0.0, backend=self.backend,
        )

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, r={self.r}, lora_alpha={self.lora_alpha}, "
                f"lora_dropout={self.lora_dropout}, scaling={self.scaling:g}, merged={self.merged}, "
                f"backend={self.backend!r}")


class AdapterBank(nn.Module):
    """G adapters for one base layer, stored as banks ``A [G, r, in]`` and ``B [G, out, r]``.

    ``forward(x, adapter_index)`` runs one adapter per row (-1: the base alone), as in
    multi-adapter serving. ``adapter_index`` is an int tensor [...] (one per row of x, read on every
    call) or an :class:`~lorakern.AdapterBatch` that ``prepare`` built once for all layers of a batch.
    Multi-adapter serving as in S-LoRA (arXiv 2311.03285) and PEFT's ``adapter_names``.

    Args:
        base: the frozen ``nn.Linear`` (in -> out); it is shared, and frozen in place.
        num_adapters: G >= 1.
        r: the rank of every adapter (>= 1).
        lora_alpha: each adapter's scale is ``lora_alpha / r`` (the buffer ``scaling`` [G]).
        backend: the op's backend (see :func:`lorakern.lora_linear`).

    Parameters ``lora_A`` [G, r, in] (kaiming-uniform) and ``lora_B`` [G, out, r] (zeros) in the
    base's dtype and device. ``forward(x [..., in], adapter_index)`` returns [..., out] in x's dtype.

    Raises:
        ValueError: ``num_adapters < 1`` or ``r < 1``; in forward, an index outside [-1, G) or of
            the wrong length (see :func:`lorakern.lora_linear`).

    >>> base = nn.Linear(64, 32)
    >>> bank = AdapterBank(base, num_adapters=4, r=8)
    >>> batch = bank.prepare(torch.tensor([0, 3, -1]))   # once per batch, shared by every layer
    >>> bank(torch.randn(3, 64), batch).shape
    torch.Size([3, 32])
    """

    def __init__(self, base: nn.Linear, num_adapters: int, r: int = 8, lora_alpha: float = 8,
                 backend: str = "auto") -> None:
        super().__init__()
        if num_adapters < 1:
            raise ValueError(f"num_adapters: expected >= 1, got {num_adapters}")
        if r < 1:
            raise ValueError(f"r: expected an int >= 1, got {r!r}")
        w = base.weight
        self.base, self.r, self.backend = base, r, backend
        base.requires_grad_(False)
        self.lora_A = nn.Parameter(torch.empty(num_adapters, r, base.in_features, device=w.device, dtype=w.dtype))
        self.lora_B = nn.Parameter(torch.zeros(num_adapters, base.out_features, r, device=w.device, dtype=w.dtype))
        self.register_buffer("scaling", torch.full((num_adapters,), lora_alpha / r, device=w.device))
        for a in self.lora_A.data:
            _kaiming_uniform_(a)

    def prepare(self, adapter_index: torch.Tensor) -> AdapterBatch:
        """The batch's rows, checked and sorted once: int [...] (flattened) -> AdapterBatch.

        Raises TypeError / ValueError as :class:`~lorakern.AdapterBatch` does (dtype, values
        outside [-1, G)).
        """
        return AdapterBatch(adapter_index.reshape(-1), num_adapters=self.lora_A.shape[0])

    def forward(self, x: torch.Tensor, adapter_index: Union[torch.Tensor, AdapterBatch]) -> torch.Tensor:
        lead = x.shape[:-1]
        if isinstance(adapter_index, torch.Tensor):
            adapter_index = adapter_index.reshape(-1)
        y = lora_linear(x.reshape(-1, x.shape[-1]), self.base.weight, self.base.bias, self.lora_A, self.lora_B,
                        scaling=self.scaling, adapter_index=adapter_index, backend=self.backend)
        return y.reshape(*lead, -1)
