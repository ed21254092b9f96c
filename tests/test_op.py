"""The op's suite: every backend against the float64 oracle, forward and every gradient.

Runs per tier through the ``case`` fixture (conftest.py): torch on CPU by default, triton under
the interpreter, and every backend on a GPU.
"""
from __future__ import annotations

import pytest
import torch

import lorakern
from lorakern.alloc import poisoned
from lorakern.ops import get_backend
from lorakern.reference import reference_lora_linear

GRAD_ARGS = ("x", "bias", "lora_A", "lora_B", "rank_scale", "out_scale", "base_scale")


def rel_err(a: torch.Tensor, ref: torch.Tensor, rss: torch.Tensor | None = None) -> float:
    """||a - ref|| / ||ref||; with ``rss`` (the root-sum-square of the products that sum to each
    element of ref), over max(||ref||, ||rss||): a sum that cancels (|sum| << its terms) is only
    as exact as its terms' rounding, so a correct bf16 kernel is not failed on it."""
    a, ref = a.double().cpu(), ref.double().cpu()
    assert not torch.isnan(a).any(), "NaN in the output (an element left unwritten?)"
    den = max(ref.norm().item(), 0.0 if rss is None else rss.double().cpu().norm().item())
    return (a - ref).norm().item() / (den if den > 0 else 1.0)


def _oracle(t, kw, keep, dropout_p, g, names, *, square=False):
    """The float64 oracle's output and gradients (w.r.t. ``names``, for upstream gradient ``g``).

    ``square=True`` runs it on the elementwise squares of every input, scale and g (dropout's
    1/(1-p) squared too): each output is then the sum of the squares of the products that the
    plain oracle sums, whose square root is the scale of the rounding a correct kernel may show."""
    f = (lambda v: v.detach().double() ** 2) if square else (lambda v: v.detach().double())
    refs = {k: None if v is None else f(v).requires_grad_(k in names) for k, v in t.items()}
    refs.setdefault("base_scale", None)
    kw = dict(kw)
    if square:
        kw["scaling"] = kw.get("scaling", 1.0) ** 2
        dropout_p = 1.0 - (1.0 - dropout_p) ** 2
    y = reference_lora_linear(refs["x"], refs["weight"], refs["bias"], refs["lora_A"], refs["lora_B"],
                              rank_scale=refs["rank_scale"], out_scale=refs["out_scale"],
                              base_scale=refs["base_scale"], keep=keep, dropout_p=dropout_p, **kw)
    if g is None:
        return y.detach(), ()
    grads = torch.autograd.grad(y, [refs[k] for k in names], f(g))
    return y.detach(), grads


def make(case, M, K, N, R, *, G=None, bias=True, rank_scale=False, rank_mask=False, out_scale=False,
         base_scale=False, lead=(), seed=0):
    """Fresh random inputs (never zeros) scaled so outputs are O(1)."""
    gen = torch.Generator().manual_seed(seed)
    dev, dt = case.device, case.dtype

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device=dev, dtype=dt)

    bank = () if G is None else (G,)
    t = {
        "x": rnd(*lead, M, K),
        "weight": rnd(N, K, scale=K ** -0.5),
        "bias": rnd(N) if bias else None,
        "lora_A": rnd(*bank, R, K, scale=K ** -0.5),
        "lora_B": rnd(*bank, N, R, scale=R ** -0.5),
        "rank_scale": rnd(*bank, R) + 1.0 if rank_scale else None,
        "out_scale": rnd(*bank, N) + 1.0 if out_scale else None,
        "base_scale": rnd(N) + 1.0 if base_scale else None,
    }
    return t, make_kw(gen, dev, M, R, G=G, rank_mask=rank_mask)


def make_kw(gen: torch.Generator, dev, M: int, R: int, *, G: int | None = None, rank_mask: bool = False) -> dict:
    """The op's keywords drawn from ``gen``: a rank mask (rank 0 on, the last off) and, for a bank of
    G adapters, adapter_index [M] and a scaling per adapter."""
    bank = () if G is None else (G,)
    kw = {}
    if rank_mask:
        m = torch.rand(*bank, R, generator=gen) > 0.4
        m[..., 0] = True
        m[..., -1] = False
        kw["rank_mask"] = m.to(dev)
    if G is not None:
        idx = torch.randint(-1, G - 1, (M,), generator=gen)  # adapter G-1 gets no rows
        kw["adapter_index"] = idx.to(dev)
        kw["scaling"] = (torch.rand(G, generator=gen) + 0.5).to(dev)
    return kw


def leaf_copy(v: torch.Tensor, requires_grad: bool) -> torch.Tensor:
    """A leaf copy of ``v`` with its strides and storage offset: ``clone()`` would make a strided
    view dense, so a test of views would silently test contiguous tensors."""
    if v.numel() == 0:
        return v.detach().clone().requires_grad_(requires_grad)
    span = v.storage_offset() + sum((n - 1) * s for n, s in zip(v.shape, v.stride())) + 1
    out = torch.empty(span, dtype=v.dtype, device=v.device).as_strided(v.shape, v.stride(), v.storage_offset())
    return out.detach().copy_(v).requires_grad_(requires_grad)


def call_op(case, t, kw, *, grad_args=GRAD_ARGS, **opts):
    """The op on fresh leaf copies of ``t`` (those named in ``grad_args`` require grad): (y, leaves)."""
    leaves = {k: None if v is None else leaf_copy(v, k in grad_args) for k, v in t.items()}
    y = lorakern.lora_linear(leaves["x"], leaves["weight"], leaves["bias"], leaves["lora_A"], leaves["lora_B"],
                             rank_scale=leaves["rank_scale"], out_scale=leaves["out_scale"],
                             base_scale=leaves.get("base_scale"), backend=case.backend, **opts, **kw)
    return y, leaves


def run_and_check(case, t, kw, *, dropout_p=0.0, seed=123, grads=True, deterministic=False, grad_args=GRAD_ARGS):
    """Run the op (outputs poisoned), compare forward and every gradient (of ``grad_args``) with the oracle."""
    x = t["x"]
    M = x.numel() // x.shape[-1]
    keep = None
    if dropout_p > 0:
        keep = get_backend(case.backend).dropout_keep(seed, M, x.shape[-1], dropout_p, x.device)
    with poisoned():
        y, leaves = call_op(case, t, kw, grad_args=grad_args if grads else (), dropout_p=dropout_p, seed=seed,
                            deterministic=deterministic)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(7)).to(y) if grads else None
    names = [k for k in grad_args if grads and t.get(k) is not None]
    y_ref, want = _oracle(t, kw, keep, dropout_p, g, names)
    y_rss, want_rss = (z.sqrt() if torch.is_tensor(z) else tuple(w.sqrt() for w in z)
                       for z in _oracle(t, kw, keep, dropout_p, g, names, square=True))
    assert y.shape == y_ref.shape and y.dtype == x.dtype
    e = rel_err(y, y_ref, y_rss)
    assert e <= case.tol, f"forward: {e:.2e} > {case.tol:.0e}"
    if not grads:
        return y
    with poisoned():
        got = torch.autograd.grad(y, [leaves[k] for k in names], g)
    for name, a, b, rss in zip(names, got, want, want_rss):
        assert a.shape == leaves[name].shape, name
        e = rel_err(a, b, rss)
        assert e <= case.tol * 2, f"d{name}: {e:.2e} > {2 * case.tol:.0e}"
    return y


SHAPES = [(1, 16, 16, 4), (7, 29, 23, 5), (33, 48, 40, 8)]


@pytest.mark.parametrize("M,K,N,R", SHAPES)
def test_plain(case, M, K, N, R):
    t, kw = make(case, M, K, N, R)
    run_and_check(case, t, kw)


@pytest.mark.parametrize("feature", ["no_bias", "rank_scale", "rank_mask", "out_scale", "base_scale", "all"])
def test_features(case, feature):
    flags = {k: feature in (k, "all") for k in ("rank_scale", "rank_mask", "out_scale", "base_scale")}
    flags["bias"] = feature != "no_bias"
    t, kw = make(case, 19, 37, 31, 8, **flags)
    run_and_check(case, t, dict(kw, scaling=0.75))


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout(case, p):
    t, kw = make(case, 21, 40, 17, 6, rank_scale=True, out_scale=True)
    run_and_check(case, t, kw, dropout_p=p, seed=2024)


def test_leading_dims(case):
    t, kw = make(case, 5, 24, 20, 4, lead=(2, 3))
    y = run_and_check(case, t, kw)
    assert y.shape == (2, 3, 5, 20)


@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
def test_banks_adapter_index(case, dropout_p):
    t, kw = make(case, 29, 32, 24, 6, G=4, rank_scale=True, out_scale=True, rank_mask=True)
    run_and_check(case, t, kw, dropout_p=dropout_p)


@pytest.mark.parametrize("M", [3, 70])
def test_base_scale_with_dropout_and_banks(case, M):
    """DoRA's shape of call: c scales the base path, v the adapter's; both trained."""
    t, kw = make(case, M, 48, 40, 8, G=3, out_scale=True, base_scale=True)
    run_and_check(case, t, kw, dropout_p=0.1)


@pytest.mark.parametrize("G", [None, 3])
def test_each_gradient_alone(case, G):
    """Only one input requires grad: the backend computes that gradient alone (its ``needs``
    flags), and it equals the oracle's."""
    t, kw = make(case, 21, 40, 24, 6, G=G, rank_scale=True, out_scale=True, base_scale=True, rank_mask=True)
    for name in GRAD_ARGS:
        run_and_check(case, t, kw, dropout_p=0.2, grad_args=(name,))


def test_deterministic_repeats_bitwise(case):
    """deterministic=True: two calls give the same bits, forward and every gradient, in the
    shapes where the native backends otherwise split sums across blocks (few rows and a long K;
    many rows with banks, for the per-adapter reductions; small on a CPU, where the interpreter
    runs the same code paths in its fixed configurations)."""
    shapes = ((4, 2048, None), (300, 96, 3)) if case.device == "cuda" else ((4, 40, None), (37, 24, 3))
    for M, K, G in shapes:
        t, kw = make(case, M, K, 64, 8, G=G, rank_scale=True, out_scale=True, base_scale=True, seed=M)
        runs = []
        for _ in range(2):
            y, leaves = call_op(case, t, kw, dropout_p=0.1, seed=5, deterministic=True)
            y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y))
            runs.append([y] + [leaves[k].grad for k in GRAD_ARGS if leaves[k] is not None])
        for a, b in zip(*runs):
            assert torch.equal(a, b)


def test_banks_shared_vectors(case):
    """[R] rank_scale and [N] out_scale shared by every adapter of a bank."""
    t, kw = make(case, 17, 24, 20, 4, G=3)
    gen = torch.Generator().manual_seed(3)
    t["rank_scale"] = (torch.rand(4, generator=gen) + 0.5).to(t["x"])
    t["out_scale"] = (torch.rand(20, generator=gen) + 0.5).to(t["x"])
    run_and_check(case, t, kw)


def test_all_rows_base_only(case):
    t, kw = make(case, 9, 16, 16, 4, G=2)
    kw["adapter_index"] = torch.full((9,), -1, device=case.device)
    y = run_and_check(case, t, kw)
    base = torch.nn.functional.linear(t["x"].double(), t["weight"].double(), t["bias"].double())
    assert rel_err(y, base) <= case.tol


def test_strided_views(case):
    """x non-contiguous; A and B slices of bigger banks, read in place."""
    t, kw = make(case, 13, 24, 20, 4)
    dev, dt = case.device, case.dtype
    x_big = torch.randn(24, 2 * 13, device=dev, dtype=dt)
    t["x"] = x_big.T[::2]  # [13, 24], strides (2, 26)
    A_bank = torch.randn(10, 40, device=dev, dtype=dt) * 24 ** -0.5
    B_bank = torch.randn(32, 9, device=dev, dtype=dt) * 0.5
    t["lora_A"] = A_bank[3:7, 5:29]  # [4, 24] view
    t["lora_B"] = B_bank[6:26, ::2][:, :4]  # [20, 4], column stride 2
    assert not t["x"].is_contiguous() and not t["lora_B"].is_contiguous()
    run_and_check(case, t, kw)


def test_strided_bank_views(case):
    """A [G, R, K] that is a slice of a bigger [G', R', K'] bank, as VeRA and Tied-LoRA read it."""
    t, kw = make(case, 11, 24, 20, 4, G=3)
    dev, dt = case.device, case.dtype
    bank_A = torch.randn(5, 8, 30, device=dev, dtype=dt) * 24 ** -0.5
    bank_B = torch.randn(4, 26, 7, device=dev, dtype=dt) * 0.5
    t["lora_A"] = bank_A[1:4, 2:6, 3:27]
    t["lora_B"] = bank_B[:3, 4:24, 1:5]
    run_and_check(case, t, kw)


def test_m_zero(case):
    t, kw = make(case, 0, 16, 12, 4)
    y = run_and_check(case, t, kw)
    assert y.shape == (0, 12)


def test_same_seed_same_output(case):
    t, kw = make(case, 17, 32, 16, 4)
    a = lorakern.lora_linear(*[t[k] for k in ("x", "weight", "bias", "lora_A", "lora_B")], dropout_p=0.3, seed=5,
                             backend=case.backend)
    b = lorakern.lora_linear(*[t[k] for k in ("x", "weight", "bias", "lora_A", "lora_B")], dropout_p=0.3, seed=5,
                             backend=case.backend)
    c = lorakern.lora_linear(*[t[k] for k in ("x", "weight", "bias", "lora_A", "lora_B")], dropout_p=0.3, seed=6,
                             backend=case.backend)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_seed_none_follows_torch_generator(case):
    t, kw = make(case, 9, 16, 8, 4)
    args = [t[k] for k in ("x", "weight", "bias", "lora_A", "lora_B")]
    torch.manual_seed(11)
    a = lorakern.lora_linear(*args, dropout_p=0.5, backend=case.backend)
    torch.manual_seed(11)
    b = lorakern.lora_linear(*args, dropout_p=0.5, backend=case.backend)
    assert torch.equal(a, b)


def test_dropout_mask_not_stored(case):
    """Saved for backward: x by reference, q [M, Ra] fp32; nothing of size M x K or M x N new."""
    M, K, N, R = 64, 48, 40, 4
    t, kw = make(case, M, K, N, R)
    x = t["x"].requires_grad_()
    A, B = t["lora_A"].requires_grad_(), t["lora_B"].requires_grad_()
    inputs = {x.data_ptr(), t["weight"].data_ptr(), A.data_ptr(), B.data_ptr()}
    new_bytes = []

    def pack(s):
        if s.data_ptr() not in inputs:
            new_bytes.append(s.numel() * s.element_size())
        return s

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda s: s):
        lorakern.lora_linear(x, t["weight"], t["bias"], A, B, dropout_p=0.1, seed=1, backend=case.backend)
    assert sum(new_bytes) <= max(4, case.dtype.itemsize) * M * R + 1024, new_bytes


def test_nan_inf_propagate(case):
    t, kw = make(case, 6, 16, 8, 4)
    t["x"][2, 3] = float("nan")
    t["x"][4, 1] = float("inf")
    y = lorakern.lora_linear(*[t[k] for k in ("x", "weight", "bias", "lora_A", "lora_B")], backend=case.backend)
    ref = reference_lora_linear(*[t[k] for k in ("x", "weight", "bias", "lora_A", "lora_B")])
    assert torch.equal(y.isnan().cpu(), ref.isnan().cpu())
    assert torch.isfinite(y[[0, 1, 3, 5]]).all()


def test_frozen_tensors_get_no_grad(case):
    t, kw = make(case, 8, 16, 12, 4)
    x = t["x"].requires_grad_()
    A = t["lora_A"].requires_grad_()
    y = lorakern.lora_linear(x, t["weight"], t["bias"], A, t["lora_B"], backend=case.backend)
    y.sum().backward()
    assert x.grad is not None and A.grad is not None
    assert t["weight"].grad is None and t["lora_B"].grad is None


def test_weight_grad_slow_path(case):
    t, kw = make(case, 8, 16, 12, 4)
    W = t["weight"].clone().requires_grad_()
    x = t["x"]
    y = lorakern.lora_linear(x, W, t["bias"], t["lora_A"], t["lora_B"], backend=case.backend)
    g = torch.randn_like(y)
    (dW,) = torch.autograd.grad(y, W, g)
    assert rel_err(dW, g.double().T @ x.double()) <= case.tol * 2
