"""Mixed precision (fp32 adapters beside a bf16 / fp16 x and W) and bases the op cannot compute
(``lorakern.lora_update`` over a base layer's output): the op against PEFT's own arithmetic.

Default tier: the torch backend on CPU in bf16 + fp32 adapters. ``interpret`` tier: the triton
backend under TRITON_INTERPRET=1 in fp16 + fp32 adapters (the interpreter has no bf16).
"""
from __future__ import annotations

import pytest
import torch

import lorakern
from lorakern.testing import rel_err

HALF_TOL = 2e-2  # bf16 / fp16 outputs and the gradients that flow through them


def _leaves(*ts):
    return [t.detach().clone().requires_grad_(t.requires_grad) for t in ts]


def _inputs(dtype, M=24, K=40, N=36, R=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g).to(dtype).requires_grad_()
    W = (torch.randn(N, K, generator=g) / K ** 0.5).to(dtype)
    A = (torch.randn(R, K, generator=g) / K ** 0.5).requires_grad_()  # fp32: PEFT's default
    B = torch.randn(N, R, generator=g).requires_grad_()
    u = (torch.rand(R, generator=g) + 0.5).requires_grad_()
    v = (torch.rand(N, generator=g) + 0.5).requires_grad_()
    return x, W, A, B, u, v


def _peft_chain(x, W, A, B, u, v, s):
    """PEFT's arithmetic: base in x's dtype, the adapter branch in fp32, added, cast to x's dtype."""
    base = x @ W.T
    return (base + ((x.to(A.dtype) @ A.T) * u * s) @ (B * v[:, None]).T).to(x.dtype)


def _compare(y, ys, leaves, ref_leaves, tol=HALF_TOL):
    assert y.dtype == ys.dtype
    assert rel_err(y.float(), ys.float()) < tol
    g = torch.randn_like(ys)
    y.backward(g)
    ys.backward(g)
    for a, b in zip(leaves, ref_leaves):
        assert a.grad.dtype == a.dtype, "fp32 adapters get fp32 gradients"
        assert rel_err(a.grad.float(), b.grad.float()) < tol


@pytest.mark.parametrize("backend,dtype,device", [
    pytest.param("torch", torch.bfloat16, "cpu", id="torch-bf16"),
    pytest.param("torch", torch.float16, "cpu", id="torch-fp16"),
    pytest.param("triton", torch.float16, "cpu", id="triton-interp-fp16", marks=pytest.mark.interpret),
    # on a GPU: the triton backend's fold-in plan in bf16 and fp16 (run by bench/gpu_run.sh quick)
    pytest.param("triton", torch.bfloat16, "cuda", id="triton-gpu-bf16", marks=pytest.mark.gpu),
    pytest.param("triton", torch.float16, "cuda", id="triton-gpu-fp16", marks=pytest.mark.gpu),
])
def test_fp32_adapters_beside_half_x_match_peft(backend, dtype, device):
    x, W, A, B, u, v = (t.detach().to(device).requires_grad_(t.requires_grad) for t in _inputs(dtype))
    ref = _leaves(x, A, B, u, v)
    y = lorakern.lora_linear(x, W, None, A, B, scaling=0.5, rank_scale=u, out_scale=v, backend=backend)
    ys = _peft_chain(ref[0], W, *ref[1:], 0.5)
    _compare(y, ys, (x, A, B, u, v), ref)


@pytest.mark.interpret
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("bank", [False, True], ids=["one", "bank"])
@pytest.mark.parametrize("M", [9, 70], ids=["small-M", "large-M"])
def test_triton_fp32_adapters_compute_in_fp32(p, bank, M):
    """The triton backend with fp32 adapters beside fp16 x and W (the interpreter has no bf16): the
    fold-in plan at every M, every adapter product in fp32 (x and g widened in registers, never
    rounded to fp16), as PEFT. The adapters' fp32 gradients match the float64 oracle to fp32
    accuracy (rounding A and B to fp16 first, as the kernels did until now, misses by ~5e-4);
    y and dx (fp16) within the half-precision tolerance."""
    import lorakern.triton
    from lorakern.testing import check_against_oracle, random_problem

    t, kw = random_problem(M, 40, 36, 6, G=3 if bank else None, rank_scale="shared", out_scale="shared",
                           rank_mask="shared", scaling=None if bank else 0.5, dtype=torch.float16)
    wide, _ = random_problem(M, 40, 36, 6, G=3 if bank else None, rank_scale="shared", out_scale="shared", seed=1)
    t.update({k: wide[k] for k in ("lora_A", "lora_B", "rank_scale", "out_scale")})
    keep = lorakern.triton.dropout_keep(3, M, 40, p, "cpu") if p else None
    r = check_against_oracle(t, kw, backend="triton", dropout_p=p, seed=3, keep=keep)
    for name in ("dlora_A", "dlora_B", "drank_scale", "dout_scale"):
        assert r.outputs[name].dtype == torch.float32, name
        assert r.errors[name] < 2e-5, (name, r.errors[name])


def test_fp32_adapter_banks_beside_bf16_x():
    x, W, A, B, _, _ = _inputs(torch.bfloat16)
    A2, B2 = (torch.stack([t, t.flip(0)]).detach().requires_grad_() for t in (A, B))
    idx = torch.arange(x.shape[0]) % 3 - 1  # -1, 0, 1, ...
    y = lorakern.lora_linear(x, W, None, A2, B2, scaling=0.5, adapter_index=idx)
    ref = (x @ W.T).float()
    for gi in range(2):
        rows = idx == gi
        ref[rows] += 0.5 * (x[rows].float() @ A2[gi].T) @ B2[gi].T
    assert rel_err(y.float(), ref) < HALF_TOL
    y.sum().backward()
    assert A2.grad.dtype == torch.float32 and B2.grad.dtype == torch.float32


@pytest.mark.parametrize("args,match", [
    (dict(A=torch.float64, B=torch.float64),
     r"lora_A: expected dtype torch.bfloat16 or torch.float32 .* got torch.float64"),
    (dict(A=torch.float32, B=torch.bfloat16),
     r"lora_B: expected dtype torch.float32 \(that of lora_A\), got torch.bfloat16"),
    (dict(A=torch.float32, B=torch.float32, u=torch.float16), r"rank_scale: expected dtype .*, got torch.float16"),
])
def test_bad_adapter_dtypes_name_the_argument(args, match):
    x, W, A, B, u, _ = _inputs(torch.bfloat16)
    u = u.to(args["u"]) if "u" in args else None
    with pytest.raises(TypeError, match=match):
        lorakern.lora_linear(x, W, None, A.to(args["A"]), B.to(args["B"]), rank_scale=u)


def test_fp32_x_keeps_one_dtype():
    x, W, A, B, _, _ = _inputs(torch.float32)
    with pytest.raises(TypeError, match=r"lora_A: expected dtype torch.float32 .* got torch.bfloat16"):
        lorakern.lora_linear(x, W, None, A.bfloat16(), B.bfloat16())


# --------------------------------------------------------------------------- cuda backend (gpu)

# M, K, N, R, G, options. The paths: the decode kernel (M <= 4), cuBLAS's base product plus the
# expand kernel (M > 4, or base_scale), 16-byte and scalar loads of fp32 A in the shrink (K a
# multiple of 8 or not; strided views), two rank passes (R > 16), dropout, masks, banks, and
# half-precision rank_scale / out_scale beside fp32 A and B ("half_scales").
CUDA_MIXED = [
    (3, 64, 48, 8, 0, dict(rank_scale="shared", out_scale="shared")),
    (3, 64, 48, 8, 0, dict(base_scale=True, out_scale="shared")),
    (37, 136, 72, 6, 0, dict(rank_scale="shared", out_scale="shared")),
    (37, 131, 72, 6, 0, dict(bias=False, rank_scale="shared", rank_mask="shared")),
    (64, 96, 80, 20, 0, dict(out_scale="shared", dropout=0.2)),
    (130, 128, 64, 8, 0, dict(strided=True, rank_scale="shared", dropout=0.1)),
    (29, 64, 56, 5, 0, dict(rank_scale="shared", out_scale="shared", half_scales=True)),
    (41, 72, 40, 6, 3, dict(rank_scale="per_adapter", out_scale="per_adapter", per_adapter_scaling=True)),
    (97, 80, 33, 17, 4, dict(rank_scale="shared", out_scale="per_adapter", rank_mask="per_adapter",
                             per_adapter_scaling=True, dropout=0.15)),
]


def _cuda_mixed_problem(M, K, N, R, G, dtype, *, strided=False, half_scales=False, per_adapter_scaling=False,
                        seed=0, **opts):
    """``random_problem`` on the GPU with x, W, bias, base_scale in ``dtype`` and lora_A, lora_B (and,
    unless ``half_scales``, rank_scale and out_scale) drawn in fp32: values a half-precision dtype
    cannot hold, so a kernel that rounds them shows it. ``strided``: x, W, A every other column of a
    wider tensor, B column-major."""
    from lorakern.testing import random_problem, strided_copy

    common = dict(G=G or None, idle_adapter=False, scaling=None if per_adapter_scaling else 0.7, device="cuda", **opts)
    t, kw = random_problem(M, K, N, R, dtype=dtype, seed=seed, **common)
    wide, _ = random_problem(M, K, N, R, dtype=torch.float32, seed=seed + 1, **common)
    t.update({k: wide[k] for k in ("lora_A", "lora_B") + (() if half_scales else ("rank_scale", "out_scale"))})
    if strided:
        layouts = dict(x="columns", weight="columns", lora_A="columns", lora_B="column_major")
        t.update({k: strided_copy(t[k], layout) for k, layout in layouts.items()})
    return t, kw


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("cfg", CUDA_MIXED, ids=lambda c: f"M{c[0]}K{c[1]}N{c[2]}R{c[3]}G{c[4]}")
def test_cuda_fp32_adapters_compute_in_fp32(cfg, dtype):
    """The cuda backend with fp32 adapters beside a half-precision x and W (PEFT's default precision):
    the base product in x's dtype, the adapter branch in fp32, one rounding to x's dtype.

    Against the float64 oracle: the fp32 gradients (dA, dB, and du / dv when fp32) within 2e-5
    (the torch backend on a CPU: ~2e-7 on these problems; with A and B rounded to x's dtype first,
    as this backend did until now: 4e-4 in fp16, 4e-3 in bf16); y and dx within the half-precision
    tolerance. Without dropout, against the torch backend (PEFT's
    arithmetic) on the same inputs: no output or gradient further from the oracle than its.
    Written without a GPU: not yet run."""
    from lorakern import cuda
    from lorakern.testing import check_against_oracle

    M, K, N, R, G, opt = cfg
    opt = dict(opt)
    p = opt.pop("dropout", 0.0)
    t, kw = _cuda_mixed_problem(M, K, N, R, G, dtype, seed=M * 1000 + K, **opt)
    keep = cuda.dropout_keep(5, M, K, p, "cuda") if p else None
    got = check_against_oracle(t, kw, backend="cuda", dropout_p=p, seed=5, keep=keep, rss=True)
    for name in ("dlora_A", "dlora_B", "drank_scale", "dout_scale"):
        if name in got.outputs and t[name[1:]].dtype == torch.float32:
            assert got.outputs[name].dtype == torch.float32, name
            assert got.errors[name] < 2e-5, (name, got.errors[name])
    if p == 0:
        peft_like = check_against_oracle(t, kw, backend="torch", rss=True)
        for name, e in got.errors.items():
            assert e <= 1.5 * peft_like.errors[name] + 2e-5, (name, e, peft_like.errors[name])


# --------------------------------------------------------------------------- lora_update


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_lora_update_equals_lora_linear(p):
    x, W, A, B, u, _ = _inputs(torch.bfloat16)
    x = x.detach().reshape(2, 12, -1).requires_grad_()
    ref = _leaves(x, A, B, u)
    y = lorakern.lora_linear(ref[0], W, None, *ref[1:3], rank_scale=ref[3], scaling=0.5, dropout_p=p, seed=7,
                             backend="torch")
    base = x @ W.T
    out = lorakern.lora_update(x, base, A, B, rank_scale=u, scaling=0.5, dropout_p=p, seed=7)
    assert out is base, "added in place"
    assert rel_err(out.float(), y.float()) < 1e-2
    g = torch.randn_like(y)
    out.backward(g)
    y.backward(g)
    for a, b in zip((x, A, B, u), ref):
        assert a.grad.dtype == a.dtype
        assert rel_err(a.grad.float(), b.grad.float()) < HALF_TOL


def test_lora_update_saves_nothing_m_by_k_of_its_own():
    x, W, A, B, _, _ = _inputs(torch.bfloat16, M=64, K=64, N=64)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        base = x @ W.T  # saves x (and W)
        lorakern.lora_update(x, base, A, B, dropout_p=0.1)
    big = {t.data_ptr() for t in saved if t.numel() >= x.numel()}
    assert big <= {x.data_ptr(), W.data_ptr()}, "only the base layer's own x and W are M x K"


@pytest.mark.parametrize("kw,err,match", [
    (dict(base_output=torch.zeros(24, 36, dtype=torch.float32)), TypeError,
     "base_output: expected dtype torch.bfloat16"),
    (dict(base_output=torch.zeros(23, 36, dtype=torch.bfloat16)), ValueError, "base_output: expected shape"),
    (dict(base_output=torch.zeros(36, 24, dtype=torch.bfloat16).T), ValueError, "base_output: expected a contiguous"),
    (dict(dropout_p=1.0), ValueError, "dropout_p"),
])
def test_lora_update_bad_input(kw, err, match):
    x, W, A, B, _, _ = _inputs(torch.bfloat16)
    args = {"base_output": (x @ W.T).detach(), "dropout_p": 0.0, **kw}
    with pytest.raises(err, match=match):
        lorakern.lora_update(x, args.pop("base_output"), A, B, **args)


# --------------------------------------------------------------------------- PEFT: default precision, quantized bases

peft = pytest.importorskip("peft")
pytest.importorskip("transformers")

import copy  # noqa: E402

from peft import LoraConfig, get_peft_model  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

import lorakern.peft as lkpeft  # noqa: E402
from conftest import tiny_llama  # noqa: E402

SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# out-features multiples of 32: bitsandbytes' CPU 4-bit kernel asks for it
LLAMA = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, max_position_embeddings=64)
HALVES = [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float16, id="fp16")]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class Int4Linear(nn.Linear):
    """A stand-in for a quantized base (bitsandbytes ``Linear4bit``): int4 codes with one absmax
    scale per row, dequantized then multiplied. An ``nn.Linear`` subclass with its own forward, so
    PEFT wraps it in ``lora.Linear`` and the op cannot compute it."""

    def __init__(self, linear: nn.Linear) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w = linear.weight.detach().float()
        scale = w.abs().amax(1, keepdim=True) / 7
        self.weight = nn.Parameter(torch.round(w / scale).clamp(-7, 7).to(torch.int8), requires_grad=False)
        self.register_buffer("scale", scale.to(linear.weight.dtype))
        self.bias = None

    def forward(self, x):
        return F.linear(x, self.weight.to(x.dtype) * self.scale.to(x.dtype))


def _bnb_nf4(lin: nn.Linear) -> nn.Module:
    """bitsandbytes' ``Linear4bit`` (NF4, quantized on the CPU), the QLoRA base."""
    bnb = pytest.importorskip("bitsandbytes")
    q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=False, compute_dtype=lin.weight.dtype,
                          quant_type="nf4")
    q.weight = bnb.nn.Params4bit(lin.weight.data, requires_grad=False, quant_type="nf4")
    return q.to(lin.weight.device)


def _bnb_int8(lin: nn.Linear) -> nn.Module:
    """bitsandbytes' ``Linear8bitLt`` (LLM.int8 weights, no outlier threshold), quantized on the CPU."""
    bnb = pytest.importorskip("bitsandbytes")
    q = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=False, has_fp16_weights=False, threshold=0.0)
    q.weight = bnb.nn.Int8Params(lin.weight.data, requires_grad=False, has_fp16_weights=False)
    return q.to(lin.weight.device)


QUANTIZED = {"int4": Int4Linear, "bnb-nf4": _bnb_nf4, "bnb-int8": _bnb_int8}
BASES = [pytest.param(None, id="linear"), pytest.param("int4", id="int4-stand-in"),
         pytest.param("bnb-nf4", id="bnb-nf4"), pytest.param("bnb-int8", id="bnb-int8")]


def _quantize(model: nn.Module, kind: str) -> nn.Module:
    for name, m in list(model.named_modules()):
        for child, lin in list(m.named_children()):
            if child in SEVEN and type(lin) is nn.Linear:
                setattr(m, child, QUANTIZED[kind](lin))
    return model


def llama(dtype, dropout=0.0, quantized=None):
    base = tiny_llama(0, **LLAMA).to(dtype)
    if quantized:
        base = _quantize(base, quantized)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=SEVEN, init_lora_weights=False,
                                            lora_dropout=dropout))
    A = model.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight
    assert A.dtype == torch.float32, "PEFT's default: fp32 adapters beside the half-precision base"
    return model


def ids(seed, batch=2, seq=12):
    return torch.randint(0, 256, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _loss(model, x):
    return model(input_ids=x, labels=x).loss


def _lora_grads(model):
    return {n: p.grad for n, p in model.named_parameters() if "lora_" in n}


@pytest.mark.parametrize("dtype", HALVES)
@pytest.mark.parametrize("quantized", BASES)
def test_default_precision_fuses_every_call(dtype, quantized, caplog):
    model = llama(dtype, dropout=0.05, quantized=quantized)
    with caplog.at_level("INFO", logger="lorakern.peft"):
        assert lkpeft.patch(model) == 14
    assert "14 LoRA layers: 14 fused" in caplog.text
    model.train()
    _loss(model, ids(0)).backward()
    model.eval()
    with torch.no_grad():
        model(input_ids=ids(1))
    rep = lkpeft.report(model)
    assert rep.fused == 14 and rep.fallbacks() == 0, str(rep)
    assert rep.calls[lkpeft.patching.FUSED] == {"train": 14, "eval": 14}


@pytest.mark.parametrize("dtype", HALVES)
@pytest.mark.parametrize("quantized", BASES)
def test_default_precision_matches_stock_peft(dtype, quantized):
    stock = llama(dtype, quantized=quantized)
    patched = copy.deepcopy(stock)
    lkpeft.patch(patched)
    x = ids(2)
    with torch.no_grad():
        assert rel_err(patched(input_ids=x).logits.float(), stock(input_ids=x).logits.float()) < HALF_TOL
    opts = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2) for m in (stock, patched)]
    for step in range(3):
        losses = []
        for m, opt in zip((stock, patched), opts):
            opt.zero_grad()
            loss = _loss(m, ids(10 + step))
            loss.backward()
            losses.append(loss.item())
        assert abs(losses[0] - losses[1]) < HALF_TOL * abs(losses[0]), (step, losses)
        if step == 0:
            gs, gp = _lora_grads(stock), _lora_grads(patched)
            assert len(gs) == 28
            for n in gs:
                assert gp[n].dtype == torch.float32
                assert rel_err(gp[n], gs[n]) < 2 * HALF_TOL, n  # gradients: twice the output bound
        for opt in opts:
            opt.step()
    assert lkpeft.report(patched).fallbacks() == 0


def _saved_bytes(model, x) -> int:
    """Bytes of the distinct tensors autograd saves for one training forward."""
    seen = {}

    def pack(t):
        seen[t.data_ptr()] = t.nbytes
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _loss(model, x)
    return sum(seen.values())


@pytest.mark.parametrize("quantized", BASES[1:])
def test_quantized_base_saves_less_than_peft_with_dropout(quantized):
    stock = llama(torch.bfloat16, dropout=0.05, quantized=quantized)
    patched = copy.deepcopy(stock)
    lkpeft.patch(patched)
    x = ids(3, batch=4, seq=32)
    fused, peft_saved = _saved_bytes(patched, x), _saved_bytes(stock, x)
    assert fused < peft_saved * 0.9, (fused, peft_saved)
    assert lkpeft.report(patched).fallbacks() == 0


def test_peft_bnb_layer_class_is_patched_and_fused():
    """PEFT's own QLoRA layer (``lora.bnb.Linear4bit``, which get_peft_model picks where bitsandbytes
    has a GPU) is patched too, and its fallback is its own forward."""
    pytest.importorskip("bitsandbytes")
    from peft.tuners.lora import bnb as peft_bnb

    if not hasattr(peft_bnb, "Linear4bit"):
        pytest.skip("peft has no lora.bnb.Linear4bit here")
    torch.manual_seed(0)
    base = _bnb_nf4(nn.Linear(64, 96, bias=False).to(torch.bfloat16))
    stock = peft_bnb.Linear4bit(base, "default", LoraConfig(r=4, lora_alpha=8), r=4, lora_alpha=8,
                                init_lora_weights=False)
    model = nn.Sequential(copy.deepcopy(stock))
    assert lkpeft.patch(model) == 1
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    assert rel_err(model(x).float(), stock(x).float()) < HALF_TOL
    model[0].merged_adapters.append("default")  # merged: PEFT's own forward (the base alone)
    assert rel_err(model(x).float(), base(x).float()) == 0
    rep = lkpeft.report(model)
    assert rep.calls[lkpeft.patching.FUSED]["train"] == 1 and rep.fallbacks() == 1
