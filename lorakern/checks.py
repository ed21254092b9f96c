"""Argument checks of the op's entry points: every error names the argument, the expected and
the given shape, dtype or device, and is raised before any kernel runs.

>>> import torch
>>> check_args(torch.randn(3, 4), torch.randn(5, 4), None, torch.randn(2, 4), torch.randn(5, 2), 1.0,
...            None, None, None, 0.0, None, None)
(3, 4, 5, 2, 1)
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from lorakern.batch import ActiveRanks, AdapterBatch

__all__ = ["FLOATS", "shape_str", "check_input", "check_tensor", "check_vector", "adapter_dtypes", "check_args"]

FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def shape_str(t: torch.Tensor) -> str:
    """``[2, 3]`` for a tensor of shape (2, 3)."""
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def check_tensor(name: str, t, *, dims: Sequence[int], like: torch.Tensor, floating: bool = True,
                 dtypes: Optional[tuple] = None, whose: str = "that of x") -> None:
    """Type, rank and device of ``t``; with ``floating``, its dtype: one of ``dtypes`` (default: x's)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dim() not in dims:
        want = " or ".join(f"{d}-D" for d in dims)
        raise ValueError(f"{name}: expected a {want} tensor, got shape {shape_str(t)}")
    if t.device != like.device:
        raise ValueError(f"{name}: expected device {like.device} (that of x), got {t.device}")
    dtypes = dtypes or (like.dtype,)
    if floating and t.dtype not in dtypes:
        want = " or ".join(str(d) for d in dict.fromkeys(dtypes))
        raise TypeError(f"{name}: expected dtype {want} ({whose}), got {t.dtype}")


def adapter_dtypes(x_dtype: torch.dtype) -> tuple:
    """The dtypes lora_A / lora_B may have beside x of ``x_dtype``: x's own, and float32 beside a
    float16 / bfloat16 x (PEFT's default precision: a half-precision base, fp32 adapters)."""
    return (x_dtype, torch.float32) if x_dtype in (torch.float16, torch.bfloat16) else (x_dtype,)


def check_vector(name: str, t, length: int, banked: bool, G: int, like: torch.Tensor, *, floating=True,
                 dtypes: Optional[tuple] = None, whose: str = "that of x") -> None:
    """A [length] (or, with banks, [G, length]) vector like ``check_tensor``'s; None passes."""
    if t is None:
        return
    check_tensor(name, t, dims=(1, 2), like=like, floating=floating, dtypes=dtypes, whose=whose)
    want = (G, length) if banked and t.dim() == 2 else (length,)
    if tuple(t.shape) != want:
        wanted = f"[{length}]" + (f" or [{G}, {length}]" if banked else "")
        raise ValueError(f"{name}: expected shape {wanted}, got {shape_str(t)}")


def check_input(x) -> None:
    """x: a floating tensor [..., K] (float16, bfloat16, float32 or float64)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOATS:
        raise TypeError(f"x: expected a floating dtype (float16, bfloat16, float32, float64), got {x.dtype}")
    if x.dim() < 1:
        raise ValueError(f"x: expected at least 1 dimension [..., K], got shape {shape_str(x)}")


def check_args(x, weight, bias, A, B, scaling, rank_scale, rank_mask, out_scale, dropout_p, adapter_index,
               base_scale) -> tuple[int, int, int, int, int]:
    """Every argument of ``lora_linear`` (its names, in its order): ``(M, K, N, R, G)``, or the
    first error, naming the argument with the expected and the given shape, dtype or device."""
    check_input(x)
    check_tensor("weight", weight, dims=(2,), like=x)
    N, K = weight.shape
    if x.shape[-1] != K:
        raise ValueError(f"x: expected last dimension {K} (weight's in-features), got shape {shape_str(x)}")
    if bias is not None:
        check_tensor("bias", bias, dims=(1,), like=x)
        if bias.shape[0] != N:
            raise ValueError(f"bias: expected shape [{N}], got {shape_str(bias)}")
    check_tensor("lora_A", A, dims=(2, 3), like=x, dtypes=adapter_dtypes(x.dtype),
                  whose="that of x, or float32 beside a half-precision x")
    check_tensor("lora_B", B, dims=(2, 3), like=x, dtypes=(A.dtype,), whose="that of lora_A")
    either = (x.dtype, A.dtype)  # rank_scale / out_scale: x's dtype or the adapters'
    banked = A.dim() == 3
    if B.dim() != A.dim():
        raise ValueError(f"lora_B: expected {A.dim()}-D like lora_A {shape_str(A)}, got shape {shape_str(B)}")
    G = A.shape[0] if banked else 1
    R = A.shape[-2]
    if R < 1:
        raise ValueError(f"lora_A: expected rank r >= 1, got shape {shape_str(A)}")
    if A.shape[-1] != K:
        raise ValueError(f"lora_A: expected shape {'[G, r, ' if banked else '[r, '}{K}] (in-features {K}), got {shape_str(A)}")
    want_B = (G, N, R) if banked else (N, R)
    if tuple(B.shape) != want_B:
        raise ValueError(f"lora_B: expected shape [{', '.join(map(str, want_B))}] (out-features {N}, rank {R}), got {shape_str(B)}")
    if isinstance(scaling, torch.Tensor):
        if scaling.device != x.device:
            raise ValueError(f"scaling: expected device {x.device} (that of x), got {scaling.device}")
        if not scaling.is_floating_point():
            raise TypeError(f"scaling: expected a floating tensor, got {scaling.dtype}")
        if scaling.dim() == 0:
            pass
        elif not banked or tuple(scaling.shape) != (G,):
            raise ValueError(f"scaling: expected a float{' or shape [' + str(G) + ']' if banked else ''}, got shape {shape_str(scaling)}")
    elif not isinstance(scaling, (int, float)) or isinstance(scaling, bool):
        raise TypeError(f"scaling: expected a float or a tensor, got {type(scaling).__name__}")
    check_vector("rank_scale", rank_scale, R, banked, G, x, dtypes=either, whose="that of x or of lora_A")
    if isinstance(rank_mask, ActiveRanks):
        rank_mask = rank_mask.mask
    check_vector("rank_mask", rank_mask, R, banked, G, x, floating=False)
    if rank_mask is not None and rank_mask.dtype != torch.bool:
        raise TypeError(f"rank_mask: expected dtype torch.bool, got {rank_mask.dtype}")
    check_vector("out_scale", out_scale, N, banked, G, x, dtypes=either, whose="that of x or of lora_A")
    check_vector("base_scale", base_scale, N, False, G, x)
    if not isinstance(dropout_p, (int, float)) or isinstance(dropout_p, bool) or not (0.0 <= dropout_p < 1.0):
        raise ValueError(f"dropout_p: expected a float in [0, 1), got {dropout_p!r}")
    M = x.numel() // K if K else 0
    if adapter_index is None:
        if banked:
            raise ValueError(f"adapter_index: required with banked lora_A {shape_str(A)}, got None")
        return M, K, N, R, G
    if not banked:
        raise ValueError(f"adapter_index: given, so lora_A must be a bank [G, r, {K}], got shape {shape_str(A)}")
    index = adapter_index.index if isinstance(adapter_index, AdapterBatch) else adapter_index
    if not isinstance(index, torch.Tensor):
        raise TypeError(f"adapter_index: expected a torch.Tensor or an AdapterBatch, got {type(index).__name__}")
    if index.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"adapter_index: expected dtype int32 or int64, got {index.dtype}")
    if index.device != x.device:
        raise ValueError(f"adapter_index: expected device {x.device} (that of x), got {index.device}")
    if index.dim() != 1 or index.shape[0] != M:
        raise ValueError(f"adapter_index: expected shape [{M}] (one per row of x), got {shape_str(index)}")
    if isinstance(adapter_index, AdapterBatch) and adapter_index.num_adapters != G:
        raise ValueError(f"adapter_index: an AdapterBatch for {adapter_index.num_adapters} adapters, "
                         f"but lora_A has {G}: shape {shape_str(A)}")
    return M, K, N, R, G
