"""The generalized LoRA op: argument checks, backend choice and the torch.library registration.

Everything that computes lives in a backend (``lorakern/backends/``: ``portable`` for ``torch``,
``lorakern/triton/``, ``lorakern/cuda.py``); this module checks arguments before any kernel runs,
builds the backend interface's ``Problem`` and ``Operands`` (``lorakern/backends/interface.py``)
and owns the autograd formula's plumbing.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from lorakern import backends
from lorakern.backends.interface import Grads, Needs, Operands, Problem, qdtype
from lorakern.batch import ActiveRanks, AdapterBatch, can_sync

__all__ = ["lora_linear", "BACKENDS", "backend_status", "resolve_backend"]

BACKENDS = backends.NAMES
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_CPU_PREFERENCE = ("cpu", "torch")  # auto on a CPU: the native kernels where they are built


def backend_status(name: str) -> tuple[bool, str]:
    """``(True, "")`` if backend ``name`` can run here, else ``(False, reason)`` in one line.

    ``"auto"`` is always available (it falls back to the ``torch`` backend).

    Raises:
        ValueError: ``name`` is not ``"auto"`` or a backend name.
    """
    if name == "auto":
        return True, ""
    return backends.status(name)


def resolve_backend(backend: str, x: torch.Tensor, M: int, K: int, N: int, R: int) -> str:
    """The backend that runs: ``backend`` itself if forced, else the fastest for this device and shape.

    Raises:
        ValueError: an unknown name, or a forced backend that cannot compute on x's device / dtype.
        RuntimeError: a forced backend that is unavailable here (the reason in one line).
    """
    if backend != "auto":
        b = backends.get(backend)
        ok, why = b.available()
        if not ok:
            raise RuntimeError(f"backend {backend!r} is {why}")
        if not b.runs_on(x.device, x.dtype):
            raise ValueError(f"backend: {backend!r} cannot run {x.dtype} on device {x.device}")
        return backend
    if x.device.type == "cuda" and x.dtype != torch.float64:
        from lorakern import autotable

        order = autotable.preference(x.device, x.dtype, M, K, N, R)
    else:
        order = _CPU_PREFERENCE
    for name in order:
        if name in backends.BACKENDS and backends.runs_on(name, x.device, x.dtype):
            return name
    return "torch"


# --------------------------------------------------------------------------- argument checks


def _shape(t: torch.Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def _check_tensor(name: str, t, *, dims: Sequence[int], like: torch.Tensor, floating: bool = True) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dim() not in dims:
        want = " or ".join(f"{d}-D" for d in dims)
        raise ValueError(f"{name}: expected a {want} tensor, got shape {_shape(t)}")
    if t.device != like.device:
        raise ValueError(f"{name}: expected device {like.device} (that of x), got {t.device}")
    if floating and t.dtype != like.dtype:
        raise TypeError(f"{name}: expected dtype {like.dtype} (that of x), got {t.dtype}")


def _check_vector(name: str, t, length: int, banked: bool, G: int, like: torch.Tensor, *, floating=True) -> None:
    if t is None:
        return
    _check_tensor(name, t, dims=(1, 2), like=like, floating=floating)
    want = (G, length) if banked and t.dim() == 2 else (length,)
    if tuple(t.shape) != want:
        wanted = f"[{length}]" + (f" or [{G}, {length}]" if banked else "")
        raise ValueError(f"{name}: expected shape {wanted}, got {_shape(t)}")


def _check_args(x, weight, bias, A, B, scaling, rank_scale, rank_mask, out_scale, dropout_p, adapter_index,
                base_scale):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOATS:
        raise TypeError(f"x: expected a floating dtype (float16, bfloat16, float32, float64), got {x.dtype}")
    if x.dim() < 1:
        raise ValueError(f"x: expected at least 1 dimension [..., K], got shape {_shape(x)}")
    _check_tensor("weight", weight, dims=(2,), like=x)
    N, K = weight.shape
    if x.shape[-1] != K:
        raise ValueError(f"x: expected last dimension {K} (weight's in-features), got shape {_shape(x)}")
    if bias is not None:
        _check_tensor("bias", bias, dims=(1,), like=x)
        if bias.shape[0] != N:
            raise ValueError(f"bias: expected shape [{N}], got {_shape(bias)}")
    _check_tensor("lora_A", A, dims=(2, 3), like=x)
    _check_tensor("lora_B", B, dims=(2, 3), like=x)
    banked = A.dim() == 3
    if B.dim() != A.dim():
        raise ValueError(f"lora_B: expected {A.dim()}-D like lora_A {_shape(A)}, got shape {_shape(B)}")
    G = A.shape[0] if banked else 1
    R = A.shape[-2]
    if R < 1:
        raise ValueError(f"lora_A: expected rank r >= 1, got shape {_shape(A)}")
    if A.shape[-1] != K:
        raise ValueError(f"lora_A: expected shape {'[G, r, ' if banked else '[r, '}{K}] (in-features {K}), got {_shape(A)}")
    want_B = (G, N, R) if banked else (N, R)
    if tuple(B.shape) != want_B:
        raise ValueError(f"lora_B: expected shape [{', '.join(map(str, want_B))}] (out-features {N}, rank {R}), got {_shape(B)}")
    if isinstance(scaling, torch.Tensor):
        if scaling.device != x.device:
            raise ValueError(f"scaling: expected device {x.device} (that of x), got {scaling.device}")
        if not scaling.is_floating_point():
            raise TypeError(f"scaling: expected a floating tensor, got {scaling.dtype}")
        if scaling.dim() == 0:
            pass
        elif not banked or tuple(scaling.shape) != (G,):
            raise ValueError(f"scaling: expected a float{' or shape [' + str(G) + ']' if banked else ''}, got shape {_shape(scaling)}")
    elif not isinstance(scaling, (int, float)) or isinstance(scaling, bool):
        raise TypeError(f"scaling: expected a float or a tensor, got {type(scaling).__name__}")
    _check_vector("rank_scale", rank_scale, R, banked, G, x)
    if isinstance(rank_mask, ActiveRanks):
        rank_mask = rank_mask.mask
    _check_vector("rank_mask", rank_mask, R, banked, G, x, floating=False)
    if rank_mask is not None and rank_mask.dtype != torch.bool:
        raise TypeError(f"rank_mask: expected dtype torch.bool, got {rank_mask.dtype}")
    _check_vector("out_scale", out_scale, N, banked, G, x)
    _check_vector("base_scale", base_scale, N, False, G, x)
    if not isinstance(dropout_p, (int, float)) or isinstance(dropout_p, bool) or not (0.0 <= dropout_p < 1.0):
        raise ValueError(f"dropout_p: expected a float in [0, 1), got {dropout_p!r}")
    M = x.numel() // K if K else 0
    if adapter_index is None:
        if banked:
            raise ValueError(f"adapter_index: required with banked lora_A {_shape(A)}, got None")
        return M, K, N, R, G
    if not banked:
        raise ValueError(f"adapter_index: given, so lora_A must be a bank [G, r, {K}], got shape {_shape(A)}")
    index = adapter_index.index if isinstance(adapter_index, AdapterBatch) else adapter_index
    if not isinstance(index, torch.Tensor):
        raise TypeError(f"adapter_index: expected a torch.Tensor or an AdapterBatch, got {type(index).__name__}")
    if index.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"adapter_index: expected dtype int32 or int64, got {index.dtype}")
    if index.device != x.device:
        raise ValueError(f"adapter_index: expected device {x.device} (that of x), got {index.device}")
    if index.dim() != 1 or index.shape[0] != M:
        raise ValueError(f"adapter_index: expected shape [{M}] (one per row of x), got {_shape(index)}")
    if isinstance(adapter_index, AdapterBatch) and adapter_index.num_adapters != G:
        raise ValueError(f"adapter_index: an AdapterBatch for {adapter_index.num_adapters} adapters, "
                         f"but lora_A has {G}: shape {_shape(A)}")
    return M, K, N, R, G


# --------------------------------------------------------------------------- the registered ops


def _problem(x, weight, lora_A, scaling, rank_idx, dropout_p, seed, deterministic) -> Problem:
    banked = lora_A.dim() == 3
    return Problem(M=x.shape[0], K=x.shape[1], N=weight.shape[0], R=lora_A.shape[-2],
                   Ra=lora_A.shape[-2] if rank_idx is None else rank_idx.shape[0],
                   G=lora_A.shape[0] if banked else 1, banked=banked, scaling=float(scaling),
                   dropout_p=float(dropout_p), seed=0 if seed is None else int(seed), deterministic=deterministic)


def _forward_impl(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], lora_A: torch.Tensor,
    lora_B: torch.Tensor, scaling: float, scaling_g: Optional[torch.Tensor],
    rank_scale: Optional[torch.Tensor], rank_idx: Optional[torch.Tensor],
    out_scale: Optional[torch.Tensor], dropout_p: float, seed: Optional[torch.Tensor],
    adapter_index: Optional[torch.Tensor], row_order: Optional[torch.Tensor], adapter_rows: Optional[torch.Tensor],
    base_scale: Optional[torch.Tensor], backend: str, deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward op: (y [M, N], q [M, Ra]). The seed travels as a CPU int64 scalar tensor (so
    torch.compile can trace drawing it from torch's generator); backends get an int."""
    pb = _problem(x, weight, lora_A, scaling, rank_idx, dropout_p, seed, deterministic)
    if pb.M == 0:
        return x.new_empty(0, pb.N), torch.empty(0, pb.Ra, device=x.device, dtype=qdtype(x))
    op = Operands(x, weight, bias, lora_A, lora_B, scaling_g, rank_scale, rank_idx, out_scale, base_scale,
                  adapter_index, row_order, adapter_rows)
    return backends.get(backend).forward(pb, op)


_fwd = torch.library.custom_op("lorakern::lora_linear_fwd", mutates_args=())(_forward_impl)


@_fwd.register_fake
def _fwd_fake(x, weight, bias, lora_A, lora_B, scaling, scaling_g, rank_scale, rank_idx, out_scale,
              dropout_p, seed, adapter_index, row_order, adapter_rows, base_scale, backend, deterministic):
    Ra = lora_A.shape[-2] if rank_idx is None else rank_idx.shape[0]
    return x.new_empty(x.shape[0], weight.shape[0]), x.new_empty(x.shape[0], Ra, dtype=qdtype(x))


def _backward_impl(
    grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor,
    lora_B: torch.Tensor, scaling: float, scaling_g: Optional[torch.Tensor],
    rank_scale: Optional[torch.Tensor], rank_idx: Optional[torch.Tensor],
    out_scale: Optional[torch.Tensor], dropout_p: float, seed: Optional[torch.Tensor],
    adapter_index: Optional[torch.Tensor], row_order: Optional[torch.Tensor], adapter_rows: Optional[torch.Tensor],
    base_scale: Optional[torch.Tensor], q: torch.Tensor, needs: list[bool], backend: str, deterministic: bool,
) -> list[torch.Tensor]:
    """The backward op: the eight gradients of ``Grads``, an empty tensor where ``needs`` is False
    (custom ops return tensors only)."""
    need = Needs(*needs)
    if x.shape[0] == 0:
        grads = _zero_grads(x, weight, lora_A, lora_B, rank_scale, out_scale, base_scale, needs)
    else:
        pb = _problem(x, weight, lora_A, scaling, rank_idx, dropout_p, seed, deterministic)
        op = Operands(x, weight, None, lora_A, lora_B, scaling_g, rank_scale, rank_idx, out_scale, base_scale,
                      adapter_index, row_order, adapter_rows)
        grads = backends.get(backend).backward(pb, op, grad_y, q, need)
    return [g if g is not None else x.new_empty(0) for g in grads]


_bwd = torch.library.custom_op("lorakern::lora_linear_bwd", mutates_args=())(_backward_impl)


def _grad_likes(x, weight, A, B, rank_scale, out_scale, base_scale):
    """The tensors whose shapes the eight gradients take (bias's is [N])."""
    return (x, weight, x.new_empty(weight.shape[0]), A, B, rank_scale, out_scale, base_scale)


def _zero_grads(x, weight, A, B, rank_scale, out_scale, base_scale, needs):
    likes = _grad_likes(x, weight, A, B, rank_scale, out_scale, base_scale)
    return Grads(*(torch.zeros_like(t) if n and t is not None else None for n, t in zip(needs, likes)))


@_bwd.register_fake
def _bwd_fake(grad_y, x, weight, lora_A, lora_B, scaling, scaling_g, rank_scale, rank_idx, out_scale,
              dropout_p, seed, adapter_index, row_order, adapter_rows, base_scale, q, needs, backend, deterministic):
    likes = _grad_likes(x, weight, lora_A, lora_B, rank_scale, out_scale, base_scale)
    return [torch.empty_like(t, memory_format=torch.contiguous_format) if n and t is not None else x.new_empty(0)
            for n, t in zip(needs, likes)]


# positions of the differentiable inputs of _forward_impl, in Grads' order
_GRAD_INPUTS = (0, 1, 2, 3, 4, 7, 9, 15)
_N_INPUTS = 18


def _setup_context(ctx, inputs, output):
    (x, weight, bias, A, B, scaling, scaling_g, rank_scale, rank_idx, out_scale, p, seed, adapter_index,
     row_order, adapter_rows, base_scale, backend, deterministic) = inputs
    _, q = output
    ctx.needs = [bool(ctx.needs_input_grad[i]) for i in _GRAD_INPUTS]
    ctx.scalars = (scaling, p, backend, deterministic)
    ctx.save_for_backward(x, weight, A, B, scaling_g, rank_scale, rank_idx, out_scale, adapter_index, row_order,
                          adapter_rows, base_scale, q, seed)
    ctx.mark_non_differentiable(q)


def _backward(ctx, grad_y, grad_q):
    (x, weight, A, B, scaling_g, rank_scale, rank_idx, out_scale, adapter_index, row_order, adapter_rows,
     base_scale, q, seed) = ctx.saved_tensors
    scaling, p, backend, deterministic = ctx.scalars
    grads = [None] * _N_INPUTS
    if not any(ctx.needs):
        return tuple(grads)
    bwd = _backward_impl if getattr(ctx, "direct", False) else _bwd
    out = bwd(grad_y.contiguous(), x, weight, A, B, scaling, scaling_g, rank_scale, rank_idx, out_scale,
              p, seed, adapter_index, row_order, adapter_rows, base_scale, q, ctx.needs, backend, deterministic)
    for i, g, n in zip(_GRAD_INPUTS, out, ctx.needs):
        grads[i] = g if n else None
    return tuple(grads)


_fwd.register_autograd(_backward, setup_context=_setup_context)


class _Direct(torch.autograd.Function):
    """The eager path: the registered op's forward, context and backward, called without the
    custom-op dispatcher (whose argument handling costs more than a small layer's kernels).
    ``lora_linear`` takes it outside torch.compile for plain tensors; the registered op serves
    torch.compile, fake and subclass tensors."""

    @staticmethod
    def forward(ctx, *inputs):
        y, q = _forward_impl(*inputs)
        ctx.direct = True
        _setup_context(ctx, inputs, (y, q))
        return y, q

    @staticmethod
    def backward(ctx, grad_y, grad_q):
        return _backward(ctx, grad_y, grad_q)


_PLAIN = (torch.Tensor, torch.nn.Parameter)


# --------------------------------------------------------------------------- the public entry point


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    *,
    scaling: Union[float, torch.Tensor] = 1.0,
    rank_scale: Optional[torch.Tensor] = None,
    rank_mask: Union[torch.Tensor, ActiveRanks, None] = None,
    out_scale: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    seed: Optional[int] = None,
    adapter_index: Union[torch.Tensor, AdapterBatch, None] = None,
    base_scale: Optional[torch.Tensor] = None,
    deterministic: Optional[bool] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """``y = c * (x W^T) + b + v * ((s * (x~ A^T) * (u * m)) B^T)``, fused; see DESIGN.md section 1.

    >>> import torch, lorakern
    >>> x, W = torch.randn(4, 32), torch.randn(16, 32)
    >>> A, B = torch.randn(8, 32), torch.randn(16, 8)
    >>> lorakern.lora_linear(x, W, None, A, B, scaling=2.0).shape
    torch.Size([4, 16])

    Banks ``lora_A [G, r, K]`` / ``lora_B [G, N, r]`` with ``adapter_index [M]`` give each row its
    own adapter (-1: the base only). ``dropout_p`` applies to the adapter branch only, keyed by
    ``seed`` (None draws one from torch's generator) and regenerated, never stored, in backward.
    ``base_scale`` (c, [N], trainable) scales the base path per output column (DoRA's magnitude
    ratio; ARCHITECTURE.md). ``deterministic=True`` (None: ``torch.are_deterministic_algorithms_enabled()``)
    makes every backend sum in a fixed order, so repeated calls agree bit for bit.
    """
    if torch.is_autocast_enabled(x.device.type) if hasattr(torch, "is_autocast_enabled") else False:
        dt = torch.get_autocast_dtype(x.device.type)
        cast = lambda t: t.to(dt) if isinstance(t, torch.Tensor) and t.is_floating_point() else t  # noqa: E731
        x, weight, bias, lora_A, lora_B, rank_scale, out_scale, base_scale = map(
            cast, (x, weight, bias, lora_A, lora_B, rank_scale, out_scale, base_scale))
    M, K, N, R, G = _check_args(x, weight, bias, lora_A, lora_B, scaling, rank_scale, rank_mask, out_scale,
                                dropout_p, adapter_index, base_scale)
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    elif not isinstance(deterministic, bool):
        raise TypeError(f"deterministic: expected a bool or None, got {type(deterministic).__name__}")
    name = resolve_backend(backend, x, M, K, N, R)

    dropout_p = float(dropout_p)
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or not (0 <= seed < 2**62)):
        raise ValueError(f"seed: expected an int in [0, 2**62) or None, got {seed!r}")
    seed_t = None
    if dropout_p > 0.0:
        seed_t = torch.randint(0, 2**31 - 1, ()) if seed is None else torch.tensor(seed, dtype=torch.int64)

    scaling_g = None
    if isinstance(scaling, torch.Tensor):
        if scaling.dim() == 0:
            scaling = float(scaling)
        else:
            scaling_g = scaling.detach().to(qdtype(x))
            scaling = 1.0
    scaling = float(scaling)

    rank_idx = None
    if rank_mask is not None:
        ranks = rank_mask if isinstance(rank_mask, ActiveRanks) else ActiveRanks(rank_mask)
        m = ranks.mask.to(x.dtype)
        rank_scale = m if rank_scale is None else rank_scale * m
        rank_idx = ranks.index  # None: every rank runs (all active, none active, or not readable here)
        if rank_idx is not None and ranks.mask.dim() == 1 and rank_scale is m:
            rank_scale = None  # the compacted ranks all have mask 1

    row_order = adapter_rows = None
    if adapter_index is not None:
        batch = adapter_index if isinstance(adapter_index, AdapterBatch) else AdapterBatch(adapter_index, G)
        adapter_index, row_order, adapter_rows = batch.index, batch.order, batch.rows

    lead = x.shape[:-1]
    x2 = x.reshape(M, K)
    direct = not torch.compiler.is_compiling() and all(type(t) in _PLAIN for t in (x2, weight, lora_A, lora_B))
    y, _ = (_Direct.apply if direct else _fwd)(x2, weight, bias, lora_A, lora_B, scaling, scaling_g, rank_scale,
                                               rank_idx, out_scale, dropout_p, seed_t, adapter_index, row_order,
                                               adapter_rows, base_scale, name, deterministic)
    return y if x.dim() == 2 else y.reshape(*lead, N)
