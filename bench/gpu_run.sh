#!/usr/bin/env bash
# The GPU run, from the repository root of a GPU machine whose system python3 already has torch,
# triton, peft, pytest and matplotlib (no venv, no installs):
#
#   bash bench/gpu_run.sh quick           # <= 10 minutes: the gpu tier of the default paths (op tests,
#                                         # torch and triton; triton's fold-in plan; mixed precision: triton's and,
#                                         # once built, the cuda backend), then the training and decode shapes
#                                         # (M 1, 16, 2048, 8192; K,N 4096x4096, 4096x14336; r 16; p 0, 0.1;
#                                         # fwd, fwd+bwd; bf16) for base, peft, addmm, lorakern-auto and every
#                                         # backend: $RESULTS/<gpu>.json and the table with its targets
#   bash bench/gpu_run.sh quick-dry       # the same path on CPU with tiny shapes (CI; no build, no GPU)
#   bash bench/gpu_run.sh                 # the whole gpu tier (+ compute-sanitizer), then `bench --quick`
#   bash bench/gpu_run.sh tests           # only the whole gpu tier
#   bash bench/gpu_run.sh bench           # only `lorakern bench --quick`
#   bash bench/gpu_run.sh tune            # where eager host time goes (bench/host_profile.py), then the
#                                         # M = 8192 kernel breakdown and every candidate launch plan
#                                         # (python3 -m bench.triton_tune --sweep-only --json $OUT/tune-<gpu>.json;
#                                         # bench/make_autotable.py --tune turns it into launchplans.json)
#   LORAKERN_COMMIT=<sha> bash bench/gpu_run.sh quick   # where the copy carries no .git
#
# Files go under $OUT (default ./out); quick's results to $RESULTS (default bench/results). $PYTHON
# (default python3) runs everything. The gpu tier runs as parallel pytest shards (compiling the
# kernels is the slow, CPU-bound part on a cold machine), each with its own log, while the CUDA
# extension builds; the benchmark runs alone on the GPU afterwards. Exit status 1 when a test, the
# build or a benchmark gate failed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/out}
RESULTS=${RESULTS:-$PWD/bench/results}
PY=${PYTHON:-python3}
WHAT=${1:-all}
mkdir -p "$OUT" "$RESULTS"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
rc=0

case "$WHAT" in
    quick-dry) DEVICE=cpu; SHARD_TIMEOUT=${SHARD_TIMEOUT:-120} ;;
    quick) DEVICE=cuda; SHARD_TIMEOUT=${SHARD_TIMEOUT:-240} ;;
    all|tests|bench|tune) DEVICE=cuda; SHARD_TIMEOUT=${SHARD_TIMEOUT:-480} ;;
    *) echo "gpu_run: unknown stage '$WHAT' (quick, quick-dry, all, tests, bench, tune)" >&2; exit 2 ;;
esac
# says which is missing: torch in $PY, or (not for quick-dry) a CUDA device its torch sees
$PY bench/need_torch.py $([ "$DEVICE" = cpu ] || echo --cuda) "bash bench/gpu_run.sh $WHAT" || exit 2
GPU=$($PY -c "import torch; from lorakern.benchmark import device_slug; print(device_slug(torch.device('$DEVICE')))") \
    || exit 2
[ "$DEVICE" = cpu ] || nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1
$PY -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)'
echo "device $GPU, commit ${LORAKERN_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null)}"

# the CUDA extension, built in the background: wait_build waits for it and reports
start_build() {
    if [ "$DEVICE" = cpu ]; then echo "== dry run: no CUDA build"; return; fi
    ( $PY -m lorakern.extension build cuda >"$OUT/cuda-build.log" 2>&1; echo $? >"$OUT/rc-build" ) &
    BUILD_PID=$!
}
wait_build() {
    [ "$DEVICE" = cpu ] && return
    wait "$BUILD_PID"
    if [ "$(cat "$OUT/rc-build")" -ne 0 ]; then echo "== cuda build FAILED:"; tail -20 "$OUT/cuda-build.log"; rc=1
    else echo "== cuda build ok"; fi
}

# pytest shards in parallel: run_shards NAME=SELECTION ...; a shard passes with rc 0 or 5 (none collected)
run_shards() {
    local t0=$(date +%s) s
    local P="timeout $SHARD_TIMEOUT $PY -m pytest -q -p no:cacheprovider -m gpu --hypothesis-seed=0"
    declare -A SHARDS=()
    for s in "$@"; do SHARDS[${s%%=*}]=${s#*=}; done
    echo "== gpu tier in ${#SHARDS[@]} shards (timeout ${SHARD_TIMEOUT} s each)"
    local pids=()
    for s in "${!SHARDS[@]}"; do
        ( eval "$P ${SHARDS[$s]}" >"$OUT/pytest-$s.log" 2>&1; echo $? >"$OUT/rc-$s" ) &
        pids+=($!)
    done
    wait "${pids[@]}"
    for s in "${!SHARDS[@]}"; do
        local src=$(cat "$OUT/rc-$s")  # pytest: 0 passed, 5 none collected; 124 timed out
        printf '%-12s rc=%-3s %s\n' "$s" "$src" "$(tail -n 1 "$OUT/pytest-$s.log")"
        grep -E '^(FAILED|ERROR) ' "$OUT/pytest-$s.log" | head -5
        [ "$src" -eq 0 ] || [ "$src" -eq 5 ] || rc=1
    done
    echo "== gpu tier $(( $(date +%s) - t0 )) s"
}

# lorakern bench with the given flags into $2 (json), then its table (targets marked, gates checked)
run_bench() {
    local json=$1; shift
    echo "== lorakern bench $* ($GPU)"
    $PY -m lorakern.cli bench --device "$DEVICE" --json "$json" "$@" >"$OUT/bench-$GPU.log" 2>&1
    local brc=$?
    if [ -f "$json" ]; then $PY -m lorakern.cli bench --show "$json"; else tail -n 60 "$OUT/bench-$GPU.log"; fi
    [ "$brc" -eq 0 ] || rc=1
}

OP_SHARDS=("op-triton-bf16=tests/test_op.py -k 'triton and bfloat16'"
           "op-triton-fp=tests/test_op.py -k 'triton and not bfloat16'" "op-torch=tests/test_op.py -k torch"
           "mixed=tests/test_mixed_precision.py -k 'not cuda'" "fold=tests/test_triton.py -k 'fold or base_scale'")
CUDA_SHARD="cuda=tests/test_cuda.py tests/test_mixed_precision.py -k cuda"  # after the build: it loads it
TRAIN="--modes fwd,fwdbwd --variants plain --dropout 0,0.1 --r 16"

case "$WHAT" in
quick)
    start_build
    run_shards "${OP_SHARDS[@]}"
    wait_build
    run_shards "$CUDA_SHARD"
    run_bench "$RESULTS/$GPU.json" --quick $TRAIN --plot "$OUT/$GPU.png"
    ;;
quick-dry)
    start_build
    run_shards "${OP_SHARDS[@]}"
    wait_build
    run_shards "$CUDA_SHARD"
    run_bench "$RESULTS/$GPU.json" --M 1,16,64 --KN 64x64,64x224 $TRAIN --cpu-budget-s 0.05
    ;;
tune)
    echo "== eager host time per call ($GPU)"
    timeout 120 $PY bench/host_profile.py 2>&1 | tee "$OUT/host-$GPU.log" | head -n 45
    echo "== triton kernel breakdown and launch-plan sweep at M = 8192 ($GPU)"
    timeout "$SHARD_TIMEOUT" $PY -m bench.triton_tune --sweep-only --json "$OUT/tune-$GPU.json" 2>&1 \
        | tee "$OUT/tune-$GPU.log"
    rc=${PIPESTATUS[0]}
    ;;
all|tests|bench)
    if [ "$WHAT" != bench ]; then
        start_build
        wait_build  # the cuda shard and the sanitizer need it
        timeout "$SHARD_TIMEOUT" compute-sanitizer --tool memcheck --target-processes all --print-limit 20 \
            $PY -m pytest -q -p no:cacheprovider -m gpu tests/test_cuda.py -k "write_every or frozen or gradient" \
            >"$OUT/sanitizer.log" 2>&1 &
        SANITIZER_PID=$!
        run_shards "op-bf16=tests/test_op.py -k bfloat16" "op-fp16=tests/test_op.py -k 'float16 and not bfloat16'" \
            "op-fp32=tests/test_op.py -k float32" "robustness=tests/test_robustness.py" \
            "triton-bf16=tests/test_triton.py -k bfloat16" \
            "triton-fp16=tests/test_triton.py -k 'float16 and not bfloat16'" \
            "triton-fp32=tests/test_triton.py -k float32" "cuda=tests/test_cuda.py" \
            "fuzz-torch=tests/test_fuzz.py -k torch" "fuzz-triton=tests/test_fuzz.py -k triton" \
            "fuzz-cuda=tests/test_fuzz.py -k 'not torch and not triton'"
        wait "$SANITIZER_PID"
        printf '%-12s %s\n' sanitizer "$(grep -E 'passed|failed' "$OUT/sanitizer.log" | tail -n 1) $(grep 'ERROR SUMMARY' "$OUT/sanitizer.log" | tail -n 1)"
        grep -q "ERROR SUMMARY: 0 errors" "$OUT/sanitizer.log" || rc=1
    fi
    [ "$WHAT" = tests ] || run_bench "$OUT/$GPU.json" --quick --plot "$OUT/$GPU.png"
    ;;
esac
echo "== gpu_run $WHAT: rc=$rc"
exit "$rc"
