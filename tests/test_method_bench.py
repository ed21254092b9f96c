"""bench/methods.py --quick: the method bench runs end to end on the CPU (a few steps per method) and
its table, allocation, regression and claims have the expected structure and finite numbers.
Values are not checked: the full bench (``make methods``) is where they mean something."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

pytest.importorskip("peft")
pytest.importorskip("transformers")
pytest.importorskip("matplotlib")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = ["lora", "peft-lora", "tied-TL5", "tied-TL6", "vera", "peft-vera", "adalora", "peft-adalora", "igulora",
           "igulora-ada", "reflora", "reflora-S", "cglora", "cglora-noshift"]


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("methods")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "methods.py"), "--quick", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    with open(out / "methods.json") as fh:
        return json.load(fh), proc.stdout, out


def finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def test_table_has_every_method_with_finite_numbers(quick):
    result, stdout, _ = quick
    rows = result["rows"]
    assert list(rows) == METHODS
    for name, row in rows.items():
        for key in ("params", "loss", "early_loss", "share_of_lora", "param_share", "ms_per_step", "memory_mb", "base"):
            assert finite(row[key]), (name, key, row[key])
        assert row["params"] > 0 and row["ms_per_step"] > 0 and row["memory_mb"] > 0
        assert name in stdout
    assert rows["lora"]["params"] == rows["peft-lora"]["params"]  # equal rank, the same targets
    assert rows["vera"]["params"] == rows["peft-vera"]["params"]
    assert rows["adalora"]["params"] == rows["peft-adalora"]["params"]
    assert rows["tied-TL5"]["params"] < rows["tied-TL6"]["params"] < rows["lora"]["params"]
    for run in result["runs"]:
        assert all(finite(loss) for _, loss in run["curve"])


def test_allocation_regression_and_claims(quick):
    result, stdout, out = quick
    for alloc in result["allocation"]:
        assert len(alloc["true"]) == 6
        for name in ("adalora", "peft-adalora", "igulora", "igulora-ada"):
            got = alloc["methods"][name]
            assert len(got["ranks"]) == 6 and all(0 <= r <= 8 for r in got["ranks"]) and finite(got["mse"])
            assert got["distance"] == sum(abs(a - k) for a, k in zip(got["ranks"], alloc["true"]))
    for regress in result["regression"]:
        assert set(regress) == {"lora", "reflora", "lora (random A, B)", "reflora (random A, B)",
                                "reflora-S (random A, B)"}
        assert all(finite(v) for res in regress.values() for v in res["curve"])
    papers = {c["paper"] for c in result["claims"]}
    assert {"Tied-LoRA 2311.09578", "IGU-LoRA 2603.13792", "RefLoRA 2505.18877", "CG-LoRA 2603.29824"} <= papers
    assert all(c["verdict"] in ("consistent", "NOT consistent") and c["measured"] for c in result["claims"])
    assert "Claims" in stdout and os.path.getsize(out / "methods.png") > 10_000
    # a quick run's verdicts mean nothing: printed unjudged, under one line that says so
    assert result["claims_judged"] is False and "quick run: too few steps to judge the claims" in stdout
    assert "consistent]" not in stdout and stdout.count("[not judged]") == len(result["claims"])


def test_claims_print_verdicts_only_when_judged():
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    try:
        import methods
    finally:
        sys.path.remove(os.path.join(ROOT, "bench"))
    found = [{"paper": "P", "claim": "c", "measured": "m", "verdict": "NOT consistent"}]
    assert methods.claim_lines(found, judged=True) == ["  [NOT consistent] P: c", "      measured: m"]
    assert methods.claim_lines(found, judged=False) == [f"  {methods.QUICK_NOTE}", "  [not judged] P: c",
                                                        "      measured: m"]
