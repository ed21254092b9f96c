"""``lorakern bench``: lorakern's backends beside the frozen base, PEFT and the addmm style.

Times every provider on the shapes of DESIGN.md section 6 in one process and writes records
in the schema of ``bench/README.md``:

    lorakern bench --quick --json out/h100.json --plot out/h100.png
    lorakern bench --device cpu --quick            # tiny shapes: checks the code path on CPU

Providers: ``base`` (``F.linear``, the floor), ``peft`` (PEFT's real ``lora.Linear``; AdaLoRA's
``SVDLinear`` for masked ranks), ``addmm`` (base GEMM, then ``out.addmm_(dropout(x) A^T, B^T)``)
and ``lorakern-<backend>`` for each backend that runs on the device. Modes: ``fwd`` (forward
under ``no_grad``, dropout applied when p > 0), ``bwd`` (backward alone, over a retained graph)
and ``fwdbwd`` (forward, then gradients of x and of every adapter tensor; the base is frozen).

On a GPU each time is ``triton.testing.do_bench``'s median (device events, L2 flushed before
each run) over a step that cycles through several input sets whose bytes exceed the L2 cache.
Each provider's cycle is also captured in a CUDA graph and its replays timed (``graph_ms``). At
decode sizes (M <= 64), where launch and Python overhead would otherwise dominate, the graph time
is the record's ``median_ms``, elsewhere the eager time is; a provider that cannot be captured
keeps its eager time and its record says why. On CPU each time is the median of interleaved
runs: every round runs every provider and variant of a (shape, mode) group once.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lorakern.ops import BACKENDS, backend_status, lora_linear

__all__ = [
    "Case", "Shape", "Variant", "Item", "Settings", "Skip", "PROVIDERS", "MODES", "run", "prepare",
    "prepare_group", "time_items", "to_record", "add_ratios", "bench_stream", "l2_bytes", "available_providers",
    "device_slug", "select_cases", "print_table", "plot", "main",
]

PROVIDERS = ("base", "peft", "addmm") + tuple(f"lorakern-{b}" for b in BACKENDS)
MODES = ("fwd", "bwd", "fwdbwd")
GRAPH_MAX_M = 64        # decode sizes: launch and Python overhead would otherwise dominate
ADAPTERS = 8            # bank size of the multi-adapter variant
ALPHA_PER_RANK = 2.0    # lora_alpha = 2 r, so scaling = 2
MIN_SETS, MAX_SETS = 2, 8

# DESIGN.md section 6
FULL_M = (1, 16, 128, 2048, 8192)
FULL_KN = ((4096, 4096), (4096, 1024), (4096, 14336), (14336, 4096))
FULL_R = (8, 16, 64)
QUICK_M = (1, 16, 2048, 8192)
QUICK_KN = ((4096, 4096), (4096, 14336))
QUICK_VARIANT_M = (16, 2048)
# CPU: the same grid scaled down 16x in K and N, so that `--device cpu --quick` checks the path
CPU_QUICK_M = (1, 16, 128, 512)
CPU_QUICK_KN = ((256, 256), (256, 896))
CPU_QUICK_VARIANT_M = (16, 128)


@dataclass(frozen=True, order=True)
class Shape:
    """Tokens M, in-features K, out-features N, rank r."""

    M: int
    K: int
    N: int
    r: int


@dataclass(frozen=True, order=True)
class Variant:
    """What the adapter does beyond plain LoRA: dropout, half of its ranks masked, a bank of adapters."""

    dropout: float = 0.0
    masked: bool = False
    adapters: int = 0  # 0: one adapter; G: a bank of G adapters chosen per row by adapter_index

    @property
    def label(self) -> str:
        parts = [f"p={self.dropout:g}"]
        if self.masked:
            parts.append("masked")
        if self.adapters:
            parts.append(f"{self.adapters} adapters")
        return " ".join(parts)


BASE_VARIANT = Variant()


@dataclass(frozen=True, order=True)
class Case:
    """One measurement: a mode of a shape with a variant (the base ignores the variant)."""

    mode: str
    shape: Shape
    variant: Variant


# --------------------------------------------------------------------------- inputs


@dataclass
class _Inputs:
    """One input set: fresh random tensors, never zeros."""

    x: torch.Tensor
    W: torch.Tensor
    b: torch.Tensor
    A: torch.Tensor           # [r, K] or [G, r, K]
    B: torch.Tensor           # [N, r] or [G, N, r]
    E: Optional[torch.Tensor]  # [r] rank scale (AdaLoRA's lambda) with masked ranks
    mask: Optional[torch.Tensor]
    index: Optional[torch.Tensor]
    grad_y: torch.Tensor

    def tensors(self) -> list[torch.Tensor]:
        values = (getattr(self, f.name) for f in dataclasses.fields(self))
        return [t for t in values if isinstance(t, torch.Tensor)]

    def adapter(self) -> list[torch.Tensor]:
        return [t for t in (self.A, self.B, self.E) if t is not None]


def _make_inputs(shape: Shape, variant: Variant, dtype: torch.dtype, device: torch.device) -> _Inputs:
    M, K, N, r = shape.M, shape.K, shape.N, shape.r
    G = variant.adapters
    lead = (G,) if G else ()
    rnd = lambda *s, scale=1.0: (torch.randn(*s, device=device, dtype=torch.float32) * scale).to(dtype)  # noqa: E731
    E = mask = index = None
    if variant.masked:
        E = rnd(r) + 1.0
        mask = torch.zeros(r, dtype=torch.bool, device=device)
        mask[torch.randperm(r, device=device)[: r // 2]] = True
    if G:
        index = torch.randint(0, G, (M,), device=device)
    return _Inputs(
        x=rnd(M, K).requires_grad_(), W=rnd(N, K, scale=K**-0.5), b=rnd(N),
        A=rnd(*lead, r, K, scale=K**-0.5).requires_grad_(), B=rnd(*lead, N, r, scale=r**-0.5).requires_grad_(),
        E=None if E is None else E.requires_grad_(), mask=mask, index=index, grad_y=rnd(M, N),
    )


def _set_bytes(inp: _Inputs) -> int:
    return sum(t.numel() * t.element_size() for t in inp.tensors())


# --------------------------------------------------------------------------- providers


class Skip(Exception):
    """A provider cannot run a case; the message says why, in one line."""


@dataclass
class _Built:
    fn: Callable[[torch.Tensor], torch.Tensor]  # x -> y
    grads_of: list[torch.Tensor]                # the trainable tensors (x comes first)
    frozen: list[torch.Tensor]                  # parameters and buffers: not new activations


def _peft_layer(inp: _Inputs, shape: Shape, variant: Variant) -> tuple[nn.Module, list[torch.Tensor]]:
    """PEFT's own layer around a Linear that shares the set's base weight, with the set's adapter copied in."""
    import peft

    r = shape.r
    lin = nn.Linear(shape.K, shape.N, device="meta")
    lin.weight = nn.Parameter(inp.W, requires_grad=False)
    lin.bias = nn.Parameter(inp.b, requires_grad=False)
    wrapper = nn.Sequential()
    wrapper.add_module("lin", lin)
    common = dict(lora_alpha=ALPHA_PER_RANK * r, lora_dropout=variant.dropout, target_modules=["lin"])
    if variant.masked:
        cfg = peft.AdaLoraConfig(init_r=r, target_r=max(1, r // 2), total_step=1, **common)
    else:
        cfg = peft.LoraConfig(r=r, **common)
    names = [f"a{g}" for g in range(max(1, variant.adapters))]
    model = peft.get_peft_model(wrapper, cfg, adapter_name=names[0], autocast_adapter_dtype=False)
    for name in names[1:]:
        model.add_adapter(name, cfg)
    layer = model.base_model.model.lin
    layer.train()
    trainable = []
    with torch.no_grad():
        for g, name in enumerate(names):
            pick = (lambda t: t[g]) if variant.adapters else (lambda t: t)  # noqa: E731
            if variant.masked:
                a, b_, e = layer.lora_A[name], layer.lora_B[name], layer.lora_E[name]
                e.copy_((inp.E * inp.mask).detach()[:, None])
                trainable.append(e)
            else:
                a, b_ = layer.lora_A[name].weight, layer.lora_B[name].weight
            a.copy_(pick(inp.A).detach())
            b_.copy_(pick(inp.B).detach())
            trainable += [a, b_]
    for t in trainable:
        t.requires_grad_(True)
    return layer, trainable


def _build(provider: str, inp: _Inputs, shape: Shape, variant: Variant) -> _Built:
    """The provider's ``y = f(x)`` over one input set; raises Skip where it cannot do the variant."""
    s = ALPHA_PER_RANK
    W, b, A, B = inp.W, inp.b, inp.A, inp.B
    sets = inp.tensors()
    if provider == "base":
        return _Built(lambda x: F.linear(x, W, b), [inp.x], sets)
    if provider == "peft":
        layer, trainable = _peft_layer(inp, shape, variant)
        frozen = sets + list(layer.parameters()) + list(layer.buffers())
        if variant.adapters:
            names = [f"a{g}" for g in inp.index.tolist()]
            return _Built(lambda x: layer(x, adapter_names=names), [inp.x] + trainable, frozen)
        return _Built(layer, [inp.x] + trainable, frozen)
    if provider == "addmm":
        if variant.adapters:
            raise Skip("one adapter per call: no per-row adapter choice")
        p, E, mask = variant.dropout, inp.E, inp.mask

        def addmm(x):
            t = (F.dropout(x, p) if p else x) @ A.T
            if E is not None:
                t = t * (E * mask)
            return F.linear(x, W, b).addmm_(t, B.T, alpha=s)

        return _Built(addmm, [inp.x] + inp.adapter(), sets)
    backend = provider.removeprefix("lorakern-")

    def fused(x):
        return lora_linear(x, W, b, A, B, scaling=s, rank_scale=inp.E, rank_mask=inp.mask,
                           dropout_p=variant.dropout, adapter_index=inp.index, backend=backend)

    return _Built(fused, [inp.x] + inp.adapter(), sets)


def available_providers(device: torch.device) -> tuple[list[str], dict[str, str]]:
    """Providers that run on ``device``, and a one-line reason for each that does not."""
    runs, why = [], {}
    for prov in PROVIDERS:
        if prov == "peft":
            try:
                import peft  # noqa: F401
            except ImportError as e:
                why[prov] = f"peft is not installed ({e})"
                continue
        if prov.startswith("lorakern-"):
            name = prov.removeprefix("lorakern-")
            if device.type != "cuda" and name != "torch":
                why[prov] = "runs on CUDA devices only (on CPU only interpreted: timings meaningless)"
                continue
            ok, reason = backend_status(name)
            if not ok:
                why[prov] = reason
                continue
        runs.append(prov)
    return runs, why


# --------------------------------------------------------------------------- steps and timing


def _one_line(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}".strip().splitlines()[0]
    return text[:160]


def _step(mode: str, built: _Built, inp: _Inputs) -> Callable[[], object]:
    """One timed unit of ``mode`` over one input set."""
    x, g, grads_of = inp.x, inp.grad_y, built.grads_of
    if mode == "fwd":
        def fwd():
            with torch.no_grad():
                return built.fn(x)
        return fwd
    if mode == "fwdbwd":
        return lambda: torch.autograd.grad(built.fn(x), grads_of, g, allow_unused=True)
    y = built.fn(x)  # bwd: the forward runs once, outside the timed region
    return lambda: torch.autograd.grad(y, grads_of, g, retain_graph=True, allow_unused=True)


def _cycle(steps: Sequence[Callable[[], object]]) -> Callable[[], None]:
    state = [0]

    def step():
        steps[state[0] % len(steps)]()
        state[0] += 1

    return step


def _saved_bytes(built: _Built, inp: _Inputs) -> int:
    """Bytes of the tensors autograd saves in a forward that are not x, parameters or buffers."""
    known = {t.untyped_storage().data_ptr() for t in built.frozen}
    new: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in known:
            new[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        built.fn(inp.x)
    return sum(new.values())


def _peak_mb(step: Callable[[], object], device: torch.device) -> Optional[float]:
    """Memory a step allocates above what is resident before it (CUDA only; None on CPU)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    step()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


@dataclass
class Item:
    """A provider's steps for one case (one per input set), ready to time; the timings land here."""

    provider: str
    case: Case
    steps: list[Callable[[], object]]
    saved_bytes: Optional[int]
    peak_mem_mb: Optional[float]
    ms: float = math.nan
    graph: Optional[bool] = None  # whether ms is the graph time
    graph_error: str = ""
    eager_ms: Optional[float] = None
    graph_ms: Optional[float] = None
    samples_ms: Optional[list[float]] = None  # CPU: one time per interleaved round, in round order


def _capture(steps: Sequence[Callable[[], object]]) -> "torch.cuda.CUDAGraph":
    """One CUDA graph that runs every step once (the steps already ran eagerly on this stream)."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=torch.cuda.current_stream()):
        for st in steps:
            st()
    return graph


def _time_gpu(item: Item, warmup_ms: int, rep_ms: int, graphs: bool, graph_is_median: bool) -> None:
    """Eager time, then (``graphs``) the graph time; ``graph_is_median``: the graph time is the median."""
    from triton.testing import do_bench

    item.eager_ms = do_bench(_cycle(item.steps), warmup=warmup_ms, rep=rep_ms, return_mode="median")
    item.ms, item.graph = item.eager_ms, False
    if not graphs:
        return
    try:
        graph = _capture(item.steps)
    except Exception as e:  # noqa: BLE001 - any capture failure is recorded, the eager time stands
        torch.cuda.synchronize()
        item.graph_error = _one_line(e)
        return
    item.graph_ms = do_bench(graph.replay, warmup=warmup_ms, rep=rep_ms, return_mode="median") / len(item.steps)
    if graph_is_median:
        item.ms, item.graph = item.graph_ms, True


def _time_cpu(items: Sequence[Item], budget_s: float, min_rounds: int, max_rounds: int) -> None:
    """Medians of interleaved runs: each round runs every item once, starting one later each round."""
    if not items:
        return
    cycles = [_cycle(it.steps) for it in items]
    for c in cycles:  # warm-up
        c()
    times: list[list[float]] = [[] for _ in items]
    t_end = time.perf_counter() + budget_s
    for rnd in range(max_rounds):
        for j in range(len(items)):
            k = (j + rnd) % len(items)
            t0 = time.perf_counter()
            cycles[k]()
            times[k].append(time.perf_counter() - t0)
        if rnd + 1 >= min_rounds and time.perf_counter() > t_end:
            break
    for it, ts in zip(items, times):
        it.samples_ms = [t * 1e3 for t in ts]
        it.ms = statistics.median(it.samples_ms)


# --------------------------------------------------------------------------- the run


@dataclass
class Settings:
    """How to time: GPU (do_bench milliseconds, graphs) and CPU (interleaved rounds)."""

    warmup_ms: int = 25
    rep_ms: int = 100
    graphs: bool = True
    cpu_budget_s: float = 1.0
    cpu_min_rounds: int = 5
    cpu_max_rounds: int = 200
    l2_bytes: int = 0


def _n_sets(per_set: int, l2_bytes: int) -> int:
    if not l2_bytes:
        return 1
    return max(MIN_SETS, min(MAX_SETS, math.ceil(2 * l2_bytes / max(per_set, 1))))


def l2_bytes(device: torch.device) -> int:
    """The device's L2 cache size in bytes (0 on CPU): input sets are rotated past it."""
    if device.type != "cuda":
        return 0
    props = torch.cuda.get_device_properties(device)
    return int(getattr(props, "L2_cache_size", 50 * 2**20))


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def to_record(item: Item, dtype: torch.dtype) -> dict:
    """The item's record in the schema of bench/README.md (ratios come from ``add_ratios``)."""
    c = item.case
    rec = {
        "provider": item.provider, "mode": c.mode, "M": c.shape.M, "K": c.shape.K, "N": c.shape.N,
        "r": c.shape.r, "dtype": _dtype_name(dtype), "dropout": c.variant.dropout,
        "median_ms": item.ms, "peak_mem_mb": item.peak_mem_mb,
        "masked": c.variant.masked, "adapters": c.variant.adapters, "n_sets": len(item.steps),
    }
    if item.saved_bytes is not None:
        rec["saved_bytes"] = item.saved_bytes
    if item.graph is not None:
        rec["cuda_graph"] = item.graph
    if item.eager_ms is not None:
        rec["eager_ms"] = item.eager_ms
    if item.graph_ms is not None:
        rec["graph_ms"] = item.graph_ms
    if item.graph_error:
        rec["graph_error"] = item.graph_error
    if item.samples_ms is not None:
        rec["n_rounds"] = len(item.samples_ms)
        rec["samples_ms"] = item.samples_ms
    return rec


def _group_key(case: Case) -> tuple:
    return (case.shape, case.mode)


def prepare(provider: str, case: Case, dtype: torch.dtype, device: torch.device, settings: Settings) -> Item:
    """Input sets, the provider's steps over them, saved bytes and (CUDA) peak memory; raises Skip."""
    shape, variant = case.shape, case.variant
    first = _make_inputs(shape, variant, dtype, device)
    inputs = [first] + [_make_inputs(shape, variant, dtype, device)
                        for _ in range(_n_sets(_set_bytes(first), settings.l2_bytes) - 1)]
    builts = [_build(provider, inp, shape, variant) for inp in inputs]
    steps = [_step(case.mode, bt, inp) for bt, inp in zip(builts, inputs)]
    saved = _saved_bytes(builts[0], inputs[0]) if case.mode != "fwd" else None
    peak = None
    if device.type == "cuda":
        steps[0]()  # compile / autotune / first-call costs stay out of the peak
        peak = _peak_mb(steps[0], device)
    return Item(provider, case, steps, saved, peak)


def bench_stream(device: torch.device):
    """The context to prepare and time in: on CUDA one side stream, so that CUDA graphs can be
    captured and a bwd step's backward runs on the stream its forward ran on; on CPU nothing."""
    return torch.cuda.stream(torch.cuda.Stream(device)) if device.type == "cuda" else contextlib.nullcontext()


def prepare_group(shape: Shape, mode: str, cases: Sequence[Case], providers: Sequence[str], device: torch.device,
                  dtype: torch.dtype, settings: Settings, skipped: dict[str, list[str]]) -> list[Item]:
    """The items of one (shape, mode) group: the base once, then every provider on every variant.

    A provider that cannot do a variant is left out and its reason added to ``skipped``.
    """
    wanted = [("base", Case(mode, shape, BASE_VARIANT))] if "base" in providers else []
    wanted += [(p, c) for c in sorted(cases) for p in providers if p != "base"]
    items = []
    for prov, case in wanted:
        try:
            items.append(prepare(prov, case, dtype, device, settings))
        except Skip as e:
            reason = f"{case.variant.label}: {e}"
            if reason not in skipped.setdefault(prov, []):
                skipped[prov].append(reason)
    return items


def run(cases: Iterable[Case], providers: Sequence[str], device: torch.device, dtype: torch.dtype,
        settings: Settings, log: Callable[[str], None] = print) -> tuple[list[dict], dict[str, list[str]]]:
    """Time ``providers`` on ``cases``: (records, skipped) with skipped = {provider: [reasons]}.

    >>> recs, skipped = run([Case("fwd", Shape(4, 32, 16, 4), Variant())], ["base", "lorakern-torch"],
    ...                     torch.device("cpu"), torch.float32, Settings(cpu_budget_s=0.01), log=len)
    >>> sorted(r["provider"] for r in recs)
    ['base', 'lorakern-torch']
    """
    groups: dict[tuple, list[Case]] = {}
    for case in cases:
        groups.setdefault(_group_key(case), []).append(case)
    records: list[dict] = []
    skipped: dict[str, list[str]] = {}
    torch.manual_seed(0)
    with bench_stream(device):
        for gi, ((shape, mode), group_cases) in enumerate(sorted(groups.items())):
            t0 = time.perf_counter()
            items = prepare_group(shape, mode, group_cases, providers, device, dtype, settings, skipped)
            time_items(items, device, settings)
            records += [to_record(it, dtype) for it in items]
            del items
            if device.type == "cuda":
                torch.cuda.empty_cache()
            log(f"[{gi + 1}/{len(groups)}] {mode:<6} M={shape.M} K={shape.K} N={shape.N} r={shape.r} "
                f"({time.perf_counter() - t0:.1f} s)")
    add_ratios(records)
    return records, skipped


def time_items(items: Sequence[Item], device: torch.device, settings: Settings) -> None:
    """Time a group's items: one after another with do_bench on CUDA, interleaved on CPU."""
    if device.type == "cuda":
        for it in items:
            _time_gpu(it, settings.warmup_ms, settings.rep_ms, settings.graphs, it.case.shape.M <= GRAPH_MAX_M)
    else:
        _time_cpu(items, settings.cpu_budget_s, settings.cpu_min_rounds, settings.cpu_max_rounds)


def add_ratios(records: list[dict]) -> None:
    """ratio_to_base (same mode and shape) and speedup_vs_peft (same case) on every record.

    CPU records of one interleaved group also get ``paired_ratio_to_base``: the median over rounds
    of this round's time over base's time in the same round, which a machine whose load drifts
    between rounds moves less than the ratio of the two medians.
    """
    shape_key = lambda r: (r["mode"], r["M"], r["K"], r["N"], r["r"], r["dtype"])  # noqa: E731
    case_key = lambda r: shape_key(r) + (r["dropout"], r["masked"], r["adapters"])  # noqa: E731
    base = {shape_key(r): r for r in records if r["provider"] == "base"}
    peft = {case_key(r): r["median_ms"] for r in records if r["provider"] == "peft"}
    plain = {(r["provider"],) + shape_key(r) + (r["dropout"], r["adapters"]): r["median_ms"] for r in records
             if not r["masked"]}
    for r in records:
        if r["masked"]:
            half = plain.get((r["provider"], r["mode"], r["M"], r["K"], r["N"], r["r"] // 2, r["dtype"],
                              r["dropout"], r["adapters"]))
            if half is not None:
                r["ratio_to_half_rank"] = r["median_ms"] / half
        b = base.get(shape_key(r))
        if b is not None:
            r["ratio_to_base"] = r["median_ms"] / b["median_ms"]
            if "samples_ms" in r and len(r["samples_ms"]) == len(b.get("samples_ms", ())):
                r["paired_ratio_to_base"] = statistics.median(t / tb for t, tb in zip(r["samples_ms"], b["samples_ms"]))
        if case_key(r) in peft:
            r["speedup_vs_peft"] = peft[case_key(r)] / r["median_ms"]


# --------------------------------------------------------------------------- case selection


def _parse_list(text: str, conv) -> tuple:
    return tuple(conv(v) for v in text.split(",") if v)


def _parse_kn(text: str) -> tuple:
    return tuple(tuple(int(v) for v in kn.lower().split("x")) for kn in text.split(",") if kn)


def select_cases(args: argparse.Namespace, device: torch.device) -> list[Case]:
    """The cases the flags ask for: the quick set, the full set of DESIGN.md section 6, or overrides."""
    cpu = device.type != "cuda"
    if args.quick:
        Ms, KNs, rs = (CPU_QUICK_M, CPU_QUICK_KN, (16,)) if cpu else (QUICK_M, QUICK_KN, (16,))
        variant_M, variant_KN = (CPU_QUICK_VARIANT_M, CPU_QUICK_KN[:1]) if cpu else (QUICK_VARIANT_M, QUICK_KN[:1])
    else:
        Ms, KNs, rs = FULL_M, FULL_KN, FULL_R
        variant_M, variant_KN = FULL_M, FULL_KN
    Ms = args.M or Ms
    KNs = args.KN or KNs
    rs = args.r or rs
    if args.M or args.KN:
        variant_M, variant_KN = Ms, KNs
    if args.shapes:
        plain = list(args.shapes)
        extra = list(args.shapes)
    else:
        plain = [Shape(M, K, N, r) for M in Ms for K, N in KNs for r in rs]
        extra = [Shape(M, K, N, r) for M in variant_M for K, N in variant_KN for r in rs]
    modes = args.modes or MODES
    extras = []
    half = []  # plain cases at half the rank: what a masked half of the ranks should cost
    if "masked" in args.variants:
        extras.append(Variant(masked=True))
        half = [Shape(sh.M, sh.K, sh.N, sh.r // 2) for sh in extra if sh.r >= 2]
    if "adapters" in args.variants:
        extras.append(Variant(adapters=ADAPTERS))
    cases = []
    for mode in modes:
        if "plain" in args.variants:
            cases += [Case(mode, sh, Variant(dropout=p)) for sh in plain for p in args.dropout]
        cases += [Case(mode, sh, v) for sh in extra for v in extras]
        cases += [Case(mode, sh, Variant()) for sh in half]
    cases = sorted(set(cases))
    if args.part:
        k, n = args.part
        keys = sorted({_group_key(c) for c in cases})
        mine = set(keys[k - 1::n])
        cases = [c for c in cases if _group_key(c) in mine]
    return cases


# --------------------------------------------------------------------------- output


def device_slug(device: torch.device) -> str:
    """Short name of the device kind for result files: 'h100', 'h200', 'a100', ... or 'cpu'."""
    if device.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(device)
    for token in name.replace("NVIDIA", "").split():
        if any(ch.isdigit() for ch in token):
            return token.split("-")[0].lower()
    return name.split()[-1].lower()


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def _commit() -> str:
    env = os.environ.get("LORAKERN_COMMIT")
    if env:
        return env
    root = Path(__file__).resolve().parent.parent
    git = ["git", "-c", f"safe.directory={root}"]
    try:
        head = subprocess.run(git + ["rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(git + ["diff", "--quiet", "HEAD", "--", "lorakern", "csrc"], cwd=root).returncode
    except (OSError, subprocess.CalledProcessError):
        return _commit_from_files(root / ".git")
    return head + ("+dirty" if dirty else "")


def _commit_from_files(git_dir: Path) -> str:
    """HEAD's commit read from .git without git (a copied tree); whether it is dirty is unknown."""
    try:
        head = (git_dir / "HEAD").read_text().strip()
        if not head.startswith("ref: "):
            return head
        ref = head.removeprefix("ref: ")
        if (git_dir / ref).exists():
            return (git_dir / ref).read_text().strip()
        for line in (git_dir / "packed-refs").read_text().splitlines():
            if line.endswith(" " + ref):
                return line.split()[0]
    except OSError:
        pass
    return "unknown"


def _triton_version() -> Optional[str]:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def _fmt_ratio(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.2f}"


def print_table(records: Sequence[dict], providers: Sequence[str], out=sys.stdout) -> None:
    """Per case: base ms, each provider's time over base, and the best lorakern's speedup over PEFT."""
    rows: dict[tuple, dict[str, dict]] = {}
    for r in records:
        key = (r["mode"], r["M"], r["K"], r["N"], r["r"], r["dropout"], r["masked"], r["adapters"])
        rows.setdefault(key, {})[r["provider"]] = r
    base = {k[:5]: v["base"] for k, v in rows.items() if "base" in v}
    others = [p for p in providers if p != "base"]
    head = f"{'mode':<6} {'M':>5} {'K':>5} {'N':>5} {'r':>3} {'variant':<18} {'base ms':>9} "
    head += " ".join(f"{p.replace('lorakern-', 'lk-'):>10}" for p in others) + f" {'lk/peft':>8}"
    print("time / base (x); lk/peft: PEFT time / best lorakern time; g: CUDA graph, e: eager", file=out)
    print(head, file=out)
    for key in sorted(rows):
        provs = rows[key]
        b = base.get(key[:5])
        label = Variant(key[5], key[6], key[7]).label
        line = f"{key[0]:<6} {key[1]:>5} {key[2]:>5} {key[3]:>5} {key[4]:>3} {label:<18} "
        line += f"{b['median_ms']:9.4f} " if b else f"{'-':>9} "
        cells = []
        for p in others:
            rec = provs.get(p)
            mark = "" if rec is None or rec.get("cuda_graph") is None else ("g" if rec["cuda_graph"] else "e")
            cells.append(f"{_fmt_ratio(rec and rec.get('ratio_to_base')) + mark:>10}")
        line += " ".join(cells)
        lk = [provs[p]["speedup_vs_peft"] for p in others
              if p.startswith("lorakern-") and p in provs and "speedup_vs_peft" in provs[p]]
        line += f" {_fmt_ratio(max(lk) if lk else None):>8}"
        print(line, file=out)
    halves = [r for r in records if "ratio_to_half_rank" in r and r["provider"].startswith("lorakern-")]
    if halves:
        print("half the ranks masked, time / time of the plain layer at half the rank (target <= 1.02):", file=out)
    for r in sorted(halves, key=lambda r: (r["provider"], r["mode"], r["M"], r["K"], r["N"])):
        print(f"  {r['provider']:<16} {r['mode']:<6} M={r['M']:<5} K={r['K']:<5} N={r['N']:<5} r={r['r']}: "
              f"{r['ratio_to_half_rank']:.3f}", file=out)


def plot(records: Sequence[dict], providers: Sequence[str], path: str, title: str) -> None:
    """Ratio to base by shape, one panel per mode; solid lines without dropout, dashed with."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plain = [r for r in records if not r["masked"] and not r["adapters"] and "ratio_to_base" in r]
    modes = [m for m in MODES if any(r["mode"] == m for r in plain)]
    fig, axes = plt.subplots(len(modes), 1, figsize=(12, 3.6 * len(modes)), squeeze=False)
    for ax, mode in zip(axes[:, 0], modes):
        recs = [r for r in plain if r["mode"] == mode]
        shapes = sorted({(r["M"], r["K"], r["N"], r["r"]) for r in recs})
        xs = {s: i for i, s in enumerate(shapes)}
        for color, prov in enumerate(p for p in providers if p != "base"):
            for p in sorted({r["dropout"] for r in recs}):
                pts = sorted((xs[(r["M"], r["K"], r["N"], r["r"])], r["ratio_to_base"]) for r in recs
                             if r["provider"] == prov and r["dropout"] == p)
                if pts:
                    ax.plot(*zip(*pts), "-" if p == 0 else "--", color=f"C{color}", marker="o",
                            label=f"{prov} p={p:g}")
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks(range(len(shapes)))
        ax.set_xticklabels([f"{M}x{K}x{N}\nr{r}" for M, K, N, r in shapes], fontsize=7)
        ax.set_yscale("log")
        ax.set_ylabel("time / F.linear")
        ax.set_title(f"{title}: {mode}")
        ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- command line


def _parse_shapes(text: str) -> tuple:
    return tuple(Shape(*(int(v) for v in s.lower().split("x"))) for s in text.split(",") if s)


def _parse_part(text: str) -> tuple[int, int]:
    k, n = (int(v) for v in text.split("/"))
    if not 1 <= k <= n:
        raise argparse.ArgumentTypeError(f"--part: expected k/n with 1 <= k <= n, got {text!r}")
    return k, n


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="lorakern bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="the quick set (a few minutes on an H100)")
    ap.add_argument("--json", metavar="OUT.json", help="write the records there")
    ap.add_argument("--plot", metavar="OUT.png", help="plot ratio to base by shape there")
    ap.add_argument("--dtype", choices=("bfloat16", "float16", "float32"),
                    help="default: bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--M", type=lambda s: _parse_list(s, int), help="tokens, e.g. 1,16,2048")
    ap.add_argument("--KN", type=_parse_kn, help="in x out features, e.g. 4096x4096,4096x14336")
    ap.add_argument("--r", type=lambda s: _parse_list(s, int), help="ranks, e.g. 8,16,64")
    ap.add_argument("--shapes", type=_parse_shapes, help="explicit MxKxNxr list (overrides --M/--KN/--r)")
    ap.add_argument("--modes", type=lambda s: _parse_list(s, str), help="subset of fwd,bwd,fwdbwd")
    ap.add_argument("--dropout", type=lambda s: _parse_list(s, float), default=(0.0, 0.1))
    ap.add_argument("--variants", type=lambda s: _parse_list(s, str), default=("plain", "masked", "adapters"),
                    help="subset of plain,masked,adapters")
    ap.add_argument("--providers", type=lambda s: _parse_list(s, str), help=f"subset of {','.join(PROVIDERS)}")
    ap.add_argument("--part", type=_parse_part, help="k/n: the k-th of n parts of the (shape, mode) groups")
    ap.add_argument("--warmup-ms", type=int, default=25)
    ap.add_argument("--rep-ms", type=int, default=100)
    ap.add_argument("--no-graphs", action="store_true", help="never capture CUDA graphs")
    ap.add_argument("--cpu-budget-s", type=float, default=None,
                    help="CPU: seconds of interleaved rounds per group (default 0.5 quick, 5 otherwise)")
    ap.add_argument("--list", action="store_true", help="print the cases and exit")
    ap.add_argument("--show", metavar="RESULT.json", help="print the table of a written result and exit")
    return ap


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``lorakern bench [--device D] [--quick] [--json OUT.json] [--plot OUT.png] ...``; returns the exit code."""
    args = _parser().parse_args(argv)
    if args.show:
        return _show(args.show)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("lorakern bench: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    bad = [m for m in (args.modes or ()) if m not in MODES] + [p for p in (args.providers or ()) if p not in PROVIDERS]
    bad += [v for v in args.variants if v not in ("plain", "masked", "adapters")]
    if bad:
        print(f"lorakern bench: unknown mode, provider or variant: {', '.join(bad)}", file=sys.stderr)
        return 2
    runnable, skipped = available_providers(device)
    providers = [p for p in (args.providers or PROVIDERS) if p in runnable]
    skipped = {p: [why] for p, why in skipped.items() if p in (args.providers or PROVIDERS)}
    cases = select_cases(args, device)
    if args.list:
        for c in cases:
            print(c.mode, c.shape, c.variant.label)
        return 0
    settings = Settings(
        warmup_ms=args.warmup_ms, rep_ms=args.rep_ms, graphs=not args.no_graphs, l2_bytes=l2_bytes(device),
        cpu_budget_s=args.cpu_budget_s if args.cpu_budget_s is not None else (0.5 if args.quick else 5.0),
    )
    n_groups = len({_group_key(c) for c in cases})
    print(f"lorakern bench on {_device_name(device)}, {_dtype_name(dtype)}: {len(cases)} cases in {n_groups} "
          f"groups; providers {', '.join(providers)}", flush=True)
    t0 = time.perf_counter()
    records, skips = run(cases, providers, device, dtype, settings, log=lambda s: print(s, flush=True))
    for p, reasons in skips.items():
        skipped.setdefault(p, []).extend(reasons)
    result = {
        "device": _device_name(device), "commit": _commit(), "torch": torch.__version__,
        "triton": _triton_version(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "slug": device_slug(device), "wall_s": round(time.perf_counter() - t0, 1),
        "skipped": skipped, "records": records,
    }
    if args.json:
        import json

        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    if args.plot:
        plot(records, providers, args.plot, result["device"])
    _summary(result)
    return 0


def _summary(result: dict) -> None:
    """What was skipped and why, then the table."""
    print(f"{result['device']}, commit {result['commit']}, torch {result['torch']}, triton {result['triton']}, "
          f"{result['date']}")
    for p, reasons in result["skipped"].items():
        for why in reasons:
            print(f"skipped {p}: {why}")
    errors = {(r["provider"], r["graph_error"]) for r in result["records"] if r.get("graph_error")}
    for prov, err in sorted(errors):
        print(f"no CUDA graph for {prov}: {err}")
    present = {r["provider"] for r in result["records"]}
    print_table(result["records"], [p for p in PROVIDERS if p in present])
    print(f"{len(result['records'])} records in {result['wall_s']} s")


def _show(path: str) -> int:
    import json

    _summary(json.loads(Path(path).read_text()))
    return 0
