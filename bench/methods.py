"""Method bench: every lorakern method on small real tasks, on the CPU, beside PEFT's own
LoRA, AdaLoRA and VeRA, with each seed paper's claim set next to what was measured.

Three tasks, none of which needs a download:

1. ``lm``: a tiny Llama (transformers ``LlamaConfig``, byte tokens) pre-trained briefly on the
   Python standard library's own sources, then adapted to another text that ships with Python,
   ``pydoc_data.topics`` (the interpreter's help texts), by each method at equal rank (LoRA r = 8;
   AdaLoRA and IGU-LoRA from 12 down to an average of 8, the same budget). Held-out loss on the
   last tenth of the topics text, trainable parameters, share of LoRA's gain, time per step and
   the training memory the method adds (saved activations + adapter state).
2. ``alloc``: a stack of residual tanh layers whose teacher differs from the student's frozen
   weights by updates of known ranks per layer; AdaLoRA and IGU-LoRA must allocate a budget of the
   true total: the L1 distance of their allocated ranks to the true ones (and a uniform split's).
3. ``regress``: a low-rank regression ``Y = X W*^T`` with a known rank-4 target, fitted by rank-4
   factors with Adam at one learning rate: RefLoRA (full and -S) against LoRA from the same start
   (B = 0, or both factors random as in plain matrix factorization).

``python bench/methods.py`` (``make methods``) takes a few minutes on two cores; ``--quick`` runs
each method for a few steps (CI: ``tests/test_method_bench.py`` checks the table's structure). It
prints the tables and the claims, writes ``<out>/methods.json`` and ``<out>/methods.png``. A quick
run is too short to judge the claims: it prints them unjudged (the JSON keeps each criterion's
outcome as ``verdict`` and says ``"claims_judged": false``).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import sys
import sysconfig
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from lorakern.benchmark.timing import Stopwatch
from lorakern.methods import AdaLoRA, CGLoRA, IGULoRA, LoRA, RefLoRA, TiedLoRA, VeRA

CPU = torch.device("cpu")  # the step times come from the one timing module (Stopwatch)

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class Setting:
    """Step counts and sizes of one bench run (full or ``--quick``)."""
    batch: int
    seq: int
    pretrain_steps: int
    adapt_steps: int
    evals: int
    eval_batches: int
    stdlib_bytes: int
    alloc_steps: int
    regress_steps: int
    seeds: tuple[int, ...]


FULL = Setting(batch=8, seq=128, pretrain_steps=500, adapt_steps=150, evals=10, eval_batches=8,
               stdlib_bytes=3_000_000, alloc_steps=300, regress_steps=300, seeds=(0, 1))
QUICK = Setting(batch=2, seq=32, pretrain_steps=4, adapt_steps=3, evals=1, eval_batches=1, stdlib_bytes=100_000,
                alloc_steps=12, regress_steps=10, seeds=(0,))


# ------------------------------------------------------------------------------------------- data


def stdlib_text(limit: int) -> torch.Tensor:
    """The standard library's .py sources (site-packages, tests and pydoc_data left out), bytes."""
    root = sysconfig.get_paths()["stdlib"]
    chunks, size = [], 0
    for dirpath, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in ("site-packages", "test", "tests", "pydoc_data", "idle_test"))
        for name in sorted(files):
            if name.endswith(".py") and size < limit:
                with open(os.path.join(dirpath, name), "rb") as fh:
                    chunks.append(fh.read())
                size += len(chunks[-1])
    return torch.frombuffer(bytearray(b"".join(chunks)[:limit]), dtype=torch.uint8)


def topics_text() -> tuple[torch.Tensor, torch.Tensor]:
    """``pydoc_data.topics`` (the help texts), bytes, split 90 / 10 into train and held-out."""
    from pydoc_data.topics import topics
    data = torch.frombuffer(bytearray("\n\n".join(topics[k] for k in sorted(topics)).encode()), dtype=torch.uint8)
    cut = int(len(data) * 0.9)
    return data[:cut], data[cut:]


def windows(data: torch.Tensor, setting: Setting, gen: torch.Generator) -> torch.Tensor:
    """``setting.batch`` random windows of ``setting.seq`` bytes, int64 [batch, seq]."""
    start = torch.randint(0, len(data) - setting.seq - 1, (setting.batch,), generator=gen)
    return torch.stack([data[s: s + setting.seq] for s in start.tolist()]).long()


# ------------------------------------------------------------------------------------------- model


def tiny_llama(setting: Setting) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=setting.seq,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg)


def lm_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=ids).logits
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))


def pretrained(setting: Setting, out: str) -> dict:
    """The base model's state dict: pre-trained on the stdlib sources (cached in ``out``)."""
    path = os.path.join(out, f"methods_base_{setting.pretrain_steps}_{setting.batch}x{setting.seq}_"
                             f"{setting.stdlib_bytes}.pt")
    if os.path.exists(path):
        return torch.load(path)
    torch.manual_seed(1234)
    data = stdlib_text(setting.stdlib_bytes)
    model = tiny_llama(setting)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(1234)
    for step in range(setting.pretrain_steps):
        for group in opt.param_groups:
            group["lr"] = 3e-3 * min(1.0, (step + 1) / 50)
        lm_loss(model, windows(data, setting, gen)).backward()
        opt.step()
        opt.zero_grad()
    state = model.state_dict()
    torch.save(state, path)
    return state


# ------------------------------------------------------------------------------------------- methods


@dataclass
class Adapter:
    """A method set up on a model: what the training loop needs."""
    model: nn.Module
    extra_loss: Callable[[], torch.Tensor] = lambda: 0.0
    after_step: Callable[[int], None] = lambda step: None
    attach: Callable[[torch.optim.Optimizer], None] = lambda opt: None
    allocation: Callable[[], dict[str, int]] = dict


def ours(method, prepare: Optional[Callable] = None) -> Callable[[nn.Module], Adapter]:
    def build(model: nn.Module) -> Adapter:
        model = method.apply(model)
        if prepare is not None:
            prepare(method, model)
        return Adapter(model, extra_loss=lambda: method.regularization(model), attach=method.attach,
                       allocation=(lambda: method.ranks(model)) if isinstance(method, AdaLoRA) else dict)
    return build


def peft(config) -> Callable[[nn.Module], Adapter]:
    def build(model: nn.Module) -> Adapter:
        from peft import AdaLoraConfig, get_peft_model
        pm = get_peft_model(model, config)
        if not isinstance(config, AdaLoraConfig):
            return Adapter(pm)
        inner = pm.base_model

        def orth() -> torch.Tensor:  # what PEFT's AdaLoraModel.forward adds to a loss it computes
            terms = [torch.linalg.norm((p @ p.T if "lora_A" in n else p.T @ p) - torch.eye(
                p.shape[0] if "lora_A" in n else p.shape[1])) for n, p in inner.model.named_parameters()
                if ("lora_A" in n or "lora_B" in n) and p.requires_grad]
            return config.orth_reg_weight * torch.stack(terms).mean()

        def allocation() -> dict[str, int]:
            pattern = pm.peft_config["default"].rank_pattern or {}
            return {n.removesuffix(".lora_E.default"): sum(v) for n, v in pattern.items()}

        return Adapter(pm, extra_loss=orth, after_step=inner.update_and_allocate, allocation=allocation)
    return build


def cg_prepare(batches: list[torch.Tensor]) -> Callable:
    return lambda method, model: method.initialize(model, batches, loss_fn=lm_loss)


def lm_methods(steps: int, cg_batches: list[torch.Tensor]) -> dict[str, tuple[str, float, Callable]]:
    """``{name: (PEFT counterpart or "", learning rate, builder)}`` at equal rank / budget."""
    from peft import AdaLoraConfig, LoraConfig, VeraConfig
    r, lr, vera_lr = 8, 3e-3, 3e-2
    sched = dict(init_r=12, target_r=r, total_step=steps, tinit=steps // 10, tfinal=steps // 5,
                 deltaT=max(1, steps // 20), target_modules=TARGETS)
    return {
        "lora": ("peft-lora", lr, ours(LoRA(r=r, lora_alpha=16, target_modules=TARGETS))),
        "peft-lora": ("", lr, peft(LoraConfig(r=r, lora_alpha=16, target_modules=TARGETS))),
        "tied-TL5": ("", lr, ours(TiedLoRA(r=r, target_modules=TARGETS, trainable="TL5"))),
        "tied-TL6": ("", lr, ours(TiedLoRA(r=r, target_modules=TARGETS, trainable="TL6"))),
        "vera": ("peft-vera", vera_lr, ours(VeRA(r=64, target_modules=TARGETS))),
        "peft-vera": ("", vera_lr, peft(VeraConfig(r=64, target_modules=TARGETS))),
        "adalora": ("peft-adalora", lr, ours(AdaLoRA(**sched))),
        "peft-adalora": ("", lr, peft(AdaLoraConfig(**sched))),
        "igulora": ("", lr, ours(IGULoRA(**sched))),
        "igulora-ada": ("", lr, ours(IGULoRA(lora_alpha=8.0, lora_dropout=0.0, **sched))),
        "reflora": ("", lr, ours(RefLoRA(r=r, lora_alpha=16, target_modules=TARGETS))),
        "reflora-S": ("", lr, ours(RefLoRA(r=r, lora_alpha=16, target_modules=TARGETS, variant="s"))),
        "cglora": ("", lr, ours(CGLoRA(r=r, lora_alpha=16, target_modules=TARGETS), cg_prepare(cg_batches))),
        "cglora-noshift": ("", lr, ours(CGLoRA(r=r, lora_alpha=16, target_modules=TARGETS, shift=False),
                                        cg_prepare(cg_batches))),
    }


# ------------------------------------------------------------------------------------------- training


def added_memory(adapter: Adapter, params: list[nn.Parameter], ids: torch.Tensor) -> int:
    """Bytes one training step holds for the method: tensors saved for backward (each storage
    once) plus the adapter's parameters, gradients and two Adam moments."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = lm_loss(adapter.model, ids) + adapter.extra_loss()
    loss.backward()
    for p in params:
        p.grad = None
    return sum(seen.values()) + 4 * sum(p.numel() * p.element_size() for p in params)


@torch.no_grad()
def held_out(model: nn.Module, batches: list[torch.Tensor]) -> float:
    model.eval()
    loss = sum(lm_loss(model, ids).item() for ids in batches) / len(batches)
    model.train()
    return loss


def adapt(name: str, build: Callable, lr: float, base: dict, train: torch.Tensor, evals: list[torch.Tensor],
          setting: Setting, seed: int) -> dict:
    torch.manual_seed(seed)
    model = tiny_llama(setting)
    model.load_state_dict(base)
    adapter = build(model)
    params = [p for p in adapter.model.parameters() if p.requires_grad]
    gen = torch.Generator().manual_seed(seed)
    memory = added_memory(adapter, params, windows(train, setting, gen))
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    adapter.attach(opt)
    every = max(1, setting.adapt_steps // setting.evals)
    curve, times = [(0, held_out(adapter.model, evals))], []
    for step in range(setting.adapt_steps):
        ids = windows(train, setting, gen)
        with Stopwatch(CPU) as clock:
            (lm_loss(adapter.model, ids) + adapter.extra_loss()).backward()
            opt.step()
            adapter.after_step(step)
            opt.zero_grad()
        times.append(clock.seconds)
        if (step + 1) % every == 0 or step + 1 == setting.adapt_steps:
            curve.append((step + 1, held_out(adapter.model, evals)))
    return {"method": name, "seed": seed, "params": sum(p.numel() for p in params), "loss": curve[-1][1],
            "early_loss": curve[1][1], "curve": curve, "ms_per_step": 1e3 * statistics.median(times[1:] or times),
            "memory_mb": memory / 2 ** 20, "allocation": adapter.allocation()}


# ------------------------------------------------------------------------------------------- rank allocation


class ResidualStack(nn.Module):
    """``h <- h + tanh(W_l h)`` for l = 1..L: a model whose per-layer update ranks can be planted."""

    def __init__(self, width: int, depth: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width, bias=False) for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = x + torch.tanh(layer(x))
        return x


TRUE_RANKS = (0, 1, 2, 3, 5, 7)


def allocation_task(setting: Setting, seed: int) -> dict:
    from peft import AdaLoraConfig
    width, gen = 32, torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    student = ResidualStack(width, len(TRUE_RANKS))
    teacher = copy.deepcopy(student)
    with torch.no_grad():
        for layer, k in zip(teacher.layers, TRUE_RANKS):
            U, _ = torch.linalg.qr(torch.randn(width, width, generator=gen))
            V, _ = torch.linalg.qr(torch.randn(width, width, generator=gen))
            layer.weight.add_(1.5 * U[:, :k] @ V[:, :k].T)
    steps = setting.alloc_steps
    sched = dict(init_r=8, target_r=sum(TRUE_RANKS) // len(TRUE_RANKS), total_step=steps, tinit=steps // 10,
                 tfinal=steps // 4, deltaT=max(1, steps // 40), target_modules=["0", "1", "2", "3", "4", "5"])
    builders = {"adalora": ours(AdaLoRA(lora_alpha=8.0, **sched)),
                "peft-adalora": peft(AdaLoraConfig(lora_alpha=8.0, **sched)),
                "igulora": ours(IGULoRA(**sched)),
                "igulora-ada": ours(IGULoRA(lora_alpha=8.0, lora_dropout=0.0, **sched))}
    uniform = sum(abs(sched["target_r"] - k) for k in TRUE_RANKS)
    result = {"true": list(TRUE_RANKS), "uniform_distance": uniform, "methods": {}}
    for name, build in builders.items():
        torch.manual_seed(seed)
        adapter = build(copy.deepcopy(student))
        params = [p for p in adapter.model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
        adapter.attach(opt)
        data_gen = torch.Generator().manual_seed(seed + 1)
        for step in range(steps):
            x = torch.randn(256, width, generator=data_gen)
            with torch.no_grad():
                y = teacher(x)
            (F.mse_loss(adapter.model(x), y) + adapter.extra_loss()).backward()
            opt.step()
            adapter.after_step(step)
            opt.zero_grad()
        alloc = adapter.allocation()
        ranks = [alloc.get(f"layers.{i}", 0) for i in range(len(TRUE_RANKS))]
        with torch.no_grad():
            x = torch.randn(1024, width, generator=data_gen)
            fit = F.mse_loss(adapter.model(x), teacher(x)).item()
        result["methods"][name] = {"ranks": ranks, "distance": sum(abs(a - k) for a, k in zip(ranks, TRUE_RANKS)),
                                   "mse": fit}
    return result


# ------------------------------------------------------------------------------------------- regression


def regression_task(setting: Setting, seed: int) -> dict:
    """Rank-4 factors fitting a rank-4 target ``Y = X W*^T`` (no base), Adam at one learning rate,
    relative loss. Two starts: B = 0 (LoRA's; RefLoRA waits its default 100-step warm-up there) and
    both factors kaiming-uniform (plain matrix factorization; RefLoRA from step 0)."""
    d, r, lr = 64, 4, 1e-2
    gen = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(d, d, generator=gen))
    V, _ = torch.linalg.qr(torch.randn(d, d, generator=gen))
    target = (U[:, :r] * torch.tensor([4.0, 2.0, 1.0, 0.5])) @ V[:, :r].T
    X = torch.randn(512, d, generator=gen)
    Y = X @ target.T
    methods = {  # name: (method, start both factors random)
        "lora": (lambda: LoRA(r=r, lora_alpha=r, target_modules=["0"]), False),
        "reflora": (lambda: RefLoRA(r=r, lora_alpha=r, target_modules=["0"]), False),
        "lora (random A, B)": (lambda: LoRA(r=r, lora_alpha=r, target_modules=["0"]), True),
        "reflora (random A, B)": (lambda: RefLoRA(r=r, lora_alpha=r, target_modules=["0"], warmup_steps=0), True),
        "reflora-S (random A, B)": (lambda: RefLoRA(r=r, lora_alpha=r, target_modules=["0"], warmup_steps=0,
                                                    variant="s"), True),
    }
    out = {}
    for name, (make, random_start) in methods.items():
        torch.manual_seed(seed)
        net = nn.Sequential(nn.Linear(d, d, bias=False))
        with torch.no_grad():
            net[0].weight.zero_()
        m = make()
        net = m.apply(net)
        if random_start:
            nn.init.kaiming_uniform_(net[0].lora_B, a=math.sqrt(5))
        params = [p for p in net.parameters() if p.requires_grad]
        opt = torch.optim.Adam(params, lr=lr)
        m.attach(opt)
        curve = []
        for _ in range(setting.regress_steps):
            loss = (net(X) - Y).square().mean() / Y.square().mean()
            curve.append(loss.item())
            loss.backward()
            opt.step()
            opt.zero_grad()
        out[name] = {"curve": curve, "final": curve[-1],
                     "steps_to_1e-2": next((i for i, v in enumerate(curve) if v <= 1e-2), None)}
    return out


# ------------------------------------------------------------------------------------------- report


def summarize(runs: list[dict]) -> dict[str, dict]:
    """Mean over seeds per method, with each method's share of LoRA's gain and of its PEFT twin's."""
    by: dict[str, list[dict]] = {}
    for run in runs:
        by.setdefault(run["method"], []).append(run)
    mean = lambda rs, k: statistics.fmean(r[k] for r in rs)  # noqa: E731
    rows = {name: {k: mean(rs, k) for k in ("params", "loss", "early_loss", "ms_per_step", "memory_mb", "base")}
            for name, rs in by.items()}
    for name, row in rows.items():
        row["gain"] = statistics.fmean(r["base"] - r["loss"] for r in by[name])
    lora_gain = rows["lora"]["gain"]
    for name, row in rows.items():
        row["share_of_lora"] = row["gain"] / lora_gain if lora_gain else float("nan")
        row["param_share"] = row["params"] / rows["lora"]["params"]
    return rows


def verdict(ok: bool) -> str:
    return "consistent" if ok else "NOT consistent"


def claims(rows: dict, twins: dict, alloc: list[dict], regress: list[dict]) -> list[dict]:
    """Each seed paper's claim next to what was measured (criteria stated in ``measured``)."""
    out = []

    def add(paper: str, claim: str, measured: str, ok: bool) -> None:
        out.append({"paper": paper, "claim": claim, "measured": measured, "verdict": verdict(ok)})

    t6 = rows["tied-TL6"]
    add("Tied-LoRA 2311.09578", "TL6 comes within 1-2% of LoRA with ~12.5% of its parameters",
        f"TL6 gets {t6['share_of_lora']:.0%} of LoRA's held-out gain with {t6['param_share']:.1%} of its "
        f"parameters (criterion: >= 90% of the gain; with 2 layers tying can at most halve A and B)",
        t6["share_of_lora"] >= 0.9)
    igu, ada = rows["igulora"], rows["adalora"]
    add("IGU-LoRA 2603.13792", "beats AdaLoRA at a matched parameter budget (held-out quality)",
        f"held-out loss {igu['loss']:.4f} (reference defaults) and {rows['igulora-ada']['loss']:.4f} (AdaLoRA's "
        f"alpha, dropout) vs AdaLoRA {ada['loss']:.4f}", igu["loss"] < ada["loss"])
    dist = {k: statistics.fmean(a["methods"][k]["distance"] for a in alloc) for k in alloc[0]["methods"]}
    add("IGU-LoRA 2603.13792", "allocates ranks better than AdaLoRA's instantaneous sensitivity",
        f"L1 distance of allocated to true ranks {list(TRUE_RANKS)}: IGU-LoRA {dist['igulora']:.1f} "
        f"({dist['igulora-ada']:.1f} with AdaLoRA's alpha), AdaLoRA {dist['adalora']:.1f}, PEFT AdaLoRA "
        f"{dist['peft-adalora']:.1f}, uniform split {alloc[0]['uniform_distance']}",
        dist["igulora"] < dist["adalora"])
    final = {k: statistics.fmean(g[k]["final"] for g in regress) for k in regress[0]}
    reach = {k: [g[k]["steps_to_1e-2"] for g in regress] for k in regress[0]}
    slowest = {k: math.inf if None in v else max(v) for k, v in reach.items()}
    add("RefLoRA 2505.18877", "converges faster than LoRA at the same learning rate",
        f"low-rank regression, Adam steps to a relative loss of 1e-2 (per seed) from random A, B: RefLoRA "
        f"{reach['reflora (random A, B)']}, RefLoRA-S {reach['reflora-S (random A, B)']}, LoRA "
        f"{reach['lora (random A, B)']}; from B = 0: RefLoRA (warm-up 100) {reach['reflora']}, LoRA {reach['lora']}; "
        f"final {final['reflora (random A, B)']:.1e} / {final['reflora-S (random A, B)']:.1e} / "
        f"{final['lora (random A, B)']:.1e}; LM held-out loss {rows['reflora']['loss']:.4f} (RefLoRA-S "
        f"{rows['reflora-S']['loss']:.4f}) vs LoRA {rows['lora']['loss']:.4f}",
        slowest["reflora (random A, B)"] < slowest["lora (random A, B)"])
    cg = rows["cglora"]
    add("CG-LoRA 2603.29824", "faster early convergence than LoRA; the no-shift variant best",
        f"held-out loss after the first tenth of the steps: CG-LoRA {cg['early_loss']:.4f}, no shift "
        f"{rows['cglora-noshift']['early_loss']:.4f}, LoRA {rows['lora']['early_loss']:.4f}; at the end "
        f"{cg['loss']:.4f} / {rows['cglora-noshift']['loss']:.4f} / {rows['lora']['loss']:.4f}",
        min(cg["early_loss"], rows["cglora-noshift"]["early_loss"]) < rows["lora"]["early_loss"])
    for ours_name, peft_name in twins.items():
        share = rows[ours_name]["gain"] / rows[peft_name]["gain"] if rows[peft_name]["gain"] else float("nan")
        add("lorakern target", f"{ours_name} trains at least 70% as well as PEFT's {peft_name}",
            f"{share:.0%} of {peft_name}'s held-out gain", share >= 0.7)
    tl = min(rows["tied-TL5"]["share_of_lora"], t6["share_of_lora"])
    add("lorakern target", "Tied-LoRA trains at least half as well as LoRA",
        f"TL5 {rows['tied-TL5']['share_of_lora']:.0%}, TL6 {t6['share_of_lora']:.0%} of LoRA's gain", tl >= 0.5)
    return out


QUICK_NOTE = "quick run: too few steps to judge the claims; run `make methods` for the verdicts"


def claim_lines(found: list[dict], judged: bool) -> list[str]:
    """The claims as printed: ``[verdict] paper: claim`` and what was measured; unjudged (a quick
    run) each reads ``[not judged]``, under one line saying why."""
    lines = [] if judged else [f"  {QUICK_NOTE}"]
    for c in found:
        lines += [f"  [{c['verdict'] if judged else 'not judged'}] {c['paper']}: {c['claim']}",
                  f"      measured: {c['measured']}"]
    return lines


def print_report(rows: dict, alloc: list[dict], regress: list[dict], found: list[dict], seeds, judged: bool) -> None:
    base = next(iter(rows.values()))["base"]
    print(f"\nLM adaptation (tiny Llama, stdlib -> pydoc topics), mean of seeds {list(seeds)}; "
          f"held-out loss before adapting {base:.4f}")
    head = f"{'method':<16}{'params':>9}{'held-out':>10}{'early':>9}{'of LoRA':>9}{'ms/step':>9}{'train MB':>10}"
    print(head)
    print("-" * len(head))
    for name, row in rows.items():
        print(f"{name:<16}{row['params']:>9.0f}{row['loss']:>10.4f}{row['early_loss']:>9.4f}"
              f"{row['share_of_lora']:>9.0%}{row['ms_per_step']:>9.1f}{row['memory_mb']:>10.2f}")
    print(f"\nRank allocation (true ranks {alloc[0]['true']}; uniform split distance {alloc[0]['uniform_distance']})")
    for name in alloc[0]["methods"]:
        dist = statistics.fmean(a["methods"][name]["distance"] for a in alloc)
        print(f"  {name:<14} ranks (seed {seeds[0]}) {alloc[0]['methods'][name]['ranks']}  mean L1 distance "
              f"{dist:.1f}  fit mse {alloc[0]['methods'][name]['mse']:.2e}")
    print("\nLow-rank regression (relative loss)")
    for name in regress[0]:
        print(f"  {name:<24} final {statistics.fmean(g[name]['final'] for g in regress):.2e}  steps to 1e-2 "
              f"{[g[name]['steps_to_1e-2'] for g in regress]}")
    print("\nClaims", *claim_lines(found, judged), sep="\n")


def plot(rows: dict, runs: list[dict], alloc: list[dict], regress: list[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    for i, name in enumerate(rows):
        run = next(r for r in runs if r["method"] == name)
        steps, losses = zip(*run["curve"])
        axes[0].plot(steps, losses, label=name, ls="--" if name.startswith("peft") else "-", color=plt.cm.tab20(i))
    axes[0].set(title="LM adaptation: held-out loss (seed 0)", xlabel="step", ylabel="loss")
    axes[0].legend(fontsize=7, ncol=2)
    names = list(alloc[0]["methods"])
    width = 0.8 / (len(names) + 1)
    idx = torch.arange(len(TRUE_RANKS)).float()
    axes[1].bar(idx - 0.4 + width / 2, alloc[0]["true"], width, label="true", color="black")
    for i, name in enumerate(names):
        axes[1].bar(idx - 0.4 + width * (i + 1.5), alloc[0]["methods"][name]["ranks"], width, label=name)
    axes[1].set(title="rank allocation per layer (seed 0)", xlabel="layer", ylabel="rank")
    axes[1].legend(fontsize=7)
    for name, res in regress[0].items():
        axes[2].semilogy(res["curve"], label=name)
    axes[2].set(title="low-rank regression (seed 0)", xlabel="Adam step", ylabel="relative loss")
    axes[2].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: Optional[list[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few steps per method (CI)")
    parser.add_argument("--out", default="out", help="folder for methods.json, methods.png and the base model")
    parser.add_argument("--seeds", type=int, nargs="+", help="seeds (default: 0 1, quick: 0)")
    args = parser.parse_args(argv)
    setting = QUICK if args.quick else FULL
    seeds = tuple(args.seeds) if args.seeds else setting.seeds
    os.makedirs(args.out, exist_ok=True)
    t0 = time.perf_counter()
    base = pretrained(setting, args.out)
    train, held = topics_text()
    runs = []
    for seed in seeds:
        gen = torch.Generator().manual_seed(10_000 + seed)
        evals = [windows(held, setting, gen) for _ in range(setting.eval_batches)]
        cg_batches = [windows(train, setting, gen) for _ in range(4)]
        before = tiny_llama(setting)
        before.load_state_dict(base)
        before_loss = held_out(before, evals)
        for name, (twin, lr, build) in lm_methods(setting.adapt_steps, cg_batches).items():
            run = adapt(name, build, lr, base, train, evals, setting, seed)
            run["base"] = before_loss
            runs.append(run)
            print(f"  seed {seed} {name:<15} held-out {run['loss']:.4f} ({time.perf_counter() - t0:.0f} s)",
                  file=sys.stderr)
    twins = {name: twin for name, (twin, _, _) in lm_methods(setting.adapt_steps, []).items() if twin}
    rows = summarize(runs)
    alloc = [allocation_task(setting, seed) for seed in seeds]
    regress = [regression_task(setting, seed) for seed in seeds]
    found = claims(rows, twins, alloc, regress)
    print_report(rows, alloc, regress, found, seeds, judged=not args.quick)
    result = {"setting": vars(setting) | {"seeds": list(seeds)}, "rows": rows, "runs": runs, "allocation": alloc,
              "regression": regress, "claims": found, "claims_judged": not args.quick,
              "seconds": time.perf_counter() - t0,
              "torch": torch.__version__}
    with open(os.path.join(args.out, "methods.json"), "w") as fh:
        json.dump(result, fh, indent=1, default=float)
    plot(rows, runs, alloc, regress, os.path.join(args.out, "methods.png"))
    print(f"\nwrote {args.out}/methods.json and {args.out}/methods.png in {result['seconds']:.0f} s")
    return result


if __name__ == "__main__":
    main()
