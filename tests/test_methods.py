"""lorakern.methods on a tiny Llama built from a config (no downloads), fp32 on CPU.

Trainable counts against each method's formula, a few training steps per method (the loss
falls, frozen weights stay bitwise), parity with stock PEFT (outputs and gradients) for LoRA,
rsLoRA, VeRA, AdaLoRA and DoRA, AdaLoRA's budget and mask against PEFT's RankAllocator,
RefLoRA's refactoring in float64, CG-LoRA's shifted base, and state-dict round trips.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from peft import AdaLoraConfig, LoraConfig, VeraConfig, get_peft_model  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from lorakern.methods import AdaLoRA, CGLoRA, DoRA, IGULoRA, LoRA, RefLoRA, TiedLoRA, VeRA  # noqa: E402
from lorakern.methods.reflora import balancing_matrix  # noqa: E402

SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LAYERS = 2
CFG = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS, num_attention_heads=4,
           num_key_value_heads=2, vocab_size=128)
R = 4

METHODS = {
    "lora": lambda: LoRA(r=R, lora_alpha=8, target_modules=SEVEN),
    "rslora": lambda: LoRA(r=R, lora_alpha=8, target_modules=SEVEN, use_rslora=True),
    "pissa": lambda: LoRA(r=R, lora_alpha=8, target_modules=SEVEN, init="pissa"),
    "tied-tl5": lambda: TiedLoRA(r=R, target_modules=SEVEN, trainable="TL5"),
    "tied-tl6": lambda: TiedLoRA(r=R, target_modules=SEVEN),
    "vera": lambda: VeRA(r=16, target_modules=SEVEN),
    "adalora": lambda: AdaLoRA(init_r=R, target_r=2, total_step=6, tinit=1, tfinal=2, target_modules=SEVEN),
    "igulora": lambda: IGULoRA(init_r=R, target_r=2, total_step=6, tinit=1, tfinal=2, target_modules=SEVEN),
    "reflora": lambda: RefLoRA(r=R, lora_alpha=8, target_modules=SEVEN, warmup_steps=2),
    "reflora-s": lambda: RefLoRA(r=R, lora_alpha=8, target_modules=SEVEN, variant="s", warmup_steps=2),
    "cglora": lambda: CGLoRA(r=R, lora_alpha=8, target_modules=SEVEN),
    "dora": lambda: DoRA(r=R, lora_alpha=8, target_modules=SEVEN),
}


def llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**CFG))


def batch(seed: int) -> dict:
    ids = torch.randint(0, CFG["vocab_size"], (4, 16), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "labels": ids}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def shapes() -> dict[str, tuple[int, int]]:
    """``{name: (in, out)}`` of the targeted projections of the tiny Llama."""
    return {n: (m.in_features, m.out_features) for n, m in llama().named_modules()
            if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in SEVEN}


def trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def adapted(name: str, seed: int = 0) -> tuple[object, nn.Module]:
    m = METHODS[name]()
    model = m.apply(llama(seed))
    if name == "cglora":
        m.initialize(model, [batch(1), batch(2)])
    return m, model


@pytest.mark.parametrize("name", sorted(METHODS))
def test_inference_mode_serves_as_no_grad(name):
    """Serving runs under torch.inference_mode: every method gives there what it gives under no_grad."""
    _, model = adapted(name)
    model.eval()
    ids = batch(3)["input_ids"]
    with torch.no_grad():
        want = model(input_ids=ids).logits
    with torch.inference_mode():
        got = model(input_ids=ids).logits
    assert torch.equal(got, want)


# --------------------------------------------------------------------------- trainable counts


def _tied_count(letters: str) -> int:
    total = 0
    for key in SEVEN:
        k, n = next(s for name, s in shapes().items() if name.endswith("." + key))
        shared = ("A" in letters) * R * k + ("B" in letters) * n * R
        total += shared + LAYERS * (("u" in letters) * R + ("v" in letters) * n)
    return total


FORMULAS = {
    "lora": lambda: sum(R * (k + n) for k, n in shapes().values()),
    "dora": lambda: sum(R * (k + n) + n for k, n in shapes().values()),
    "vera": lambda: sum(16 + n for k, n in shapes().values()),
    "tied-tl5": lambda: _tied_count("AB"),
    "tied-tl6": lambda: _tied_count("ABuv"),
    "adalora": lambda: sum(R * (k + n) + R for k, n in shapes().values()),
}
FORMULAS.update({"rslora": FORMULAS["lora"], "pissa": FORMULAS["lora"], "reflora": FORMULAS["lora"],
                 "reflora-s": FORMULAS["lora"], "cglora": FORMULAS["lora"], "igulora": FORMULAS["adalora"]})


@pytest.mark.parametrize("name", sorted(METHODS))
def test_trainable_count(name):
    m = METHODS[name]()
    model = m.apply(llama())
    assert trainable(model) == FORMULAS[name]()
    assert len(m.layers(model)) == len(SEVEN) * LAYERS
    assert all(not p.requires_grad for n, p in model.named_parameters() if "embed" in n or "norm" in n)


def test_tied_factors_are_one_parameter_across_layers():
    model = TiedLoRA(r=R, target_modules=SEVEN).apply(llama())
    attn = [model.model.layers[i].self_attn.q_proj for i in range(LAYERS)]
    assert attn[0].lora_A is attn[1].lora_A and attn[0].lora_B is attn[1].lora_B
    assert attn[0].rank_scale is not attn[1].rank_scale


def test_vera_layers_read_the_bank_in_place():
    model = VeRA(r=16, target_modules=SEVEN).apply(llama())
    k_proj = model.model.layers[1].self_attn.k_proj  # in 64, out 32 of a bank [16, 128], [128, 16]
    A, B = k_proj.factors()
    bank = k_proj.bank
    assert bank is model.model.layers[0].mlp.down_proj.bank
    assert A.data_ptr() == bank.lora_A.data_ptr() and A.stride() == (bank.max_in, 1) and A.shape == (16, 64)
    assert B.data_ptr() == bank.lora_B.data_ptr() and B.shape == (32, 16)


# --------------------------------------------------------------------------- training


@pytest.mark.parametrize("name", sorted(METHODS))
def test_training_lowers_the_loss_and_keeps_frozen_weights(name):
    m, model = adapted(name)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    frozen.update({n: b.clone() for n, b in model.named_buffers() if ".bank." in n})
    data = batch(3)
    with torch.no_grad():
        before = model.eval()(**data).loss.item()
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    m.attach(opt)
    for _ in range(6):
        loss = model(**data).loss + m.regularization(model)
        loss.backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        after = model.eval()(**data).loss.item()
    assert after < before - 1e-3, (before, after)
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert p.grad is None
    state = dict(model.named_parameters()) | dict(model.named_buffers())
    assert all(torch.equal(state[n], v) for n, v in frozen.items())
    if name in ("adalora", "igulora"):
        assert m.step == 6 and m.active_ranks(model) == 2 * len(m.layers(model))


def test_adalora_masked_ranks_drop_out_of_the_output():
    m, model = adapted("adalora")
    layer = model.model.layers[0].mlp.up_proj
    with torch.no_grad():
        for _, lay in m.layers(model):
            lay.lora_B.normal_()
            lay.rank_scale.normal_()
        mask = layer.rank_mask
        m.allocate(m.budget(3)[0])  # all-zero scores: PEFT's rule masks them all
    assert layer.rank_mask is mask and not mask.any()  # updated in place, the op's cache sees it
    with torch.no_grad():
        mask[1:3] = True
        layer.rank_scale.normal_()
    x = torch.randn(5, 64)
    E = layer.rank_scale * mask
    want = x @ layer.weight.T + layer.scaling * ((x @ layer.lora_A.T) * E) @ layer.lora_B.T
    assert rel(layer(x), want) < 1e-5 and rel(want, x @ layer.weight.T) > 1e-3


@pytest.mark.parametrize("name", ["vera", "tied-tl6", "adalora", "dora"])
def test_merge_matches_the_unmerged_output_and_unmerge_restores(name):
    m, model = adapted(name)
    layer = model.model.layers[1].mlp.down_proj
    with torch.no_grad():
        for p in layer.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.3)
        if name == "adalora":
            layer.rank_mask[0] = False
    W = layer.weight.detach().clone()
    x = torch.randn(3, 5, layer.in_features)
    with torch.no_grad():
        want = layer(x)
        layer.merge()
        assert rel(layer(x), want) < 1e-5 and rel(layer.weight, W) > 1e-3
        layer.unmerge()
        assert rel(layer.weight, W) < 1e-6 and rel(layer(x), want) < 1e-6


def test_igulora_runs_each_step_at_a_point_of_the_path_and_retrains():
    m = IGULoRA(init_r=R, target_r=2, total_step=5, tinit=0, tfinal=2, retrain=True, target_modules=["q_proj"])
    model = m.apply(llama())
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    m.attach(opt)
    layer = model.model.layers[0].self_attn.q_proj
    data, seen = batch(3), []
    for step in range(5):
        seen.append(m.alpha)
        assert all(lay.train_scale == m.alpha for _, lay in m.layers(model))
        model(**data).loss.backward()
        A_before = layer.lora_A.detach().clone()
        opt.step()
        if step == 3:  # the budget is final: the kept triplets restart, their optimizer state dropped
            assert layer.lora_A not in opt.state and rel(layer.lora_A, A_before) > 0.5
            assert m.active_ranks(model) == 2 * LAYERS
            assert torch.allclose(layer.rank_scale, torch.where(layer.rank_mask, 0.1, 0.0))
        opt.zero_grad()
    assert all(a in [k / 20 for k in range(1, 21)] for a in seen[:3]) and len(set(seen[:3])) > 1
    assert seen[3:] == [1.0, 1.0]
    assert m.active_ranks(model) == 2 * LAYERS


# --------------------------------------------------------------------------- parity with PEFT


def _peft_twins(name: str, seed: int = 0):
    """Our method on a tiny Llama and stock PEFT on a copy, with equal (random, nonzero) adapters;
    returns (method, ours, theirs, [(our tensor, their tensor), ...])."""
    configs = {
        "lora": LoraConfig(r=R, lora_alpha=8, target_modules=SEVEN),
        "rslora": LoraConfig(r=R, lora_alpha=8, target_modules=SEVEN, use_rslora=True),
        "dora": LoraConfig(r=R, lora_alpha=8, target_modules=SEVEN, use_dora=True),
        "vera": VeraConfig(r=16, target_modules=SEVEN),
        "adalora": AdaLoraConfig(init_r=R, target_r=2, total_step=6, tinit=1, tfinal=2, target_modules=SEVEN),
    }
    base = llama(seed)
    theirs = get_peft_model(copy.deepcopy(base), configs[name])
    m = METHODS[name]()
    ours = m.apply(base)
    weight = lambda t: t.weight if isinstance(t, nn.Module) else t  # noqa: E731
    pairs = []
    for n, layer in m.layers(ours):
        p = theirs.base_model.model.get_submodule(n)
        if name == "vera":
            pairs += [(layer.rank_scale, p.vera_lambda_d["default"]), (layer.out_scale, p.vera_lambda_b["default"])]
        else:
            pairs += [(layer.lora_A, weight(p.lora_A["default"])), (layer.lora_B, weight(p.lora_B["default"]))]
        if name == "dora":
            pairs.append((layer.magnitude, p.lora_magnitude_vector["default"].weight))
        if name == "adalora":
            pairs.append((layer.rank_scale, p.lora_E["default"]))
    with torch.no_grad():
        for ours_t, theirs_t in pairs:
            ours_t.copy_(torch.randn_like(ours_t) * 0.1 + (1.0 if ours_t.dim() == 1 else 0.0))
            theirs_t.copy_(ours_t.reshape(theirs_t.shape))
    return m, ours, theirs, pairs


@pytest.mark.parametrize("name", ["lora", "rslora", "vera", "adalora", "dora"])
def test_parity_with_peft(name):
    m, ours, theirs, pairs = _peft_twins(name)
    data = batch(4)
    out_ours = ours(**data)
    out_theirs = theirs.base_model(**data)  # where PEFT's AdaLoRA adds its orthogonal regularization
    loss_ours = out_ours.loss + m.regularization(ours)
    with torch.no_grad():
        plain = llama()(**data).logits
    assert rel(out_ours.logits, out_theirs.logits) < 1e-5
    assert rel(out_ours.logits, plain) > 1e-3  # the adapters matter
    assert abs(loss_ours.item() - out_theirs.loss.item()) < 1e-5 * abs(out_theirs.loss.item())
    loss_ours.backward()
    out_theirs.loss.backward()
    for ours_t, theirs_t in pairs:
        assert rel(ours_t.grad, theirs_t.grad.reshape(ours_t.shape)) < 1e-5
    if name == "vera":
        bank = m.layers(ours)[0][1].bank
        assert torch.equal(bank.lora_A, theirs.base_model.vera_A["default"])
        assert torch.equal(bank.lora_B, theirs.base_model.vera_B["default"])


def test_adalora_budget_scores_and_mask_agree_with_peft_rank_allocator():
    cfg = dict(init_r=6, target_r=3, total_step=20, tinit=2, tfinal=3, deltaT=2)
    base = llama()
    theirs = get_peft_model(copy.deepcopy(base), AdaLoraConfig(target_modules=SEVEN, **cfg))
    alloc, inner = theirs.base_model.rankallocator, theirs.base_model.model
    m = AdaLoRA(target_modules=SEVEN, **cfg)
    ours = m.apply(base)
    assert [m.budget(t) for t in range(22)] == [alloc.budget_schedule(t) for t in range(22)]

    gen = torch.Generator().manual_seed(5)
    layers = m.layers(ours)
    for step in range(2):  # the EMAs of |w * grad w| from the same weights and gradients
        for n, layer in layers:
            for part, ours_p in (("A", layer.lora_A), ("E", layer.rank_scale), ("B", layer.lora_B)):
                theirs_p = inner.get_submodule(n).get_parameter(f"lora_{part}.default")
                with torch.no_grad():
                    ours_p.copy_(torch.randn(ours_p.shape, generator=gen))
                    theirs_p.copy_(ours_p.reshape(theirs_p.shape))
                ours_p.grad = torch.randn(ours_p.shape, generator=gen)
                theirs_p.grad = ours_p.grad.reshape(theirs_p.shape).clone()
        m.update_scores()
        alloc.update_ipt(inner)
    for n, layer in layers:
        for part in "AEB":
            key = f"{n}.lora_{part}.default"
            for kind, store in (("avg", alloc.exp_avg_ipt), ("unc", alloc.exp_avg_unc)):
                ours_ema = getattr(layer.scores, f"{kind}_{part}")
                assert ours_ema.any() and torch.allclose(ours_ema.flatten(), store[key].flatten(), rtol=1e-6, atol=0)

    for budget in (60, 42, 31):  # then, given exactly the same scores, the same mask
        for n, layer in layers:
            for part in "AEB":
                key = f"{n}.lora_{part}.default"
                for kind, store in (("avg", alloc.exp_avg_ipt), ("unc", alloc.exp_avg_unc)):
                    value = torch.rand(store[key].shape, generator=gen)
                    store[key] = value
                    getattr(layer.scores, f"{kind}_{part}").copy_(value.reshape(-1) if part == "E" else value)
        pattern = alloc.mask_to_budget(inner, budget)
        m.allocate(budget)
        assert m.active_ranks(ours) == budget
        for n, layer in layers:
            assert layer.rank_mask.tolist() == pattern[f"{n}.lora_E.default"]
            theirs_E = inner.get_submodule(n).lora_E["default"].flatten()
            assert torch.equal(layer.rank_scale.detach(), theirs_E.detach())


# --------------------------------------------------------------------------- RefLoRA, float64


def _psd_pow(S: torch.Tensor, power: float) -> torch.Tensor:
    lam, U = torch.linalg.eigh(S)
    return (U * lam.pow(power)) @ U.T


def test_reflora_full_step_is_the_step_in_the_balanced_factorization():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(24, 12, dtype=torch.float64))
    m = RefLoRA(r=3, target_modules=["0"], warmup_steps=0, eps=0.0)
    layer = m.apply(net)[0]
    with torch.no_grad():
        layer.lora_B.normal_()
    A, B = layer.lora_A.detach().clone(), layer.lora_B.detach().clone()
    S, S_inv = balancing_matrix(A, B, eps=0.0)
    assert rel(S @ A @ A.T @ S, B.T @ B) < 1e-10 and rel(S @ S_inv, torch.eye(3, dtype=torch.float64)) < 1e-10

    P = _psd_pow(S, -0.5)  # the refactoring B' = B P, A' = P^-1 A: balanced, same product
    A1, B1 = torch.linalg.solve(P, A), B @ P
    assert rel(A1 @ A1.T, B1.T @ B1) < 1e-10 and rel(B1 @ A1, B @ A) < 1e-12

    lr = 0.05
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    m.attach(opt)
    x = torch.randn(10, 24, dtype=torch.float64)
    net(x).square().sum().backward()
    gA, gB = layer.lora_A.grad.clone(), layer.lora_B.grad.clone()
    opt.step()
    # the gradient at the refactored point, stepped there: g_A' = P g_A, g_B' = g_B P^-1
    want = (B1 - lr * gB @ torch.linalg.inv(P)) @ (A1 - lr * P @ gA)
    assert rel(layer.lora_B.detach() @ layer.lora_A.detach(), want) < 1e-10
    assert rel(layer.lora_B.detach() @ layer.lora_A.detach(), (B - lr * gB) @ (A - lr * gA)) > 1e-6


def test_reflora_s_rebalance_keeps_BA_and_rescales_adam_moments():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(24, 12, dtype=torch.float64), nn.Tanh(), nn.Linear(12, 6, dtype=torch.float64))
    m = RefLoRA(r=3, target_modules=["0", "2"], variant="s", warmup_steps=1)
    net = m.apply(net)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    m.attach(opt)
    x = torch.randn(10, 24, dtype=torch.float64)
    with torch.no_grad():
        for _, layer in m.layers(net):
            layer.lora_B.normal_()
    net(x).square().sum().backward()
    opt.step()  # step 0: warm-up, nothing rebalanced
    for _, layer in m.layers(net):
        assert abs(layer.lora_A.norm().item() - layer.lora_B.norm().item()) > 1e-3
    before = {n: (layer.lora_B @ layer.lora_A).detach().clone() for n, layer in m.layers(net)}
    moments = {id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in net.parameters() if p in opt.state}
    scale = {n: (layer.lora_B.norm() / layer.lora_A.norm()).sqrt().item() for n, layer in m.layers(net)}
    m.rebalance(opt)
    for n, layer in m.layers(net):
        A, B, c = layer.lora_A, layer.lora_B, scale[n]
        assert rel(B @ A, before[n]) < 1e-12
        assert abs(A.norm().item() - B.norm().item()) < 1e-12 * B.norm().item()
        for p, f in ((A, c), (B, 1 / c)):
            old = moments[id(p)]
            assert rel(opt.state[p]["exp_avg"], old["exp_avg"] / f) < 1e-14
            assert rel(opt.state[p]["exp_avg_sq"], old["exp_avg_sq"] / f ** 2) < 1e-14


# --------------------------------------------------------------------------- CG-LoRA


def test_cglora_shifted_model_gives_the_same_output_at_step_zero():
    m = CGLoRA(r=R, lora_alpha=8, target_modules=SEVEN)
    model = m.apply(llama())
    probe = batch(7)["input_ids"]
    W0 = {n: layer.weight.detach().clone() for n, layer in m.layers(model)}
    with torch.no_grad():
        before = model(input_ids=probe).logits
    m.initialize(model, [batch(1), batch(2)])
    with torch.no_grad():
        after = model(input_ids=probe).logits
    assert rel(after, before) < 1e-5
    for n, layer in m.layers(model):
        assert layer.lora_A.grad is None and layer.lora_B.grad is None
        assert rel(layer.weight, W0[n]) > 1e-3  # the base did move, by -s B0 A0
        assert rel(layer.weight + layer.delta_weight(), W0[n]) < 1e-5


# --------------------------------------------------------------------------- state dicts


@pytest.mark.parametrize("name", sorted(METHODS))
def test_state_dict_round_trip(name):
    m, model = adapted(name)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    m.attach(opt)
    data = batch(3)
    for _ in range(4):
        (model(**data).loss + m.regularization(model)).backward()
        opt.step()
        opt.zero_grad()
    sd = model.state_dict()
    m2 = METHODS[name]()
    if name == "vera":
        m2.projection_prng_key = 7  # a different bank: loading redraws it from the saved seed
        assert not any(k.endswith("bank.lora_A") for k in sd)
    fresh = m2.apply(llama(seed=1))  # another base too: the state dict carries all of it
    fresh.load_state_dict(sd)
    model.eval()
    fresh.eval()
    probe = batch(8)["input_ids"]
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=probe).logits, model(input_ids=probe).logits)
    if name in ("adalora", "igulora", "reflora", "reflora-s"):
        assert m2.step == m.step == 4
    if name in ("adalora", "igulora"):
        assert m2.active_ranks(fresh) == m.active_ranks(model) < R * len(m.layers(model))
        for (_, a), (_, b) in zip(m.layers(model), m2.layers(fresh)):
            assert torch.equal(a.scores.avg_A, b.scores.avg_A) and torch.equal(a.rank_mask, b.rank_mask)


def test_vera_saves_its_bank_when_asked():
    m = VeRA(r=16, target_modules=SEVEN, save_projection=True)
    sd = m.apply(llama()).state_dict()
    assert any(k.endswith("bank.lora_A") for k in sd) and any(k.endswith("bank.seed") for k in sd)


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("make, exc, needle", [
    (lambda: LoRA(r=0), ValueError, "r:"),
    (lambda: LoRA(lora_dropout=1.0), ValueError, "lora_dropout"),
    (lambda: LoRA(init="svd"), ValueError, "init"),
    (lambda: TiedLoRA(trainable="AX"), ValueError, "trainable"),
    (lambda: TiedLoRA(trainable="A"), ValueError, "trainable"),
    (lambda: AdaLoRA(init_r=4, target_r=6, total_step=10), ValueError, "target_r"),
    (lambda: AdaLoRA(total_step=10, tinit=8, tfinal=2), ValueError, "tinit"),
    (lambda: RefLoRA(variant="x"), ValueError, "variant"),
    (lambda: CGLoRA(init="pissa"), ValueError, "init"),
])
def test_bad_hyperparameters_name_the_argument(make, exc, needle):
    with pytest.raises(exc, match=needle):
        make()


def test_bad_targets_name_the_argument():
    with pytest.raises(ValueError, match="target_modules.*matches none"):
        LoRA(target_modules=["nope_proj"]).apply(llama())
    with pytest.raises(TypeError, match="target_modules.*Embedding"):
        LoRA(target_modules=["embed_tokens"]).apply(llama())
    with pytest.raises(TypeError, match="target_modules"):
        LoRA(target_modules=3).apply(llama())
    with pytest.raises(RuntimeError, match="apply"):
        AdaLoRA(total_step=5).attach(torch.optim.SGD([nn.Parameter(torch.randn(2))], lr=0.1))


def test_all_linear_leaves_the_output_head_alone():
    m = LoRA(r=R)
    model = m.apply(llama())
    assert type(model.lm_head) is nn.Linear
    assert sorted({n.rsplit(".", 1)[-1] for n, _ in m.layers(model)}) == sorted(SEVEN)
