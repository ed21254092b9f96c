"""lorakern.benchmark's case selection and derived ratios (no timing: synthetic records), and
CPU smoke runs of the GPU scripts under bench/, which would otherwise only run (and rot) on a GPU."""
from __future__ import annotations

import importlib.util
import io
from pathlib import Path

import pytest
import torch

from lorakern import benchmark as bm
from lorakern.benchmark import gates

BENCH = Path(__file__).resolve().parent.parent / "bench"


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"lorakern_bench_{name}", BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _record(provider, ms, *, r=16, masked=False, mode="fwd", M=16):
    return {"provider": provider, "mode": mode, "M": M, "K": 256, "N": 256, "r": r, "dtype": "fp32",
            "dropout": 0.0, "median_ms": ms, "masked": masked, "adapters": 1}


def test_masked_variant_brings_its_half_rank_cases():
    args = bm.parser().parse_args(["--quick", "--device", "cpu", "--modes", "fwd"])
    cases = bm.select_cases(args, torch.device("cpu"))
    masked = {c.shape for c in cases if c.variant.masked}
    plain = {c.shape for c in cases if c.variant == bm.Variant()}
    assert masked and all(bm.Shape(s.M, s.K, s.N, s.r // 2) in plain for s in masked)
    args = bm.parser().parse_args(["--quick", "--device", "cpu", "--modes", "fwd", "--variants", "plain"])
    assert all(c.shape.r == 16 for c in bm.select_cases(args, torch.device("cpu")))


def test_ratio_to_half_rank_pairs_the_same_provider_and_shape():
    recs = [_record("base", 1.0), _record("lorakern-triton", 2.2, masked=True), _record("lorakern-triton", 2.0, r=8),
            _record("lorakern-torch", 3.0, masked=True), _record("lorakern-torch", 1.5, r=8, M=128)]
    bm.add_ratios(recs)
    assert abs(recs[1]["ratio_to_half_rank"] - 1.1) < 1e-12
    assert "ratio_to_half_rank" not in recs[3]  # its half-rank record has another M
    assert all("ratio_to_half_rank" not in r for r in recs if not r["masked"])
    lines = gates.report_lines(gates.evaluate(recs, "cuda"))
    assert "  UNMET  lorakern-triton  fwd    M=16    K=256   N=256   r=16  p=0 masked 1 adapters: 1.100" in lines
    out = io.StringIO()
    bm.print_table(recs, ["base", "lorakern-triton", "lorakern-torch"], out=out)
    assert "fwd       16   256   256  16 p=0 masked 1 adapters" in out.getvalue()


def test_host_profile_runs_on_cpu(capsys):
    assert _script("host_profile").main(["--device", "cpu", "--backend", "torch", "--K", "64", "--M", "4"]) == 0
    out = capsys.readouterr().out
    assert "lorakern-torch fwd+bwd" in out and "PEFT-style fwd+bwd" in out and "cProfile of 200" in out


def test_triton_tune_compiles_kernel_variants_for_sm90():
    """The launches bench/triton_tune.py records (the backend's real argument lists, TMA descriptors,
    base_scale, deterministic mode) compile for sm_90 without a GPU."""
    pytest.importorskip("triton")
    assert _script("triton_tune").aot(90, dtypes=(torch.bfloat16,), quick=True)
