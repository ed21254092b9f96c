"""How a case is measured: the provider's steps over rotated input sets, timed by ``timing``.

A group (one shape and mode) is prepared at once: the base, then every provider on every variant.
On a GPU each item is timed alone (``timing.median_ms``; at decode sizes also as CUDA-graph
replays, ``timing.graph_ms``); on CPU the group's items run interleaved (``timing.interleaved_ms``).

>>> from lorakern.benchmark.cases import Case, Shape, Variant
>>> recs, skipped = run([Case("fwd", Shape(4, 32, 16, 4), Variant())], ["base", "lorakern-torch"],
...                     torch.device("cpu"), torch.float32, Settings(cpu_budget_s=0.01), log=len)
>>> sorted(r["provider"] for r in recs)
['base', 'lorakern-torch']
"""
from __future__ import annotations

import contextlib
import math
import statistics
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Sequence

import torch

from lorakern.benchmark import timing
from lorakern.benchmark.cases import BASE_VARIANT, Case, Shape, group_key
from lorakern.benchmark.providers import Built, Inputs, Skip, build, make_inputs, set_bytes
from lorakern.benchmark.records import add_ratios, to_record

__all__ = ["Settings", "Item", "GRAPH_MAX_M", "prepare", "prepare_group", "time_items", "run", "saved_storages"]

GRAPH_MAX_M = 64  # decode sizes: launch and Python overhead would otherwise dominate


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


@dataclass
class Item:
    """A provider's steps for one case (one per input set), ready to time; the timings land here (ms)."""

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


def _one_line(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}".strip().splitlines()[0]
    return text[:160]


def _step(mode: str, built: Built, inp: Inputs) -> Callable[[], object]:
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


def saved_storages(exclude) -> tuple[contextlib.AbstractContextManager, dict]:
    """A context in which autograd's saved tensors are recorded, and the record: {storage: bytes}
    of every saved tensor's storage but those of ``exclude`` (parameters, buffers, inputs). Storages
    are told apart by their storage object (``_cdata``, the StorageImpl; the saved tensors keep it
    alive) within the one measurement, so views of one storage count once.

    >>> ctx, seen = saved_storages([])
    >>> with ctx:
    ...     _ = (torch.ones(4, requires_grad=True) * 2).sin()
    >>> sum(seen.values()) > 0
    True
    """
    skip = {t.untyped_storage()._cdata for t in exclude}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage._cdata not in skip:
            seen[storage._cdata] = storage.nbytes()
        return t

    return torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), seen


def _saved_bytes(built: Built, inp: Inputs) -> int:
    """Bytes of the tensors autograd saves in a forward that are not x, parameters or buffers."""
    ctx, seen = saved_storages(built.frozen)
    with ctx:
        built.fn(inp.x)
    return sum(seen.values())


def _peak_mb(step: Callable[[], object], device: torch.device) -> float:
    """Memory a step allocates above what is resident before it (CUDA)."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    step()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def prepare(provider: str, case: Case, dtype: torch.dtype, device: torch.device, settings: Settings) -> Item:
    """Input sets (as many as ``timing.n_sets`` asks), the provider's steps over them, saved bytes
    and (CUDA) peak memory.

    Raises:
        Skip: the provider cannot do the case's variant.
    """
    shape, variant = case.shape, case.variant
    first = make_inputs(shape, variant, dtype, device)
    inputs = [first] + [make_inputs(shape, variant, dtype, device)
                        for _ in range(timing.n_sets(set_bytes(first), settings.l2_bytes) - 1)]
    builts = [build(provider, inp, shape, variant) for inp in inputs]
    steps = [_step(case.mode, bt, inp) for bt, inp in zip(builts, inputs)]
    saved = _saved_bytes(builts[0], inputs[0]) if case.mode != "fwd" else None
    peak = None
    if device.type == "cuda":
        steps[0]()  # compile / autotune / first-call costs stay out of the peak
        peak = _peak_mb(steps[0], device)
    return Item(provider, case, steps, saved, peak)


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


def _time_gpu(item: Item, settings: Settings) -> None:
    """Eager time, then (``settings.graphs``) the graph time, which is ``ms`` at decode sizes."""
    item.eager_ms = timing.median_ms(timing.rotate(item.steps), torch.device("cuda"), warmup_ms=settings.warmup_ms,
                                     rep_ms=settings.rep_ms)
    item.ms, item.graph = item.eager_ms, False
    if not settings.graphs:
        return
    try:
        item.graph_ms = timing.graph_ms(item.steps, warmup_ms=settings.warmup_ms, rep_ms=settings.rep_ms)
    except Exception as e:  # noqa: BLE001 - any capture failure is recorded, the eager time stands
        torch.cuda.synchronize()
        item.graph_error = _one_line(e)
        return
    if item.case.shape.M <= GRAPH_MAX_M:
        item.ms, item.graph = item.graph_ms, True


def time_items(items: Sequence[Item], device: torch.device, settings: Settings) -> None:
    """Time a group's items: one after another on CUDA, interleaved on CPU (then ``samples_ms``
    holds every round's time and ``ms`` their median)."""
    if device.type == "cuda":
        for it in items:
            _time_gpu(it, settings)
        return
    samples = timing.interleaved_ms([timing.rotate(it.steps) for it in items], settings.cpu_budget_s,
                                    settings.cpu_min_rounds, settings.cpu_max_rounds)
    for it, ts in zip(items, samples):
        it.samples_ms = ts
        it.ms = statistics.median(ts)


def run(cases: Iterable[Case], providers: Sequence[str], device: torch.device, dtype: torch.dtype,
        settings: Settings, log: Callable[[str], object] = print) -> tuple[list[dict], dict[str, list[str]]]:
    """Time ``providers`` on ``cases``: ``(records, skipped)``, records in the schema of
    bench/README.md with their ratios, skipped = {provider: [reasons]}."""
    groups: dict[tuple, list[Case]] = {}
    for case in cases:
        groups.setdefault(group_key(case), []).append(case)
    records: list[dict] = []
    skipped: dict[str, list[str]] = {}
    torch.manual_seed(0)
    with timing.bench_stream(device):
        for gi, ((shape, mode), group_cases) in enumerate(sorted(groups.items())):
            with timing.Stopwatch(device) as clock:
                items = prepare_group(shape, mode, group_cases, providers, device, dtype, settings, skipped)
                time_items(items, device, settings)
                records += [to_record(it, dtype) for it in items]
                del items
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            log(f"[{gi + 1}/{len(groups)}] {mode:<6} M={shape.M} K={shape.K} N={shape.N} r={shape.r} "
                f"({clock.seconds:.1f} s)")
    add_ratios(records)
    return records, skipped
