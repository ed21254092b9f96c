"""CPU benchmark gates, run in the default tier: what ``backend="auto"`` runs on this CPU against ``F.linear``.

fp32, M=4096, K=N=2048, r=16, forward+backward with the base frozen (gradients of x, A and B),
every provider in the same process, medians of interleaved runs (``lorakern.benchmark.run``):

    pytest -q bench/bench_cpu.py

Gates (``lorakern.benchmark.gates``, the limits' one home), each against figures measured in
this run: lorakern-auto (the cpu backend where the CPU extension runs, else the torch backend)
<= 1.10x the base without dropout and <= 1.45x with dropout 0.1 (the
median over rounds of its time over base's time in the same round: ``paired_ratio_to_base``);
it newly saves <= 8*M*r + 64 KiB. PEFT's and the addmm style's figures go to ``extra_info``.
"""
from __future__ import annotations

import pytest
import torch

from lorakern import benchmark as bm
from lorakern.benchmark import gates

SHAPE = bm.Shape(*gates.CPU_GATE_SHAPE)
PROVIDERS = ("base", "lorakern-auto", "lorakern-torch", "peft", "addmm")
DROPOUTS = (0.0, 0.1)
# interleaved rounds, each running all 9 provider/dropout steps once: at least 5, then until 60 s
SETTINGS = bm.Settings(cpu_budget_s=60.0, cpu_min_rounds=5, cpu_max_rounds=15)
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def measured(request):
    """{(provider, dropout): (record, item)} for fwdbwd, all timed in one interleaved group; the
    figures are printed at the end of the module."""
    pytest.importorskip("peft")
    torch.manual_seed(0)
    cases = [bm.Case("fwdbwd", SHAPE, bm.Variant(dropout=p)) for p in DROPOUTS]
    skipped: dict[str, list[str]] = {}
    items = bm.prepare_group(SHAPE, "fwdbwd", cases, PROVIDERS, CPU, torch.float32, SETTINGS, skipped)
    assert not skipped, skipped
    bm.time_items(items, CPU, SETTINGS)
    records = [bm.to_record(it, torch.float32) for it in items]
    bm.add_ratios(records)
    yield {(r["provider"], r["dropout"]): (r, it) for r, it in zip(records, items)}
    plugins = request.config.pluginmanager
    with plugins.get_plugin("capturemanager").global_and_fixture_disabled():
        print("\n" + _report(records), flush=True)


def _report(records: list[dict]) -> str:
    """The figures of the run, one line per provider and dropout."""
    x_bytes = SHAPE.M * SHAPE.K * 4
    lines = [f"CPU fwd+bwd, fp32, M={SHAPE.M} K={SHAPE.K} N={SHAPE.N} r={SHAPE.r}, medians of "
             f"{records[0]['n_rounds']} interleaved rounds:",
             f"{'provider':<16} {'p':>4} {'ms':>9} {'x base':>7} {'paired':>7} {'vs peft':>8} {'saved bytes':>12} "
             f"{'/ x':>6}"]
    for r in records:
        lines.append(f"{r['provider']:<16} {r['dropout']:>4g} {r['median_ms']:9.1f} {r['ratio_to_base']:7.3f} "
                     f"{r['paired_ratio_to_base']:7.3f} "
                     f"{r.get('speedup_vs_peft', float('nan')):8.3f} {r['saved_bytes']:>12} "
                     f"{r['saved_bytes'] / x_bytes:6.2f}")
    return "\n".join(lines)


def _extra(benchmark, rec: dict) -> None:
    x_bytes = SHAPE.M * SHAPE.K * 4
    benchmark.extra_info.update({
        "interleaved_median_ms": rec["median_ms"], "ratio_to_base": rec.get("ratio_to_base"),
        "paired_ratio_to_base": rec.get("paired_ratio_to_base"), "n_rounds": rec["n_rounds"],
        "speedup_vs_peft": rec.get("speedup_vs_peft"), "saved_bytes": rec.get("saved_bytes"),
        "saved_over_input": rec.get("saved_bytes", 0) / x_bytes,
    })


@pytest.mark.parametrize("provider,dropout", [("base", 0.0)] + [(p, d) for p in PROVIDERS[1:] for d in DROPOUTS])
def test_fwdbwd(benchmark, measured, provider: str, dropout: float) -> None:
    rec, item = measured[(provider, dropout)]
    _extra(benchmark, rec)
    benchmark.pedantic(item.steps[0], rounds=1, iterations=1)
    verdicts = gates.evaluate([rec], "cpu")
    assert not gates.failed(verdicts), "\n".join(gates.report_lines(verdicts)) + (
        f"\nratio of medians {rec['ratio_to_base']:.3f}x; base {measured[('base', 0.0)][0]['median_ms']:.1f} ms, "
        f"lorakern {rec['median_ms']:.1f} ms; PEFT {measured[('peft', dropout)][0]['paired_ratio_to_base']:.3f}x, "
        f"saves {measured[('peft', dropout)][0]['saved_bytes']} bytes")
