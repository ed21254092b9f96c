#!/usr/bin/env bash
# The GPU run, from the repository root of a GPU machine whose system python3 already has torch,
# triton, peft, pytest and matplotlib (no venv, no installs):
#
#   bash bench/gpu_run.sh                 # tests, then bench; files under $OUT (default ./out)
#   bash bench/gpu_run.sh tests           # only the gpu test tier (+ compute-sanitizer)
#   bash bench/gpu_run.sh bench           # only `lorakern bench --quick`
#   bash bench/gpu_run.sh tune            # where eager host time goes (bench/host_profile.py), then the
#                                         # M = 8192 kernel breakdown and configuration sweep
#                                         # (bench/triton_tune.py --sweep-only: TMA on / off first)
#   LORAKERN_COMMIT=<sha> bash bench/gpu_run.sh   # where the copy carries no .git
#
# The gpu tier runs as parallel pytest shards (compiling the kernels is the slow part of a cold
# machine, and it is CPU-bound), each with its own log; the sanitizer runs the cuda backend's
# kernel tests under memcheck. The benchmark runs alone on the GPU afterwards.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/out}
WHAT=${1:-all}
SHARD_TIMEOUT=${SHARD_TIMEOUT:-480}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}

slug='import torch; from lorakern.benchmark import device_slug; print(device_slug(torch.device("cuda")))'
GPU=$(python3 -c "$slug") || { echo "gpu_run: no CUDA device visible to python3's torch" >&2; exit 2; }
nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1
python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__, torch.cuda.get_device_name())'
echo "commit ${LORAKERN_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null)}"
rc=0

if [ "$WHAT" != bench ]; then
    t0=$(date +%s)
    python3 -m lorakern.cuda build >"$OUT/cuda-build.log" 2>&1 || { tail -20 "$OUT/cuda-build.log"; rc=1; }
    echo "== cuda build $(( $(date +%s) - t0 )) s; gpu tier in shards (timeout ${SHARD_TIMEOUT} s each)"
    # a fixed hypothesis seed, so that a failure the fuzz finds on a GPU is drawn again by the next run
    P="timeout $SHARD_TIMEOUT python3 -m pytest -q -p no:cacheprovider -m gpu --hypothesis-seed=0"
    declare -A SHARDS=(
        [op-bf16]="tests/test_op.py -k bfloat16" [op-fp16]="tests/test_op.py -k 'float16 and not bfloat16'"
        [op-fp32]="tests/test_op.py -k float32" [robustness]="tests/test_robustness.py"
        [triton-bf16]="tests/test_triton.py -k bfloat16"
        [triton-fp16]="tests/test_triton.py -k 'float16 and not bfloat16'"
        [triton-fp32]="tests/test_triton.py -k float32" [cuda]="tests/test_cuda.py" [fuzz-torch]="tests/test_fuzz.py -k torch"
        [fuzz-triton]="tests/test_fuzz.py -k triton" [fuzz-cuda]="tests/test_fuzz.py -k 'not torch and not triton'"
    )
    for s in "${!SHARDS[@]}"; do ( eval "$P ${SHARDS[$s]}" >"$OUT/pytest-$s.log" 2>&1; echo $? >"$OUT/rc-$s" ) & done
    timeout "$SHARD_TIMEOUT" compute-sanitizer --tool memcheck --target-processes all --print-limit 20 \
        python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_cuda.py -k "write_every or frozen or gradient" \
        >"$OUT/sanitizer.log" 2>&1 &
    wait
    for s in "${!SHARDS[@]}"; do
        src=$(cat "$OUT/rc-$s")  # pytest: 0 passed, 5 none collected; 124 timed out
        printf '%-11s rc=%-3s %s\n' "$s" "$src" "$(tail -n 1 "$OUT/pytest-$s.log")"
        grep -E '^(FAILED|ERROR) ' "$OUT/pytest-$s.log" | head -5
        [ "$src" -eq 0 ] || [ "$src" -eq 5 ] || rc=1
    done
    printf '%-11s %s\n' sanitizer "$(grep -E 'passed|failed' "$OUT/sanitizer.log" | tail -n 1) $(grep 'ERROR SUMMARY' "$OUT/sanitizer.log" | tail -n 1)"
    grep -q "ERROR SUMMARY: 0 errors" "$OUT/sanitizer.log" || rc=1
    echo "== gpu tier $(( $(date +%s) - t0 )) s, rc=$rc"
fi

if [ "$WHAT" = tune ]; then
    echo "== eager host time per call ($GPU)"
    timeout 120 python3 bench/host_profile.py 2>&1 | tee "$OUT/host-$GPU.log" | head -n 45
    echo "== triton kernel breakdown and configuration sweep at M = 8192 ($GPU)"
    timeout "$SHARD_TIMEOUT" python3 bench/triton_tune.py --sweep-only 2>&1 | tee "$OUT/tune-$GPU.log"
    exit "${PIPESTATUS[0]}"
fi

if [ "$WHAT" != tests ]; then
    echo "== lorakern bench --quick ($GPU)"
    python3 -m lorakern.cli bench --quick --json "$OUT/$GPU.json" --plot "$OUT/$GPU.png" >"$OUT/bench-$GPU.log" 2>&1
    bench_rc=$?
    if [ "$bench_rc" -eq 0 ]; then python3 -m lorakern.cli bench --show "$OUT/$GPU.json"; else tail -n 60 "$OUT/bench-$GPU.log"; rc=1; fi
fi
exit "$rc"
