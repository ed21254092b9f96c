"""``lorakern demo``: PEFT LoRA fine-tuning, stock and through ``lorakern.peft.patch``, side by side.

A Llama-architecture causal LM is built from a config (random weights: nothing is downloaded)
and fine-tuned with PEFT LoRA on all seven projections, on byte tokens of Python's standard
library sources (present wherever Python is). The same run happens twice, with the same
seeds and the same batches in the same order: once with stock PEFT, once patched. It prints
tokens/s (warm-up steps excluded), the speedup, memory and losses, and plots loss and
throughput when matplotlib is installed (``pip install "lorakern[bench]"``; without it the plot
is skipped with one line saying so). On a GPU it trains in bf16 (autocast; PEFT keeps fp32
adapters) a larger model.

>>> from lorakern.demo import main
>>> main(["--preset", "tiny", "--out", "/tmp/demo.png"])  # doctest: +SKIP
0
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import logging
import math
import os
import statistics
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from lorakern.benchmark.measure import saved_storages
from lorakern.benchmark.timing import Stopwatch
from lorakern.cli import device as device_arg
from lorakern.extras import MissingDependency, require

LOSS_TAIL = 10  # the last steps whose mean training loss the table shows
SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# model and run sizes (batch: per process); "cpu" finishes both runs in under 5 minutes on 2 cores
PRESETS = {
    "tiny": dict(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=160, seq=32, batch=4, steps=6, warmup=2),
    "cpu": dict(hidden=256, layers=4, heads=8, kv_heads=4, intermediate=704, seq=128, batch=8, steps=60, warmup=5),
    "gpu": dict(hidden=2048, layers=8, heads=32, kv_heads=8, intermediate=8192, seq=1024, batch=8, steps=200,
                warmup=20),
}


@dataclass
class Run:
    """What one training run measured."""

    name: str
    warmup: int
    tokens_per_step: int
    losses: list = field(default_factory=list)
    step_s: list = field(default_factory=list)
    eval_loss: float = math.nan
    saved_bytes: int = 0
    peak_bytes: Optional[int] = None
    fused_layers: int = 0
    fallbacks: int = 0

    @property
    def tokens_per_s(self) -> float:
        timed = self.step_s[self.warmup:]
        return self.tokens_per_step * len(timed) / sum(timed)

    @property
    def final_loss(self) -> float:
        """The mean training loss of the last ``LOSS_TAIL`` steps (all of them when fewer)."""
        tail = self.losses[-LOSS_TAIL:]
        return sum(tail) / len(tail)


class _FallbackCounter(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += "PEFT's own forward" in record.getMessage()


def corpus(max_bytes: int = 4 << 20) -> tuple[torch.Tensor, str]:
    """Byte tokens of the standard library's top-level ``*.py`` files, in sorted order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks, size = [], 0
    for f in sorted(root.glob("*.py")):
        data = f.read_bytes()
        chunks.append(data)
        size += len(data)
        if size >= max_bytes:
            break
    if size < 1 << 16:
        raise RuntimeError(f"found only {size} bytes of Python sources under {root}")
    return torch.frombuffer(bytearray(b"".join(chunks)[:max_bytes]), dtype=torch.uint8).long(), str(root)


def batches(tokens: torch.Tensor, n: int, batch: int, seq: int, seed: int) -> list[torch.Tensor]:
    """``n`` batches of random windows, the same for every run (a seeded generator)."""
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(tokens) - seq, (n, batch), generator=g)
    return [torch.stack([tokens[s:s + seq] for s in row.tolist()]) for row in starts]


def _rank_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def train(name: str, patched: bool, p: dict, args, device: torch.device, train_batches, eval_batches) -> Run:
    """One fine-tuning run; identical in every respect but ``patched``. Under torchrun: DDP, each
    process training on its share of every batch."""
    from peft import LoraConfig, get_peft_model
    from tqdm import tqdm
    from transformers import LlamaConfig, LlamaForCausalLM

    import lorakern.peft

    bf16 = device.type == "cuda"
    torch.manual_seed(args.seed)
    cfg = LlamaConfig(vocab_size=256, hidden_size=p["hidden"], intermediate_size=p["intermediate"],
                      num_hidden_layers=p["layers"], num_attention_heads=p["heads"],
                      num_key_value_heads=p["kv_heads"], max_position_embeddings=p["seq"])
    with torch.device(device):  # initialised where it runs: fast on a GPU, the same weights in both runs
        base = LlamaForCausalLM(cfg).to(torch.bfloat16 if bf16 else torch.float32)
    model = get_peft_model(base, LoraConfig(r=args.r, lora_alpha=2 * args.r, lora_dropout=args.dropout,
                                            target_modules=SEVEN))
    rank, world = _rank_world()
    run = Run(name, p["warmup"], world * p["batch"] * p["seq"])
    counter = _FallbackCounter()
    log = logging.getLogger("lorakern.peft")
    old_level = log.level
    if patched:
        run.fused_layers = lorakern.peft.patch(model)
        log.addHandler(counter)
        log.setLevel(logging.DEBUG)
    trainable = [q for q in model.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=args.lr)
    if world > 1:
        device_ids = [device.index] if device.type == "cuda" else None
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(args.seed + 1 + rank)  # dropout: the same generator state at the start of both runs
    try:
        model.train()
        bar = tqdm(train_batches, desc=f"{name:>10}", unit="step", dynamic_ncols=True, disable=rank != 0)
        for step, ids in enumerate(bar):
            ids = ids[rank::world].to(device)
            hooks, seen = saved_storages(model.parameters()) if step == 0 else (contextlib.nullcontext(), {})
            with Stopwatch(device) as clock:
                with hooks, autocast():
                    loss = model(input_ids=ids, labels=ids).loss
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                if world > 1:
                    loss = loss.detach().clone()
                    dist.all_reduce(loss)
                    loss /= world
                run.losses.append(loss.item())
            run.step_s.append(clock.seconds)
            run.saved_bytes = run.saved_bytes or sum(seen.values())
            bar.set_postfix(loss=f"{run.losses[-1]:.3f}", tok_s=f"{run.tokens_per_step / run.step_s[-1]:,.0f}")
        if device.type == "cuda":
            run.peak_bytes = torch.cuda.max_memory_allocated(device)
        model.eval()
        with torch.no_grad(), autocast():
            run.eval_loss = statistics.fmean(model(input_ids=b.to(device), labels=b.to(device)).loss.item()
                                             for b in eval_batches)
    finally:
        log.removeHandler(counter)
        log.setLevel(old_level)
    run.fallbacks = counter.count
    del model, base, opt, trainable
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return run


def plot(runs: Sequence[Run], path: str, title: str) -> None:
    """Loss and throughput per step of each run, in one PNG at ``path``.

    Raises:
        MissingDependency: matplotlib is not installed (``pip install "lorakern[bench]"``).
    """
    matplotlib = require("matplotlib", "the demo's plot")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_tps) = plt.subplots(1, 2, figsize=(12, 4.5))
    for run in runs:
        steps = range(1, len(run.losses) + 1)
        ax_loss.plot(steps, run.losses, label=run.name, alpha=0.8)
        ax_tps.plot(steps, [run.tokens_per_step / s for s in run.step_s],
                    label=f"{run.name}: {run.tokens_per_s:,.0f} tokens/s", alpha=0.8)
    ax_loss.set(xlabel="step", ylabel="training loss (nats / byte)", title="loss")
    ax_tps.axvspan(0.5, runs[0].warmup + 0.5, color="grey", alpha=0.15, label="warm-up (not timed)")
    ax_tps.set(xlabel="step", ylabel="tokens / s", title="throughput per step")
    ax_tps.set_ylim(bottom=0)
    for ax in (ax_loss, ax_tps):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _mb(n: Optional[int]) -> str:
    return "-" if n is None else f"{n / 2**20:,.1f} MB"


def _report(runs: Sequence[Run], p: dict, args, device: torch.device, dtype: torch.dtype, world: int) -> None:
    stock, ours = runs
    each = " (rank 0)" if world > 1 else ""
    speedup = ours.tokens_per_s / stock.tokens_per_s
    rows = [
        ("tokens/s (timed steps)", f"{stock.tokens_per_s:,.0f}", f"{ours.tokens_per_s:,.0f}"),
        ("median step", f"{1e3 * statistics.median(stock.step_s[stock.warmup:]):.1f} ms",
         f"{1e3 * statistics.median(ours.step_s[ours.warmup:]):.1f} ms"),
        ("saved activations / step" + each, _mb(stock.saved_bytes), _mb(ours.saved_bytes)),
        ("peak GPU memory" + each, _mb(stock.peak_bytes), _mb(ours.peak_bytes)),
        (f"train loss (last {len(stock.losses[-LOSS_TAIL:])} steps)", f"{stock.final_loss:.4f}",
         f"{ours.final_loss:.4f}"),
        ("held-out loss", f"{stock.eval_loss:.4f}", f"{ours.eval_loss:.4f}"),
    ]
    print(f"\n{'':<36}{'stock PEFT':>12}{'lorakern':>12}")
    for label, a, b in rows:
        print(f"{label:<36}{a:>12}{b:>12}")
    print(f"\nspeedup: {speedup:.2f}x tokens/s ({ours.fused_layers} layers fused, "
          f"{ours.fallbacks} calls fell back to PEFT's forward)")
    if device.type == "cpu":
        print("  (CPU timings vary from run to run, by tens of percent on a shared or loaded machine; for a "
              "steadier figure run the demo twice, or with more timed steps, e.g. --steps 120)")
    print("  (dropout masks come from different generators, so the two loss curves agree within noise, "
          "not bit for bit)")
    title = (f"PEFT LoRA r={args.r} on a {p['layers']}-layer Llama, {device.type} {str(dtype)[6:]}: "
             f"lorakern {speedup:.2f}x tokens/s")
    try:
        plot(runs, args.out, title)
    except MissingDependency as e:
        print(f"plot: skipped: {e}")
        return
    print(f"plot: {os.path.abspath(args.out)}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the demo; returns the exit status (``lorakern demo --help`` lists the options).

    Under ``torchrun --nproc-per-node N``, each run is DDP over N processes (nccl on GPUs,
    gloo on CPUs), each training on its share of every batch; rank 0 reports.
    """
    ap = argparse.ArgumentParser(
        prog="lorakern demo", description="Fine-tune a small Llama with PEFT LoRA twice, stock and through "
        "lorakern.peft.patch, on the same batches; print tokens/s, memory and losses of both.")
    ap.add_argument("--device", type=device_arg, default="cuda" if torch.cuda.is_available() else "cpu",
                    help="where to train (default: cuda when there is a GPU, else cpu)")
    ap.add_argument("--preset", choices=sorted(PRESETS), help="model and run size (default: by device)")
    ap.add_argument("--steps", type=int, help="training steps per run (default: the preset's)")
    ap.add_argument("--warmup", type=int, help="first steps left out of the timing (default: the preset's)")
    ap.add_argument("--threads", type=int, default=1,
                    help="CPU threads (default 1: these small matmuls gain little from more, and on a shared "
                         "machine several threads wait on each other)")
    ap.add_argument("--r", type=int, default=16, help="LoRA rank (default 16; lora_alpha is 2r)")
    ap.add_argument("--dropout", type=float, default=0.1, help="LoRA dropout probability (default 0.1)")
    ap.add_argument("--lr", type=float, default=2e-3, help="AdamW learning rate (default 2e-3)")
    ap.add_argument("--seed", type=int, default=0, help="seed of weights, batches and dropout (default 0)")
    ap.add_argument("--out", default="demo.png",
                    help='where to write the plot (default demo.png; needs matplotlib: pip install "lorakern[bench]")')
    args = ap.parse_args(argv)
    device = args.device
    p = dict(PRESETS[args.preset or ("gpu" if device.type == "cuda" else "cpu")])
    p["steps"] = args.steps or p["steps"]
    p["warmup"] = p["warmup"] if args.warmup is None else args.warmup
    if not 1 <= p["warmup"] < p["steps"]:  # step 0 also measures saved activations: never timed
        ap.error(f"--warmup: expected 1 <= warmup < steps ({p['steps']}), got {p['warmup']}")
    if args.threads < 1:
        ap.error(f"--threads: expected >= 1, got {args.threads}")
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        _demo(p, args, device, world)
    finally:
        if world > 1:
            dist.destroy_process_group()
    return 0


def _demo(p: dict, args, device: torch.device, world: int) -> None:
    from lorakern.ops import resolve_backend

    rank = _rank_world()[0]
    say = print if rank == 0 else (lambda *a, **k: None)
    tokens, root = corpus()
    held_out = len(tokens) // 10
    train_batches = batches(tokens[:-held_out], p["steps"], world * p["batch"], p["seq"], args.seed)
    eval_batches = batches(tokens[-held_out:], 4, p["batch"], p["seq"], args.seed + 1)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    where = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else f"CPU, {torch.get_num_threads()} thread{'s' if torch.get_num_threads() > 1 else ''}")
    backend = resolve_backend("auto", torch.empty(0, device=device, dtype=dtype), p["batch"] * p["seq"],
                              p["hidden"], p["hidden"], args.r)
    say(f"lorakern demo: PEFT LoRA fine-tuning, stock PEFT against lorakern.peft.patch, on {device.type} ({where})"
        + (f" x {world} processes (DDP)" if world > 1 else ""))
    say(f"  model: Llama architecture from a config (random weights, no downloads), {p['layers']} layers, "
        f"hidden {p['hidden']}, MLP {p['intermediate']}, {p['heads']}/{p['kv_heads']} heads, "
        f"{'bf16 autocast, fp32 adapters' if dtype == torch.bfloat16 else 'fp32'}")
    say(f"  data: {len(tokens) / 2**20:.1f} MB of {root}/*.py as bytes; batch {world * p['batch']} x {p['seq']} "
        f"= {world * p['batch'] * p['seq']:,} tokens/step; the same batches in the same order for both runs")
    say(f"  LoRA r={args.r} alpha={2 * args.r} dropout={args.dropout} on {', '.join(SEVEN)}; AdamW lr {args.lr}; "
        f"{p['steps']} steps, the first {p['warmup']} untimed; seed {args.seed} for both; lorakern backend {backend}")
    runs = [train(name, patched, p, args, device, train_batches, eval_batches)
            for name, patched in (("stock PEFT", False), ("lorakern", True))]
    if rank == 0:
        _report(runs, p, args, device, dtype, world)
