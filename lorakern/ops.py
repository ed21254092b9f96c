"""The generalized LoRA op: argument checks, backend choice and the torch.library registration.

Everything that computes lives in a backend (``lorakern/backends/``: ``portable`` for ``torch``,
``lorakern/triton/``, ``lorakern/cuda.py``); this module checks arguments before any kernel runs,
builds the backend interface's ``Problem`` and ``Operands`` (``lorakern/backends/interface.py``)
and owns the autograd formula's plumbing.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.autograd.forward_ad as fwAD

from lorakern import backends, differentiable, eager
from lorakern.backends.interface import Grads, Needs, Operands, Problem, qdtype
from lorakern.batch import ActiveRanks, AdapterBatch
from lorakern.checks import check_args

__all__ = ["lora_linear", "BACKENDS", "backend_status", "resolve_backend"]

BACKENDS = backends.NAMES
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
    grads = _grads(grad_y, x, weight, lora_A, lora_B, scaling, scaling_g, rank_scale, rank_idx, out_scale,
                   dropout_p, seed, adapter_index, row_order, adapter_rows, base_scale, q, needs, backend,
                   deterministic)
    return [g if g is not None else x.new_empty(0) for g in grads]


def _grads(grad_y, x, weight, lora_A, lora_B, scaling, scaling_g, rank_scale, rank_idx, out_scale, dropout_p,
           seed, adapter_index, row_order, adapter_rows, base_scale, q, needs, backend, deterministic) -> Grads:
    """The backend's gradients (``_backward_impl``'s arguments), None where ``needs`` is False."""
    if x.shape[0] == 0:
        return _zero_grads(x, weight, lora_A, lora_B, rank_scale, out_scale, base_scale, needs)
    pb = _problem(x, weight, lora_A, scaling, rank_idx, dropout_p, seed, deterministic)
    op = Operands(x, weight, None, lora_A, lora_B, scaling_g, rank_scale, rank_idx, out_scale, base_scale,
                  adapter_index, row_order, adapter_rows)
    return backends.get(backend).backward(pb, op, grad_y, q, Needs(*needs))


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
    ctx.set_materialize_grads(False)  # q's gradient stays None: no [M, Ra] zeros made per backward


def _backward(ctx, grad_y, grad_q):
    (x, weight, A, B, scaling_g, rank_scale, rank_idx, out_scale, adapter_index, row_order, adapter_rows,
     base_scale, q, seed) = ctx.saved_tensors
    scaling, p, backend, deterministic = ctx.scalars
    grads = [None] * _N_INPUTS
    if grad_y is None or not any(ctx.needs):  # None: only q (not differentiable) had a gradient
        return tuple(grads)
    if torch.is_grad_enabled():  # create_graph=True (and torch.func): gradients with a graph of their own
        inputs = (x, weight, None, A, B, scaling, scaling_g, rank_scale, rank_idx, out_scale, p, seed,
                  adapter_index, row_order, adapter_rows, base_scale, backend, deterministic)
        wrt = [i for i, n in zip(_GRAD_INPUTS, ctx.needs) if n and i != 2]  # db = colsum(g): bias is not needed
        for i, g in zip(wrt, differentiable.vjp(inputs, wrt, grad_y)):
            grads[i] = g
        if ctx.needs[2]:
            grads[2] = grad_y.sum(0)
        return tuple(grads)
    bwd = _grads if getattr(ctx, "direct", False) else _bwd
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
    torch.compile, torch.jit.trace, the meta device, fake and subclass tensors.

    Supported: double backward (``create_graph=True``: the gradients are composed from
    differentiable torch ops, ``differentiable.op_output``), forward-mode AD (``torch.func.jvp``,
    ``torch.autograd.forward_ad``: ``jvp`` below) and ``torch.func`` transforms (``setup_context``
    style, vmap rule generated; with dropout, vmap needs ``randomness="same"``, and vmap raises
    for random ops without it). The registered op has no jvp rule: forward-mode AD through it
    (torch.compile, jit.trace, meta, tensor subclasses) raises NotImplementedError.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(*inputs):
        return _forward_impl(*inputs)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.direct = True
        _setup_context(ctx, inputs, output)
        _save_for_jvp(ctx, inputs)

    @staticmethod
    def backward(ctx, grad_y, grad_q):
        return _backward(ctx, grad_y, grad_q)

    @staticmethod
    def jvp(ctx, *tangents):
        """The tangent of y (q gets none: it is not differentiable): J t as the reverse-mode derivative
        of the linear map g -> J^T g of ``differentiable.op_output`` (forward-mode AD does not nest)."""
        saved = iter(ctx.saved_tensors)
        primals = [next(saved) if is_t else t for t, is_t in zip(ctx.others, ctx.is_tensor)]
        wrt = [i for i, t in enumerate(tangents) if isinstance(t, torch.Tensor)]
        y_shape = (primals[0].shape[0], primals[1].shape[0])
        linear = lambda g: differentiable.vjp(primals, wrt, g)  # noqa: E731  g -> J^T g
        _, vjp_of_vjp = torch.func.vjp(linear, primals[0].new_zeros(y_shape))
        (dy,) = vjp_of_vjp(tuple(tangents[i] for i in wrt))
        return dy, None


def _save_for_jvp(ctx, inputs) -> None:
    """What ``_Direct.jvp`` reads: the tensor inputs (``save_for_forward``) and the others."""
    ctx.save_for_forward(*(t for t in inputs if isinstance(t, torch.Tensor)))
    ctx.is_tensor = tuple(isinstance(t, torch.Tensor) for t in inputs)
    ctx.others = tuple(None if is_t else t for t, is_t in zip(inputs, ctx.is_tensor))


class _EagerDirect(_Direct):
    """``_Direct`` outside torch.func transforms, in the ctx-taking style: autograd applies it without
    binding its signature (``Function.apply`` calls ``inspect.signature`` on every call of a
    ``setup_context``-style function, ~60 us of a small layer's step on the CI CPU), and keeps what
    ``jvp`` reads only inside a forward-AD level (``torch.autograd.forward_ad.dual_level``)."""

    setup_context = torch.autograd.Function.setup_context  # not overridden: forward takes ctx

    @staticmethod
    def forward(ctx, *inputs):
        out = _forward_impl(*inputs)
        ctx.direct = True
        _setup_context(ctx, inputs, out)
        if fwAD._current_level >= 0:
            _save_for_jvp(ctx, inputs)
        return out


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _has_tangent(*tensors) -> bool:
    """Whether a ``torch.autograd.forward_ad`` tangent rides on any of ``tensors`` (the registered
    op has no jvp rule: it would drop it)."""
    if fwAD._current_level < 0:
        return False
    return any(t is not None and fwAD.unpack_dual(t).tangent is not None for t in tensors)


# --------------------------------------------------------------------------- the public entry point


def autocast_dtype(x) -> Optional[torch.dtype]:
    """The dtype autocast casts ``x``'s device's tensors to, or None where autocast is off or does not
    exist (the meta device has none)."""
    dev = x.device.type if isinstance(x, torch.Tensor) else "cpu"
    if not torch.amp.is_autocast_available(dev) or not torch.is_autocast_enabled(dev):
        return None
    return torch.get_autocast_dtype(dev)


def _autocast(t, dt: torch.dtype):
    """``t`` as autocast casts an argument of ``F.linear``: floating tensors other than float64, to ``dt``."""
    if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64:
        return t.to(dt)
    return t



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
    """``y = c * (x W^T) + b + v * ((s * (x~ A^T) * (u * m)) B^T)``: a frozen linear layer plus a
    low-rank adapter, in one fused op, forward and backward (the contract: docs/contract.md section 1;
    how the code implements it: ARCHITECTURE.md).

    LoRA (Hu et al. 2021, arXiv 2106.09685) is ``s = lora_alpha / r`` and no other option, as
    PEFT's ``lora.Linear`` computes it; rsLoRA (arXiv 2312.03732) ``s = lora_alpha / sqrt(r)``;
    AdaLoRA's E (arXiv 2303.10512) and VeRA's d (arXiv 2310.11454) are ``rank_scale``, VeRA's b
    ``out_scale``, DoRA's magnitude ratio (arXiv 2402.09353) ``base_scale`` and ``out_scale``.

    Args:
        x: [..., K] float16 / bfloat16 / float32 (float64 on the ``torch`` backend); M rows once
            the leading dimensions are flattened.
        weight: W [N, K], frozen base weight, x's dtype and device, any strides.
        bias: b [N] in x's dtype, or None.
        lora_A: A [r, K] (one adapter), or a bank [G, r, K] with ``adapter_index``. x's dtype, or
            float32 beside a float16 / bfloat16 x (PEFT's default precision).
        lora_B: B [N, r], or a bank [G, N, r]; lora_A's dtype.
        scaling: s, a float, or a float tensor (0-dim, or [G] with banks; never read on the host).
        rank_scale: u [r] (or [G, r] with banks), x's or the adapters' dtype; None = 1.
        rank_mask: m, bool [r] (or [G, r]) or an :class:`~lorakern.ActiveRanks` built once; masked
            ranks are skipped, not computed and multiplied by 0. None = every rank.
        out_scale: v [N] (or [G, N]), x's or the adapters' dtype; None = 1.
        dropout_p: probability in [0, 1) of dropping an element of x on the adapter branch only
            (``x~ = x * keep / (1 - p)``); the keep-mask is a function of ``seed``, regenerated in
            backward, never stored.
        seed: int in [0, 2**62), or None to draw one from torch's default generator (so
            ``torch.manual_seed`` makes runs repeatable). Used only when ``dropout_p > 0``.
        adapter_index: with banks, int32 / int64 [M] in [-1, G) (-1: the base alone for that row)
            or an :class:`~lorakern.AdapterBatch` built once per batch.
        base_scale: c [N] in x's dtype, scales the base product only (trainable); None = 1.
        deterministic: True sums in a fixed order, so repeated calls agree bit for bit on the same
            device, dtype and versions; None reads ``torch.are_deterministic_algorithms_enabled()``.
        backend: ``"auto"`` (the fastest measured for the device and shape), ``"torch"``,
            ``"cpu"``, ``"triton"`` or ``"cuda"``; ``lorakern.backend_status(name)`` says why one
            cannot run here.

    Returns:
        y [..., N] in x's dtype (contiguous). Autograd gives the gradient of every tensor that
        requires one (x, W, b, A, B, u, v, c), computing only those; a tensor ``scaling`` is
        treated as a constant (detached).

    Mixed precision: with float32 adapters beside a half-precision x, the adapter branch is
    computed in float32 in every backend (``triton``: its fold-in plan; ``cuda``: its kernels,
    compiled but not yet run on a GPU), added to the base product and rounded once, and the
    adapters' gradients are float32 (``triton`` with ``base_scale``, DoRA, still rounds the
    adapters to x's dtype first). Under autocast the op casts what autocast casts for ``F.linear``. A base layer the op
    cannot compute (quantized, hooked): :func:`lorakern.lora_update`.

    Raises:
        TypeError: an argument of the wrong type or dtype (the message names the argument, the
            dtypes allowed and the one given), before any kernel runs.
        ValueError: shapes that do not match, a device other than x's, ``dropout_p`` outside
            [0, 1), a bad seed, an ``adapter_index`` value outside [-1, G), a backend that cannot
            run x's dtype on its device.
        RuntimeError: a forced backend that is unavailable here (the message says why).
        NotImplementedError: forward-mode AD through the registered op (torch.compile, meta,
            tensor subclasses); plain eager tensors support it.

    >>> import torch, lorakern
    >>> x, W = torch.randn(4, 32), torch.randn(16, 32)
    >>> A, B = torch.randn(8, 32), torch.randn(16, 8)
    >>> lorakern.lora_linear(x, W, None, A, B, scaling=2.0).shape
    torch.Size([4, 16])
    >>> bank_A, bank_B = torch.randn(3, 8, 32), torch.randn(3, 16, 8)    # G = 3 adapters
    >>> lorakern.lora_linear(x, W, None, bank_A, bank_B, adapter_index=torch.tensor([0, 2, -1, 1])).shape
    torch.Size([4, 16])
    """
    # torch.compile, torch.jit.trace (which must record the registered op), meta, fake and subclass
    # tensors take the registered op
    direct = (not torch.compiler.is_compiling() and not torch.jit.is_tracing() and isinstance(x, torch.Tensor)
              and x.device.type != "meta" and all(type(t) in _PLAIN for t in (x, weight, lora_A, lora_B)))
    if direct and type(dropout_p) in (float, int) and dropout_p == 0 and rank_scale is None and rank_mask is None \
            and out_scale is None and adapter_index is None and base_scale is None and seed is None \
            and (deterministic is None or type(deterministic) is bool):  # the plainest call: autograd's own ops
        y = eager.call(x, weight, bias, lora_A, lora_B, scaling, backend)
        if y is not None:
            return y
    dt = autocast_dtype(x)
    if dt is not None:
        x, weight, bias, lora_A, lora_B, rank_scale, out_scale, base_scale = (
            _autocast(t, dt) for t in (x, weight, bias, lora_A, lora_B, rank_scale, out_scale, base_scale))
    M, K, N, R, G = check_args(x, weight, bias, lora_A, lora_B, scaling, rank_scale, rank_mask, out_scale,
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

    scaling_g = s0 = None  # a tensor scaling enters as a tensor (no host read: no sync, no graph break)
    if isinstance(scaling, torch.Tensor):
        if adapter_index is not None:  # banks
            scaling_g = scaling.detach().to(qdtype(x)).expand(G).contiguous()
        else:
            s0 = scaling.detach()  # one adapter: folded into rank_scale below
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
    if s0 is not None:
        rank_scale = (s0.to(lora_A.dtype).expand(R).contiguous() if rank_scale is None
                      else rank_scale * s0.to(rank_scale.dtype))

    row_order = adapter_rows = None
    if adapter_index is not None:
        batch = adapter_index if isinstance(adapter_index, AdapterBatch) else AdapterBatch(adapter_index, G)
        adapter_index, row_order, adapter_rows = batch.index, batch.order, batch.rows

    lead = x.shape[:-1]
    x2 = x if x.dim() == 2 else x.reshape(M, K)
    if not direct and _has_tangent(x2, weight, bias, lora_A, lora_B, rank_scale, out_scale, base_scale):
        raise NotImplementedError("lora_linear: forward-mode AD (a dual tensor) through the registered op, which "
                                  "torch.compile, torch.jit.trace, the meta device and tensor subclasses take, "
                                  "is not supported; plain eager tensors support it")
    if direct:  # torch.func transforms need the setup_context style; anything else takes the cheaper one
        op = _Direct.apply if torch._C._are_functorch_transforms_active() else _EagerDirect.apply
    else:
        op = _fwd
    y, _ = op(x2, weight, bias, lora_A, lora_B, scaling, scaling_g, rank_scale, rank_idx, out_scale, dropout_p,
              seed_t, adapter_index, row_order, adapter_rows, base_scale, name, deterministic)
    return y if x.dim() == 2 else y.reshape(*lead, N)
