"""The generalized LoRA op: argument checks, backend choice and the torch.library registration.

Everything that computes lives in a backend (``reference.py`` for ``torch``, ``triton/`` and
``cuda.py``); this module checks arguments before any kernel runs, normalises them to the
backend interface of ARCHITECTURE.md and owns the autograd formula's plumbing.
"""
from __future__ import annotations

import importlib
import os
import weakref
from typing import Optional, Sequence, Union

import torch

__all__ = ["lora_linear", "BACKENDS", "backend_status", "get_backend", "resolve_backend"]

BACKENDS = ("torch", "triton", "cuda")
_MODULES = {"torch": "lorakern.reference", "triton": "lorakern.triton", "cuda": "lorakern.cuda"}
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


_LOADED: dict = {}  # name -> module: the op asks on every call, and import_module costs microseconds


def get_backend(name: str):
    """The backend module called ``name`` (see ARCHITECTURE.md for its interface)."""
    mod = _LOADED.get(name)
    if mod is None:
        if name not in _MODULES:
            raise ValueError(f"backend: expected one of {('auto',) + BACKENDS}, got {name!r}")
        mod = _LOADED[name] = importlib.import_module(_MODULES[name])
    return mod


def backend_status(name: str) -> tuple[bool, str]:
    """``(True, "")`` if backend ``name`` can run here, else ``(False, reason)`` in one line."""
    try:
        mod = get_backend(name)
    except ImportError as e:  # triton not installed, say
        return False, f"unavailable: {e}"
    return mod.available()


def _device_ok(name: str, device: torch.device) -> bool:
    """Whether backend ``name`` (available) computes on ``device``."""
    if device.type == "cpu":
        return name == "torch" or (name == "triton" and os.environ.get("TRITON_INTERPRET") == "1")
    return device.type == "cuda" or name == "torch"


def _runs_on(name: str, device: torch.device) -> bool:
    return backend_status(name)[0] and _device_ok(name, device)


def resolve_backend(backend: str, x: torch.Tensor, M: int, K: int, N: int, R: int) -> str:
    """The backend that runs: ``backend`` itself if forced, else the fastest for this device and shape."""
    if backend != "auto":
        if backend not in BACKENDS:
            raise ValueError(f"backend: expected one of {('auto',) + BACKENDS}, got {backend!r}")
        ok, why = backend_status(backend)
        if not ok:
            raise RuntimeError(f"backend {backend!r} is {why}")
        if not _device_ok(backend, x.device):
            raise ValueError(f"backend: {backend!r} cannot run on device {x.device}")
        return backend
    if x.device.type != "cuda" or x.dtype == torch.float64:
        return "torch"
    from lorakern import autotable

    for name in autotable.preference(x.device, x.dtype, M, K, N, R):
        if _runs_on(name, x.device):
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
    if not isinstance(adapter_index, torch.Tensor):
        raise TypeError(f"adapter_index: expected a torch.Tensor, got {type(adapter_index).__name__}")
    if adapter_index.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"adapter_index: expected dtype int32 or int64, got {adapter_index.dtype}")
    if adapter_index.device != x.device:
        raise ValueError(f"adapter_index: expected device {x.device} (that of x), got {adapter_index.device}")
    if adapter_index.dim() != 1 or adapter_index.shape[0] != M:
        raise ValueError(f"adapter_index: expected shape [{M}] (one per row of x), got {_shape(adapter_index)}")
    if M and not _no_sync(x):
        lo, hi = _index_range(adapter_index)
        if lo < -1 or hi >= G:
            bad = lo if lo < -1 else hi
            raise ValueError(f"adapter_index: expected values in [-1, {G}), got {bad}")
    return M, K, N, R, G


_RANGE_SEEN: list = [None, -1, 0, 0]  # weakref to the last index tensor checked, its version, min, max


def _index_range(adapter_index: torch.Tensor) -> tuple[int, int]:
    """(min, max) of ``adapter_index``: one host sync per index tensor and in-place version. A model
    passes the same index to every adapted layer of a step, so eager serving syncs once per step,
    not once per layer; a new tensor, or an in-place change to this one, is read again. Inference
    tensors keep no version counter, so they are read on every call."""
    ref, version, lo, hi = _RANGE_SEEN
    current = None if adapter_index.is_inference() else adapter_index._version
    if current is not None and ref is not None and ref() is adapter_index and version == current:
        return lo, hi
    lo, hi = (int(v) for v in torch.aminmax(adapter_index))
    if current is not None:
        _RANGE_SEEN[:] = [weakref.ref(adapter_index), current, lo, hi]
    return lo, hi


def _no_sync(x: torch.Tensor) -> bool:
    """True where a host sync is impossible (graph capture, torch.compile): value checks are
    skipped there and kernels treat an out-of-range adapter index as -1 (base only)."""
    return torch.compiler.is_compiling() or (x.is_cuda and torch.cuda.is_current_stream_capturing())


# --------------------------------------------------------------------------- rank-mask compaction

_IDX_CACHE: dict = {}


def _active_ranks(rank_mask: torch.Tensor) -> Optional[torch.Tensor]:
    """int64 indices of the ranks active in any adapter, or None when all are active.

    Cached on the mask's storage and version counter, so an unchanged mask costs no sync. An
    inference tensor has no version counter: it is read on every call.
    """
    key = None if rank_mask.is_inference() else (rank_mask.data_ptr(), rank_mask._version, tuple(rank_mask.shape),
                                                 rank_mask.device)
    hit = _IDX_CACHE.get(key) if key is not None else None
    if hit is not None:
        return hit[0]
    any_active = rank_mask if rank_mask.dim() == 1 else rank_mask.any(dim=0)
    idx = torch.nonzero(any_active).flatten()
    result = None if idx.numel() == any_active.numel() else idx
    if key is not None:
        if len(_IDX_CACHE) > 4096:
            _IDX_CACHE.clear()
        _IDX_CACHE[key] = (result, rank_mask)  # keep the mask alive so the pointer is not reused
    return result


# --------------------------------------------------------------------------- the registered ops


def _seed_int(seed: Optional[torch.Tensor]) -> int:
    """The dropout seed: a CPU int64 scalar tensor through the op (so torch.compile can trace
    drawing it from torch's generator), a Python int for the backends."""
    return 0 if seed is None else int(seed)


def _qdtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32



def _forward_impl(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], lora_A: torch.Tensor,
    lora_B: torch.Tensor, scaling: float, scaling_g: Optional[torch.Tensor],
    rank_scale: Optional[torch.Tensor], rank_idx: Optional[torch.Tensor],
    out_scale: Optional[torch.Tensor], dropout_p: float, seed: Optional[torch.Tensor],
    adapter_index: Optional[torch.Tensor], base_scale: Optional[torch.Tensor], backend: str, deterministic: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    M, N = x.shape[0], weight.shape[0]
    Ra = lora_A.shape[-2] if rank_idx is None else rank_idx.shape[0]
    if M == 0:
        return x.new_empty(0, N), torch.empty(0, Ra, device=x.device, dtype=_qdtype(x))
    return get_backend(backend).forward(
        x, weight, bias, lora_A, lora_B, scaling, scaling_g, rank_scale, rank_idx, out_scale,
        dropout_p, _seed_int(seed), adapter_index, base_scale, deterministic,
    )


_fwd = torch.library.custom_op("lorakern::lora_linear_fwd", mutates_args=())(_forward_impl)


@_fwd.register_fake
def _fwd_fake(x, weight, bias, lora_A, lora_B, scaling, scaling_g, rank_scale, rank_idx, out_scale,
              dropout_p, seed, adapter_index, base_scale, backend, deterministic):
    Ra = lora_A.shape[-2] if rank_idx is None else rank_idx.shape[0]
    y = x.new_empty(x.shape[0], weight.shape[0])
    q = x.new_empty(x.shape[0], Ra, dtype=_qdtype(x))
    return y, q


def _backward_impl(
    grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor,
    lora_B: torch.Tensor, scaling: float, scaling_g: Optional[torch.Tensor],
    rank_scale: Optional[torch.Tensor], rank_idx: Optional[torch.Tensor],
    out_scale: Optional[torch.Tensor], dropout_p: float, seed: Optional[torch.Tensor],
    adapter_index: Optional[torch.Tensor], base_scale: Optional[torch.Tensor], q: torch.Tensor, needs: list[bool],
    backend: str, deterministic: bool,
) -> list[torch.Tensor]:
    if x.shape[0] == 0:
        grads = _zero_grads(x, weight, lora_A, lora_B, rank_scale, out_scale, base_scale, needs)
    else:
        grads = get_backend(backend).backward(
            grad_y, x, weight, lora_A, lora_B, scaling, scaling_g, rank_scale, rank_idx,
            out_scale, dropout_p, _seed_int(seed), adapter_index, base_scale, q, tuple(needs), deterministic,
        )
    # custom ops return tensors only: an empty tensor stands for "not computed"
    return [g if g is not None else x.new_empty(0) for g in grads]


_bwd = torch.library.custom_op("lorakern::lora_linear_bwd", mutates_args=())(_backward_impl)


def _grad_likes(x, weight, A, B, rank_scale, out_scale, base_scale):
    """The tensors whose shapes the eight gradients take (bias's is [N])."""
    return (x, weight, x.new_empty(weight.shape[0]), A, B, rank_scale, out_scale, base_scale)


def _zero_grads(x, weight, A, B, rank_scale, out_scale, base_scale, needs):
    likes = _grad_likes(x, weight, A, B, rank_scale, out_scale, base_scale)
    return [torch.zeros_like(t) if n and t is not None else None for n, t in zip(needs, likes)]


@_bwd.register_fake
def _bwd_fake(grad_y, x, weight, lora_A, lora_B, scaling, scaling_g, rank_scale, rank_idx, out_scale,
              dropout_p, seed, adapter_index, base_scale, q, needs, backend, deterministic):
    likes = _grad_likes(x, weight, lora_A, lora_B, rank_scale, out_scale, base_scale)
    return [torch.empty_like(t, memory_format=torch.contiguous_format) if n and t is not None else x.new_empty(0)
            for n, t in zip(needs, likes)]


def _setup_context(ctx, inputs, output):
    (x, weight, bias, A, B, scaling, scaling_g, rank_scale, rank_idx, out_scale, p, seed, adapter_index,
     base_scale, backend, deterministic) = inputs
    _, q = output
    ctx.needs = [bool(ctx.needs_input_grad[i]) for i in (0, 1, 2, 3, 4, 7, 9, 13)]
    ctx.scalars = (scaling, p, backend, deterministic)
    ctx.save_for_backward(x, weight, A, B, scaling_g, rank_scale, rank_idx, out_scale, adapter_index, base_scale, q,
                          seed)
    ctx.mark_non_differentiable(q)


def _backward(ctx, grad_y, grad_q):
    x, weight, A, B, scaling_g, rank_scale, rank_idx, out_scale, adapter_index, base_scale, q, seed = ctx.saved_tensors
    scaling, p, backend, deterministic = ctx.scalars
    needs = ctx.needs
    if not any(needs):
        return (None,) * 16
    bwd = _backward_impl if getattr(ctx, "direct", False) else _bwd
    grads = bwd(grad_y.contiguous(), x, weight, A, B, scaling, scaling_g, rank_scale, rank_idx, out_scale,
                p, seed, adapter_index, base_scale, q, needs, backend, deterministic)
    dx, dw, db, dA, dB, drs, dv, dbs = (g if n else None for g, n in zip(grads, needs))
    return dx, dw, db, dA, dB, None, None, drs, None, dv, None, None, None, dbs, None, None


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
    rank_mask: Optional[torch.Tensor] = None,
    out_scale: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    seed: Optional[int] = None,
    adapter_index: Optional[torch.Tensor] = None,
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
            scaling_g = scaling.detach().to(_qdtype(x))
            scaling = 1.0
    scaling = float(scaling)

    rank_idx = None
    if rank_mask is not None:
        m = rank_mask.to(x.dtype)
        rank_scale = m if rank_scale is None else rank_scale * m
        if not _no_sync(x):
            rank_idx = _active_ranks(rank_mask)
            if rank_idx is not None and rank_idx.numel() == 0:
                rank_idx = None  # no active rank: run unmasked with u * m = 0, so A and B get zero grads
            elif rank_mask.dim() == 1 and rank_scale is m:
                rank_scale = None  # the compacted ranks all have mask 1

    lead = x.shape[:-1]
    x2 = x.reshape(M, K)
    if adapter_index is not None:
        adapter_index = adapter_index.to(torch.int64)
    direct = not torch.compiler.is_compiling() and all(type(t) in _PLAIN for t in (x2, weight, lora_A, lora_B))
    y, _ = (_Direct.apply if direct else _fwd)(x2, weight, bias, lora_A, lora_B, scaling, scaling_g, rank_scale,
                                               rank_idx, out_scale, dropout_p, seed_t, adapter_index, base_scale,
                                               name, deterministic)
    return y if x.dim() == 2 else y.reshape(*lead, N)
