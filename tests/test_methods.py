"""lorakern.methods on a tiny Llama (and a tiny T5) built from a config (no downloads), fp32 on CPU.

Trainable counts against each method's formula, a few training steps per method (the loss
falls, frozen weights stay bitwise), parity with stock PEFT (outputs and gradients) for LoRA,
rsLoRA, VeRA, AdaLoRA and DoRA, AdaLoRA's budget and mask against PEFT's RankAllocator and a
whole AdaLoRA training run against PEFT's, pruned triplets that keep their gradient, IGU-LoRA's
path point, weighted budget and defaults (withyou12/igulora), Tied-LoRA's tie groups on a T5 and
its parameter formula, RefLoRA's refactoring in float64 and its reference options, CG-LoRA's
rank-r curvature-whitened step (shifted and not), PiSSA's fast SVD, and state-dict round trips.
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
from lorakern.testing import rel_err  # noqa: E402

SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LAYERS = 2
CFG = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS, num_attention_heads=4,
           num_key_value_heads=2, vocab_size=128)
R = 4

METHODS = {
    "lora": lambda: LoRA(r=R, lora_alpha=8, target_modules=SEVEN),
    "rslora": lambda: LoRA(r=R, lora_alpha=8, target_modules=SEVEN, use_rslora=True),
    "pissa": lambda: LoRA(r=R, lora_alpha=8, target_modules=SEVEN, init_lora_weights="pissa"),
    "tied-tl5": lambda: TiedLoRA(r=R, target_modules=SEVEN, trainable="TL5"),
    "tied-tl6": lambda: TiedLoRA(r=R, target_modules=SEVEN),
    "pissa-fast": lambda: LoRA(r=R, lora_alpha=8, target_modules=SEVEN, init_lora_weights="pissa_niter_2"),
    "vera": lambda: VeRA(r=16, target_modules=SEVEN),
    "adalora": lambda: AdaLoRA(init_r=R, target_r=2, total_step=6, tinit=1, tfinal=2, target_modules=SEVEN),
    "igulora": lambda: IGULoRA(init_r=R, target_r=2, total_step=6, tinit=1, tfinal=2, deltaT=1, lora_alpha=8,
                               lora_dropout=0.0, target_modules=SEVEN),
    "reflora": lambda: RefLoRA(r=R, lora_alpha=8, target_modules=SEVEN, warmup_steps=2),
    "reflora-s": lambda: RefLoRA(r=R, lora_alpha=8, target_modules=SEVEN, variant="s", warmup_steps=2),
    "reflora-reinit": lambda: RefLoRA(r=R, lora_alpha=8, target_modules=SEVEN, warmup_steps=0, interval=2,
                                      re_init=True),
    "cglora": lambda: CGLoRA(r=R, lora_alpha=8, target_modules=SEVEN),
    "cglora-noshift": lambda: CGLoRA(r=R, lora_alpha=8, target_modules=SEVEN, shift=False, step=0.1),
    "dora": lambda: DoRA(r=R, lora_alpha=8, target_modules=SEVEN),
}


def llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**CFG))


def batch(seed: int) -> dict:
    ids = torch.randint(0, CFG["vocab_size"], (4, 16), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "labels": ids}


def shapes() -> dict[str, tuple[int, int]]:
    """``{name: (in, out)}`` of the targeted projections of the tiny Llama."""
    return {n: (m.in_features, m.out_features) for n, m in llama().named_modules()
            if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in SEVEN}


def trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def adapted(name: str, seed: int = 0) -> tuple[object, nn.Module]:
    m = METHODS[name]()
    model = m.apply(llama(seed))
    if name.startswith("cglora"):
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
FORMULAS.update({name: FORMULAS["lora"] for name in ("rslora", "pissa", "pissa-fast", "reflora", "reflora-s",
                                                     "reflora-reinit", "cglora", "cglora-noshift")})
FORMULAS["igulora"] = FORMULAS["adalora"]


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
    if name == "adalora":
        assert m.step == 6 and m.active_ranks(model) == 2 * len(m.layers(model))
    if name == "igulora":  # a budget in parameters: 2 ranks' worth of every layer
        kept = sum((lay.in_features + lay.out_features) * int(lay.rank_mask.sum()) for _, lay in m.layers(model))
        assert m.step == 6 and m.budget(6)[0] - 192 < kept <= m.budget(6)[0]


def _loss_step(model, m, data, opt) -> float:
    loss = model(**data).loss + m.regularization(model)
    loss.backward()
    opt.step()
    opt.zero_grad()
    return loss.item()


def test_adalora_pruned_triplets_keep_their_gradient_and_come_back():
    """Paper Sec. 3 and PEFT: pruning zeroes E only, so E keeps its gradient (the op's rank_mask
    would remove the rank from the op: no gradient, never back) until the allocation is final."""
    m, model = adapted("adalora")
    layer = model.model.layers[0].mlp.up_proj
    with torch.no_grad():
        for _, lay in m.layers(model):
            lay.lora_B.normal_()
            lay.rank_scale.normal_()
        mask = layer.rank_mask
        m.allocate(m.budget(3)[0])  # all-zero scores: PEFT's rule prunes them all
    assert layer.rank_mask is mask and not mask.any() and not layer.rank_scale.any()
    x = torch.randn(5, 64)
    assert rel_err(layer(x), x @ layer.weight.T) < 1e-6  # E = 0: the pruned triplets are gone
    layer(x).square().sum().backward()
    assert (layer.rank_scale.grad != 0).all()  # ... but E still learns
    opt = torch.optim.SGD([layer.rank_scale], lr=0.1)
    opt.step()
    assert (layer.rank_scale != 0).all()
    with torch.no_grad():  # the next allocation, scores favouring triplet 2 of this layer, keeps it
        layer.scores.avg_E[2] = layer.scores.unc_E[2] = 1.0
        revived = layer.rank_scale[2].item()
        m.allocate(1)
    assert layer.rank_mask.tolist() == [False, False, True, False] and layer.rank_scale[2].item() == revived
    assert rel_err(layer(x), x @ layer.weight.T
               + layer.scaling * ((x @ layer.lora_A.T) * (layer.rank_scale * mask)) @ layer.lora_B.T) < 1e-5
    assert not layer.mask_in_op
    m.update_and_allocate(m.total_step - m.tfinal)  # the final allocation: from here the op skips pruned ranks
    assert all(lay.mask_in_op for _, lay in m.layers(model))
    layer.rank_scale.grad = None
    layer(x).square().sum().backward()
    assert not layer.rank_scale.grad[~layer.rank_mask].any()
    # the final ranks are compacted once (no host read of the mask per call); a loaded state dict
    # with another mask re-compacts them
    assert layer.final_ranks.index.tolist() == layer.rank_mask.nonzero().flatten().tolist()
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    state["rank_mask"] = torch.tensor([True, True, False, False])
    layer.load_state_dict(state, strict=False)
    assert layer.final_ranks.index.tolist() == [0, 1]


def test_adalora_trains_as_peft_adalora_step_by_step():
    """A whole run (budgeting, pruning every deltaT steps, final phase) against PEFT's AdaLoRA from
    the same start: the same losses, masks and factors (the issue's tiny-Llama case, shortened)."""
    cfg = dict(init_r=6, target_r=4, total_step=14, tinit=2, tfinal=4, deltaT=2, lora_alpha=8,
               target_modules=["q_proj", "v_proj"])
    base = llama()
    theirs = get_peft_model(copy.deepcopy(base), AdaLoraConfig(**cfg))
    inner = theirs.base_model.model
    m = AdaLoRA(**cfg)
    ours = m.apply(base)
    with torch.no_grad():
        for n, layer in m.layers(ours):
            for part, p in (("A", layer.lora_A), ("E", layer.rank_scale), ("B", layer.lora_B)):
                p.copy_(inner.get_submodule(n).get_parameter(f"lora_{part}.default").reshape(p.shape))
    opt_ours = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=2e-2)
    opt_theirs = torch.optim.AdamW([p for p in theirs.parameters() if p.requires_grad], lr=2e-2)
    m.attach(opt_ours)
    pruned_and_back = set()
    for step in range(cfg["total_step"]):
        data = batch(10 + step % 3)
        loss_ours = _loss_step(ours, m, data, opt_ours)
        out = theirs.base_model(**data)  # PEFT adds its orthogonal regularization here
        out.loss.backward()
        opt_theirs.step()
        theirs.base_model.update_and_allocate(step)
        opt_theirs.zero_grad()
        assert abs(loss_ours - out.loss.item()) < 1e-4 * out.loss.item(), step
        pattern = theirs.peft_config["default"].rank_pattern or {}
        for n, layer in m.layers(ours):
            if pattern:
                assert layer.rank_mask.tolist() == pattern[f"{n}.lora_E.default"], (step, n)
            pruned_and_back |= {(n, i) for i, kept in enumerate(layer.rank_mask.tolist()) if not kept}
    for n, layer in m.layers(ours):
        their_E = inner.get_submodule(n).lora_E["default"].flatten()
        assert rel_err(layer.rank_scale, their_E) < 1e-3 and rel_err(layer.lora_A, inner.get_submodule(n).lora_A["default"]) < 1e-3
    assert pruned_and_back and m.active_ranks(ours) == 4 * len(m.layers(ours))


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
        assert rel_err(layer(x), want) < 1e-5 and rel_err(layer.weight, W) > 1e-3
        layer.unmerge()
        assert rel_err(layer.weight, W) < 1e-6 and rel_err(layer(x), want) < 1e-6


def test_igulora_runs_each_step_at_a_point_of_the_path_and_retrains():
    m = IGULoRA(init_r=R, target_r=2, total_step=5, tinit=0, tfinal=2, deltaT=1, retrain=True, target_modules=["q_proj"])
    model = m.apply(llama())
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    m.attach(opt)
    layer = model.model.layers[0].self_attn.q_proj
    data, seen = batch(3), []
    for step in range(5):
        seen.append(m.alpha)
        assert all(lay.train_scale == m.alpha ** 3 for _, lay in m.layers(model))
        model(**data).loss.backward()
        A_before = layer.lora_A.detach().clone()
        opt.step()
        if step == 3:  # the budget is final: the kept triplets restart, their optimizer state dropped
            assert layer.lora_A not in opt.state and rel_err(layer.lora_A, A_before) > 0.5
            assert m.active_ranks(model) == 2 * LAYERS
            assert torch.allclose(layer.rank_scale, torch.where(layer.rank_mask, 0.1, 0.0))
        opt.zero_grad()
    assert all(a in [k / 20 for k in range(1, 21)] for a in seen[:3]) and len(set(seen[:3])) > 1
    assert seen[3:] == [1.0, 1.0]
    assert m.active_ranks(model) == 2 * LAYERS


def test_igulora_path_point_scales_the_product_by_alpha_cubed():
    """The straight path (A, E, B) -> alpha (A, E, B) in parameter space: B E A scaled by alpha^3
    in training mode (reference ``weight_coeff ** 3``), by 1 in eval mode."""
    torch.manual_seed(1)
    m = IGULoRA(init_r=R, target_r=2, total_step=10, tinit=0, tfinal=2, lora_dropout=0.0, target_modules=["q_proj"])
    model = m.apply(llama())
    m.attach(torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1))
    assert m.alpha < 1.0
    layer = model.model.layers[1].self_attn.q_proj
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(3, 64)
    update = layer.scaling * ((x @ layer.lora_A.T) * layer.rank_scale) @ layer.lora_B.T
    assert rel_err(layer.train()(x), x @ layer.weight.T + m.alpha ** 3 * update) < 1e-5
    assert rel_err(layer.eval()(x), x @ layer.weight.T + update) < 1e-5


def test_igulora_pruned_triplets_keep_their_gradient():
    """The reference zeroes ``lora_E`` only (its ``lora_mask`` stays 1 while pruning), so E keeps learning."""
    m, model = adapted("igulora")
    layer = model.model.layers[0].self_attn.v_proj
    with torch.no_grad():
        layer.lora_B.normal_()
        layer.scores.avg_E.copy_(torch.arange(R, dtype=torch.float32))
    m.allocate(m.budget(0)[0] - 1)  # prune the cheapest-scored triplet of the model: one of this layer
    pruned = ~layer.rank_mask
    assert pruned.sum() == 1 and not layer.rank_scale[pruned].any()
    layer(torch.randn(5, 64)).square().sum().backward()
    assert (layer.rank_scale.grad[pruned] != 0).all()


def test_igulora_budget_is_weighted_by_each_layer_parameter_count():
    """Reference ``RankAllocator``: a rank costs its layer's share of parameters, and pruning walks
    the triplets by rising score until the pruned cost reaches ``initial - budget``."""
    targets = ["q_proj", "k_proj", "up_proj"]  # one rank costs 64 + 64, 64 + 32, 64 + 128
    m = IGULoRA(init_r=R, target_r=2, total_step=10, tinit=0, tfinal=2, deltaT=1, target_modules=targets)
    model = m.apply(llama())
    cost = {n: layer.in_features + layer.out_features for n, layer in m.layers(model)}
    assert m.budget(0)[0] == R * sum(cost.values()) and m.budget(10)[0] == 2 * sum(cost.values())
    gen = torch.Generator().manual_seed(3)
    for _, layer in m.layers(model):
        for buf in layer.scores.buffers():
            buf.copy_(torch.rand(buf.shape, generator=gen))
    budget = m.budget(4)[0]
    m.allocate(budget)
    entries = sorted((float(score), cost[n], n, i) for n, layer in m.layers(model)
                     for i, score in enumerate(m.triplet_scores(layer)))
    pruned_cost, threshold = 0, None
    for score, c, _, _ in entries:  # the reference's mask_to_target_rank, written out
        pruned_cost += c
        if pruned_cost >= m.budget(0)[0] - budget:
            threshold = score
            break
    kept_cost = 0
    for n, layer in m.layers(model):
        assert layer.rank_mask.tolist() == [float(s) > threshold for s in m.triplet_scores(layer)]
        kept_cost += cost[n] * int(layer.rank_mask.sum())
    assert budget - max(cost.values()) < kept_cost <= budget


def test_igulora_defaults_are_the_reference_ones():
    m = IGULoRA(init_r=R, target_r=2, total_step=300, target_modules=SEVEN)
    got = (m.orth_reg_weight, m.lora_alpha, m.lora_dropout, m.deltaT, m.beta1, m.beta2, m.ig_steps)
    assert got == (1.0, 1.0, 0.3, 50, 0.85, 0.85, 20)
    layer = m.apply(llama()).model.layers[0].self_attn.q_proj
    assert layer.scaling == 1 / (R + 1e-5) and torch.allclose(layer.rank_scale, torch.full((R,), 0.1))
    assert float(m._element_score(torch.tensor(0.0), torch.tensor(0.0))) == 1.0  # (0 + 1e-6) / (0 + 1e-6)
    with torch.no_grad():  # only the off-diagonal of A A^T and B^T B is penalized, weight 1
        for _, lay in m.layers(m._model):
            lay.lora_A.copy_(torch.eye(R, lay.in_features) * 3)
            lay.lora_B.copy_(torch.eye(lay.out_features, R) * 2)
    assert float(m.regularization(m._model)) == 0.0


# --------------------------------------------------------------------------- Tied-LoRA


def t5():
    from transformers import T5Config, T5ForConditionalGeneration
    torch.manual_seed(0)
    return T5ForConditionalGeneration(T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=2,
                                               num_decoder_layers=2, num_heads=4))


def test_tied_lora_ties_by_role_and_shape():
    """Encoder and decoder, self- and cross-attention outputs get their own A and B; the layers of one role share."""
    m = TiedLoRA(r=R, target_modules=["q", "o", "wo"])
    model = m.apply(t5())
    enc, dec = model.encoder.block, model.decoder.block
    self_o = [dec[i].layer[0].SelfAttention.o for i in range(2)]
    cross_o = [dec[i].layer[1].EncDecAttention.o for i in range(2)]
    assert self_o[0].lora_A is self_o[1].lora_A and cross_o[0].lora_B is cross_o[1].lora_B
    assert self_o[0].lora_A is not cross_o[0].lora_A and self_o[0].lora_B is not cross_o[0].lora_B
    assert enc[0].layer[0].SelfAttention.q.lora_A is not dec[0].layer[0].SelfAttention.q.lora_A
    assert self_o[0].rank_scale is not self_o[1].rank_scale
    assert len(m.groups(model)) == 8 and all(len(names) == 2 for names in m.groups(model).values())
    net = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 8))  # one role, two shapes
    net = TiedLoRA(r=R, target_modules=["0", "1", "2"]).apply(net)
    assert net[0].lora_A is net[1].lora_A and net[0].lora_B is not net[2].lora_B and net[2](torch.randn(2, 16)).shape == (2, 8)


@pytest.mark.parametrize("config", ["TL5", "TL6", "ABuv", "Buv", "Au", "Av", "B", "uv"])
def test_tied_lora_parameter_formula(config):
    """Trainable parameters against sum over tie groups of [A] r in + [B] out r + L ([u] r + [v] out)."""
    letters = {"TL5": "AB", "TL6": "ABuv"}.get(config, config)
    m = TiedLoRA(r=R, target_modules=["q", "o", "wo"], trainable=config)
    model = m.apply(t5())
    want = 0
    for stack in ("encoder", "decoder"):
        for role in ("SelfAttention.q", "SelfAttention.o", "EncDecAttention.q", "EncDecAttention.o", "DenseReluDense.wo"):
            layers = [mod for n, mod in model.named_modules() if n.startswith(stack) and n.endswith(role)]
            if layers:
                k, n = layers[0].in_features, layers[0].out_features
                want += ("A" in letters) * R * k + ("B" in letters) * n * R
                want += len(layers) * (("u" in letters) * R + ("v" in letters) * n)
    assert trainable(model) == want == m.parameter_count(
        [(k, n, len(names)) for (_, n, k), names in m.groups(model).items()])
    d, L = 16, 5  # the paper's case: one group of L square layers
    net = TiedLoRA(r=R, trainable=config, target_modules=[str(i) for i in range(L)]).apply(
        nn.Sequential(*[nn.Linear(d, d) for _ in range(L)]))
    paper = {"TL5": 2 * d * R, "TL6": 2 * d * R + L * (R + d)}
    assert trainable(net) == paper.get(config, m.parameter_count([(d, d, L)]))


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
    assert rel_err(out_ours.logits, out_theirs.logits) < 1e-5
    assert rel_err(out_ours.logits, plain) > 1e-3  # the adapters matter
    assert abs(loss_ours.item() - out_theirs.loss.item()) < 1e-5 * abs(out_theirs.loss.item())
    loss_ours.backward()
    out_theirs.loss.backward()
    for ours_t, theirs_t in pairs:
        assert rel_err(ours_t.grad, theirs_t.grad.reshape(ours_t.shape)) < 1e-5
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
    assert rel_err(S @ A @ A.T @ S, B.T @ B) < 1e-10 and rel_err(S @ S_inv, torch.eye(3, dtype=torch.float64)) < 1e-10

    P = _psd_pow(S, -0.5)  # the refactoring B' = B P, A' = P^-1 A: balanced, same product
    A1, B1 = torch.linalg.solve(P, A), B @ P
    assert rel_err(A1 @ A1.T, B1.T @ B1) < 1e-10 and rel_err(B1 @ A1, B @ A) < 1e-12

    lr = 0.05
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    m.attach(opt)
    x = torch.randn(10, 24, dtype=torch.float64)
    net(x).square().sum().backward()
    gA, gB = layer.lora_A.grad.clone(), layer.lora_B.grad.clone()
    opt.step()
    # the gradient at the refactored point, stepped there: g_A' = P g_A, g_B' = g_B P^-1
    want = (B1 - lr * gB @ torch.linalg.inv(P)) @ (A1 - lr * P @ gA)
    assert rel_err(layer.lora_B.detach() @ layer.lora_A.detach(), want) < 1e-10
    assert rel_err(layer.lora_B.detach() @ layer.lora_A.detach(), (B - lr * gB) @ (A - lr * gA)) > 1e-6


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
        assert rel_err(B @ A, before[n]) < 1e-12
        assert abs(A.norm().item() - B.norm().item()) < 1e-12 * B.norm().item()
        for p, f in ((A, c), (B, 1 / c)):
            old = moments[id(p)]
            assert rel_err(opt.state[p]["exp_avg"], old["exp_avg"] / f) < 1e-14
            assert rel_err(opt.state[p]["exp_avg_sq"], old["exp_avg_sq"] / f ** 2) < 1e-14


# --------------------------------------------------------------------------- CG-LoRA


def _regression(shift: bool, step: float):
    """A float64 linear layer adapted by CG-LoRA on two batches of a squared-error loss, and what
    the test needs to recompute the curvature by hand."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(12, 10, dtype=torch.float64))
    m = CGLoRA(r=3, lora_alpha=6, target_modules=["0"], damping=1e-2, shift=shift, step=step)
    net = m.apply(net)
    W0, b = net[0].weight.detach().clone(), net[0].bias.detach().clone()
    X, Y = torch.randn(40, 12, dtype=torch.float64), torch.randn(40, 10, dtype=torch.float64)
    batches = [(X[:20], Y[:20]), (X[20:], Y[20:])]
    loss_fn = lambda model, bt: (model(bt[0]) - bt[1]).square().sum(-1).mean()  # noqa: E731
    with torch.no_grad():
        before = sum(loss_fn(net, bt) for bt in batches).item()
    m.initialize(net, batches, loss_fn)
    return m, net, W0, b, X, Y, batches, loss_fn, before


def _whitened_step(W0, b, X, Y, r: int, damping: float) -> torch.Tensor:
    """-S_out^-1/2 [S_out^-1/2 G S_in^-1/2]_r S_in^-1/2 from the empirical Fisher's K-FAC factors."""
    E = 2 * (X @ W0.T + b - Y)  # each row's own loss gradient at the layer's output
    G = E.T @ X / X.shape[0]  # the mean loss's gradient (both batches have 20 rows)

    def inv_sqrt(S):
        lam, U = torch.linalg.eigh(S + damping * S.diagonal().mean() * torch.eye(S.shape[0], dtype=S.dtype))
        return (U * lam.rsqrt()) @ U.T

    Si, So = inv_sqrt(X.T @ X / X.shape[0]), inv_sqrt(E.T @ E / X.shape[0])
    U, sigma, Vh = torch.linalg.svd(So @ G @ Si)
    return -So @ (U[:, :r] * sigma[:r]) @ Vh[:r] @ Si


def test_cglora_b0a0_is_the_rank_r_curvature_whitened_step():
    """s B0 A0 = step * D_r: the curvature's magnitudes kept, not one norm per direction; base shifted."""
    m, net, W0, b, X, Y, *_ = _regression(shift=True, step=0.5)
    layer = net[0]
    D = _whitened_step(W0, b, X, Y, r=3, damping=1e-2)
    assert rel_err(layer.scaling * layer.lora_B @ layer.lora_A, 0.5 * D) < 1e-9
    assert torch.allclose(layer.lora_B.norm(dim=0), layer.lora_A.norm(dim=1))  # balanced per rank
    assert rel_err(layer.weight + layer.scaling * layer.lora_B @ layer.lora_A, W0) < 1e-12  # shifted: unchanged


def test_cglora_no_shift_starts_one_step_along_it():
    """The paper's "no shift" variant: W0 stays, the model starts at W0 + step * D_r (and the loss falls)."""
    m, net, W0, b, X, Y, batches, loss_fn, before = _regression(shift=False, step=0.2)
    layer = net[0]
    assert torch.equal(layer.weight, W0)
    assert rel_err(layer.weight + layer.scaling * layer.lora_B @ layer.lora_A, W0 + 0.2 * _whitened_step(W0, b, X, Y, r=3, damping=1e-2)) < 1e-9
    with torch.no_grad():
        assert sum(loss_fn(net, bt) for bt in batches).item() < before - 1e-3


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
    assert rel_err(after, before) < 1e-5
    for n, layer in m.layers(model):
        assert layer.lora_A.grad is None and layer.lora_B.grad is None
        assert rel_err(layer.weight, W0[n]) > 1e-3  # the base did move, by -s B0 A0
        assert rel_err(layer.weight + layer.delta_weight(), W0[n]) < 1e-5
    largest = max(float(layer.lora_B.norm(dim=0).max()) for _, layer in m.layers(model))
    assert largest == pytest.approx(1.0, rel=1e-5)  # step=None: the model's largest factor column has norm 1


# --------------------------------------------------------------------------- reference options, defaults


def test_reflora_warmup_interval_and_re_init_as_the_reference():
    """zhangyilang/RefLoRA: warm-up 100 by default, refactoring every ``interval`` steps after it, and
    ``re_init`` (A, B kaiming-uniform, the base shifted by -s B A: the output unchanged)."""
    assert RefLoRA().warmup_steps == 100 and RefLoRA().interval == 1
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(24, 12, dtype=torch.float64))
    x = torch.randn(10, 24, dtype=torch.float64)
    before = net(x).detach()
    for variant, hook in (("full", "precondition"), ("s", "rebalance")):
        m = RefLoRA(r=3, target_modules=["0"], warmup_steps=2, interval=3, re_init=True, variant=variant)
        model = m.apply(copy.deepcopy(net))
        layer = model[0]
        assert layer.lora_B.abs().min() > 0 and rel_err(model(x), before) < 1e-12 and rel_err(layer.weight, net[0].weight) > 1e-3
        calls = []
        setattr(m, hook, lambda *args: calls.append(m.step))
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        m.attach(opt)
        for _ in range(12):
            model(x).square().sum().backward()
            opt.step()
            opt.zero_grad()
        assert calls == [2, 5, 8, 11] == [s for s in range(12) if m.acts_at(s)]
    with pytest.raises(ValueError, match="re_init"):
        RefLoRA(re_init=True, init="gaussian")


def test_vera_saves_its_bank_by_default_as_peft():
    assert VeraConfig(target_modules=SEVEN).save_projection is True
    sd = VeRA(r=16, target_modules=SEVEN).apply(llama()).state_dict()
    assert any(k.endswith("bank.lora_A") for k in sd) and any(k.endswith("bank.seed") for k in sd)
    sd = VeRA(r=16, target_modules=SEVEN, save_projection=False).apply(llama()).state_dict()
    assert not any(k.endswith("bank.lora_A") for k in sd) and any(k.endswith("bank.seed") for k in sd)


def test_vera_without_its_bank_redraws_it_from_the_saved_seed():
    m = VeRA(r=16, target_modules=SEVEN, projection_prng_key=3, save_projection=False)
    model = m.apply(llama())
    with torch.no_grad():
        for _, layer in m.layers(model):
            layer.out_scale.normal_()
    fresh = VeRA(r=16, target_modules=SEVEN, projection_prng_key=7, save_projection=False).apply(llama())
    fresh.load_state_dict(model.state_dict())
    probe = batch(8)["input_ids"]
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=probe).logits, model(input_ids=probe).logits)


def test_pissa_fast_svd_as_peft_pissa_niter():
    """PEFT's ``init_lora_weights="pissa_niter_[n]"``: the principal factors from torch.svd_lowrank."""
    torch.manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(40, 40))
    V, _ = torch.linalg.qr(torch.randn(48, 48))
    W = (U[:, :20] * 2.0 ** -torch.arange(20.0)) @ V[:, :20].T  # a decaying spectrum
    layers = {}
    for init in ("pissa", "pissa_niter_4"):
        lin = nn.Linear(48, 40)
        with torch.no_grad():
            lin.weight.copy_(W)
        layers[init] = LoRA(r=4, lora_alpha=8, target_modules=["0"], init_lora_weights=init).apply(nn.Sequential(lin))[0]
    fast, full = layers["pissa_niter_4"], layers["pissa"]
    assert rel_err(fast.weight + fast.delta_weight(), W) < 1e-6
    assert rel_err(fast.lora_B @ fast.lora_A, full.lora_B @ full.lora_A) < 2e-3  # 4 subspace iterations
    assert rel_err(fast.weight, W) > 0.1


@pytest.mark.parametrize("kw, expected", [({}, True), (dict(init="kaiming"), True), (dict(init="gaussian"), "gaussian"),
                                          (dict(init_lora_weights=False), False),
                                          (dict(init_lora_weights="gaussian", init="gaussian"), "gaussian")])
def test_init_lora_weights_as_peft_and_init_as_its_alias(kw, expected):
    assert LoRA(**kw).init_lora_weights == expected


def test_init_lora_weights_false_starts_both_factors_random_as_peft():
    torch.manual_seed(0)
    layer = LoRA(r=4, target_modules=["0"], init_lora_weights=False).apply(nn.Sequential(nn.Linear(16, 8)))[0]
    assert layer.lora_A.abs().sum() > 0 and layer.lora_B.abs().sum() > 0  # the update is nonzero at the start


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
        m2.projection_prng_key = 7  # a different bank: the saved one replaces it
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


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("make, exc, needle", [
    (lambda: LoRA(r=0), ValueError, "r:"),
    (lambda: LoRA(lora_dropout=1.0), ValueError, "lora_dropout"),
    (lambda: LoRA(init="svd"), ValueError, "init: expected one of"),
    (lambda: LoRA(init_lora_weights="svd"), ValueError, "init_lora_weights: expected True, False"),
    (lambda: LoRA(init="pissa", init_lora_weights="gaussian"), ValueError, "init: expected it unset or equal"),
    (lambda: TiedLoRA(trainable="AX"), ValueError, "trainable"),
    (lambda: TiedLoRA(trainable="A"), ValueError, "trainable"),
    (lambda: AdaLoRA(init_r=4, target_r=6, total_step=10), ValueError, "target_r"),
    (lambda: AdaLoRA(total_step=10, tinit=8, tfinal=2), ValueError, "tinit"),
    (lambda: RefLoRA(variant="x"), ValueError, "variant"),
    (lambda: CGLoRA(init_lora_weights="pissa"), ValueError, "init_lora_weights: expected True, False or 'gaussian'"),
    (lambda: RefLoRA(re_init=True, init_lora_weights=False), ValueError, "re_init: expected init_lora_weights=True"),
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
