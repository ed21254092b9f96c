"""lorakern.benchmark's case selection, derived ratios and gates (no timing: synthetic records), the
tuning tables and the tool that writes them, and CPU smoke runs of the GPU scripts under bench/,
which would otherwise only run (and rot) on a GPU."""
from __future__ import annotations

import importlib
import importlib.util
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lorakern import benchmark as bm
from lorakern.benchmark import gates
from lorakern.triton import configs

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"


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


def test_triton_tune_compiles_kernel_variants_for_sm90(monkeypatch):
    """The launches bench/triton_tune records through the op (the backend's real argument lists, TMA
    descriptors, base_scale, deterministic mode) compile for sm_90 without a GPU."""
    pytest.importorskip("triton")
    monkeypatch.syspath_prepend(str(ROOT))
    aot = importlib.import_module("bench.triton_tune.aot")
    assert aot.aot(90, dtypes=(torch.bfloat16,), quick=True)


def test_gates_fail_the_run_and_targets_are_marked():
    rec = dict(_record("lorakern-auto", 1.0, mode="fwdbwd", M=4096), K=2048, N=2048, masked=False, adapters=0,
               paired_ratio_to_base=1.3, saved_bytes=10)
    verdicts = gates.evaluate([rec], "cpu")
    assert [v.target.name for v in gates.failed(verdicts)] == ["CPU fwd+bwd near the base"]
    assert any(line.startswith("gate 'CPU fwd+bwd near the base'") and "FAILED" in line
               for line in gates.report_lines(verdicts))
    assert not gates.evaluate([rec], "cuda") or not gates.failed(gates.evaluate([rec], "cuda"))
    result = {"device": "CPU", "commit": "c", "torch": "t", "triton": None, "date": "d", "slug": "cpu",
              "wall_s": 0.0, "skipped": {}, "records": [rec]}
    out = io.StringIO()
    assert bm.report.summary(result, out=out) == 1
    assert "1 gate checks FAILED" in out.getvalue()


def test_providers_come_from_the_backend_table():
    from lorakern import backends

    assert [p for p in bm.PROVIDERS if p.startswith("lorakern-") and p != "lorakern-auto"] == [
        f"lorakern-{name}" for name in backends.NAMES]
    runs, why = bm.available_providers(torch.device("cpu"))
    assert {"base", "addmm", "lorakern-auto", "lorakern-torch"} <= set(runs)
    assert all(why[p] for p in bm.PROVIDERS if p not in runs)


def test_launch_plans_have_a_row_for_every_size():
    tables = configs.load()
    assert {"default", "interpret"} <= set(tables)
    for name, kinds in tables.items():
        for kind, rows in kinds.items():
            assert kind in configs.KINDS and "M_max" not in rows[-1], (name, kind)
            assert [r["M_max"] for r in rows[:-1]] == sorted(r["M_max"] for r in rows[:-1]), (name, kind)
    for kind in configs.KINDS:
        plan = configs.plan(kind, M=8192, N=4096, K=4096, esize=4, sms=132, table="default")
        assert plan[configs.KINDS[kind]] >= 16


def test_planning_context_forces_entries_and_restores_them():
    args = dict(M=8192, N=4096, K=4096, table="default")
    before = configs.plan("fwd", **args)
    with configs.planning(fwd={"FUSE_Q": False}, sms=7):
        with configs.planning(fwd={"BK": 32}, table="interpret"):
            inner = configs.plan("fwd", **args)
            assert inner["BK"] == 32 and not inner["FUSE_Q"]
            assert configs.table_name() == "interpret"
        assert configs.plan("fwd", **args)["BK"] == before["BK"]
        assert configs.plan("shrink", M=16, K=4096, sms=1000, table="default")["SPLIT_K"] <= 14
    assert configs.plan("fwd", **args) == before
    assert configs.plan("fwd", banked=True, **args)["FUSE_Q"] is False
    with pytest.raises(ValueError, match="unknown kinds"):
        with configs.planning(fwdd={"BK": 16}):
            pass


def test_make_autotable_writes_both_tables(tmp_path):
    tool = _script("make_autotable")
    results = {"device": "GPU X", "records": [
        {"provider": f"lorakern-{b}", "mode": "fwdbwd", "dropout": 0.0, "masked": False, "adapters": 0,
         "dtype": "bfloat16", "M": M, "median_ms": ms}
        for M, b, ms in ((16, "triton", 1.0), (16, "torch", 2.0), (8192, "triton", 3.0), (8192, "torch", 2.0))]
        + [{"provider": "lorakern-auto", "mode": "fwdbwd", "dropout": 0.0, "masked": False, "adapters": 0,
            "dtype": "bfloat16", "M": 16, "median_ms": 0.1}]}
    tune = {"device": "GPU X", "M": 8192, "results": [
        {"kind": "fwd", "dropout": False, "entries": {"TMA": True, "num_stages": 4}, "ms": 1.0},
        {"kind": "fwd", "dropout": False, "entries": {"TMA": False}, "ms": 2.0},
        {"kind": "fwd", "dropout": True, "entries": {"TMA": True}, "ms": 1.5}]}
    (tmp_path / "r.json").write_text(json.dumps(results))
    (tmp_path / "t.json").write_text(json.dumps(tune))
    (tmp_path / "plans.json").write_text(configs.TABLES.read_text())
    assert tool.main([str(tmp_path / "r.json"), "--tune", str(tmp_path / "t.json"), "--table",
                      str(tmp_path / "auto.json"), "--plans", str(tmp_path / "plans.json")]) == 0
    assert json.loads((tmp_path / "auto.json").read_text()) == {"GPU X": {"bfloat16": [[4104, "triton"],
                                                                                       [2**62, "torch"]]}}
    plans = json.loads((tmp_path / "plans.json").read_text())
    large = plans["GPU X"]["fwd"][-1]
    assert large["TMA"] is True and large["num_stages"] == 4 and large["dropout"] == {"num_stages": 3,
                                                                                      "FUSE_Q": False}
    assert tool.dump_plans(plans) == (tmp_path / "plans.json").read_text()
    assert tool.dump_plans(configs.load()) == configs.TABLES.read_text()


def test_gpu_run_quick_dry_run(tmp_path):
    """bash bench/gpu_run.sh quick-dry: the path of the GPU session's quick run (test shards, the
    training and decode benchmark, its result file and table) on CPU with tiny shapes."""
    env = dict(os.environ, PYTHON=sys.executable, OUT=str(tmp_path / "out"), RESULTS=str(tmp_path / "res"),
               SHARD_TIMEOUT="300")
    run = subprocess.run(["bash", str(BENCH / "gpu_run.sh"), "quick-dry"], cwd=ROOT, env=env, text=True,
                         capture_output=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads((tmp_path / "res" / "cpu.json").read_text())
    assert {"device", "commit", "torch", "triton", "records"} <= set(result)
    providers = {r["provider"] for r in result["records"]}
    assert {"base", "peft", "addmm", "lorakern-auto", "lorakern-torch"} <= providers
    assert {(r["M"], r["mode"], r["dropout"]) for r in result["records"]} == {
        (M, mode, p) for M in (1, 16, 64) for mode in ("fwd", "fwdbwd") for p in (0.0, 0.1)}
    assert "vs ref" in run.stdout and "op-torch" in run.stdout and "gpu_run quick-dry: rc=0" in run.stdout


def test_bench_dry_run_prints_what_auto_picks(capsys):
    assert bm.main(["--device", "cpu", "--M", "16", "--KN", "64x64", "--r", "4", "--variants", "plain",
                    "--modes", "fwd", "--dropout", "0", "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith("auto on cpu float32")
    from lorakern import backends

    *case, pick = lines[1].split()
    assert case == ["fwd", "16", "64", "64", "4", "p=0"] and pick in backends.NAMES
