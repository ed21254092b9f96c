"""The op's suite: every backend against the float64 oracle, forward and every gradient.

Runs per tier through the ``case`` fixture (conftest.py): torch on CPU by default, triton under
the interpreter, and every backend on a GPU.
"""
from __future__ import annotations

import pytest
import torch

import lorakern
from lorakern import backends
from lorakern.reference import reference_lora_linear
from lorakern.testing import GRAD_ARGS, GRAD_FACTOR, check_against_oracle, random_problem, randn_view, rel_err, run_op

def make(case, M, K, N, R, **flags):
    """Fresh random inputs and keywords for ``case`` (``lorakern.testing.random_problem``'s flags)."""
    return random_problem(M, K, N, R, device=case.device, dtype=case.dtype, **flags)


def run_and_check(case, t, kw, *, dropout_p=0.0, seed=123, grads=True, deterministic=False, grad_args=GRAD_ARGS):
    """Run the op (outputs poisoned), compare forward and every gradient (of ``grad_args``) with the
    oracle, each error judged against the products' root-sum-square too; returns y."""
    x = t["x"]
    M = x.numel() // x.shape[-1]
    keep = None
    if dropout_p > 0:
        keep = backends.get(case.backend).dropout_keep(seed, M, x.shape[-1], dropout_p, x.device)
    return check_against_oracle(t, kw, backend=case.backend, tol=case.tol, dropout_p=dropout_p, seed=seed, keep=keep,
                                grad_args=grad_args if grads else (), rss=True,
                                deterministic=deterministic).outputs["y"]


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
            y, leaves = run_op(t, kw, backend=case.backend, dropout_p=0.1, seed=5, deterministic=True)
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
    gen = torch.Generator().manual_seed(1)
    t["x"] = randn_view(gen, 13, 24, layout="transposed", device=case.device, dtype=case.dtype)  # strides (2, 27)
    t["lora_A"] = randn_view(gen, 4, 24, layout="window", scale=24 ** -0.5, device=case.device, dtype=case.dtype)
    t["lora_B"] = randn_view(gen, 20, 4, layout="columns", scale=0.5, device=case.device, dtype=case.dtype)
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
    assert rel_err(dW, g.double().T @ x.double()) <= case.tol * GRAD_FACTOR
