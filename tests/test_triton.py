"""The triton backend's own paths against the float64 oracle, outputs poisoned with NaN.

``interpret`` tier: TRITON_INTERPRET=1 on CPU, fp32 and fp16, tiny shapes (16-wide blocks, so
every shape here crosses block edges). ``gpu`` tier: the same tests on CUDA in bf16, fp16 and
fp32 on bigger awkward shapes. Kernel variants (q inside the GEMM or a separate shrink, split
or whole passes, sorted or unsorted rows) are forced through ``configs.planning``.
"""
from __future__ import annotations

import os
import re

import pytest
import torch

import lorakern
import lorakern.triton
from lorakern.alloc import poisoned
from lorakern.reference import reference_lora_linear
from lorakern.testing import GRAD_ARGS, check_against_oracle, random_problem, rel_err, tolerance

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
HAS_CUDA = torch.cuda.is_available()


def _tiers():
    out = []
    for dt in (torch.float32, torch.float16):
        out.append(pytest.param(("cpu", dt), id=f"interp-{str(dt)[6:]}", marks=pytest.mark.interpret))
    for dt in (torch.bfloat16, torch.float16, torch.float32):
        out.append(pytest.param(("cuda", dt), id=f"cuda-{str(dt)[6:]}", marks=pytest.mark.gpu))
    return out


@pytest.fixture(params=_tiers())
def env(request):
    dev, dt = request.param
    if dev == "cuda" and not HAS_CUDA:
        pytest.skip("no CUDA device")
    if dev == "cpu" and not INTERPRET:
        pytest.skip("needs TRITON_INTERPRET=1")
    return dev, dt


@pytest.fixture
def override():
    """Force kernel configurations for one test: ``override("fwd", FUSE_Q=False)`` enters
    ``configs.planning`` for the rest of the test (nested calls add to the earlier ones)."""
    import contextlib

    from lorakern.triton import configs
    with contextlib.ExitStack() as stack:
        yield lambda kind, **kw: stack.enter_context(configs.planning(**{kind: kw}))


def shape(dev, small, big):
    """Tiny shapes under the interpreter, bigger awkward ones on a GPU."""
    return small if dev == "cpu" else big


def make(dev, dt, M, K, N, R, *, G=None, rank_scale=None, out_scale=None, rank_mask=False):
    """Fresh random inputs (``lorakern.testing.random_problem``); one adapter gets scaling 0.75,
    a bank sends row 0 to the base only."""
    t, kw = random_problem(M, K, N, R, G=G, rank_scale=rank_scale, out_scale=out_scale, rank_mask=rank_mask,
                           scaling=0.75 if G is None else None, device=dev, dtype=dt)
    if G is not None:
        kw["adapter_index"][0] = -1
    return t, kw


def check(t, kw, *, dropout_p=0.0, seed=11, grads=True):
    """The op on the triton backend vs the float64 oracle: y and every gradient; returns them."""
    x = t["x"]
    keep = lorakern.triton.dropout_keep(seed, *x.shape, dropout_p, x.device) if dropout_p > 0 else None
    return check_against_oracle(t, kw, backend="triton", dropout_p=dropout_p, seed=seed, keep=keep, grad_seed=3,
                                grad_args=GRAD_ARGS if grads else ()).outputs


# --------------------------------------------------------------------------- single adapter


@pytest.mark.parametrize("fuse", [True, False])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_plain(env, override, fuse, p):
    """fuse: q inside the forward GEMM and dA inside the dx kernel, or each in its own pass."""
    dev, dt = env
    override("fwd", FUSE_Q=fuse)
    override("dx", FUSE_DA=fuse)
    t, kw = make(dev, dt, *shape(dev, (37, 41, 35, 6), (1237, 1000, 777, 13)))
    check(t, kw, dropout_p=p)


@pytest.mark.parametrize("M", [1, 16, 17])
def test_small_m(env, override, M):
    """Also the one-adapter backward with dt and g^T t as torch products (CUBLAS)."""
    dev, dt = env
    override("gpass", CUBLAS=True)
    t, kw = make(dev, dt, M, *shape(dev, (24, 19, 4), (4096, 1031, 16)))
    check(t, kw, dropout_p=0.2)


def test_all_features(env, override):
    dev, dt = env
    override("gpass", CUBLAS=True)
    t, kw = make(dev, dt, *shape(dev, (29, 33, 31, 8), (515, 763, 1030, 16)),
                 rank_scale="shared", out_scale="shared", rank_mask=True)
    out = check(t, kw, dropout_p=0.1)
    masked = ~kw["rank_mask"]
    assert (out["dlora_A"][masked] == 0).all() and (out["dlora_B"][:, masked] == 0).all()


@pytest.mark.parametrize("split", [1, 3])
def test_split_passes(env, override, split):
    """Each pass whole or split with atomic adds: shrink over K slices, g-pass (dt) over N slices,
    dA over row slices; g^T t in the g-pass or (split) by the row-reduction kernel."""
    dev, dt = env
    override("fwd", FUSE_Q=False)
    override("dx", FUSE_DA=False)
    override("shrink", SPLIT_K=split)
    override("gpass", SPLIT_N=split, P_APART=split > 1, CUBLAS=False)
    override("dA", SPLIT_M=split)
    t, kw = make(dev, dt, *shape(dev, (40, 34, 48, 5), (777, 520, 1500, 7)), rank_scale="shared", out_scale="shared")
    check(t, kw)


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_tma(env, override, monkeypatch, p):
    """x, g and W tiles through tensor descriptors in the forward and dx GEMMs (q in the GEMM or
    not); a strided x sends the forward back to pointer loads, dx (g and W) keeps descriptors."""
    from lorakern.triton import backend
    dev, dt = env
    override("fwd", TMA=True, FUSE_Q=p == 0)
    override("dx", TMA=True)
    made = []
    real = backend._descriptors
    monkeypatch.setattr(backend, "_descriptors", lambda *tiles: made.append(real(*tiles)) or made[-1])
    M, K, N, R = shape(dev, (37, 48, 40, 6), (1237, 1024, 776, 13))
    t, kw = make(dev, dt, M, K, N, R, rank_scale="shared", out_scale="shared")
    check(t, kw, dropout_p=p)
    tma = dev == "cpu" or torch.cuda.get_device_capability()[0] >= 9
    assert [d is not None for d in made] == [tma, tma]
    made.clear()
    t["x"] = torch.randn(M, 2 * K).to(device=dev, dtype=dt)[:, ::2]
    check(t, kw, dropout_p=p)
    assert [d is not None for d in made] == [False, tma]


def test_descriptors_only_where_the_layout_allows():
    """Tensor descriptors need a contiguous last dimension, a 16-byte aligned base and row stride,
    and no empty dimension; anything else gets None (pointer loads)."""
    from lorakern.triton import backend
    base = torch.zeros(64 * 40 + 8, dtype=torch.float16)
    ok = base[:64 * 40].view(64, 40)
    assert backend._descriptors((ok, (16, 16)), (ok, (16, 32))) is not None
    bad = {"offset": base[1:64 * 40 + 1].view(64, 40), "row stride": base[:64 * 36].view(64, 36)[:, :33],
           "column stride": ok[:, ::2], "empty": ok[:0]}
    for why, t in bad.items():
        assert backend._descriptors((ok, (16, 16)), (t, (16, 16))) is None, why


def test_strided_views(env):
    """x, W, A, B, bias, rank_scale and out_scale as non-contiguous views, read in place."""
    dev, dt = env
    M, K, N, R = shape(dev, (21, 26, 18, 4), (333, 520, 300, 12))
    t, kw = make(dev, dt, M, K, N, R, rank_scale="shared", out_scale="shared")
    gen = torch.Generator().manual_seed(5)
    big = lambda *s: torch.randn(*s, generator=gen).to(device=dev, dtype=dt)  # noqa: E731
    t["x"] = big(M, 2 * K)[:, ::2]
    t["weight"] = big(K, N).t() * K ** -0.5
    t["lora_A"] = (big(3 * R, K) * K ** -0.5)[R:2 * R]
    t["lora_B"] = big(R, N + 5)[:, 3:N + 3].t()
    t["bias"] = big(2 * N)[::2]
    t["rank_scale"] = big(R, 2)[:, 1] + 1.0
    t["out_scale"] = big(N, 3)[:, 0] + 1.0
    assert not t["x"].is_contiguous() and not t["lora_B"].is_contiguous()
    check(t, kw, dropout_p=0.25)


# --------------------------------------------------------------------------- the fold-in plan


def _routes(t, kw, p):
    """(forward route, backward route with every gradient) that configs gives this problem."""
    from lorakern.triton import configs
    x, A = t["x"], t["lora_A"]
    M, K = x.shape
    N, Ra = t["weight"].shape[0], A.shape[-2]
    common = dict(banked=A.dim() == 3, dropout=p > 0, esize=x.element_size(), sms=1, mixed=A.dtype != x.dtype,
                  base_scale=t.get("base_scale") is not None)
    return (configs.forward_route(M, N, K, Ra, **common),
            configs.backward_route(M, N, K, Ra, **common, deterministic=False, need_x=True, need_dt=True,
                                   need_P=True, need_A=True))


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("cublas", [True, False])
def test_fold_in(env, override, p, cublas):
    """The fold-in plan (the table's FOLD: M >= 64 under the interpreter): shrink, the forward
    kernel with K = 0 writing b + t (v*B)^T, cuBLAS adding x W^T onto it; dx kernel with N = 0
    writing the adapter's term (dA fused with dropout), cuBLAS adding g W; masked ranks, scales."""
    dev, dt = env
    override("gpass", CUBLAS=cublas)
    t, kw = make(dev, dt, *shape(dev, (70, 41, 35, 6), (2100, 1000, 777, 13)), rank_scale="shared",
                 out_scale="shared", rank_mask=True)
    fwd, bwd = _routes(t, kw, p)
    assert fwd.fold and bwd.fold and bwd.fuse_da == (p > 0) and bwd.cublas == cublas
    check(t, kw, dropout_p=p)


def test_fold_in_banks_and_deterministic(env):
    """Per-row adapters through the fold-in plan (the same kernels take banks); deterministic mode
    (dA by the one-slice row reduction, no atomics across programs): the same bits twice."""
    dev, dt = env
    t, kw = make(dev, dt, *shape(dev, (80, 24, 20, 4), (2100, 520, 600, 16)), G=3, rank_scale="per_adapter",
                 out_scale="per_adapter")
    assert all(r.fold for r in _routes(t, kw, 0.2))
    check(t, kw, dropout_p=0.2)
    x = t["x"]
    keep = lorakern.triton.dropout_keep(5, *x.shape, 0.2, x.device)
    runs = [check_against_oracle(t, kw, backend="triton", dropout_p=0.2, seed=5, keep=keep,
                                 deterministic=True).outputs for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(runs[0].values(), runs[1].values()))


def test_base_scale_takes_the_fused_gemm(env):
    """cuBLAS's beta = 1 cannot scale the base product per column: with a base scale the large-M
    plan is the fused GEMM."""
    dev, dt = env
    t, kw = random_problem(*shape(dev, (70, 24, 20, 4), (2100, 520, 600, 16)), base_scale=True, scaling=0.5,
                           device=dev, dtype=dt)
    assert not any(r.fold for r in _routes(t, kw, 0.1))
    check(t, kw, dropout_p=0.1)


# --------------------------------------------------------------------------- banks


@pytest.mark.parametrize("scales", ["none", "per", "shared"])
@pytest.mark.parametrize("sort", [False, True])
def test_banks(env, monkeypatch, override, scales, sort):
    """sort: rows sorted by adapter, dropout on, g^T t by the row-reduction kernel; else rows in
    place (tiles with many adapters), no dropout, g^T t in the g-pass."""
    from lorakern.triton import grouping
    dev, dt = env
    monkeypatch.setattr(grouping, "SORT_MIN_ROWS", 0 if sort else 1 << 30)
    override("gpass", P_APART=sort)
    s = {"none": None, "per": "per_adapter", "shared": "shared"}[scales]
    t, kw = make(dev, dt, *shape(dev, (40, 24, 20, 4), (1000, 520, 600, 16)), G=5,
                 rank_scale=s, out_scale=s, rank_mask=scales == "per")
    out = check(t, kw, dropout_p=0.2 if sort else 0.0)
    assert (out["dlora_A"][-1] == 0).all() and (out["dlora_B"][-1] == 0).all(), "adapter with no rows"


def test_bank_views(env):
    """A and B as strided slices of bigger banks (VeRA / Tied-LoRA style), read in place."""
    dev, dt = env
    M, K, N, R, G = shape(dev, (23, 20, 18, 4, 3), (500, 384, 520, 8, 4))
    t, kw = make(dev, dt, M, K, N, R, G=G, out_scale="per_adapter")
    gen = torch.Generator().manual_seed(9)
    big = lambda *s: torch.randn(*s, generator=gen).to(device=dev, dtype=dt)  # noqa: E731
    t["lora_A"] = (big(2 * G, 2 * R, K) * K ** -0.5)[::2, 1::2]
    t["lora_B"] = (big(G, R, N) * R ** -0.5).transpose(1, 2)
    check(t, kw)


def _backend_args(t, kw, adapter_index=None, dropout_p=0.0, seed=0):
    """(Problem, Operands) as the op hands them to a backend (no mask); ``adapter_index`` replaces
    kw's unchecked (rows visited in a sorted order that treats any value outside [0, G) as -1)."""
    from lorakern.backends.interface import Operands, Problem

    sg = kw["scaling"].float() if isinstance(kw["scaling"], torch.Tensor) else None
    s = 1.0 if sg is not None else kw["scaling"]
    x, W, A = t["x"], t["weight"], t["lora_A"]
    idx = kw.get("adapter_index") if adapter_index is None else adapter_index
    order = None if idx is None else torch.argsort(torch.where((idx >= 0) & (idx < A.shape[0]), idx, -1), stable=True)
    R = A.shape[-2]
    pb = Problem(M=x.shape[0], K=x.shape[1], N=W.shape[0], R=R, Ra=R, G=A.shape[0] if A.dim() == 3 else 1,
                 banked=A.dim() == 3, scaling=s, dropout_p=dropout_p, seed=seed, deterministic=False)
    return pb, Operands(x, W, t["bias"], A, t["lora_B"], sg, t["rank_scale"], None, t["out_scale"], None, idx, order,
                        None)


def test_out_of_range_index_is_base_only(env):
    """An index outside [-1, G) (possible under graph capture, where values are not checked)
    reads as -1: the row gets the base only, and no memory outside the bank is touched."""
    dev, dt = env
    M, K, N, R, G = shape(dev, (19, 24, 20, 4, 3), (300, 256, 384, 8, 3))
    t, kw = make(dev, dt, M, K, N, R, G=G, rank_scale="per_adapter", out_scale="per_adapter")
    bad = kw["adapter_index"].clone()
    bad[1::4] = G + 7
    bad[2::4] = -(2 ** 40)
    clean = torch.where((bad >= 0) & (bad < G), bad, -1)
    with poisoned():
        y, q = lorakern.triton.forward(*_backend_args(t, kw, adapter_index=bad))
    y_ref = reference_lora_linear(*(t[k] for k in ("x", "weight", "bias", "lora_A", "lora_B")),
                                  rank_scale=t["rank_scale"], out_scale=t["out_scale"], scaling=kw["scaling"],
                                  adapter_index=clean)
    assert rel_err(y, y_ref) <= tolerance("triton", dev, dt)
    assert (q[clean < 0] == 0).all(), "rows without an adapter hold q = 0"


def test_needs_frozen(env):
    """Only the gradients asked for come back; each equals the one computed with all needs."""
    dev, dt = env
    M, K, N, R, G = shape(dev, (20, 24, 18, 4, 3), (300, 256, 384, 8, 3))
    t, kw = make(dev, dt, M, K, N, R, G=G, rank_scale="per_adapter", out_scale="per_adapter")
    from lorakern.backends.interface import Needs

    pb, op = _backend_args(t, kw)
    y, q = lorakern.triton.forward(pb, op)
    g = torch.randn_like(y)
    bw = lambda needs: lorakern.triton.backward(pb, op, g, q, Needs(*needs))  # noqa: E731
    with poisoned():
        full = bw((True,) * 7 + (False,))  # no base_scale
    for i in range(7):
        needs = tuple(j == i for j in range(8))
        with poisoned():
            one = bw(needs)
        assert all(o is None for j, o in enumerate(one) if j != i)
        # atomic adds may land in another order: equal up to a last-bit flip of the outputs' dtype
        assert rel_err(one[i], full[i].double()) < (1e-5 if dt == torch.float32 else 2e-3), i


# --------------------------------------------------------------------------- dropout mask


def test_dropout_keep_is_the_kernels_mask(env):
    """q returned by the forward is exactly (x * keep / (1 - p)) A^T with dropout_keep's mask,
    whichever kernel computes it (shrink, or inside the GEMM), for a seed beyond 32 bits too."""
    from lorakern.triton import configs
    dev, dt = env
    M, K, N, R = shape(dev, (18, 40, 16, 4), (300, 1000, 128, 16))
    t, kw = make(dev, dt, M, K, N, R)
    p = 0.4
    for seed in (3, 2 ** 40 + 5):
        keep = lorakern.triton.dropout_keep(seed, M, K, p, dev)
        assert keep.dtype == torch.bool and keep.shape == (M, K)
        assert abs(keep.float().mean().item() - (1 - p)) < 0.1
        assert torch.equal(keep, lorakern.triton.dropout_keep(seed, M, K, p, dev))
        q_ref = (t["x"].double() * keep / (1 - p)) @ t["lora_A"].double().T
        for fuse in (True, False):
            with configs.planning(fwd={"FUSE_Q": fuse}), poisoned():
                _, q = lorakern.triton.forward(*_backend_args({**t, "bias": None}, {"scaling": 1.0},
                                                              dropout_p=p, seed=seed))
            assert rel_err(q, q_ref) <= tolerance("triton", dev, dt), (seed, fuse)
    assert not torch.equal(lorakern.triton.dropout_keep(3, M, K, p, dev), lorakern.triton.dropout_keep(4, M, K, p, dev))


def test_dropout_stream_depends_on_row_col_and_K_only(env):
    """keep[row, col] is a function of (seed, row, col, K): the rows of a bigger mask with the same K."""
    dev, _ = env
    a = lorakern.triton.dropout_keep(17, 5, 24, 0.5, dev)
    b = lorakern.triton.dropout_keep(17, 9, 24, 0.5, dev)
    assert torch.equal(a, b[:5])


# --------------------------------------------------------------------------- bad input


def test_rejects_float64():
    from lorakern.backends.interface import Operands, Problem

    f64 = dict(dtype=torch.float64)
    x, W, A, B = torch.randn(3, 8, **f64), torch.randn(4, 8, **f64), torch.randn(2, 8, **f64), torch.randn(4, 2, **f64)
    assert not lorakern.triton.runs_on(x.device, x.dtype)
    pb = Problem(M=3, K=8, N=4, R=2, Ra=2, G=1, banked=False, scaling=1.0, dropout_p=0.0, seed=0, deterministic=False)
    with pytest.raises(TypeError, match="x: the triton backend takes"):
        lorakern.triton.forward(pb, Operands(x, W, None, A, B, *[None] * 8))
    ok, why = lorakern.triton.available()
    with pytest.raises(ValueError if ok else RuntimeError,
                       match="backend: .triton. cannot run torch.float64" if ok else re.escape(why)):
        lorakern.lora_linear(x, W, None, A, B, backend="triton")


def test_available_says_why():
    ok, why = lorakern.triton.available()
    assert ok == (HAS_CUDA or INTERPRET)
    assert ok or "CUDA" in why
