"""The public API on CPU: argument checks, gradcheck, opcheck, torch.compile, LoRALinear, AdapterBank."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import lorakern
from lorakern.ops import _bwd, _fwd
from lorakern.backends.portable import dropout_keep
from lorakern.batch import AdapterBatch
from lorakern.reference import reference_lora_linear
from lorakern.testing import random_problem, rel_err


def inputs(M=6, K=10, N=8, R=4, G=None, dtype=torch.float32):
    """(x, weight, bias, lora_A, lora_B) of ``lorakern.testing.random_problem``."""
    t, _ = random_problem(M, K, N, R, G=G, dtype=dtype)
    return t["x"], t["weight"], t["bias"], t["lora_A"], t["lora_B"]


# --------------------------------------------------------------------------- bad input

BAD = {
    "in_features": (lambda x, W, b, A, B: ((x[:, :9], W, b, A, B), {}), ValueError, "x: expected last dimension 10"),
    "A_in": (lambda x, W, b, A, B: ((x, W, b, A[:, :9], B), {}), ValueError, "lora_A: expected shape"),
    "B_rank": (lambda x, W, b, A, B: ((x, W, b, A, B[:, :3]), {}), ValueError, "lora_B: expected shape [8, 4]"),
    "B_out": (lambda x, W, b, A, B: ((x, W, b, A, B[:7]), {}), ValueError, "lora_B: expected shape"),
    "rank0": (lambda x, W, b, A, B: ((x, W, b, A[:0], B[:, :0]), {}), ValueError, "rank r >= 1"),
    "dtype": (lambda x, W, b, A, B: ((x, W.double(), b, A, B), {}), TypeError, "weight: expected dtype torch.float32"),
    "A_dtype": (lambda x, W, b, A, B: ((x, W, b, A.half(), B), {}), TypeError, "lora_A: expected dtype"),
    "bias_len": (lambda x, W, b, A, B: ((x, W, b[:5], A, B), {}), ValueError, "bias: expected shape [8], got [5]"),
    "rank_scale": (lambda x, W, b, A, B: ((x, W, b, A, B), {"rank_scale": torch.ones(3)}), ValueError,
                   "rank_scale: expected shape [4]"),
    "rank_mask": (lambda x, W, b, A, B: ((x, W, b, A, B), {"rank_mask": torch.ones(5, dtype=torch.bool)}),
                  ValueError, "rank_mask: expected shape [4]"),
    "rank_mask_dtype": (lambda x, W, b, A, B: ((x, W, b, A, B), {"rank_mask": torch.ones(4)}), TypeError,
                        "rank_mask: expected dtype torch.bool"),
    "out_scale": (lambda x, W, b, A, B: ((x, W, b, A, B), {"out_scale": torch.ones(9)}), ValueError,
                  "out_scale: expected shape [8]"),
    "base_scale": (lambda x, W, b, A, B: ((x, W, b, A, B), {"base_scale": torch.ones(2, 8)}), ValueError,
                   "base_scale: expected shape [8], got [2, 8]"),
    "base_scale_dtype": (lambda x, W, b, A, B: ((x, W, b, A, B), {"base_scale": torch.ones(8, dtype=torch.float64)}),
                         TypeError, "base_scale: expected dtype torch.float32"),
    "deterministic": (lambda x, W, b, A, B: ((x, W, b, A, B), {"deterministic": 1}), TypeError, "deterministic"),
    "dropout_hi": (lambda x, W, b, A, B: ((x, W, b, A, B), {"dropout_p": 1.0}), ValueError, "dropout_p"),
    "dropout_lo": (lambda x, W, b, A, B: ((x, W, b, A, B), {"dropout_p": -0.1}), ValueError, "dropout_p"),
    "int_x": (lambda x, W, b, A, B: ((x.long(), W, b, A, B), {}), TypeError, "x: expected a floating dtype"),
    "backend": (lambda x, W, b, A, B: ((x, W, b, A, B), {"backend": "cublas"}), ValueError, "backend: expected one of"),
    "index_without_bank": (lambda x, W, b, A, B: ((x, W, b, A, B), {"adapter_index": torch.zeros(6, dtype=torch.long)}),
                           ValueError, "adapter_index: given, so lora_A must be a bank"),
    "device": (lambda x, W, b, A, B: ((x, W.to("meta"), b, A, B), {}), ValueError, "weight: expected device cpu"),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_input_names_the_argument(name):
    make, exc, msg = BAD[name]
    args, kw = make(*inputs())
    with pytest.raises(exc) as e:
        lorakern.lora_linear(*args, **kw)
    assert msg in str(e.value), str(e.value)


@pytest.mark.parametrize("idx,msg", [
    (torch.tensor([0, 1, 2, 0, -1, 3]), "adapter_index: expected values in [-1, 3), got 3"),
    (torch.tensor([0, 1, -2, 0, -1, 1]), "got -2"),
    (torch.tensor([0, 1, 2]), "adapter_index: expected shape [6]"),
    (torch.tensor([0.0, 1, 2, 0, 1, 1]), "adapter_index: expected dtype int32 or int64"),
])
def test_bad_adapter_index(idx, msg):
    x, W, b, A, B = inputs(G=3)
    with pytest.raises((ValueError, TypeError)) as e:
        lorakern.lora_linear(x, W, b, A, B, adapter_index=idx)
    assert msg in str(e.value), str(e.value)


@pytest.mark.parametrize("inference", [False, True])
def test_prepared_batch_read_once_for_every_layer(monkeypatch, inference):
    """An AdapterBatch reads the index's values (a host sync on a GPU) once, when built, whatever
    the number of layers that take it; a plain tensor is read on every call, so an in-place change
    (also through .data or NumPy) is always seen, under inference_mode or not."""
    x, W, b, A, B = inputs(G=3)
    reads = []
    real = torch.Tensor.cpu
    monkeypatch.setattr(torch.Tensor, "cpu", lambda t, *a, **k: reads.append(1) or real(t, *a, **k))
    with torch.inference_mode(inference):
        idx = torch.tensor([0, 1, 2, 0, -1, 1])
        batch = lorakern.AdapterBatch(idx, num_adapters=3)
        for _ in range(4):
            lorakern.lora_linear(x, W, b, A, B, adapter_index=batch)
        assert len(reads) == 1
        for _ in range(4):
            lorakern.lora_linear(x, W, b, A, B, adapter_index=idx)
        assert len(reads) == 5
        idx.data[0] = 3
        with pytest.raises(ValueError, match=r"adapter_index: expected values in \[-1, 3\), got 3"):
            lorakern.lora_linear(x, W, b, A, B, adapter_index=idx)
        idx.numpy()[0] = -2
        with pytest.raises(ValueError, match=r"got -2"):
            lorakern.lora_linear(x, W, b, A, B, adapter_index=idx)
        lorakern.lora_linear(x, W, b, A, B, adapter_index=idx.clone().fill_(2))


def test_batch_for_another_bank_size():
    x, W, b, A, B = inputs(G=3)
    with pytest.raises(ValueError, match="adapter_index: an AdapterBatch for 2 adapters, but lora_A has 3"):
        lorakern.lora_linear(x, W, b, A, B, adapter_index=lorakern.AdapterBatch(torch.zeros(6, dtype=torch.long), 2))


def test_rank_mask_changed_in_place_is_seen():
    """No cache: a mask changed through .data or a NumPy view gives the new result on the next call."""
    x, W, b, A, B = inputs()
    m = torch.tensor([True, False, True, True])
    m.data[1] = True
    assert torch.allclose(lorakern.lora_linear(x, W, b, A, B, rank_mask=m), lorakern.lora_linear(x, W, b, A, B))
    m.numpy()[0] = False
    assert torch.allclose(lorakern.lora_linear(x, W, b, A, B, rank_mask=m),
                          lorakern.lora_linear(x, W, b, A, B, rank_mask=m.clone()))
    assert not torch.allclose(lorakern.lora_linear(x, W, b, A, B, rank_mask=m), lorakern.lora_linear(x, W, b, A, B))


def test_rank_mask_made_under_inference_mode():
    """Inference tensors keep no version counter: the mask is read on every call, in-place changes too."""
    x, W, b, A, B = inputs()
    m = torch.tensor([True, False, True, True])
    want = lorakern.lora_linear(x, W, b, A, B, rank_mask=m)
    with torch.inference_mode():
        mi = m.clone()
        assert torch.allclose(lorakern.lora_linear(x, W, b, A, B, rank_mask=mi), want)
        mi[0] = False
        assert torch.allclose(lorakern.lora_linear(x, W, b, A, B, rank_mask=mi),
                              lorakern.lora_linear(x, W, b, A, B, rank_mask=mi.clone()))
        assert not torch.allclose(lorakern.lora_linear(x, W, b, A, B, rank_mask=mi), want)


def test_bank_without_index():
    x, W, b, A, B = inputs(G=3)
    with pytest.raises(ValueError, match="adapter_index: required"):
        lorakern.lora_linear(x, W, b, A, B)


def test_scaling_per_adapter_shape():
    x, W, b, A, B = inputs(G=3)
    with pytest.raises(ValueError, match=r"scaling: expected a float or shape \[3\]"):
        lorakern.lora_linear(x, W, b, A, B, scaling=torch.ones(2), adapter_index=torch.zeros(6, dtype=torch.long))


def test_unavailable_backend_says_why():
    ok, why = lorakern.backend_status("cuda")
    if ok:
        pytest.skip("cuda backend available here")
    assert why.startswith("unavailable") and "\n" not in why
    with pytest.raises((RuntimeError, ValueError)):
        lorakern.lora_linear(*inputs(), backend="cuda")


# --------------------------------------------------------------------------- autograd and registration


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_gradcheck_float64(p):
    x, W, b, A, B = (t.requires_grad_() for t in inputs(M=5, K=6, N=4, R=3, dtype=torch.float64))
    u = torch.rand(3, dtype=torch.float64, requires_grad=True)
    v = torch.rand(4, dtype=torch.float64, requires_grad=True)
    m = torch.tensor([True, False, True])

    def f(x, W, b, A, B, u, v):
        return lorakern.lora_linear(x, W, b, A, B, scaling=0.7, rank_scale=u, rank_mask=m, out_scale=v,
                                    dropout_p=p, seed=42, backend="torch")

    assert torch.autograd.gradcheck(f, (x, W, b, A, B, u, v))


def test_gradcheck_banks():
    x, W, b, A, B = (t.requires_grad_() for t in inputs(M=7, K=5, N=4, R=2, G=3, dtype=torch.float64))
    idx = torch.tensor([0, 2, -1, 2, 0, 0, 2])
    s = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)
    f = lambda x, A, B: lorakern.lora_linear(x, W, b, A, B, scaling=s, adapter_index=idx, dropout_p=0.2,  # noqa
                                             seed=3, backend="torch")
    assert torch.autograd.gradcheck(f, (x, A, B))


def test_gradcheck_base_scale():
    x, W, b, A, B = (t.requires_grad_() for t in inputs(dtype=torch.float64))
    c, v = (torch.rand(8, dtype=torch.float64, requires_grad=True) + 0.5 for _ in range(2))
    f = lambda x, W, A, B, c, v: lorakern.lora_linear(x, W, b, A, B, scaling=0.5, base_scale=c, out_scale=v,  # noqa
                                                     dropout_p=0.2, seed=3, backend="torch")
    assert torch.autograd.gradcheck(f, (x, W, A, B, c, v))


def _op_args(requires_grad):
    x, W, b, A, B = inputs()
    c = torch.rand(8)
    for t in (x, A, B, c):
        t.requires_grad_(requires_grad)
    return (x, W, b, A, B, 0.5, None, torch.rand(4), None, torch.rand(8), 0.1, torch.tensor(9), None, None, None, c,
            "torch", False)


@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck_forward(requires_grad):
    torch.library.opcheck(_fwd, _op_args(requires_grad))


def test_opcheck_banked():
    x, W, b, A, B = inputs(G=3)
    A.requires_grad_()
    batch = AdapterBatch(torch.tensor([0, 2, -1, 1, 1, 0]), num_adapters=3)
    args = (x, W, b, A, B, 1.0, torch.rand(3), None, None, None, 0.0, None, batch.index, batch.order, batch.rows, None,
            "torch", True)
    torch.library.opcheck(_fwd, args)


def test_opcheck_backward():
    x, W, b, A, B = inputs()
    y, q = _fwd(x, W, b, A, B, 0.5, None, None, None, None, 0.1, torch.tensor(9), None, None, None, None, "torch",
                False)
    args = (torch.randn_like(y), x, W, A, B, 0.5, None, None, None, None, 0.1, torch.tensor(9), None, None, None, None, q,
            [True, False, True, True, True, False, False, False], "torch", False)
    torch.library.opcheck(_bwd, args)


def test_eager_path_matches_the_registered_op(monkeypatch):
    """lora_linear's eager path (no custom-op dispatcher) and the registered op give the same bits."""
    from lorakern import ops

    x, W, b, A, B = inputs(G=3)
    idx = torch.tensor([0, 2, -1, 1, 1, 0])
    c, v, s = torch.rand(8) + 0.5, torch.rand(3, 8), torch.rand(3)

    def run():
        leaves = [t.clone().requires_grad_() for t in (x, A, B, c, v)]
        y = lorakern.lora_linear(leaves[0], W, b, leaves[1], leaves[2], scaling=s, base_scale=leaves[3],
                                 out_scale=leaves[4], adapter_index=idx, dropout_p=0.3, seed=4, backend="torch")
        y.backward(torch.ones_like(y))
        return [y] + [t.grad for t in leaves]

    direct = run()
    monkeypatch.setattr(ops, "_PLAIN", ())  # every call through the registered op
    for a, r in zip(direct, run()):
        assert torch.equal(a, r)


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    model = nn.Sequential(lorakern.LoRALinear(16, 12, r=4, lora_dropout=0.1), nn.GELU(),
                          lorakern.LoRALinear(12, 8, r=4))
    nn.init.normal_(model[0].lora_B)
    nn.init.normal_(model[2].lora_B)
    x = torch.randn(5, 16)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    model.eval()
    y_eager = model(x)
    y_comp = compiled(x)
    torch.testing.assert_close(y_comp, y_eager)
    model.train()
    torch.manual_seed(1)
    out = compiled(x).sum()
    out.backward()
    assert model[0].lora_A.grad is not None and model[2].lora_B.grad is not None


def test_torch_compile_inductor_masked():
    torch._dynamo.reset()
    x, W, b, A, B = inputs()
    m = torch.tensor([True, False, True, True])
    f = lambda x: lorakern.lora_linear(x, W, b, A, B, rank_mask=m, scaling=0.5)  # noqa: E731
    torch.testing.assert_close(torch.compile(f, fullgraph=True)(x), f(x))


def test_autocast_casts_to_the_autocast_dtype():
    x, W, b, A, B = inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lorakern.lora_linear(x, W, b, A, B)
    assert y.dtype == torch.bfloat16
    ref = reference_lora_linear(x, W, b, A, B)
    assert rel_err(y, ref) < 2e-2


def test_dropout_keep_rate():
    keep = dropout_keep(3, 200, 300, 0.25, "cpu")
    assert abs(keep.float().mean().item() - 0.75) < 0.01


def test_empty_mask_is_the_base():
    x, W, b, A, B = inputs()
    y = lorakern.lora_linear(x, W, b, A, B, rank_mask=torch.zeros(4, dtype=torch.bool))
    torch.testing.assert_close(y, nn.functional.linear(x, W, b))


def test_mask_compaction_follows_in_place_updates():
    x, W, b, A, B = inputs()
    m = torch.tensor([True, True, False, True])
    y1 = lorakern.lora_linear(x, W, b, A, B, rank_mask=m)
    m[1] = False  # in place: the cached compaction must not be reused
    y2 = lorakern.lora_linear(x, W, b, A, B, rank_mask=m)
    torch.testing.assert_close(y2, reference_lora_linear(x, W, b, A, B, rank_mask=m).float())
    assert not torch.allclose(y1, y2)


# --------------------------------------------------------------------------- LoRALinear and AdapterBank


def test_loralinear_init_like_peft():
    torch.manual_seed(0)
    layer = lorakern.LoRALinear(64, 32, r=8, lora_alpha=16)
    assert layer.scaling == 2.0 and torch.count_nonzero(layer.lora_B) == 0
    bound = 1 / math.sqrt(64)  # kaiming_uniform(a=sqrt 5) on [r, in]
    assert layer.lora_A.abs().max() <= bound and layer.lora_A.std() > bound / 4
    assert not layer.weight.requires_grad and layer.lora_A.requires_grad
    assert lorakern.LoRALinear(64, 32, r=16, lora_alpha=8, use_rslora=True).scaling == pytest.approx(2.0)
    g = lorakern.LoRALinear(640, 32, r=4, init_lora_weights="gaussian")
    assert g.lora_A.std().item() == pytest.approx(0.25, rel=0.1)


def test_loralinear_matches_oracle_and_loads_linear_state():
    lin = nn.Linear(20, 12)
    layer = lorakern.LoRALinear(20, 12, r=4, lora_alpha=8)
    missing, unexpected = layer.load_state_dict(lin.state_dict(), strict=False)
    assert set(missing) == {"lora_A", "lora_B"} and not unexpected
    nn.init.normal_(layer.lora_B)
    x = torch.randn(3, 7, 20)
    ref = reference_lora_linear(x, layer.weight, layer.bias, layer.lora_A, layer.lora_B, scaling=2.0)
    torch.testing.assert_close(layer(x).double(), ref, rtol=1e-5, atol=1e-5)


def test_from_linear_shares_weight():
    lin = nn.Linear(20, 12)
    layer = lorakern.LoRALinear.from_linear(lin, r=4, lora_alpha=4)
    assert layer.weight is lin.weight and layer.bias is lin.bias
    torch.testing.assert_close(layer(torch.ones(2, 20)), lin(torch.ones(2, 20)))  # B = 0 at init
    with pytest.raises(TypeError, match="linear: expected an nn.Linear"):
        lorakern.LoRALinear.from_linear(nn.Conv1d(2, 2, 1))


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4"])
def test_loralinear_pissa_like_peft(init):
    """PEFT's init_lora_weights="pissa" / "pissa_niter_[n]" on LoRALinear and from_linear: the output
    is unchanged, A and B hold the principal factors (B A spans W's top-r singular subspace)."""
    torch.manual_seed(0)
    lin = nn.Linear(24, 16)
    x = torch.randn(5, 24)
    y0 = lin(x).detach()
    W0 = lin.weight.detach().clone()
    layer = lorakern.LoRALinear.from_linear(lin, r=4, lora_alpha=8, init_lora_weights=init)
    assert layer.weight is lin.weight
    torch.testing.assert_close(layer(x), y0, rtol=1e-5, atol=1e-5)
    top = torch.linalg.svdvals(W0)[:4]  # a randomized SVD (niter) approximates them on a flat spectrum
    torch.testing.assert_close(torch.linalg.svdvals(layer.scaling * layer.lora_B @ layer.lora_A)[:4], top,
                               rtol=1e-3 if init == "pissa" else 0.1, atol=1e-4)
    direct = lorakern.LoRALinear(24, 16, r=4, init_lora_weights=init)
    assert direct.lora_B.abs().sum() > 0
    with pytest.raises(ValueError, match=r"r: expected at most min\(in_features, out_features\) = 16"):
        lorakern.LoRALinear(24, 16, r=20, init_lora_weights=init)


def test_merge_unmerge_round_trip():
    layer = lorakern.LoRALinear(20, 12, r=4, lora_alpha=8)
    nn.init.normal_(layer.lora_B)
    x = torch.randn(5, 20)
    y = layer(x)
    w0 = layer.weight.detach().clone()
    layer.merge()
    assert layer.merged
    torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-5)
    layer.unmerge()
    assert not layer.merged
    torch.testing.assert_close(layer.weight, w0, rtol=0, atol=1e-6)
    torch.testing.assert_close(layer(x), y)


def test_state_dict_round_trip():
    a = lorakern.LoRALinear(20, 12, r=4)
    nn.init.normal_(a.lora_B)
    b = lorakern.LoRALinear(20, 12, r=4)
    b.load_state_dict(a.state_dict())
    x = torch.randn(4, 20)
    assert torch.equal(a(x), b(x))


def test_loralinear_bad_args():
    with pytest.raises(ValueError, match="r: expected an int >= 1"):
        lorakern.LoRALinear(4, 4, r=0)
    with pytest.raises(ValueError, match="lora_dropout"):
        lorakern.LoRALinear(4, 4, lora_dropout=1.5)
    with pytest.raises(ValueError, match="init_lora_weights: expected True, False, 'gaussian', 'pissa'"):
        lorakern.LoRALinear(4, 4, init_lora_weights="olora")
    assert "r=8" in repr(lorakern.LoRALinear(4, 4))


def test_adapter_bank_rows():
    from lorakern.modules import AdapterBank

    base = nn.Linear(16, 8)
    bank = AdapterBank(base, num_adapters=3, r=4, lora_alpha=8)
    nn.init.normal_(bank.lora_B)
    x = torch.randn(2, 3, 16)
    idx = torch.tensor([[0, 2, -1], [1, 1, 0]])
    y = bank(x, idx)
    ref = reference_lora_linear(x.reshape(6, 16), base.weight, base.bias, bank.lora_A, bank.lora_B,
                                scaling=bank.scaling, adapter_index=idx.reshape(-1))
    torch.testing.assert_close(y.reshape(6, 8).double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_base_scale_one_gives_linear_bits(backend):
    """DoRA right after initialisation (B = 0, ratio c = 1) is the base layer bit for bit, as in
    PEFT (whose own test_lora_use_dora_linear checks it with allclose on a biased 1000 x 1000)."""
    if not lorakern.backend_status(backend)[0]:
        pytest.skip(f"backend {backend} {lorakern.backend_status(backend)[1]}")
    gen = torch.Generator().manual_seed(0)
    x, W, b = torch.rand(10, 1000, generator=gen), torch.randn(1000, 1000, generator=gen) / 30, torch.randn(1000) / 30
    A, B, one = torch.randn(8, 1000, generator=gen), torch.zeros(1000, 8), torch.ones(1000)
    y = lorakern.lora_linear(x, W, b, A, B, base_scale=one, out_scale=one, backend=backend)
    assert torch.equal(y, torch.nn.functional.linear(x, W, b))
