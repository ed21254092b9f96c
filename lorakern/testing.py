"""The correctness harness: random inputs, the float64 oracle check and the tolerances of docs/contract.md section 5.

One place for what the test suite, the ``bench/`` scripts and ``lorakern check`` judge a backend by:

- ``rel_err``: ``||out - ref|| / ||ref||`` in float64 (NaN and inf never pass);
- ``TOL`` / ``tolerance``: the bounds per precision, ``GRAD_FACTOR`` times that for gradients;
- ``random_problem``, ``randn``, ``randn_view``, ``strided_copy``: fresh random inputs (never zeros,
  outputs O(1)), adapter banks, and non-contiguous views that the op must read in place;
- ``leaf_copy`` / ``run_op``: the op on leaf copies that keep their strides;
- ``check_against_oracle``: the op (outputs poisoned with NaN, ``lorakern.alloc.poisoned``) against
  ``reference_lora_linear`` in float64, forward and gradients, asserted within tolerance.

Inputs are a dict named as ``lorakern.lora_linear``'s arguments (``x``, ``weight``, ``bias``,
``lora_A``, ``lora_B``, ``rank_scale``, ``out_scale``, ``base_scale``; None where absent) plus a dict of
its keywords (``scaling``, ``rank_mask``, ``adapter_index``).

>>> from lorakern.testing import check_against_oracle, random_problem
>>> t, kw = random_problem(7, 29, 23, 5, G=3, rank_scale="shared")
>>> sorted(check_against_oracle(t, kw, backend="torch").errors)
['dbias', 'dlora_A', 'dlora_B', 'drank_scale', 'dx', 'y']
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch

import lorakern
from lorakern.alloc import poisoned

__all__ = ["TOL", "GRAD_FACTOR", "GRAD_ARGS", "tolerance", "rel_err", "randn", "randn_view", "strided_copy",
           "random_problem", "leaf_copy", "run_op", "Comparison", "check_against_oracle"]

# relative-error bounds of docs/contract.md section 5, by precision
TOL = {
    "float64": 1e-10,
    "float32": 1e-5,  # the torch backend on a CPU
    "tf32": 5e-4,  # float32 where tf32 or Triton's fp32 dot is used: every GPU backend, Triton interpreted
    "float16": 1e-2,
    "bfloat16": 1e-2,
}
# a gradient sums over more products than the output: it gets this many times the output's bound
GRAD_FACTOR = 2
# the op's differentiable inputs other than the frozen base weight, in the order their gradients are reported
GRAD_ARGS = ("x", "bias", "lora_A", "lora_B", "rank_scale", "out_scale", "base_scale")

Scale = Union[None, bool, str]  # None / False: absent; True or "per_adapter": one per adapter; "shared"


def tolerance(backend: str, device: Union[str, torch.device], dtype: torch.dtype) -> float:
    """The bound on ``rel_err`` of an output of ``backend`` computing in ``dtype`` on ``device``.

    Raises KeyError for a dtype the table has no bound for (an integer dtype).

    >>> tolerance("torch", "cpu", torch.float32), tolerance("triton", "cuda", torch.float32)
    (1e-05, 0.0005)
    """
    name = str(dtype).removeprefix("torch.")
    if name == "float32" and not (backend == "torch" and torch.device(device).type == "cpu"):
        name = "tf32"
    return TOL[name]


def rel_err(out: torch.Tensor, ref: torch.Tensor, rss: Optional[torch.Tensor] = None) -> float:
    """``||out - ref|| / ||ref||`` in float64, any device and dtype; ``||out - ref||`` when ref is all zeros.

    With ``rss`` (the root-sum-square of the products that sum to each element of ref, shaped as
    ref), the denominator is max(||ref||, ||rss||): a sum that cancels (|sum| << its terms) is only
    as exact as its terms' rounding, so a correct bf16 kernel is not failed on it.

    Raises AssertionError when out or ref holds a NaN or an infinity (an element a kernel left
    unwritten in a poisoned output reads NaN), or when their shapes differ.

    >>> round(rel_err(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.5])), 6)  # 0.5 / sqrt(1 + 2.5 ** 2)
    0.185695
    """
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    assert out.shape == ref.shape, f"shape {list(out.shape)} != reference {list(ref.shape)}"
    assert torch.isfinite(out).all(), "NaN or inf in the output (an element left unwritten?)"
    assert torch.isfinite(ref).all(), "NaN or inf in the reference"
    den = max(ref.norm().item(), 0.0 if rss is None else rss.detach().double().cpu().norm().item())
    return (out - ref).norm().item() / (den if den > 0 else 1.0)


# --------------------------------------------------------------------------- inputs


def randn(gen: torch.Generator, *shape: int, scale: float = 1.0, device: Union[str, torch.device] = "cpu",
          dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard normal draws times ``scale``, contiguous, in ``dtype`` on ``device``; drawn on the CPU
    from ``gen``, so a seed gives the same values on every device.

    >>> randn(torch.Generator().manual_seed(0), 2, 3, scale=0.5, dtype=torch.float16).shape
    torch.Size([2, 3])
    """
    return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dtype)


def randn_view(gen: torch.Generator, *shape: int, layout: str, scale: float = 1.0,
               device: Union[str, torch.device] = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``randn`` values of ``shape`` as a non-contiguous view into a bigger draw, never a copy.

    ``layout``: "transposed" (2-D [M, K] only: rows 1, 3, ... of a transposed [K, 2M + 1] draw,
    strides (2, 2M + 1), storage offset 1); "window" ([..., r, c] inside [..., r + 2, c + 3] at
    offsets 1 and 2); "columns" (every other column of [..., r + 1, 2c] from row 1). Raises
    ValueError for another layout, or a "transposed" shape that is not 2-D.

    >>> randn_view(torch.Generator().manual_seed(0), 4, 6, layout="transposed").stride()
    (2, 9)
    """
    draw = lambda *s: randn(gen, *s, scale=scale, device=device, dtype=dtype)  # noqa: E731
    *lead, r, c = shape
    if layout == "transposed" and not lead:
        return draw(c, 2 * r + 1).T[1::2]
    if layout == "window":
        return draw(*lead, r + 2, c + 3)[..., 1:r + 1, 2:c + 2]
    if layout == "columns":
        return draw(*lead, r + 1, 2 * c)[..., 1:, ::2]
    raise ValueError(f"layout: expected 'transposed' (2-D), 'window' or 'columns', got {layout!r} for {list(shape)}")


def strided_copy(t: torch.Tensor, layout: str) -> torch.Tensor:
    """The values of ``t`` in a non-contiguous layout: "columns" (every other column of a tensor twice
    as wide) or "column_major" (the last two dimensions transposed in memory). Raises ValueError for
    another layout.

    >>> strided_copy(torch.ones(3, 4), "columns").stride(), strided_copy(torch.ones(3, 4), "column_major").stride()
    ((8, 2), (1, 3))
    """
    if layout == "columns":
        wide = torch.empty(*t.shape[:-1], 2 * t.shape[-1], device=t.device, dtype=t.dtype)
        wide[..., ::2] = t
        return wide[..., ::2]
    if layout == "column_major":
        return t.mT.contiguous().mT
    raise ValueError(f"layout: expected 'columns' or 'column_major', got {layout!r}")


def _scale_vector(draw, kind: Scale, bank: tuple, n: int, shift: float) -> Optional[torch.Tensor]:
    if not kind:
        return None
    if kind not in (True, "per_adapter", "shared"):
        raise ValueError(f"expected None, True, 'per_adapter' or 'shared', got {kind!r}")
    return draw(*(() if kind == "shared" else bank), n) + shift


def random_problem(M: int, K: int, N: int, R: int, *, G: Optional[int] = None, bias: bool = True,
                   rank_scale: Scale = None, out_scale: Scale = None, base_scale: bool = False,
                   rank_mask: Scale = None, scaling: Optional[float] = None, idle_adapter: bool = True,
                   lead: Sequence[int] = (), layouts: Optional[dict] = None, seed: int = 0,
                   device: Union[str, torch.device] = "cpu", dtype: torch.dtype = torch.float32) -> tuple[dict, dict]:
    """Fresh random inputs for the op, never zeros, scaled so outputs are O(1); ``(t, kw)``.

    ``t``: ``x [*lead, M, K]``, ``weight [N, K]``, ``bias [N]`` (or None), ``lora_A [R, K]`` /
    ``[G, R, K]``, ``lora_B [N, R]`` / ``[G, N, R]``, ``rank_scale`` and ``out_scale`` (1 + noise;
    None, one per adapter ``[G, R]`` / ``[G, N]`` for True or "per_adapter", or "shared" ``[R]`` /
    ``[N]``), ``base_scale [N]`` (1 + noise, or None); all in ``dtype`` on ``device``. ``layouts``
    (``{name: layout}``) stores those inputs non-contiguous, ``strided_copy(t[name], layout)``.

    ``kw``: ``rank_mask`` (bool, rank 0 on and the last off, per adapter or shared like the scales);
    for a bank of G adapters ``adapter_index`` int64 ``[M]`` in [-1, G) (-1: the base only; with
    ``idle_adapter`` adapter G - 1 gets no rows) and ``scaling`` float32 ``[G]`` in [0.5, 1.5);
    ``scaling`` given: that float instead (for one adapter too). Everything is drawn on the CPU
    from ``torch.Generator().manual_seed(seed)`` in this order. Raises ValueError for an unknown
    scale or mask kind, or layout.

    >>> t, kw = random_problem(5, 16, 12, 4, G=3, rank_mask="shared", dtype=torch.float16)
    >>> t["lora_A"].shape, t["x"].dtype, kw["rank_mask"].shape, kw["adapter_index"].shape
    (torch.Size([3, 4, 16]), torch.float16, torch.Size([4]), torch.Size([5]))
    """
    gen = torch.Generator().manual_seed(seed)
    draw = lambda *s, scale=1.0: randn(gen, *s, scale=scale, device=device, dtype=dtype)  # noqa: E731
    bank = () if G is None else (G,)
    t = {
        "x": draw(*lead, M, K),
        "weight": draw(N, K, scale=K ** -0.5),
        "bias": draw(N) if bias else None,
        "lora_A": draw(*bank, R, K, scale=K ** -0.5),
        "lora_B": draw(*bank, N, R, scale=R ** -0.5),
        "rank_scale": _scale_vector(draw, rank_scale, bank, R, 1.0),
        "out_scale": _scale_vector(draw, out_scale, bank, N, 1.0),
        "base_scale": draw(N) + 1.0 if base_scale else None,
    }
    t.update({k: strided_copy(t[k], layout) for k, layout in (layouts or {}).items()})
    kw = {}
    mask = _scale_vector(lambda *s: torch.rand(*s, generator=gen), rank_mask, bank, R, 0.0)
    if mask is not None:
        mask = mask > 0.4
        mask[..., 0] = True
        mask[..., -1] = False
        kw["rank_mask"] = mask.to(device)
    if G is not None:
        kw["adapter_index"] = torch.randint(-1, G - 1 if idle_adapter else G, (M,), generator=gen).to(device)
        kw["scaling"] = (torch.rand(G, generator=gen) + 0.5).to(device)
    if scaling is not None:
        kw["scaling"] = scaling
    return t, kw


# --------------------------------------------------------------------------- running the op


def leaf_copy(v: torch.Tensor, requires_grad: bool) -> torch.Tensor:
    """A leaf copy of ``v`` with its strides and storage offset: ``clone()`` would make a strided
    view dense, so a test of views would silently test contiguous tensors.

    >>> leaf_copy(torch.ones(4, 6)[:, ::2], True).stride()
    (6, 2)
    """
    if v.numel() == 0:
        return v.detach().clone().requires_grad_(requires_grad)
    span = v.storage_offset() + sum((n - 1) * s for n, s in zip(v.shape, v.stride())) + 1
    out = torch.empty(span, dtype=v.dtype, device=v.device).as_strided(v.shape, v.stride(), v.storage_offset())
    return out.detach().copy_(v).requires_grad_(requires_grad)


def run_op(t: dict, kw: Optional[dict] = None, *, backend: str = "auto", grad_args: Sequence[str] = GRAD_ARGS,
           **opts) -> tuple[torch.Tensor, dict]:
    """``lorakern.lora_linear`` on leaf copies of ``t`` (strides kept; those named in ``grad_args``
    require grad) with the keywords ``kw`` and ``opts`` (dropout_p, seed, deterministic); returns
    ``(y, leaves)``. Raises what the op raises.

    >>> t, kw = random_problem(3, 8, 6, 2)
    >>> y, leaves = run_op(t, kw, backend="torch", grad_args=("lora_A",))
    >>> y.shape, leaves["lora_A"].requires_grad, leaves["x"].requires_grad
    (torch.Size([3, 6]), True, False)
    """
    leaves = {k: None if v is None else leaf_copy(v, k in grad_args) for k, v in t.items()}
    y = lorakern.lora_linear(leaves["x"], leaves["weight"], leaves.get("bias"), leaves["lora_A"], leaves["lora_B"],
                             rank_scale=leaves.get("rank_scale"), out_scale=leaves.get("out_scale"),
                             base_scale=leaves.get("base_scale"), backend=backend, **opts, **(kw or {}))
    return y, leaves


def _oracle(t, kw, keep, dropout_p, g, names, *, square=False):
    """The float64 oracle's output and gradients (w.r.t. ``names``, for upstream gradient ``g``).

    ``square=True`` runs it on the elementwise squares of every input, scale and g (dropout's
    1/(1-p) squared too): each output is then the sum of the squares of the products that the
    plain oracle sums, whose square root is the scale of the rounding a correct kernel may show."""
    f = (lambda v: v.detach().double() ** 2) if square else (lambda v: v.detach().double())
    refs = {k: None if v is None else f(v).requires_grad_(k in names) for k, v in t.items()}
    kw = dict(kw)
    if square:
        kw["scaling"] = kw.get("scaling", 1.0) ** 2
        dropout_p = 1.0 - (1.0 - dropout_p) ** 2
    y = lorakern.reference_lora_linear(refs["x"], refs["weight"], refs.get("bias"), refs["lora_A"], refs["lora_B"],
                                       rank_scale=refs.get("rank_scale"), out_scale=refs.get("out_scale"),
                                       base_scale=refs.get("base_scale"), keep=keep, dropout_p=dropout_p, **kw)
    if g is None:
        return y.detach(), ()
    grads = torch.autograd.grad(y, [refs[k] for k in names], f(g))
    return y.detach(), grads


def _within(name: str, out: torch.Tensor, ref: torch.Tensor, rss: Optional[torch.Tensor], bound: float) -> float:
    e = rel_err(out, ref, rss)
    assert e <= bound, f"{name}: {e:.2e} > {bound:.0e}"
    return e


@dataclass(frozen=True)
class Comparison:
    """What ``check_against_oracle`` saw: ``outputs`` (the op's ``"y"`` and ``"d<name>"`` per
    gradient) and ``errors`` (``rel_err`` of each against the oracle), under the same keys."""

    outputs: dict
    errors: dict


def check_against_oracle(t: dict, kw: Optional[dict] = None, *, backend: str = "auto", tol: Optional[float] = None,
                         dropout_p: float = 0.0, seed: int = 123, keep: Optional[torch.Tensor] = None,
                         grad_args: Sequence[str] = GRAD_ARGS, grad_seed: int = 7, rss: bool = False,
                         deterministic: bool = False) -> Comparison:
    """Run the op on ``backend`` (outputs poisoned with NaN, so an element left unwritten fails) and
    compare ``y`` and the gradients of the inputs named in ``grad_args`` (those present in ``t``)
    with ``reference_lora_linear`` in float64 on the same values.

    The upstream gradient is drawn from ``grad_seed``. ``keep`` (bool ``[M, K]``) is the backend's
    dropout mask for ``seed`` (its ``dropout_keep``), required when ``dropout_p > 0``. ``tol``
    (default ``tolerance(backend, x.device, x.dtype)``) bounds ``y``; each gradient gets
    ``GRAD_FACTOR * tol``. ``rss=True`` judges each error against max(|ref|, root-sum-square of
    the products summed), see ``rel_err``.

    Raises AssertionError on a wrong shape or dtype, a NaN or inf, or an error past its bound
    (the forward is asserted before the backward runs); ValueError when ``keep`` is missing.

    >>> t, kw = random_problem(9, 16, 12, 4, G=2, rank_mask=True)
    >>> r = check_against_oracle(t, kw, backend="torch", grad_args=("lora_A",))
    >>> sorted(r.outputs), r.errors["y"] < 1e-5
    (['dlora_A', 'y'], True)
    """
    kw = {} if kw is None else kw
    x = t["x"]
    if dropout_p > 0 and keep is None:
        raise ValueError("keep: required when dropout_p > 0 (the backend's dropout_keep(seed, M, K, p, device))")
    tol = tolerance(backend, x.device, x.dtype) if tol is None else tol
    names = [k for k in grad_args if t.get(k) is not None]
    with poisoned():
        y, leaves = run_op(t, kw, backend=backend, grad_args=names, dropout_p=dropout_p, seed=seed,
                           deterministic=deterministic)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(grad_seed)).to(y) if names else None
    y_ref, want = _oracle(t, kw, keep, dropout_p, g, names)
    y_rss, want_rss = None, [None] * len(names)
    if rss:
        y_sq, want_sq = _oracle(t, kw, keep, dropout_p, g, names, square=True)
        y_rss, want_rss = y_sq.sqrt(), [w.sqrt() for w in want_sq]
    assert y.shape == y_ref.shape and y.dtype == x.dtype, f"y: {y.dtype} {list(y.shape)}"
    outputs, errors = {"y": y}, {"y": _within("y", y, y_ref, y_rss, tol)}
    if not names:
        return Comparison(outputs, errors)
    with poisoned():
        got = torch.autograd.grad(y, [leaves[k] for k in names], g)
    for name, a, b, r in zip(names, got, want, want_rss):
        assert a.shape == t[name].shape and a.dtype == t[name].dtype, f"d{name}: {a.dtype} {list(a.shape)}"
        outputs["d" + name] = a
        errors["d" + name] = _within("d" + name, a, b, r, GRAD_FACTOR * tol)
    return Comparison(outputs, errors)
