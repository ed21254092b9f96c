"""save_peft: methods trained in lorakern, saved for PEFT and loaded by stock PEFT (tiny Llama, fp32, CPU).

Each method trains 3 steps, is saved with ``save_peft`` and loaded with
``PeftModel.from_pretrained`` onto a fresh copy of the base: same logits (relative 1e-5). PEFT's
own ``save_pretrained`` of what it loaded writes the same files, and a stock PEFT model with the
equivalent config saves the same config and keys.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from peft import AdaLoraConfig, LoraConfig, PeftModel, VeraConfig, get_peft_model  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from conftest import TINY_LLAMA, tiny_llama  # noqa: E402
from lorakern.methods import AdaLoRA, CGLoRA, DoRA, IGULoRA, LoRA, Method, RefLoRA, TiedLoRA, VeRA  # noqa: E402
from lorakern.peft import save_peft  # noqa: E402
from lorakern.testing import rel_err  # noqa: E402

SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
R = 4
ADA = dict(init_r=R, target_r=2, total_step=4, tinit=0, tfinal=1, target_modules=SEVEN)

# name: (our method, the equivalent PEFT config)
CASES = {
    "lora": (lambda: LoRA(r=R, lora_alpha=8, target_modules=SEVEN),
             lambda: LoraConfig(r=R, lora_alpha=8, target_modules=SEVEN)),
    "rslora": (lambda: LoRA(r=R, lora_alpha=8, target_modules=SEVEN, use_rslora=True),
               lambda: LoraConfig(r=R, lora_alpha=8, target_modules=SEVEN, use_rslora=True)),
    "pissa": (lambda: LoRA(r=R, lora_alpha=8, target_modules=SEVEN, init="pissa"),
              lambda: LoraConfig(r=R, lora_alpha=8, target_modules=SEVEN, init_lora_weights="pissa")),
    "dora": (lambda: DoRA(r=R, lora_alpha=8, target_modules=SEVEN),
             lambda: LoraConfig(r=R, lora_alpha=8, target_modules=SEVEN, use_dora=True)),
    "vera": (lambda: VeRA(r=16, target_modules=SEVEN, projection_prng_key=3, save_projection=False),
             lambda: VeraConfig(r=16, target_modules=SEVEN, projection_prng_key=3, save_projection=False)),
    "vera-saved": (lambda: VeRA(r=16, target_modules=SEVEN, save_projection=True),
                   lambda: VeraConfig(r=16, target_modules=SEVEN, save_projection=True)),
    "adalora": (lambda: AdaLoRA(**ADA), lambda: AdaLoraConfig(**ADA)),
    "reflora": (lambda: RefLoRA(r=R, lora_alpha=8, target_modules=SEVEN, warmup_steps=1),
                lambda: LoraConfig(r=R, lora_alpha=8, target_modules=SEVEN)),
}


def batch(seed: int) -> dict:
    ids = torch.randint(0, TINY_LLAMA["vocab_size"], (4, 16), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "labels": ids}


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=batch(9)["input_ids"]).logits


def train(m: Method, model: nn.Module, steps: int = 3) -> nn.Module:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    m.attach(opt)
    for step in range(steps):
        (model(**batch(step)).loss + m.regularization(model)).backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


def read(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(adapter_config.json, adapter_model.safetensors)`` of a checkpoint folder, sets for lists."""
    config = json.loads((path / "adapter_config.json").read_text())
    config["target_modules"] = set(config["target_modules"])
    return config, load_file(path / "adapter_model.safetensors")


@pytest.mark.parametrize("name", sorted(CASES))
def test_peft_loads_what_save_peft_writes(name, tmp_path):
    make_method, make_config = CASES[name]
    m = make_method()
    ours = train(m, m.apply(tiny_llama()))
    if name == "adalora":  # the budget fell from 56 ranks: some are masked
        assert 0 < m.active_ranks(ours) < R * len(m.layers(ours))
    save_peft(m, ours, tmp_path / "ours")

    theirs = PeftModel.from_pretrained(tiny_llama(), tmp_path / "ours")
    assert rel_err(logits(theirs), logits(ours)) < 1e-5
    assert rel_err(logits(ours), logits(tiny_llama())) > 1e-3  # the adapters are trained, not at their zero start

    theirs.save_pretrained(tmp_path / "resaved")  # PEFT writes back exactly what it loaded
    config, tensors = read(tmp_path / "ours")
    config_again, tensors_again = read(tmp_path / "resaved")
    assert config == config_again and tensors.keys() == tensors_again.keys()
    assert all(torch.equal(t, tensors_again[k]) for k, t in tensors.items())

    stock = get_peft_model(tiny_llama(), make_config())  # the equivalent PEFT config saves the same config and keys
    stock.save_pretrained(tmp_path / "stock")
    config_stock, tensors_stock = read(tmp_path / "stock")
    if name == "adalora":
        assert set(config.pop("rank_pattern")) == {f"{n}.lora_E" for n, _ in m.layers(ours)}
        assert config_stock.pop("rank_pattern") is None  # stock PEFT has not masked yet
    assert config == config_stock and tensors.keys() == tensors_stock.keys()


def test_cglora_saves_as_lora_onto_its_shifted_base(tmp_path):
    m = CGLoRA(r=R, lora_alpha=8, target_modules=SEVEN)
    ours = m.apply(tiny_llama())
    m.initialize(ours, [batch(1), batch(2)])
    train(m, ours)
    with pytest.raises(NotImplementedError, match="CGLoRA.*W0 - s B0 A0.*allow_shifted_base=True"):
        save_peft(m, ours, tmp_path)
    save_peft(m, ours, tmp_path, allow_shifted_base=True)
    assert read(tmp_path)[0]["peft_type"] == "LORA"
    base = tiny_llama()
    with torch.no_grad():
        for name, layer in m.layers(ours):
            base.get_submodule(name).weight.copy_(layer.weight)
    assert rel_err(logits(PeftModel.from_pretrained(base, tmp_path)), logits(ours)) < 1e-5


class _OwnLoRA(LoRA):
    pass


@pytest.mark.parametrize("make, needle", [
    (lambda: TiedLoRA(r=R, target_modules=SEVEN), "TiedLoRA.*PEFT has no Tied-LoRA"),
    (lambda: IGULoRA(init_r=R, target_r=2, total_step=4, target_modules=SEVEN), "IGULoRA.*PEFT has no IGU-LoRA"),
    (lambda: _OwnLoRA(r=R, target_modules=SEVEN), "_OwnLoRA.*no PEFT export"),
])
def test_methods_peft_does_not_have_raise(make, needle, tmp_path):
    m = make()
    model = m.apply(tiny_llama())
    with pytest.raises(NotImplementedError, match=needle):
        save_peft(m, model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unadapted_or_merged_models_are_refused(tmp_path):
    m = LoRA(r=R, target_modules=SEVEN)
    with pytest.raises(ValueError, match="found no LoRALinear"):
        save_peft(m, tiny_llama(), tmp_path)
    model = m.apply(tiny_llama())
    model.model.layers[0].mlp.up_proj.merge()
    with pytest.raises(ValueError, match="merged.*up_proj"):
        save_peft(m, model, tmp_path)
