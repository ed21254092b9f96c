"""The command line: ``lorakern --help`` and every command's, the console script, errors that say what to
install, and ``lorakern check``'s table without third-party noise."""
from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from lorakern import cli, extras


def test_help_lists_every_command(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(f"  {name}" in out for name in cli.COMMANDS)
    assert 'pip install "lorakern[peft]"' in out


@pytest.mark.parametrize("command", list(cli.COMMANDS))
def test_every_command_has_help_with_option_descriptions(command, capsys):
    assert cli.main([command, "--help"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"usage: lorakern {command}")
    options = [i for i, line in enumerate(lines) if re.match(r"  -", line) and not line.startswith("  -h, --help")]
    assert options
    for i in options:  # the description on the option's line, or on the next, indented
        assert re.match(r"  -\S.*?\s{2,}\S", lines[i]) or re.match(r"\s{10,}\S", lines[i + 1]), lines[i]


def test_usage_errors_exit_2(capsys):
    assert cli.main([]) == 2
    assert cli.main(["nonsense"]) == 2
    assert "invalid choice" in capsys.readouterr().err


@pytest.mark.parametrize("args,expected", [
    (["--M", "0"], "argument --M: expected an int >= 1, got '0'"),
    (["--dropout", "1.5"], "argument --dropout: expected a float in [0, 1), got '1.5'"),
    (["--device", "cpu"], "argument --device: invalid choice: 'cpu'"),
])
def test_plan_rejects_bad_values_with_a_usage_line(args, expected, capsys):
    """A shape of zero, a dropout outside [0, 1) or a GPU the autotable has no rows for: one usage
    line naming the option, exit 2 (not a traceback, not an invented answer)."""
    assert cli.main(["plan", *args]) == 2
    assert expected in capsys.readouterr().err


def test_console_script_runs():
    exe = shutil.which("lorakern", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.skip("the lorakern console script is not installed beside this python")
    run = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "commands:" in run.stdout


def test_missing_dependency_says_what_to_install(capsys, monkeypatch):
    for module in ("peft", "matplotlib"):  # None in sys.modules: the import raises ModuleNotFoundError
        monkeypatch.setitem(sys.modules, module, None)
    assert cli.main(["demo", "--preset", "tiny"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("lorakern demo: lorakern demo needs peft,")  # matplotlib only for the plot
    assert 'pip install "lorakern[peft]"' in err and "Traceback" not in err


def test_demo_runs_without_matplotlib_and_says_how_to_get_the_plot(capsys, monkeypatch, tmp_path):
    pytest.importorskip("peft")
    pytest.importorskip("transformers")
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    png = tmp_path / "demo.png"
    assert cli.main(["demo", "--preset", "tiny", "--steps", "4", "--warmup", "1", "--out", str(png)]) == 0
    out = capsys.readouterr().out
    assert "speedup:" in out and not png.exists()
    assert "train loss (last 4 steps)" in out  # the steps it averaged, not a fixed 10
    assert "CPU timings vary from run to run" in out
    [skip] = [line for line in out.splitlines() if line.startswith("plot:")]
    assert skip.startswith("plot: skipped") and 'pip install "lorakern[bench]"' in skip


@pytest.mark.parametrize("command", ["check", "demo"])
@pytest.mark.parametrize("device, expected", [("cuda:99", "expected "), ("tpu", "expected cpu, cuda or cuda:N")])
def test_a_device_this_machine_lacks_is_one_line_and_exit_2(command, device, expected, capsys):
    if command == "demo":
        pytest.importorskip("peft")
        pytest.importorskip("transformers")
    assert cli.main([command, "--device", device]) == 2
    err = capsys.readouterr().err
    assert f"argument --device: {expected}" in err and repr(device) in err and "Traceback" not in err


def test_bench_plot_without_matplotlib_fails_before_running(capsys, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert cli.main(["bench", "--device", "cpu", "--shapes", "8x16x16x4", "--plot", str(tmp_path / "b.png")]) == 1
    out, err = capsys.readouterr()
    assert "lorakern bench --plot needs matplotlib" in err and 'pip install "lorakern[bench]"' in err
    assert "lorakern bench on" not in out  # nothing ran


def test_bench_always_times_base(capsys):
    assert cli.main(["bench", "--device", "cpu", "--shapes", "8x16x16x4", "--providers", "lorakern-torch",
                     "--modes", "fwd", "--variants", "plain", "--dropout", "0", "--cpu-budget-s", "0.05"]) == 0
    out = capsys.readouterr().out
    assert "providers base, lorakern-torch" in out
    [row] = [line for line in out.splitlines() if line.startswith("fwd ")]
    assert row.split()[6] != "-"  # base's ms: the ratios have their denominator


def test_quiet_drops_third_party_warnings_and_log_lines(caplog, recwarn):
    log = logging.getLogger("torch.utils.cpp_extension")
    with extras.quiet():
        log.warning("No CUDA runtime is found, using CUDA_HOME='x'")
        warnings.warn("a third-party warning")
    assert "No CUDA runtime" not in caplog.text and not recwarn.list
    log.warning("after the block")
    assert "after the block" in caplog.text


def test_check_prints_one_row_per_backend():
    """In a fresh process, where torch's cpp_extension would warn on import without a GPU."""
    from lorakern import backends

    run = subprocess.run([sys.executable, "-m", "lorakern.cli", "check", "--device", "cpu", "-M", "8", "-K", "16",
                          "-N", "12", "-r", "4"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert "auto picks" in lines[0]
    assert [line.split()[0] for line in lines[2:-1]] == ["F.linear", *backends.NAMES]
    assert lines[-1].startswith("(CPU times vary from run to run")
    assert "No CUDA runtime" not in run.stdout + run.stderr and "Warning" not in run.stdout + run.stderr


ROOT = Path(__file__).resolve().parents[1]


def _run(cmd: list[str], **env) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120, env={**os.environ, **env})


@pytest.mark.skipif(shutil.which("make") is None, reason="no make here")
def test_make_gpu_check_says_what_is_missing_and_fails():
    no_torch = _run(["make", "gpu-check", f"PYTHON={sys.executable} -S"])  # -S: no site-packages, no torch
    assert no_torch.returncode != 0 and "make gpu-check needs a CUDA GPU and a python with torch" in no_torch.stderr
    assert "has no torch" in no_torch.stderr and "pytest" not in no_torch.stdout
    if not torch.cuda.is_available():
        no_gpu = _run(["make", "gpu-check", f"PYTHON={sys.executable}"])
        assert no_gpu.returncode != 0 and "sees no CUDA GPU" in no_gpu.stderr and "skipped" not in no_gpu.stdout


def test_gpu_run_names_a_python_without_torch(tmp_path):
    run = _run(["bash", "bench/gpu_run.sh", "quick-dry"], PYTHON=f"{sys.executable} -S", OUT=str(tmp_path))
    assert run.returncode == 2
    assert "needs a python with torch" in run.stderr and "has no torch" in run.stderr
    assert "no CUDA device" not in run.stderr
