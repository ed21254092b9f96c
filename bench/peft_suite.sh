#!/usr/bin/env bash
# PEFT's own LoRA tests, stock and with lorakern.peft.enable() in effect (issue 17: "The PEFT suite's
# LoRA tests still pass as stock with lorakern.peft.enable()").
#
#   bench/peft_suite.sh PEFT_CHECKOUT [pytest args...]
#
# PEFT_CHECKOUT: a PEFT source tree at the installed PEFT's version, holding tests/ (a git checkout,
# or the sdist: `pip download peft==$(python -c 'import peft; print(peft.__version__)') --no-deps
# --no-binary :all:` and untar it; the sdist ships tests/ without tests/__init__.py and conftest.py).
# The tests are copied to a temporary folder and run from there: PEFT's files stay untouched. A
# missing tests/__init__.py is added there (the tests import `.testing_common`); a missing
# conftest.py is reported. PEFT's pytest settings (pyproject.toml: markers, filterwarnings) apply,
# its addopts (coverage, durations) do not (-o addopts=).
#
# The selection (printed, with its size; 2161 tests for PEFT 0.21.2), from the collected ids:
#   - test_custom_models.py: every test parametrised with PEFT's LoraConfig itself (the id holds
#     "-LoraConfig-" or "[LoraConfig]"; RandLora / UniLora / TinyLoRA / AdaLoRA configs are other
#     classes), in every test class, except the cases whose targets hold no lora.Linear:
#     "Conv1d LoRA*", "Conv2d 1 LoRA*", "Conv2d Groups* LoRA*", "Conv3d 1 LoRA*", "Embedding +
#     transformers Conv1D 2 *" (the embedding alone), "MHA 1 LoRA", "MLP 1 using nn.Parameter
#     LoRA" (target_parameters); and the LoRA tests not parametrised by a config:
#     TestMixedAdapterBatches, TestMultiRankAdapter, TestDynamicDispatch (whole),
#     TestMultipleActiveAdapters::test_multiple_active_dora* / test_plain_lora_and_dora*,
#     TestLayerRepr::test_repr_lora_linear, TestRequiresGrad::test_requires_grad_lora_{same,different}_*,
#     TestPeftCustomModel::test_add_weighted_adapter_{with_different_scaling,negative_weight*,subtraction*},
#     test_adapter_name_makes_no_difference, test_lora_safe_merge*, test_merge_with_lora_bias*,
#     test_delete_adapter_with_multiple_adapters_works, test_multiple_adapters_mixed_modules_to_save*;
#   - test_initialization.py: TestLoraInitialization, TestKasaInitialization, TestEvaInitialization,
#     TestHotSwapping, TestVeloraInitialization (not TestCordaInitialization: about 3.5 minutes
#     a run here, its forward is plain LoRA after CorDA's init);
#   - test_mixed.py, test_lora_variants.py, test_bdlora.py, test_lorafa.py, test_loraplus.py,
#     test_riemannian_lora.py, test_velora.py: whole;
#   - less the tests that load a model from the hub (no hub here; they fail stock and patched,
#     after network time-outs: PEFT's hub_online_once turns HF_HUB_OFFLINE off for a first access):
#     TestActivatedLora::test_gradient_checkpointing_*, TestDynamicDispatch::test_override_lora_linear,
#     TestLoraInitialization::test_load_pissa_olora_with_other_adapter_warns,
#     test_trainable_token_indices_targets_head_and_embedding, test_lora_incompatible_mamba_modules,
#     test_nemotron_h_has_defaults_and_blocks_mamba_modules, TestMixedAdapterTypes::test_decoder_model.
#
# Each run: python -m pytest -q -p no:cacheprovider (no -x), under `timeout` ($PEFT_SUITE_TIMEOUT
# seconds, default 900), HF_HUB_OFFLINE=1. The patched run loads bench/peft_enable_plugin.py
# (-p peft_enable_plugin, bench/ on PYTHONPATH), which calls lorakern.peft.enable() at import and
# prints how many lora.Linear calls were fused. Then the two outcome sets are compared per test
# (junit XML) and every difference is listed. Exit status: 0 when the outcomes are the same, 1
# when they differ, 2 on a usage or setup error.
#
# Environment: PYTHON (default: the repository's .venv/bin/python), PEFT_SUITE_TIMEOUT,
# PEFT_SUITE_OUT (folder for the logs, XML and per-test call counts; default a temporary folder,
# kept), PEFT_TEST_DEPS (folder the tests' own imports are installed into with pip --target when
# the Python lacks them: diffusers, datasets, parameterized, scipy, attrs (peft.tuners.lora.corda
# imports attr); default /tmp/peft-test-deps). About 10 minutes in all on 2 cores.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(dirname "$here")
if [ $# -lt 1 ]; then
    sed -n '2,12p' "${BASH_SOURCE[0]}" >&2
    exit 2
fi
src=$1
shift
if [ -d "$src/tests" ]; then root=$src; tests=$src/tests
elif [ -f "$src/test_custom_models.py" ]; then root=$(dirname "$src"); tests=$src
else echo "peft_suite.sh: no PEFT tests/ folder in $src" >&2; exit 2; fi

py=${PYTHON:-$repo/.venv/bin/python}
limit=${PEFT_SUITE_TIMEOUT:-900}
deps=${PEFT_TEST_DEPS:-/tmp/peft-test-deps}
out=${PEFT_SUITE_OUT:-$(mktemp -d /tmp/peft-suite.XXXXXX)}
mkdir -p "$out"
work=$(mktemp -d /tmp/peft-suite-tests.XXXXXX)
trap 'rm -rf "$work"' EXIT

peft_version=$("$py" -c 'import peft; print(peft.__version__)' 2>/dev/null | tail -1)
echo "PEFT installed: $peft_version ($("$py" -c 'import peft, os; print(os.path.dirname(peft.__file__))' 2>/dev/null | tail -1))"
if [ -f "$root/PKG-INFO" ]; then
    echo "tests from: $root (sdist $(sed -n 's/^Version: //p' "$root/PKG-INFO"))"
elif git -C "$root" rev-parse HEAD >/dev/null 2>&1; then
    echo "tests from: $root (git $(git -C "$root" rev-parse HEAD) $(git -C "$root" describe --tags --always 2>/dev/null))"
else
    echo "tests from: $root"
fi
echo "lorakern: $repo (git $(git -C "$repo" rev-parse --short HEAD)$(git -C "$repo" diff --quiet HEAD -- lorakern || echo ', lorakern/ has uncommitted changes'))"

cp -r "$tests" "$work/tests"
rm -rf "$work/tests/__pycache__"
[ -f "$root/pyproject.toml" ] && cp "$root/pyproject.toml" "$work/"
[ -f "$work/tests/__init__.py" ] || { : > "$work/tests/__init__.py"; echo "note: added an empty tests/__init__.py"; }
[ -f "$work/tests/conftest.py" ] || echo "note: no tests/conftest.py in $tests (PEFT's git tree has one: its regression marker and transformers-deprecation checks are absent)"

# the tests' own imports (testing_common imports diffusers, testing_utils datasets): installed
# beside, never into, the Python's environment
export PYTHONPATH="$deps${PYTHONPATH:+:$PYTHONPATH}"
missing=$("$py" - <<'EOF' 2>/dev/null
import importlib.util
need = {"diffusers": "diffusers", "datasets": "datasets", "parameterized": "parameterized", "scipy": "scipy", "attr": "attrs"}
print(" ".join(p for m, p in need.items() if importlib.util.find_spec(m) is None))
EOF
)
if [ -n "$missing" ]; then
    echo "installing the tests' imports into $deps: $missing (and what they need that $py lacks)"
    report=$(mktemp)
    "$py" -m pip install -q --dry-run --report "$report" $missing >/dev/null 2>&1
    reqs=$("$py" -c 'import json, sys; r = json.load(open(sys.argv[1])); print(" ".join(i["metadata"]["name"] + "==" + i["metadata"]["version"] for i in r["install"]))' "$report")
    rm -f "$report"
    "$py" -m pip install -q --target "$deps" --no-deps $reqs 2>&1 | grep -v -e 'is ignored' -e 'already exists' || true
fi

export HF_HUB_OFFLINE=1
cd "$work"
files=(tests/test_custom_models.py tests/test_initialization.py tests/test_mixed.py tests/test_lora_variants.py
       tests/test_bdlora.py tests/test_lorafa.py tests/test_loraplus.py tests/test_riemannian_lora.py tests/test_velora.py)
present=()
for f in "${files[@]}"; do [ -f "$f" ] && present+=("$f") || echo "note: $f is not in this PEFT version"; done
pytest=("$py" -m pytest --rootdir="$work" -o addopts= -p no:cacheprovider)

"${pytest[@]}" -q --collect-only "${present[@]}" > "$out/collected.txt" 2>&1 || { tail -20 "$out/collected.txt"; exit 2; }
"$py" - "$out/collected.txt" > "$out/selection.txt" <<'EOF'
import re, sys
ids = [l.strip() for l in open(sys.argv[1]) if "::" in l and not l.startswith(" ")]
lora_cfg = re.compile(r"[-\[]LoraConfig[-\]]")  # PEFT's LoraConfig itself, not RandLora / UniLora / AdaLora...
no_linear = re.compile(r"\[(?:.*-)?(Conv1d LoRA|Conv2d 1 LoRA|Conv2d Groups2? LoRA|Conv3d 1 LoRA|"
                       r"Embedding \+ transformers Conv1D 2 |MHA 1 LoRA|MLP 1 using nn\.Parameter LoRA)")
cm_lora = re.compile(r"::(TestMixedAdapterBatches|TestMultiRankAdapter|TestDynamicDispatch)::"
                     r"|::TestMultipleActiveAdapters::test_(multiple_active_dora|plain_lora_and_dora)"
                     r"|::TestLayerRepr::test_repr_lora_linear|::TestRequiresGrad::test_requires_grad_lora_(same|different)_"
                     r"|::TestPeftCustomModel::test_(add_weighted_adapter_(with_different_scaling|negative_weight|subtraction)"
                     r"|adapter_name_makes_no_difference|lora_safe_merge|merge_with_lora_bias"
                     r"|delete_adapter_with_multiple_adapters_works|multiple_adapters_mixed_modules_to_save)")
init_lora = re.compile(r"::(TestLoraInitialization|TestKasaInitialization|TestEvaInitialization|TestHotSwapping|"
                       r"TestVeloraInitialization)::")
whole = ("test_lora_variants.py", "test_bdlora.py", "test_lorafa.py", "test_loraplus.py", "test_riemannian_lora.py",
         "test_velora.py", "test_mixed.py")
hub = re.compile(  # these load a model from the hub: they fail without it, stock or not
    r"test_lora_variants\.py::TestActivatedLora::test_gradient_checkpointing_"
    r"|::TestDynamicDispatch::test_override_lora_linear"
    r"|::TestLoraInitialization::test_(load_pissa_olora_with_other_adapter_warns|trainable_token_indices_targets_head_and_"
    r"embedding|lora_incompatible_mamba_modules|nemotron_h_has_defaults_and_blocks_mamba_modules)"
    r"|test_mixed\.py::TestMixedAdapterTypes::test_decoder_model")
for i in ids:
    f = i.split("::")[0].rsplit("/", 1)[-1]
    if hub.search(i):
        continue
    if f in whole:
        print(i)
    elif f == "test_custom_models.py" and ((lora_cfg.search(i) and not no_linear.search(i)) or cm_lora.search(i)):
        print(i)
    elif f == "test_initialization.py" and init_lora.search(i):
        print(i)
EOF
echo "selection: $(wc -l < "$out/selection.txt") tests ($out/selection.txt), by file and class:"
awk -F'::' '{print ($2 ~ /^Test/ ? $1 "::" $2 : $1)}' "$out/selection.txt" | sort | uniq -c | sed 's/^/  /'

run() {  # run NAME [extra pytest args]
    local name=$1 rc=0
    shift
    local t0=$SECONDS
    timeout "$limit" "${pytest[@]}" -q -rfE --junitxml="$out/$name.xml" "$@" "@$out/selection.txt" > "$out/$name.log" 2>&1 || rc=$?
    [ "$rc" = 124 ] && echo "$name: timed out after ${limit}s"
    printf '%-8s %s   (exit %s, %ss)\n' "$name:" "$(grep -E '^=*.*[0-9]+ (passed|failed|error|skipped).* in [0-9.]+s' "$out/$name.log" | tail -1 | sed 's/=//g; s/^ *//')" "$rc" $((SECONDS - t0))
}
run stock "$@"
PYTHONPATH="$here:$PYTHONPATH" LORAKERN_PEFT_CALLS="$out/patched-calls.json" run patched -p peft_enable_plugin "$@"
awk '/lora.Linear forward calls/ {f = 1; next} f && /^(=|[0-9]+ (passed|failed|skipped))/ {exit} f' "$out/patched.log"

rc=0
"$py" - "$out/stock.xml" "$out/patched.xml" <<'EOF' || rc=$?
import sys
import xml.etree.ElementTree as ET

def outcomes(path):
    res = {}
    for tc in ET.parse(path).getroot().iter("testcase"):
        name = tc.get("classname", "") + "::" + tc.get("name", "")
        kids = [k.tag for k in tc if k.tag in ("failure", "error", "skipped")]
        res[name] = {"failure": "failed", "error": "error", "skipped": "skipped"}.get(kids[0] if kids else "", "passed")
        if "failure" in kids and "error" in kids:
            res[name] = "failed+error"
    return res

try:
    stock, patched = outcomes(sys.argv[1]), outcomes(sys.argv[2])
except (OSError, ET.ParseError) as e:
    sys.exit(f"cannot compare: {e} (see the run's log)")
diff = sorted(k for k in stock.keys() | patched.keys() if stock.get(k) != patched.get(k))
print(f"tests with a different outcome: {len(diff)}")
for k in diff:
    print(f"  {stock.get(k, 'not run'):>8} -> {patched.get(k, 'not run'):<8} {k}")
sys.exit(1 if diff else 0)
EOF
echo "logs: $out/stock.log $out/patched.log"
exit $rc
