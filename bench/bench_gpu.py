"""GPU benchmark set (marker ``gpu``; skipped without CUDA): every provider in one process.

Two groups of docs/contract.md section 6 in the GPU's dtype (bf16): training, forward+backward at
M=8192, K=N=4096, r=16; decoding, forward at M=16 (CUDA graphs). Dropout 0 and 0.1. Each
time is ``triton.testing.do_bench``'s median through ``lorakern.benchmark`` (its one timing
module; inputs rotated past L2); pytest-benchmark runs each step once to register it, and
``extra_info`` carries the times, the ratio to base, the speedups, peak memory and saved bytes:

    PYTHONPATH=$PWD python3 -m pytest -q -m gpu bench/bench_gpu.py --benchmark-json out/bench-gpu.json

The whole quick set with its table is ``lorakern bench --quick`` (bench/gpu_run.sh).
"""
from __future__ import annotations

import math

import pytest
import torch

from lorakern import benchmark as bm

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

GROUPS = {"train": (bm.Shape(8192, 4096, 4096, 16), "fwdbwd"), "decode": (bm.Shape(16, 4096, 4096, 16), "fwd")}
DROPOUTS = (0.0, 0.1)


@pytest.fixture(scope="module")
def measured() -> dict:
    """{(group, provider, dropout): (record, item)} for both groups."""
    device = torch.device("cuda")
    providers, _ = bm.available_providers(device)
    settings = bm.Settings(l2_bytes=bm.l2_bytes(device))
    out = {}
    torch.manual_seed(0)
    with bm.bench_stream(device):
        for name, (shape, mode) in GROUPS.items():
            cases = [bm.Case(mode, shape, bm.Variant(dropout=p)) for p in DROPOUTS]
            items = bm.prepare_group(shape, mode, cases, providers, device, torch.bfloat16, settings, {})
            bm.time_items(items, device, settings)
            records = [bm.to_record(it, torch.bfloat16) for it in items]
            bm.add_ratios(records)
            out.update({(name, r["provider"], r["dropout"]): (r, it) for r, it in zip(records, items)})
        yield out


def _params():
    return [(g, p, d) for g in GROUPS for p in bm.PROVIDERS for d in (DROPOUTS if p != "base" else (0.0,))]


@pytest.mark.parametrize("group,provider,dropout", _params())
def test_provider(benchmark, measured, group: str, provider: str, dropout: float) -> None:
    if (group, provider, dropout) not in measured:
        pytest.skip(f"{provider} does not run here")
    rec, item = measured[(group, provider, dropout)]
    benchmark.extra_info.update({k: rec.get(k) for k in (
        "median_ms", "eager_ms", "graph_ms", "cuda_graph", "ratio_to_base", "speedup_vs_peft", "speedup_vs_reference",
        "peak_mem_mb", "saved_bytes", "n_sets")})
    benchmark.pedantic(item.steps[0], rounds=1, iterations=1)
    assert math.isfinite(rec["median_ms"]) and rec["median_ms"] > 0
