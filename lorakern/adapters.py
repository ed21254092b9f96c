"""Adapted linear layers the method classes build on, all running through the one op.

``AdaptedLinear`` is ``LoRALinear`` with the op's per-rank and per-output vectors (``rank_scale``
u, ``rank_mask`` m, ``out_scale`` v) and factors that are its own parameters, parameters shared
with other layers (Tied-LoRA: the same ``nn.Parameter`` in every layer), or strided slices of a
shared ``ProjectionBank`` (VeRA). ``DoRALinear`` is ``LoRALinear`` with DoRA's magnitude.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from lorakern.modules import LoRALinear
from lorakern.ops import lora_linear

__all__ = ["AdaptedLinear", "ProjectionBank", "DoRALinear", "kaiming_bank_init"]

_VECTORS = ("rank_scale", "rank_mask", "out_scale")


def kaiming_bank_init(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """Kaiming-uniform (gain sqrt 2, fan-in) on CPU from ``generator``, bit for bit as PEFT's VeRA.

    >>> kaiming_bank_init((4, 16), torch.Generator().manual_seed(0)).shape
    torch.Size([4, 16])
    """
    bound = math.sqrt(3.0) * math.sqrt(2.0) / math.sqrt(shape[1])
    with torch.no_grad():
        return torch.empty(shape).uniform_(-bound, bound, generator=generator)


class ProjectionBank(nn.Module):
    """VeRA's frozen random factors ``lora_A [r, max_in]`` and ``lora_B [max_out, r]``.

    Drawn from ``seed`` exactly as PEFT draws ``vera_A`` / ``vera_B``. One bank is shared by every
    layer (registered in each, so ``.to()`` moves it once); each layer reads a strided slice in
    place. With ``save=False`` the factors are left out of ``state_dict`` and redrawn from the
    saved ``seed`` when a state dict carrying another seed is loaded. VeRA: Kopiczko et al. 2024
    (arXiv 2310.11454); PEFT's ``VeraConfig(projection_prng_key=seed, save_projection=save)``.

    Args:
        r: the rank (VeRA's shared rank, typically 256).
        max_in, max_out: the largest in- and out-features of the layers that read the bank.
        seed: the CPU generator's seed (PEFT's ``projection_prng_key``).
        save: keep the factors in ``state_dict`` (PEFT's ``save_projection``).
        device, dtype: of the factors (drawn in float32 on the CPU, then converted).

    >>> bank = ProjectionBank(r=4, max_in=16, max_out=8, seed=0)
    >>> bank.lora_A.shape, bank.lora_B.shape
    (torch.Size([4, 16]), torch.Size([8, 4]))
    """

    def __init__(self, r: int, max_in: int, max_out: int, seed: int, *, save: bool = False,
                 device=None, dtype=None) -> None:
        super().__init__()
        self.r, self.max_in, self.max_out, self.save = r, max_in, max_out, save
        self.register_buffer("seed", torch.tensor(seed, dtype=torch.int64))
        self.register_buffer("lora_A", None, persistent=save)
        self.register_buffer("lora_B", None, persistent=save)
        self._draw(device, dtype)

    def _draw(self, device, dtype) -> None:
        gen = torch.Generator(device="cpu").manual_seed(int(self.seed))
        A = kaiming_bank_init((self.r, self.max_in), gen)
        B = kaiming_bank_init((self.max_out, self.r), gen)
        self.lora_A = A.to(device=device, dtype=dtype)
        self.lora_B = B.to(device=device, dtype=dtype)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        before = int(self.seed)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if not self.save and int(self.seed) != before:
            self._draw(self.lora_A.device, self.lora_A.dtype)

    def extra_repr(self) -> str:
        return f"r={self.r}, max_in={self.max_in}, max_out={self.max_out}, seed={int(self.seed)}, save={self.save}"


class AdaptedLinear(LoRALinear):
    """``y = x W^T + b + v * ((s * (x~ A^T) * (u * m)) B^T)``: ``LoRALinear`` with the op's vectors.

    ``rank_scale`` [r], ``rank_mask`` [r] (bool) and ``out_scale`` [out] are each None, a
    trainable parameter or a buffer (``set_vector``). The factors are ``lora_A`` / ``lora_B``
    (own or shared parameters) or, with a ``bank``, slices ``bank.lora_A[:, :in]`` and
    ``bank.lora_B[:out]`` read in place. ``train_scale`` multiplies ``s`` in training mode only.
    Takes ``LoRALinear``'s arguments; the method classes build it (Tied-LoRA, arXiv 2311.09578;
    VeRA, arXiv 2310.11454; AdaLoRA's and IGU-LoRA's ``SVDLinear`` subclass it).

    >>> layer = AdaptedLinear.from_linear(nn.Linear(16, 8), r=4)
    >>> layer.set_vector("rank_scale", torch.ones(4), trainable=True)
    >>> layer.set_vector("rank_mask", torch.tensor([True, False, True, True]), trainable=False)
    >>> layer(torch.randn(3, 16)).shape
    torch.Size([3, 8])
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        for name in _VECTORS:
            self.register_buffer(name, None)
        self.bank: Optional[ProjectionBank] = None
        self.train_scale = 1.0

    def set_vector(self, name: str, value: Optional[torch.Tensor], *, trainable: bool) -> None:
        """Set ``rank_scale``, ``rank_mask`` or ``out_scale`` to ``value``: a parameter if
        ``trainable``, else a buffer (saved in ``state_dict``); None removes it.

        ``value``: [r] for ``rank_scale`` (x's or the adapters' dtype) and ``rank_mask`` (bool),
        [out_features] for ``out_scale``. Raises ValueError for another name or shape.
        """
        if name not in _VECTORS:
            raise ValueError(f"name: expected one of {_VECTORS}, got {name!r}")
        want = self.r if name != "out_scale" else self.out_features
        if value is not None and tuple(value.shape) != (want,):
            raise ValueError(f"{name}: expected shape [{want}], got {list(value.shape)}")
        self._parameters.pop(name, None)
        self._buffers.pop(name, None)
        if trainable and value is not None:
            self.register_parameter(name, nn.Parameter(value))
        else:
            self.register_buffer(name, value)

    def use_bank(self, bank: ProjectionBank) -> None:
        """Read the factors from ``bank`` (sliced in place); the own ``lora_A`` / ``lora_B`` go.

        Raises ValueError when the bank's rank differs or it is smaller than this layer.
        """
        if bank.max_in < self.in_features or bank.max_out < self.out_features or bank.r != self.r:
            raise ValueError(f"bank: expected r={self.r}, max_in >= {self.in_features}, max_out >= "
                             f"{self.out_features}, got r={bank.r}, max_in={bank.max_in}, max_out={bank.max_out}")
        self.lora_A = None
        self.lora_B = None
        self.bank = bank

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A [r, in], B [out, r])``: the own parameters or views into the bank."""
        if self.bank is None:
            return self.lora_A, self.lora_B
        return self.bank.lora_A[:, : self.in_features], self.bank.lora_B[: self.out_features]

    def delta_weight(self) -> torch.Tensor:
        """``v * (s * B diag(u * m) A)``, [out, in]: what merging adds to the weight."""
        A, B = self.factors()
        Bf = B.float() * self.scaling
        if self.rank_scale is not None:
            Bf = Bf * self.rank_scale.float()
        if self.rank_mask is not None:
            Bf = Bf * self.rank_mask.float()
        if self.out_scale is not None:
            Bf = Bf * self.out_scale.float()[:, None]
        return (Bf @ A.float()).to(self.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return nn.functional.linear(x, self.weight, self.bias)
        A, B = self.factors()
        s = self.scaling * self.train_scale if self.training else self.scaling
        return lora_linear(
            x, self.weight, self.bias, A, B, scaling=s, rank_scale=self.rank_scale,
            rank_mask=self.rank_mask, out_scale=self.out_scale,
            dropout_p=self.lora_dropout if self.training else 0.0, backend=self.backend,
        )


class DoRALinear(LoRALinear):
    """DoRA: ``y = m / ||W + s B A||_row * (x W^T + s x~ A^T B^T) + b``, the norm detached (as PEFT).

    One call of the op: the magnitude ratio ``m / ||W + s B A||_row`` enters as both its
    ``base_scale`` and its ``out_scale``, so nothing M x N is computed or saved around it.
    ``magnitude [out]`` starts at the row norms of ``W + s B A``. DoRA: Liu et al. 2024 (arXiv
    2402.09353); PEFT's ``LoraConfig(use_dora=True)``. Takes ``LoRALinear``'s arguments and
    raises what it raises.

    >>> layer = DoRALinear.from_linear(nn.Linear(16, 8), r=4)
    >>> torch.allclose(layer.magnitude, layer.weight.norm(dim=1))
    True
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.magnitude = nn.Parameter(self.weight_norm())
        self._merge_ratio: Optional[torch.Tensor] = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, r: int = 8, **kwargs) -> "DoRALinear":
        """Wrap ``linear`` (shared, frozen); the magnitude starts at ``||W + s B A||_row``."""
        layer = super().from_linear(linear, r=r, **kwargs)
        layer.magnitude = nn.Parameter(layer.weight_norm())
        return layer

    def weight_norm(self) -> torch.Tensor:
        """``||W + s B A||`` per output row, detached, in the weight's dtype."""
        with torch.no_grad():
            return torch.linalg.norm(self.weight.float() + super().delta_weight().float(), dim=1).to(
                self.weight.dtype)

    def _ratio(self) -> torch.Tensor:
        return self.magnitude / self.weight_norm()

    def delta_weight(self) -> torch.Tensor:
        """What merging adds to the weight: ``(m / ||W + s B A||_row) (W + s B A) - W``."""
        merged = self._ratio()[:, None] * (self.weight + super().delta_weight())
        return (merged - self.weight).to(self.weight.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into the frozen weight: ``W <- (m / ||W + s B A||_row) (W + s B A)``."""
        if not self.merged:
            self._merge_ratio = self._ratio()[:, None]
            self.weight.add_(super().delta_weight()).mul_(self._merge_ratio)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo ``merge`` with the ratio it used."""
        if self.merged:
            self.weight.div_(self._merge_ratio).sub_(super().delta_weight())
            self._merge_ratio = None
            self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return nn.functional.linear(x, self.weight, self.bias)
        ratio = self._ratio()
        return lora_linear(
            x, self.weight, self.bias, self.lora_A, self.lora_B, scaling=self.scaling, base_scale=ratio,
            out_scale=ratio, dropout_p=self.lora_dropout if self.training else 0.0, backend=self.backend,
        )
