#!/usr/bin/env bash
# The GPU run, one command from the repository root of a GPU machine whose system python3 already
# has torch, triton, peft, pytest and matplotlib (no venv, no installs):
#
#   bash bench/gpu_run.sh                       # writes under $OUT (default ./out)
#   LORAKERN_COMMIT=<sha> bash bench/gpu_run.sh # where the copy carries no .git
#
# It runs the gpu test tier, then `lorakern bench --quick`, and prints the short table last.
# Files: $OUT/<gpu>.json (commit it as bench/results/<gpu>.json), $OUT/<gpu>.png, logs.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1

slug='import torch; from lorakern.benchmark import device_slug; print(device_slug(torch.device("cuda")))'
GPU=$(python3 -c "$slug") || { echo "gpu_run: no CUDA device visible to python3's torch" >&2; exit 2; }
nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1
python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__, torch.cuda.get_device_name())'

echo "== gpu test tier"
python3 -m pytest -q -m gpu tests 2>&1 | tee "$OUT/pytest-gpu.log"
tests_rc=${PIPESTATUS[0]}

echo "== lorakern bench --quick ($GPU)"
python3 -m lorakern.cli bench --quick --json "$OUT/$GPU.json" --plot "$OUT/$GPU.png" >"$OUT/bench-$GPU.log" 2>&1
bench_rc=$?

echo "== gpu tests rc=$tests_rc (5: none collected), bench rc=$bench_rc; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
if [ "$bench_rc" -eq 0 ]; then
    python3 -m lorakern.cli bench --show "$OUT/$GPU.json"
else
    tail -n 60 "$OUT/bench-$GPU.log"
fi
[ "$tests_rc" -eq 0 ] || [ "$tests_rc" -eq 5 ] || exit "$tests_rc"
exit "$bench_rc"
