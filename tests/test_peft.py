"""lorakern.peft: PEFT's LoRA layers through the fused op, against stock PEFT on a tiny Llama.

Every comparison runs the same model twice, stock and patched (a deep copy), in fp32 on CPU.
``fused`` counts the op's calls from lorakern.peft, so a test also proves which path ran.
"""
from __future__ import annotations

import copy
import io
import logging

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from peft.tuners.lora.layer import Linear as PeftLoraLinear  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

import lorakern.peft as lkpeft  # noqa: E402
from conftest import PEFT_LLAMA, TINY_LLAMA, tiny_llama  # noqa: E402
from lorakern.testing import rel_err  # noqa: E402

SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LAYERS = TINY_LLAMA["num_hidden_layers"]
pytestmark = pytest.mark.usefixtures("one_thread")


def llama(seed: int = 0, **lora) -> PeftModel:
    """A tiny Llama with PEFT LoRA on all seven projections; B random so every gradient is nonzero."""
    kw = dict(r=4, lora_alpha=8, target_modules=SEVEN, init_lora_weights=False)
    return get_peft_model(tiny_llama(seed, **PEFT_LLAMA), LoraConfig(**{**kw, **lora}))


def tokens(seed: int, batch: int = 2, seq: int = 12) -> torch.Tensor:
    return torch.randint(0, 256, (batch, seq), generator=torch.Generator().manual_seed(seed))


def counting(seed: int, batch: int = 4, seq: int = 16) -> torch.Tensor:
    """Learnable text: runs ``k, k+1, ...`` modulo 16 from random starts."""
    start = torch.randint(0, 16, (batch, 1), generator=torch.Generator().manual_seed(seed))
    return (start + torch.arange(seq)) % 16


def stock_and_patched(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    patched = copy.deepcopy(model)
    lkpeft.patch(patched)
    return model, patched


def logits(model: nn.Module, ids: torch.Tensor, **kw) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, **kw).logits


@pytest.fixture
def fused(monkeypatch) -> list:
    """Records the kwargs of every op call lorakern.peft makes."""
    calls = []
    real = lkpeft.layer.lora_linear

    def counting(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(lkpeft.layer, "lora_linear", counting)
    return calls


@pytest.fixture(autouse=True)
def _debug_log(caplog):
    caplog.set_level(logging.DEBUG, logger="lorakern.peft")


def fallback_reasons(caplog) -> list[str]:
    """The reasons lorakern.peft logged for running PEFT's own forward."""
    return [r.getMessage() for r in caplog.records if "PEFT's own forward" in r.getMessage()]


# --------------------------------------------------------------------------- parity


def test_patch_count_loss_gradients_and_20_adamw_steps(fused, caplog):
    stock, patched = stock_and_patched(llama())
    assert lkpeft.patch(patched) == 7 * LAYERS  # idempotent: the same count again
    opts = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2) for m in (stock, patched)]
    first = None
    for step in range(20):
        ids = counting(step)
        losses = []
        for m, opt in zip((stock, patched), opts):
            opt.zero_grad()
            loss = m(input_ids=ids, labels=ids).loss
            loss.backward()
            losses.append(loss.detach())
        first = first or losses[0].item()
        # step 0: the same loss; later steps: Adam's 1/sqrt(v) amplifies fp32 rounding a little
        assert rel_err(losses[1], losses[0]) <= (1e-5 if step == 0 else 1e-4), (step, losses)
        if step == 0:
            assert len(fused) == 7 * LAYERS
            grads = [{n: p.grad for n, p in m.named_parameters() if p.requires_grad} for m in (stock, patched)]
            assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 2 * 7 * LAYERS
            for name, g in grads[0].items():
                assert g.abs().sum() > 0, name
                assert rel_err(grads[1][name], g) <= 1e-5, name
        for opt in opts:
            opt.step()
    assert losses[0] < first - 0.2, (first, losses)  # it trained
    assert len(fused) == 20 * 7 * LAYERS and not fallback_reasons(caplog)


def test_dropout_has_peft_distribution(fused):
    """One layer, dropout 0.3: the output's mean and variance over fresh masks match PEFT's."""
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(32, 24))
    stock, patched = stock_and_patched(get_peft_model(
        net, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.3, target_modules=["0"], init_lora_weights=False)))
    stock.train(), patched.train()
    x = torch.randn(64, 32)
    with torch.no_grad():
        stock.eval()
        exact = stock(x)
        stock.train()
        ys = [torch.stack([m(x) for _ in range(300)]) for m in (stock, patched)]
    assert len(fused) == 300
    n = ys[0].shape[0]
    z2 = [((y.mean(0) - exact) / (y.std(0) / n**0.5)).pow(2).mean().item() for y in ys]
    var_ratio = (ys[1].var(0) / ys[0].var(0)).mean().item()
    assert 0.5 < z2[0] < 2.0 and 0.5 < z2[1] < 2.0, z2  # both unbiased around the no-dropout output
    assert 0.85 < var_ratio < 1.15, var_ratio  # same spread: same p, same 1/(1-p) scale


def train_then_eval(model: nn.Module, steps: int, seed: int) -> float:
    """Train on counting runs (``seed`` picks the dropout masks); the eval loss on held-out runs."""
    torch.manual_seed(seed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    for step in range(steps):
        ids = counting(step, batch=8, seq=32)
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    ids = counting(-1, batch=16, seq=32)
    with torch.no_grad():
        return model(input_ids=ids, labels=ids).loss.item()


def test_dropout_training_reaches_the_same_loss_within_noise(fused):
    model = llama(lora_dropout=0.1)
    start = train_then_eval(copy.deepcopy(model), 0, 0)
    stock = [train_then_eval(copy.deepcopy(model), 30, seed) for seed in (1, 2, 3)]
    lkpeft.patch(model)
    ours = [train_then_eval(copy.deepcopy(model), 30, seed) for seed in (1, 2, 3)]
    assert len(fused) == 3 * (30 + 1) * 7 * LAYERS  # 30 training steps and the eval
    mean = lambda v: sum(v) / len(v)  # noqa: E731
    noise = max(stock) - min(stock)  # stock against itself, other masks
    assert max(stock + ours) < start - 0.25, (start, stock, ours)  # both trained
    assert abs(mean(ours) - mean(stock)) <= max(2 * noise, 0.02), (stock, ours)


# --------------------------------------------------------------------------- PEFT's own features


def test_state_dict_save_pretrained_from_pretrained(tmp_path, fused):
    stock, patched = stock_and_patched(llama())
    assert list(stock.state_dict()) == list(patched.state_dict())
    params = {id(p) for p in stock.parameters()}
    lkpeft.patch(stock)  # in place: the same parameter objects
    assert {id(p) for p in stock.parameters()} == params
    lkpeft.unpatch(stock)
    patched.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_llama(5, **PEFT_LLAMA), tmp_path)  # a different random base
    loaded.base_model.model.load_state_dict(patched.base_model.model.state_dict(), strict=False)
    assert lkpeft.patch(loaded) == 7 * LAYERS
    ids = tokens(0)
    assert rel_err(logits(loaded, ids), logits(patched, ids)) <= 1e-6
    assert len(fused) == 2 * 7 * LAYERS
    buf = io.BytesIO()
    torch.save(patched, buf)  # the whole module, pickled: still patched once loaded
    buf.seek(0)
    assert rel_err(logits(torch.load(buf, weights_only=False), ids), logits(patched, ids)) <= 1e-6
    assert len(fused) == 4 * 7 * LAYERS


def test_merge_and_unload(fused, caplog):
    _, patched = stock_and_patched(llama())
    ids = tokens(1)
    before = logits(patched, ids)
    patched.merge_adapter()  # merged: the base alone runs (PEFT's forward), adapter folded in
    assert rel_err(logits(patched, ids), before) <= 1e-5
    assert any("merged" in r for r in fallback_reasons(caplog))
    patched.unmerge_adapter()
    n = len(fused)
    assert rel_err(logits(patched, ids), before) <= 1e-5 and len(fused) == n + 7 * LAYERS
    merged = patched.merge_and_unload()
    assert not any(isinstance(m, PeftLoraLinear) for m in merged.modules())
    assert rel_err(logits(merged, ids), before) <= 1e-5


def test_disable_adapter(fused):
    stock, patched = stock_and_patched(llama())
    ids = tokens(2)
    with patched.disable_adapter():
        base = logits(patched, ids)
    with stock.disable_adapter():
        assert rel_err(base, logits(stock, ids)) <= 1e-6
    assert not fused
    assert rel_err(logits(patched, ids), base) > 1e-3  # the adapter is back


def add_second_adapter(model: PeftModel) -> None:
    torch.manual_seed(3)
    model.add_adapter("b", LoraConfig(r=8, lora_alpha=4, target_modules=SEVEN, init_lora_weights=False))


def test_set_adapter_and_several_active_adapters(fused, caplog):
    stock, patched = stock_and_patched(llama())
    add_second_adapter(stock), add_second_adapter(patched)
    ids = tokens(3)
    outs = {}
    for active in ("default", "b", ["default", "b"]):
        for m in (stock, patched):
            m.base_model.set_adapter(active)
        outs[str(active)] = logits(patched, ids)
        assert rel_err(outs[str(active)], logits(stock, ids)) <= 1e-5, active
    assert rel_err(outs["default"], outs["b"]) > 1e-3 and rel_err(outs["['default', 'b']"], outs["b"]) > 1e-3
    assert len(fused) == 3 * 7 * LAYERS and not fallback_reasons(caplog)
    assert [c.get("rank_scale") is not None for c in fused[-7 * LAYERS:]] == [True] * 7 * LAYERS


def test_several_active_adapters_training_gradients(fused):
    stock, patched = stock_and_patched(llama())
    for m in (stock, patched):
        add_second_adapter(m)
        m.base_model.set_adapter(["default", "b"])
    ids = tokens(4)
    for m in (stock, patched):
        m(input_ids=ids, labels=ids).loss.backward()
    g = [{n: p.grad for n, p in m.named_parameters() if p.grad is not None} for m in (stock, patched)]
    assert g[0].keys() == g[1].keys() and len(g[0]) == 4 * 7 * LAYERS
    for name in g[0]:
        assert rel_err(g[1][name], g[0][name]) <= 1e-5, name
    assert len(fused) == 7 * LAYERS


def test_adapter_names_mixed_batch_of_different_ranks(fused, caplog):
    stock, patched = stock_and_patched(llama())
    for m in (stock, patched):
        add_second_adapter(m)
        m.eval()  # PEFT allows adapter_names in eval mode only
    ids = tokens(5, batch=5)
    names = ["b", "default", "__base__", "b", "default"]
    out = logits(patched, ids, adapter_names=names)
    assert rel_err(out, logits(stock, ids, adapter_names=names)) <= 1e-5
    assert len(fused) == 7 * LAYERS and not fallback_reasons(caplog)
    rows = [0] * 12 + [1] * 12 + [-1] * 12 + [0] * 12 + [1] * 12  # banks in order of first use: b, default
    assert all(c["adapter_index"].index.tolist() == rows for c in fused)
    with patched.disable_adapter():
        base = logits(patched, ids[2:3])
    assert rel_err(out[2:3], base) <= 1e-6  # "__base__" rows see the base alone
    with pytest.raises(ValueError, match="adapter_names"):
        patched(input_ids=ids, adapter_names=names[:3])


def test_adapter_names_index_is_read_once_for_all_layers_under_inference_mode(fused, monkeypatch):
    """Serving: the mixed batch's rows are one AdapterBatch for every layer of a forward call, so
    the index is read (a host sync on a GPU) once per batch, not once per layer, inside
    torch.inference_mode too; nothing outlives the call."""
    _, patched = stock_and_patched(llama())
    add_second_adapter(patched)
    patched.eval()
    ids = tokens(6, batch=3)
    names = ["b", "default", "__base__"]
    want = logits(patched, ids, adapter_names=names)
    reads = []
    real = torch.aminmax
    monkeypatch.setattr(torch, "aminmax", lambda t: reads.append(1) or real(t))
    with torch.inference_mode():
        got = patched(input_ids=ids, adapter_names=names).logits
    assert torch.equal(got, want)
    assert len({id(c["adapter_index"]) for c in fused}) == 2 and len(reads) == 1  # want's call, then this one


# --------------------------------------------------------------------------- enable, disable, unpatch


def test_enable_disable_cover_present_and_future_layers(fused):
    present = llama()
    lkpeft.enable()
    try:
        assert lkpeft.is_enabled()
        future = llama(seed=1)
        ids = tokens(6)
        logits(present, ids), logits(future, ids)
        assert len(fused) == 2 * 7 * LAYERS
        assert lkpeft.patch(future) == 7 * LAYERS  # harmless while enabled
        assert lkpeft.unpatch(future) == 7 * LAYERS
    finally:
        lkpeft.disable()
    assert not lkpeft.is_enabled()
    n = len(fused)
    logits(present, ids), logits(future, ids)
    assert len(fused) == n


def test_unpatch_restores_peft_forward(fused):
    model = llama()
    ids = tokens(7)
    assert lkpeft.patch(model) == 7 * LAYERS
    logits(model, ids)
    assert len(fused) == 7 * LAYERS
    assert lkpeft.unpatch(model) == 7 * LAYERS
    assert lkpeft.unpatch(model) == 0
    logits(model, ids)
    assert len(fused) == 7 * LAYERS
    assert not any("forward" in m.__dict__ for m in model.modules())


def test_patch_rejects_a_non_module():
    with pytest.raises(TypeError, match="model: expected an nn.Module"):
        lkpeft.patch("model")


def _patch_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "patch" in r.getMessage()]


@pytest.mark.parametrize("lora, reason", [(dict(lora_bias=True), "has lora_bias"),
                                          (dict(use_dora=True, lora_dropout=0.1), "DoRA adapter 'default' with dropout")])
def test_patch_counts_only_layers_that_run_fused_and_warns_once(lora, reason, caplog):
    net = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    model = get_peft_model(net, LoraConfig(r=4, target_modules=["0", "2"], **lora))
    assert lkpeft.patch(model) == 0 == lkpeft.report(model).fused
    [warning] = _patch_warnings(caplog)
    assert "2 of 2 PEFT LoRA layers will not run fused" in warning and reason in warning
    assert "LoRA layers: 0 fused" in caplog.text  # the INFO table too


def test_patch_without_lora_layers_warns(caplog):
    assert lkpeft.patch(nn.Sequential(nn.Linear(4, 4))) == 0
    [warning] = _patch_warnings(caplog)
    assert "no PEFT LoRA layers found in Sequential" in warning


def test_patch_of_fusable_layers_does_not_warn(caplog):
    assert lkpeft.patch(llama()) == 7 * LAYERS and not _patch_warnings(caplog)


# --------------------------------------------------------------------------- fallbacks and dtypes


def test_dora_fused_with_peft_parity_over_3_adamw_steps(fused, caplog):
    """PEFT's DoRA through one op call per layer: the same losses and gradients (magnitudes too)."""
    stock, patched = stock_and_patched(llama(use_dora=True))
    opts = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2) for m in (stock, patched)]
    for step in range(3):
        ids = counting(step)
        losses, grads = [], []
        for m, opt in zip((stock, patched), opts):
            opt.zero_grad()
            loss = m(input_ids=ids, labels=ids).loss
            loss.backward()
            losses.append(loss.detach())
            grads.append({n: p.grad for n, p in m.named_parameters() if p.requires_grad})
        assert rel_err(losses[1], losses[0]) <= 1e-5, (step, losses)
        assert len(grads[0]) == 3 * 7 * LAYERS and any("magnitude" in n for n in grads[0])
        for name, g in grads[0].items():
            assert rel_err(grads[1][name], g) <= 1e-4, (step, name)
        for opt in opts:
            opt.step()
    assert len(fused) == 3 * 7 * LAYERS and not fallback_reasons(caplog)
    assert all(kw.get("base_scale") is not None and kw.get("out_scale") is kw.get("base_scale") for kw in fused)


def test_dora_with_dropout_falls_back_in_training_and_fuses_in_eval(fused, caplog):
    stock, patched = stock_and_patched(llama(use_dora=True, lora_dropout=0.1))
    ids = tokens(8)
    patched.train()
    torch.manual_seed(0)
    patched(input_ids=ids)
    assert not fused and any("DoRA" in r and "dropout" in r for r in fallback_reasons(caplog))
    stock.eval()
    patched.eval()
    assert rel_err(logits(patched, ids), logits(stock, ids)) <= 1e-6
    assert len(fused) == 7 * LAYERS


def test_bf16_base_fp32_adapters_fuse_outside_autocast_and_under_it(fused, caplog):
    model = llama()
    model.base_model.model.to(torch.bfloat16)
    for n, p in model.named_parameters():
        if "lora_" in n:
            p.data = p.data.float()  # PEFT's autocast_adapter_dtype: bf16 base, fp32 adapters
    stock, patched = stock_and_patched(model)
    ids = tokens(9)
    assert rel_err(logits(patched, ids), logits(stock, ids)) <= 2e-2  # the op's mixed precision
    assert len(fused) == 7 * LAYERS and not fallback_reasons(caplog)
    fused.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, ref = logits(patched, ids), logits(stock, ids)
    assert len(fused) == 7 * LAYERS
    assert out.dtype == ref.dtype and rel_err(out, ref) <= 2e-2


def test_gpt2_conv1d_fan_in_fan_out_fused_exactly(fused, caplog):
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=256, n_embd=32, n_layer=2, n_head=4, n_positions=32, bos_token_id=0, eos_token_id=0,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    stock, patched = stock_and_patched(get_peft_model(GPT2LMHeadModel(cfg), LoraConfig(
        r=4, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True, init_lora_weights=False)))
    assert lkpeft.patch(patched) == 4 * 2  # c_attn, attn.c_proj, c_fc, mlp.c_proj
    ids = tokens(10)
    for m in (stock, patched):
        m(input_ids=ids, labels=ids).loss.backward()
    assert len(fused) == 4 * 2 and not fallback_reasons(caplog)
    g = [{n: p.grad for n, p in m.named_parameters() if p.grad is not None} for m in (stock, patched)]
    assert len(g[0]) == 2 * 4 * 2
    for name in g[0]:
        assert rel_err(g[1][name], g[0][name]) <= 1e-5, name
    assert rel_err(logits(patched, ids), logits(stock, ids)) <= 1e-5


# --------------------------------------------------------------------------- the demo


def test_demo_runs_stock_and_patched_and_writes_the_plot(tmp_path, capsys):
    from lorakern.demo import main

    png = tmp_path / "demo.png"
    assert main(["--preset", "tiny", "--steps", "4", "--warmup", "1", "--out", str(png)]) == 0
    out = capsys.readouterr().out
    assert "14 layers fused, 0 calls fell back" in out and "speedup:" in out and str(png) in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(SystemExit):
        main(["--preset", "tiny", "--warmup", "0"])
