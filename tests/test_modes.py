"""The op and patched PEFT layers behave like ``nn.Linear`` / stock PEFT under PyTorch's modes and
transforms (issue 19): double backward and forward-mode AD, torch.func, autocast, the meta device,
inference_mode, no_grad, checkpointing, torch.compile (tensor scalings, enable/disable),
jit.trace + save, torch.export, replication, copies, pickling and ``del``.

Tiny float64 shapes on CPU; torch.compile runs with a recording backend (no inductor).
"""
from __future__ import annotations

import copy
import gc
import io
import pickle
import weakref

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch import nn
from torch.autograd import gradcheck, gradgradcheck
from torch.utils.checkpoint import checkpoint

import lorakern
from lorakern import ops
from lorakern.modules import AdapterBank, LoRALinear
from lorakern.reference import reference_lora_linear

peft = pytest.importorskip("peft")
pytest.importorskip("transformers")

from peft import LoraConfig, get_peft_model  # noqa: E402

import lorakern.peft as lkpeft  # noqa: E402
from conftest import tiny_llama  # noqa: E402

F64 = torch.float64


def leaves(*shapes, dtype=F64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=g, dtype=dtype).requires_grad_() for s in shapes]


# (lora_linear keywords, extra differentiable tensors) for the op's variants
def variant(name):
    x, W, b, A, B = leaves((5, 6), (3, 6), (3,), (2, 6), (3, 2))
    kw, extra = {"scaling": 2.0}, []
    if name == "scales":  # u, v, c
        u, v, c = leaves((2,), (3,), (3,), seed=1)
        kw.update(rank_scale=u, out_scale=v, base_scale=c)
        extra = [u, v, c]
    elif name == "mask":
        kw.update(rank_mask=torch.tensor([True, False]))
    elif name == "dropout":
        kw.update(dropout_p=0.4, seed=7)
    elif name == "banks":
        A, B = leaves((3, 2, 6), (3, 3, 2), seed=2)
        kw.update(scaling=torch.tensor([1.0, 2.0, 0.5], dtype=F64), adapter_index=torch.tensor([0, 2, -1, 1, 2]))
    elif name == "tensor-scaling":
        kw.update(scaling=torch.tensor(1.5, dtype=F64))
    return [x, W, b, A, B, *extra], kw


VARIANTS = ["plain", "scales", "mask", "dropout", "banks", "tensor-scaling"]
EXTRA = ("rank_scale", "out_scale", "base_scale")


def call(fn, kw):
    """f(x, W, b, A, B, *extra) -> y with ``kw``'s tensors replaced by the positional extras."""
    names = [k for k in EXTRA if k in kw]

    def f(x, W, b, A, B, *extra):
        return fn(x, W, b, A, B, **{**kw, **dict(zip(names, extra))})
    return f


def oracle_kw(kw, x, backend="torch"):
    """The reference's keywords for the op's ``kw``: ``backend``'s dropout mask in place of the seed."""
    kw = dict(kw)
    if kw.get("dropout_p"):
        keep = ops.backends.get(backend).dropout_keep(kw.pop("seed"), x.shape[0], x.shape[1], kw["dropout_p"],
                                                      x.device)
        kw["keep"] = keep
    return kw


@pytest.fixture(params=["direct", "registered"])
def path(request, monkeypatch):
    """The eager autograd.Function, or the registered custom op (what torch.compile runs)."""
    if request.param == "registered":
        monkeypatch.setattr(ops, "_PLAIN", ())
    return request.param


# --------------------------------------------------------------------------- 1. second order, forward mode


@pytest.mark.parametrize("name", VARIANTS)
def test_gradgradcheck(name, path):
    tensors, kw = variant(name)
    kw["backend"] = "torch"
    f = call(lorakern.lora_linear, kw)
    assert gradcheck(f, tensors)
    assert gradgradcheck(f, tensors)


def test_double_backward_of_the_auto_backend_in_float32():
    """Whatever backend ran forward ("auto": the native one where built), create_graph=True gives the
    exact second derivative, in float32."""
    tensors, kw = variant("dropout")
    kw["backend"] = "auto"
    f32 = [t.detach().float().requires_grad_() for t in tensors]
    y = call(lorakern.lora_linear, kw)(*f32)
    g = torch.autograd.grad(y.square().sum(), f32, create_graph=True)
    hv = torch.autograd.grad(sum(gi.sum() for gi in g), f32)
    name = ops.resolve_backend("auto", f32[0], 5, 6, 3, 2)
    ref = call(reference_lora_linear, oracle_kw({k: v for k, v in kw.items() if k != "backend"}, f32[0], name))
    yr = ref(*f32)
    gr = torch.autograd.grad(yr.square().sum(), f32, create_graph=True)
    hr = torch.autograd.grad(sum(gi.sum() for gi in gr), f32)
    for a, b in zip(hv, hr):
        torch.testing.assert_close(a, b.float(), rtol=1e-4, atol=1e-4)


def test_double_backward_of_lora_update_raises():
    """lora_update (a base output the op cannot compute) refuses create_graph=True: never a wrong number."""
    x, A, B = leaves((5, 6), (2, 6), (3, 2))
    y = lorakern.lora_update(x, x.detach() @ torch.randn(3, 6, dtype=F64).T, A, B, scaling=2.0)
    (gA,) = torch.autograd.grad(y.square().sum(), A)  # first order works
    assert gA.shape == A.shape
    y = lorakern.lora_update(x, x.detach() @ torch.randn(3, 6, dtype=F64).T, A, B, scaling=2.0)
    with pytest.raises(NotImplementedError, match="lora_update: double backward"):
        torch.autograd.grad(y.square().sum(), A, create_graph=True)


class MLP(nn.Module):
    def __init__(self, make):
        super().__init__()
        self.l1, self.l2 = make(6, 8), make(8, 3)

    def forward(self, x):
        return self.l2(torch.tanh(self.l1(x)))


def lora_mlp():
    torch.manual_seed(0)
    m = MLP(lambda i, o: LoRALinear(i, o, r=2, lora_alpha=4, init_lora_weights=False, dtype=F64))
    return m, [p for p in m.parameters() if p.requires_grad]


def stock_forward(m, x, params):
    """The same MLP with the LoRA parameters ``params`` through the float64 oracle."""
    h = x
    for layer, (A, B), act in ((m.l1, params[0:2], torch.tanh), (m.l2, params[2:4], lambda t: t)):
        h = act(reference_lora_linear(h, layer.weight, layer.bias, A, B, scaling=layer.scaling))
    return h


def test_hessian_vector_product_of_an_mlp():
    m, params = lora_mlp()
    x = torch.randn(4, 6, dtype=F64)
    vec = [torch.randn_like(p) for p in params]

    def hvp(fwd):
        g = torch.autograd.grad(fwd().square().sum(), params, create_graph=True)
        return torch.autograd.grad(sum((gi * v).sum() for gi, v in zip(g, vec)), params)
    for a, b in zip(hvp(lambda: m(x)), hvp(lambda: stock_forward(m, x, params))):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_maml_meta_gradient():
    m, params = lora_mlp()
    x, y, xq, yq = torch.randn(4, 6, dtype=F64), torch.randn(4, 3, dtype=F64), torch.randn(3, 6, dtype=F64), \
        torch.randn(3, 3, dtype=F64)

    def meta_grad(fwd):
        g = torch.autograd.grad((fwd(x, params) - y).square().mean(), params, create_graph=True)
        fast = [p - 0.1 * gi for p, gi in zip(params, g)]
        return torch.autograd.grad((fwd(xq, fast) - yq).square().mean(), params)

    def ours(inp, ps):
        h = torch.tanh(lorakern.lora_linear(inp, m.l1.weight, m.l1.bias, ps[0], ps[1], scaling=m.l1.scaling))
        return lorakern.lora_linear(h, m.l2.weight, m.l2.bias, ps[2], ps[3], scaling=m.l2.scaling)
    for a, b in zip(meta_grad(ours), meta_grad(lambda inp, ps: stock_forward(m, inp, ps))):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("name", ["plain", "scales", "dropout", "banks"])
def test_forward_mode_ad(name):
    tensors, kw = variant(name)
    f = call(lorakern.lora_linear, kw)
    ref = call(reference_lora_linear, oracle_kw(kw, tensors[0]))
    primals = tuple(t.detach() for t in tensors)
    tangents = tuple(torch.randn_like(t) for t in primals)
    _, want = torch.func.jvp(ref, primals, tangents)
    _, got = torch.func.jvp(f, primals, tangents)
    torch.testing.assert_close(got, want)
    with fwAD.dual_level():
        y = f(*(fwAD.make_dual(p, t) for p, t in zip(primals, tangents)))
        torch.testing.assert_close(fwAD.unpack_dual(y).tangent, want)


def test_forward_mode_ad_through_the_registered_op_raises(monkeypatch):
    """The registered op (torch.compile, jit.trace, meta, subclasses) has no jvp rule: a clear error,
    not a dropped tangent."""
    monkeypatch.setattr(ops, "_PLAIN", ())
    (x, W, b, A, B), _ = variant("plain")
    with fwAD.dual_level(), pytest.raises(NotImplementedError, match="forward-mode AD"):
        lorakern.lora_linear(fwAD.make_dual(x.detach(), torch.randn_like(x)), W, b, A, B)


def test_hessian_by_jacfwd_of_jacrev():
    (x, W, b, A, B), kw = variant("plain")
    loss = lambda A: lorakern.lora_linear(x, W, b, A, B, **kw).pow(2).sum()  # noqa: E731
    want = torch.func.hessian(lambda A: reference_lora_linear(x, W, b, A, B, **kw).pow(2).sum())(A)
    torch.testing.assert_close(torch.func.hessian(loss)(A), want)


# --------------------------------------------------------------------------- 2. torch.func


@pytest.mark.parametrize("name", ["plain", "scales", "banks"])
def test_func_grad_vmap_jacrev_over_the_op(name):
    tensors, kw = variant(name)
    x, rest = tensors[0].detach(), [t.detach() for t in tensors[1:]]
    f, ref = call(lorakern.lora_linear, kw), call(reference_lora_linear, kw)
    if name == "banks":  # the index is per row: the gradient and the Jacobian over the whole batch
        A = rest[2]
        loss = lambda fn: (lambda A: fn(x, rest[0], rest[1], A, *rest[3:]).square().sum())  # noqa: E731
        torch.testing.assert_close(torch.func.grad(loss(f))(A), torch.func.grad(loss(ref))(A))
        torch.testing.assert_close(torch.func.jacrev(lambda A: f(x, rest[0], rest[1], A, *rest[3:]))(A),
                                   torch.func.jacrev(lambda A: ref(x, rest[0], rest[1], A, *rest[3:]))(A))
        return
    # per-sample gradients of A (DP-SGD), the gradient, and the Jacobian
    loss = lambda fn: (lambda xi, A: fn(xi[None], rest[0], rest[1], A, *rest[3:]).square().sum())  # noqa: E731
    got = torch.func.vmap(torch.func.grad(loss(f), argnums=1), (0, None))(x, rest[2])
    want = torch.func.vmap(torch.func.grad(loss(ref), argnums=1), (0, None))(x, rest[2])
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(torch.func.grad(lambda A: loss(f)(x[0], A))(rest[2]),
                               torch.func.grad(lambda A: loss(ref)(x[0], A))(rest[2]))
    torch.testing.assert_close(torch.func.jacrev(lambda xx: f(xx, *rest))(x), torch.func.jacrev(lambda xx: ref(xx, *rest))(x))
    torch.testing.assert_close(torch.func.vmap(lambda xi: f(xi[None], *rest))(x),
                               f(x, *rest)[:, None])


@pytest.mark.parametrize("dtype", [torch.float32, F64])  # float32: the native cpu backend where it is built
def test_per_sample_gradients_with_dropout(dtype):
    """vmap over a random op needs ``randomness=`` ("same": the mask is a function of the seed and
    the row, so every one-row sample gets the same one, as a loop of one-row calls does)."""
    x, W, b, A, B = (t.detach() for t in leaves((4, 6), (3, 6), (3,), (2, 6), (3, 2), dtype=dtype))
    loss = lambda xi, A: lorakern.lora_linear(xi[None], W, b, A, B, dropout_p=0.5, seed=11).square().sum()  # noqa: E731
    got = torch.func.vmap(torch.func.grad(loss, argnums=1), (0, None), randomness="same")(x, A)
    want = torch.stack([torch.func.grad(loss, argnums=1)(xi, A) for xi in x])
    torch.testing.assert_close(got, want)


def small_peft(seed=0, dtype=torch.float32, **lora):
    torch.manual_seed(seed)
    base = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).to(dtype)
    kw = dict(r=2, lora_alpha=4, target_modules=["0", "2"], init_lora_weights=False)
    return get_peft_model(base, LoraConfig(**{**kw, **lora}))


def stock_and_patched(model):
    patched = copy.deepcopy(model)
    assert lkpeft.patch(patched) == 2
    return model, patched


def patched_layers(model):
    return [m for m in model.modules() if lkpeft.patching._is_patched(m)]


def test_func_per_sample_gradients_of_a_patched_model():
    stock, patched = stock_and_patched(small_peft())
    x = torch.randn(4, 6)

    def per_sample(model):
        params = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}

        def loss(p, xi):
            return torch.func.functional_call(model, p, (xi[None],)).square().sum()
        return torch.func.vmap(torch.func.grad(loss), (None, 0))(params, x)
    got, want = per_sample(patched), per_sample(stock)
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6)
    jac = lambda m: torch.func.jacrev(lambda xx: m(xx))(x)  # noqa: E731
    torch.testing.assert_close(jac(patched), jac(stock), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- 3. autocast, meta


def test_autocast_casts_what_it_casts_for_linear():
    x, W, b, A, B = (t.detach() for t in leaves((5, 6), (3, 6), (3,), (2, 6), (3, 2), dtype=torch.float32))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lorakern.lora_linear(x, W, b, A, B)
        assert y.dtype == nn.functional.linear(x, W, b).dtype == torch.bfloat16
        x64, W64, b64, A64, B64 = (t.double() for t in (x, W, b, A, B))
        y64 = lorakern.lora_linear(x64, W64, b64, A64, B64)
        assert y64.dtype == nn.functional.linear(x64, W64, b64).dtype == F64
    torch.testing.assert_close(y64, lorakern.lora_linear(x64, W64, b64, A64, B64), rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["auto", "torch", "triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_autocast_casts_what_it_casts_for_linear(backend, dtype):
    """Under CUDA autocast the op computes in the autocast dtype, as F.linear does, with fp32
    leaves and fp32 gradients; float64 stays float64 (the torch backend)."""
    dev = torch.device("cuda")
    x, W, b, A, B = (t.detach().to(dev).requires_grad_() for t in
                     leaves((37, 64), (48, 64), (48,), (8, 64), (48, 8), dtype=torch.float32))
    with torch.autocast("cuda", dtype=dtype):
        y = lorakern.lora_linear(x, W, b, A, B, scaling=0.5, backend=backend)
        want = nn.functional.linear(x, W, b) + 0.5 * nn.functional.linear(nn.functional.linear(x, A), B)
        assert y.dtype == want.dtype == dtype
    torch.testing.assert_close(y.float(), want.float(), rtol=2e-2, atol=2e-2)
    y.float().sum().backward()
    assert x.grad.dtype == A.grad.dtype == B.grad.dtype == torch.float32
    if backend in ("auto", "torch"):
        x64, W64, A64, B64 = (t.detach().double() for t in (x, W, A, B))
        with torch.autocast("cuda", dtype=dtype):
            assert lorakern.lora_linear(x64, W64, None, A64, B64, backend=backend).dtype == F64


def test_float64_peft_llama_stays_float64_under_autocast():
    ids = torch.randint(0, 128, (2, 5), generator=torch.Generator().manual_seed(0))
    model = get_peft_model(tiny_llama(0).double(), LoraConfig(r=2, target_modules=["q_proj", "v_proj"],
                                                             init_lora_weights=False))
    stock, patched = model, copy.deepcopy(model)
    lkpeft.patch(patched)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        want, got = stock(input_ids=ids).logits, patched(input_ids=ids).logits
    assert got.dtype == want.dtype == F64
    torch.testing.assert_close(got, want)


def test_meta_device_runs_shapes_through():
    x, W, b, A, B = (torch.empty(s, device="meta") for s in ((2, 5, 6), (3, 6), (3,), (2, 6), (3, 2)))
    assert lorakern.lora_linear(x, W, b, A, B, scaling=torch.tensor(2.0, device="meta")).shape == (2, 5, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert lorakern.lora_linear(x, W, b, A, B).device.type == "meta"
    with torch.device("meta"):
        layer = LoRALinear(6, 3, r=2)
        model = small_peft()
    lkpeft.patch(model)
    assert layer(x).shape == (2, 5, 3) and model(x).shape == (2, 5, 3)
    assert model(x).device.type == "meta"


# --------------------------------------------------------------------------- 4. inference_mode


def test_inference_mode_forward_then_training_with_a_rank_mask():
    (x, W, b, A, B), _ = variant("plain")
    u = leaves((2,), seed=3)[0]
    mask = torch.tensor([True, False])
    f = lambda: lorakern.lora_linear(x, W, b, A, B, rank_scale=u, rank_mask=mask)  # noqa: E731
    with torch.inference_mode():
        inf = f()
    y = f()
    torch.testing.assert_close(inf, y.detach())
    y.square().sum().backward()
    assert A.grad is not None and u.grad[1] == 0 and u.grad[0] != 0


def test_adalora_with_an_inference_mode_eval_between_steps():
    from lorakern.methods import AdaLoRA

    torch.manual_seed(0)
    m = AdaLoRA(init_r=4, target_r=2, total_step=6, tinit=1, tfinal=2, deltaT=1, target_modules=["0", "2"])
    model = m.apply(nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    m.attach(opt)
    x, y = torch.randn(8, 6), torch.randn(8, 3)
    for _ in range(6):
        (model(x) - y).square().mean().backward()
        opt.step()
        opt.zero_grad()
        with torch.inference_mode():
            model.eval()
            model(x)
            model.train()
    assert m.active_ranks(model) == 2 * 2


def test_no_grad_and_inference_mode_match_and_keep_no_graph():
    tensors, kw = variant("scales")
    f = call(lorakern.lora_linear, kw)
    want = f(*tensors)
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            y = f(*tensors)
        assert y.grad_fn is None and not y.requires_grad
        torch.testing.assert_close(y, want.detach(), rtol=0, atol=0)


# --------------------------------------------------------------------------- 5. in-place changes are seen


def test_rank_mask_of_banks_changed_through_data_or_numpy_is_seen():
    (x, W, b, A, B), kw = variant("banks")
    kw.pop("scaling")
    mask = torch.tensor([[True, False]] * 3)  # rank 1 off everywhere: compacted away
    f = lambda m: lorakern.lora_linear(x, W, b, A, B, rank_mask=m, **kw)  # noqa: E731
    with torch.no_grad():
        f(mask)
        mask.data[1, 1] = True  # rank 1 back for adapter 1
        torch.testing.assert_close(f(mask), reference_lora_linear(x, W, b, A, B, rank_mask=mask, **kw))
        mask.numpy()[:, 0] = False
        mask.numpy()[2, 1] = True
        torch.testing.assert_close(f(mask), reference_lora_linear(x, W, b, A, B, rank_mask=mask, **kw))


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_adapter_index_written_through_data_or_numpy_is_checked(dtype):
    torch.manual_seed(0)
    bank = AdapterBank(nn.Linear(6, 3), num_adapters=2, r=2)
    x, idx = torch.randn(4, 6), torch.tensor([0, 1, -1, 1], dtype=dtype)
    direct = lambda: lorakern.lora_linear(x, bank.base.weight, None, bank.lora_A, bank.lora_B,  # noqa: E731
                                          adapter_index=idx)
    bank(x, idx), direct()
    idx.data[2] = 2
    for f in (bank, direct):
        with pytest.raises(ValueError, match=r"adapter_index: expected values in \[-1, 2\), got 2"):
            f(x, idx) if f is bank else f()
    idx.numpy()[2] = -3
    for f in (bank, direct):
        with torch.inference_mode(), pytest.raises(ValueError, match="got -3"):
            f(x, idx) if f is bank else f()
    idx.numpy()[2] = 1
    torch.testing.assert_close(bank(x, idx), bank(x, idx.clone()))


# --------------------------------------------------------------------------- checkpointing


@pytest.mark.parametrize("reentrant", [True, False])
def test_checkpointing_gives_the_same_gradients(reentrant):
    m, params = lora_mlp()
    x = torch.randn(4, 6, dtype=F64, requires_grad=True)
    grads = []
    for ck in (False, True):
        y = checkpoint(m, x, use_reentrant=reentrant) if ck else m(x)
        y.square().sum().backward()
        grads.append([t.grad.clone() for t in (x, *params)])
        for t in (x, *params):
            t.grad = None
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# --------------------------------------------------------------------------- 6. patch() stores nothing in the instance


def test_patched_model_is_freed_at_once_like_stock():
    x = torch.randn(3, 6)
    gc.disable()
    try:
        for patch in (False, True):
            model = small_peft()
            if patch:
                lkpeft.patch(model)
            model(x).sum().backward()
            ref = weakref.ref(model)
            layer = weakref.ref(model.base_model.model[0])
            del model
            assert ref() is None and layer() is None, f"patched={patch}"
    finally:
        gc.enable()


def replicate_on_cpu(model):
    """What ``torch.nn.parallel.replicate`` does to each module (it needs CUDA for the broadcast):
    ``_replicate_for_data_parallel`` copies, children rewired, fresh parameters."""
    mods = list(model.modules())
    reps = {id(m): m._replicate_for_data_parallel() for m in mods}
    for m in mods:
        r = reps[id(m)]
        for k, child in m._modules.items():
            r._modules[k] = None if child is None else reps[id(child)]
        for k, p in m._parameters.items():
            r._parameters[k] = None if p is None else p.detach().clone().requires_grad_(p.requires_grad)
    return reps[id(model)]


def test_replicas_run_their_own_parameters():
    stock, patched = stock_and_patched(small_peft())
    x = torch.randn(3, 6)
    outs = []
    for model in (stock, patched):
        rep = replicate_on_cpu(model)
        with torch.no_grad():
            for n, p in rep.named_parameters():
                if "lora_B" in n:
                    p.mul_(3.0)
        y = rep(x)
        y.square().sum().backward()
        outs.append((y, [p.grad for n, p in rep.named_parameters() if "lora_" in n]))
        assert all(p.grad is None for p in model.parameters())  # the original got nothing
    torch.testing.assert_close(outs[1][0], outs[0][0])
    for a, b in zip(outs[1][1], outs[0][1]):
        torch.testing.assert_close(a, b)
    assert len(patched_layers(patched)) == 2


@pytest.mark.parametrize("how", ["copy", "deepcopy", "pickle", "torch.save"])
def test_copies_and_pickles_stay_patched_with_their_own_parameters(how):
    stock, patched = stock_and_patched(small_peft())
    x = torch.randn(3, 6)
    if how == "copy":
        twin = copy.copy(patched)
    elif how == "deepcopy":
        twin = copy.deepcopy(patched)
    elif how == "pickle":
        twin = pickle.loads(pickle.dumps(patched))
    else:
        buf = io.BytesIO()
        torch.save(patched, buf)
        buf.seek(0)
        twin = torch.load(buf, weights_only=False)
    assert len(patched_layers(twin)) == 2
    torch.testing.assert_close(twin(x), stock(x))
    if how != "copy":
        with torch.no_grad():
            for n, p in twin.named_parameters():
                if "lora_B" in n:
                    p.zero_()
        torch.testing.assert_close(patched(x), stock(x))
        with stock.disable_adapter():
            torch.testing.assert_close(twin(x), stock(x))
    assert lkpeft.unpatch(twin) == 2 and not patched_layers(twin)


# --------------------------------------------------------------------------- 7. jit.trace + save, torch.export


def test_jit_trace_records_the_registered_op_and_saves():
    torch.manual_seed(0)
    layer = LoRALinear(6, 3, r=2, init_lora_weights=False).eval()
    stock, patched = stock_and_patched(small_peft())
    x = torch.randn(4, 6)
    for model, want in ((layer, layer(x)), (patched.eval(), stock(x))):
        traced = torch.jit.trace(model, (x,), check_trace=False)
        assert "lorakern::lora_linear_fwd" in str(traced.inlined_graph)
        buf = io.BytesIO()
        torch.jit.save(traced, buf)
        buf.seek(0)
        torch.testing.assert_close(torch.jit.load(buf)(x), want)


def test_export_keeps_the_op():
    torch.manual_seed(0)
    layer = LoRALinear(6, 3, r=2, init_lora_weights=False).eval()
    x = torch.randn(4, 6)
    ep = torch.export.export(layer, (x,))
    assert "lorakern.lora_linear_fwd" in str(ep.graph)
    torch.testing.assert_close(ep.module()(x), layer(x))


# --------------------------------------------------------------------------- 8, 9. torch.compile


class Recorder:
    """A torch.compile backend that keeps each graph it is given and runs it as is; ``ran`` is the
    graph that ran last."""

    def __init__(self):
        self.graphs, self.ran = [], None

    def __call__(self, gm, example_inputs):
        graph = str(gm.graph)
        self.graphs.append(graph)

        def run(*args):
            self.ran = graph
            return gm.forward(*args)
        return run


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_compiled_hotswap_keeps_one_graph(fresh_dynamo):
    """PEFT's compiled hot-swapping (``prepare_model_for_compiled_hotswap``, then
    ``hotswap_adapter_from_state_dict``): tensor scalings, one fullgraph graph for every swap."""
    from peft import get_peft_model_state_dict
    from peft.utils.hotswap import hotswap_adapter_from_state_dict, prepare_model_for_compiled_hotswap
    from peft.utils.save_and_load import _insert_adapter_name_into_state_dict

    model = small_peft()
    prepare_model_for_compiled_hotswap(model, target_rank=2)
    stock, patched = stock_and_patched(model)
    rec = Recorder()
    compiled = torch.compile(patched, backend=rec, fullgraph=True)
    x = torch.randn(3, 6)
    torch.testing.assert_close(compiled(x), stock(x))
    for seed, alpha in ((1, 8), (2, 1)):
        new = small_peft(seed, lora_alpha=alpha)
        sd = _insert_adapter_name_into_state_dict(get_peft_model_state_dict(new), adapter_name="default",
                                                  parameter_prefix="lora_")
        for m in (stock, patched):
            hotswap_adapter_from_state_dict(m, sd, adapter_name="default", config=new.peft_config["default"])
        torch.testing.assert_close(compiled(x), stock(x))
    assert len(rec.graphs) == 1 and "lorakern.lora_linear_fwd" in rec.graphs[0]


def test_op_with_a_tensor_scaling_compiles_fullgraph(fresh_dynamo):
    (x, W, b, A, B), _ = variant("plain")
    rec = Recorder()
    f = torch.compile(lambda s: lorakern.lora_linear(x, W, b, A, B, scaling=s), backend=rec, fullgraph=True)
    for s in (2.0, 0.25):
        st = torch.tensor(s, dtype=F64)
        y = f(st)
        torch.testing.assert_close(y, reference_lora_linear(x, W, b, A, B, scaling=s))
        gA, = torch.autograd.grad(y.sum(), A)
        want, = torch.autograd.grad(reference_lora_linear(x, W, b, A, B, scaling=s).sum(), A)
        torch.testing.assert_close(gA, want)
    assert len(rec.graphs) == 1


def test_disable_reaches_compiled_models(fresh_dynamo):
    model = small_peft()
    x = torch.randn(3, 6)
    rec = Recorder()
    compiled = torch.compile(model, backend=rec)
    for _ in range(2):
        lkpeft.enable()
        try:
            want = compiled(x)
            assert "lorakern.lora_linear_fwd" in rec.ran
        finally:
            lkpeft.disable()
        torch.testing.assert_close(compiled(x), want)
        assert "lorakern.lora_linear_fwd" not in rec.ran
    assert len(rec.graphs) == 2

