"""What a batch's owner prepares once and passes to every adapted layer: rows and active ranks.

A mixed batch (one adapter per row) is described by :class:`AdapterBatch`: the checked index,
its rows stably sorted by adapter and the row count of each adapter. A rank mask is described by
:class:`ActiveRanks`: the mask and the ranks active in any adapter. Both read device values
once, when they are built (one host read each on a GPU), so a model whose layers all take the
same object syncs once per batch, not once per layer. Nothing is cached: an object describes
the tensor as it was when it was built, and the owner builds a new one when the values change
(``lora_linear`` builds one per call from a plain tensor).

>>> import torch
>>> batch = AdapterBatch(torch.tensor([1, -1, 0, 1]), num_adapters=2)
>>> batch.order.tolist(), batch.rows.tolist()
([1, 2, 0, 3], [1, 1, 2])
>>> ActiveRanks(torch.tensor([True, False, True])).index.tolist()
[0, 2]
"""
from __future__ import annotations

from typing import Optional

import torch

__all__ = ["AdapterBatch", "ActiveRanks", "can_sync"]


def can_sync(t: torch.Tensor) -> bool:
    """False where reading device values on the host is impossible: inside torch.compile's
    tracing and during CUDA graph capture. Value checks are skipped there (kernels treat an
    out-of-range adapter index as -1, the base only)."""
    return not (torch.compiler.is_compiling() or (t.is_cuda and torch.cuda.is_current_stream_capturing()))


def _shape(t: torch.Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


class AdapterBatch:
    """One adapter per row: ``adapter_index`` checked, sorted and counted once.

    Mixed-adapter batches as in multi-adapter serving (S-LoRA, arXiv 2311.03285; Punica, arXiv
    2310.18547) and PEFT's ``adapter_names``: build it once per batch and pass it as
    ``adapter_index`` to every layer (``lora_linear``, ``AdapterBank``), so the index is read
    once, not once per layer.

    Args:
        adapter_index: int32 / int64 [M] on the rows' device, values in [-1, num_adapters);
            -1 means the base layer only.
        num_adapters: G, the number of adapters in the bank.

    Attributes:
        index: int64 [M], the index itself (converted, not copied when already int64).
        order: int64 [M], the rows stably sorted by adapter (rows of adapter -1 first).
        rows: CPU int64 [G + 1], the number of rows of adapter -1, 0, ..., G-1; None when built
            where the host cannot read device values (torch.compile tracing, graph capture).
        num_adapters: G.

    Raises:
        TypeError: ``adapter_index`` is not an int32 / int64 tensor.
        ValueError: it is not 1-D, or a value lies outside [-1, G) (checked where the host can
            read it).

    >>> AdapterBatch(torch.tensor([0, 0, 1]), num_adapters=2).rows.tolist()
    [0, 2, 1]
    """

    __slots__ = ("index", "order", "rows", "num_adapters")

    def __init__(self, adapter_index: torch.Tensor, num_adapters: int) -> None:
        if not isinstance(adapter_index, torch.Tensor):
            raise TypeError(f"adapter_index: expected a torch.Tensor, got {type(adapter_index).__name__}")
        if adapter_index.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"adapter_index: expected dtype int32 or int64, got {adapter_index.dtype}")
        if adapter_index.dim() != 1:
            raise ValueError(f"adapter_index: expected a 1-D tensor [M], got shape {_shape(adapter_index)}")
        G = int(num_adapters)
        index = adapter_index if adapter_index.dtype == torch.int64 else adapter_index.to(torch.int64)
        self.index, self.num_adapters = index, G
        self.order = torch.argsort(index, stable=True)
        self.rows = None
        if index.numel() and can_sync(index):
            lo_hi = torch.stack(torch.aminmax(index))
            counts = torch.bincount((index + 1).clamp_(0, G + 1), minlength=G + 2)
            stats = torch.cat([lo_hi, counts]).cpu()  # the one host read
            lo, hi = int(stats[0]), int(stats[1])
            if lo < -1 or hi >= G:
                raise ValueError(f"adapter_index: expected values in [-1, {G}), got {lo if lo < -1 else hi}")
            self.rows = stats[2:2 + G + 1]
        elif not index.numel():
            self.rows = torch.zeros(G + 1, dtype=torch.int64)

    def __repr__(self) -> str:
        return f"AdapterBatch(rows={self.index.shape[0]}, num_adapters={self.num_adapters})"


class ActiveRanks:
    """A rank mask and the ranks it leaves active (in any adapter), compacted once.

    AdaLoRA's budget (arXiv 2303.10512) as a mask: pass it as ``rank_mask`` to every layer that
    shares the mask, and kernels loop over the active ranks only; build a new one when the mask
    changes.

    Args:
        rank_mask: bool [R] or [G, R]; True keeps a rank.

    Attributes:
        mask: the mask itself.
        index: int64 [Ra], the ranks active in any adapter; None when all R are active, or when
            built where the host cannot read device values (the op then runs every rank,
            masked ones multiplied by 0).

    Raises:
        TypeError: ``rank_mask`` is not a bool tensor.

    >>> ActiveRanks(torch.tensor([[True, False], [False, False]])).index.tolist()
    [0]
    """

    __slots__ = ("mask", "index")

    def __init__(self, rank_mask: torch.Tensor) -> None:
        if not isinstance(rank_mask, torch.Tensor) or rank_mask.dtype != torch.bool:
            got = rank_mask.dtype if isinstance(rank_mask, torch.Tensor) else type(rank_mask).__name__
            raise TypeError(f"rank_mask: expected a torch.bool tensor, got {got}")
        self.mask = rank_mask
        self.index: Optional[torch.Tensor] = None
        if can_sync(rank_mask) and rank_mask.numel():
            any_active = rank_mask if rank_mask.dim() == 1 else rank_mask.any(dim=0)
            idx = torch.nonzero(any_active).flatten()
            if 0 < idx.numel() < any_active.numel():
                self.index = idx

    def __repr__(self) -> str:
        active = "all" if self.index is None else self.index.numel()
        return f"ActiveRanks(shape={list(self.mask.shape)}, active={active})"
