"""Property-based fuzzing of the op over its whole argument space, every backend against the oracle.

Shapes include M = 0, 1 and primes; x and the banks may be strided views; every optional argument
may be present; banks come with -1 rows and adapters that have no rows. Failures hypothesis finds
are kept below as explicit ``@example``s.
"""
from __future__ import annotations

import functools

import pytest
import torch
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

from lorakern.testing import randn, randn_view
from test_op import run_and_check

SPEC = st.fixed_dictionaries({
    "M": st.sampled_from([0, 1, 2, 3, 5, 7, 13, 31]),
    "K": st.sampled_from([1, 3, 16, 17, 29]),
    "N": st.sampled_from([1, 5, 16, 23]),
    "R": st.integers(1, 9),
    "G": st.sampled_from([None, None, 1, 2, 5]),
    "bias": st.booleans(),
    "rank_scale": st.sampled_from([None, "shared", "per_adapter"]),
    "out_scale": st.sampled_from([None, "shared", "per_adapter"]),
    "base_scale": st.booleans(),
    "deterministic": st.booleans(),
    "rank_mask": st.sampled_from([None, "shared", "per_adapter"]),
    "dropout_p": st.sampled_from([0.0, 0.0, 0.1, 0.6]),
    "strided_x": st.booleans(),
    "strided_bank": st.booleans(),
    "seed": st.integers(0, 2**31 - 1),
})


def build(case, spec):
    g = torch.Generator().manual_seed(spec["seed"] % 10_000)
    M, K, N, R, G = spec["M"], spec["K"], spec["N"], spec["R"], spec["G"]
    dev, dt = case.device, case.dtype
    rnd = functools.partial(randn, g, device=dev, dtype=dt)
    view = functools.partial(randn_view, g, device=dev, dtype=dt)

    bank = () if G is None else (G,)
    x = view(M, K, layout="transposed") if spec["strided_x"] else rnd(M, K)
    if spec["strided_bank"]:
        A = view(*bank, R, K, layout="window", scale=K ** -0.5)
        B = view(*bank, N, R, layout="columns", scale=R ** -0.5)
    else:
        A, B = rnd(*bank, R, K, scale=K ** -0.5), rnd(*bank, N, R, scale=R ** -0.5)

    def vec(kind, n):
        if kind is None:
            return None
        shape = (G, n) if kind == "per_adapter" and G is not None else (n,)
        return rnd(*shape) + 1.5

    t = {"x": x, "weight": rnd(N, K, scale=K ** -0.5), "bias": rnd(N) if spec["bias"] else None,
         "lora_A": A, "lora_B": B, "rank_scale": vec(spec["rank_scale"], R), "out_scale": vec(spec["out_scale"], N),
         "base_scale": rnd(N) + 1.5 if spec.get("base_scale") else None}
    kw = {}
    if spec["rank_mask"] is not None:
        shape = (G, R) if spec["rank_mask"] == "per_adapter" and G is not None else (R,)
        kw["rank_mask"] = (torch.rand(*shape, generator=g) > 0.5).to(dev)
    if G is not None:
        kw["adapter_index"] = torch.randint(-1, G, (M,), generator=g).to(dev)
        kw["scaling"] = (torch.rand(G, generator=g) + 0.25).to(dev)
    else:
        kw["scaling"] = 0.5 + spec["seed"] % 3
    return t, kw


def check(case, spec):
    t, kw = build(case, spec)
    run_and_check(case, t, kw, dropout_p=spec["dropout_p"], seed=spec["seed"],
                  deterministic=spec.get("deterministic", False))


# explicit regressions: kept whatever hypothesis draws next
EXAMPLES = [
    dict(M=0, K=1, N=1, R=1, G=None, bias=False, rank_scale=None, out_scale=None, rank_mask="shared",
         dropout_p=0.0, strided_x=False, strided_bank=False, seed=0),  # every rank masked: zero grads for A, B
    dict(M=0, K=16, N=5, R=3, G=2, bias=True, rank_scale="per_adapter", out_scale=None, rank_mask="shared",
         dropout_p=0.1, strided_x=True, strided_bank=True, seed=1),
    dict(M=1, K=1, N=1, R=1, G=None, bias=False, rank_scale=None, out_scale=None, rank_mask=None,
         dropout_p=0.6, strided_x=False, strided_bank=False, seed=2),
    dict(M=13, K=29, N=23, R=9, G=5, bias=True, rank_scale="shared", out_scale="per_adapter",
         rank_mask="per_adapter", dropout_p=0.1, strided_x=True, strided_bank=True, seed=3),
    # found on an H100 in bf16: dq sums 23 terms that cancel 166-fold, so rounding v*B to bf16 gives
    # 12% error relative to |dq|; correct kernels, judged since against the terms' root-sum-square
    dict(M=1, K=3, N=23, R=1, G=5, bias=False, rank_scale="shared", out_scale="shared", rank_mask=None,
         dropout_p=0.0, strided_x=False, strided_bank=False, seed=44213),
    # found on the CPU in bf16 (cpu backend, banks): the update rounded to bf16 twice (t, then the
    # product) before its add reached 1.01e-2; the bank path now computes it in fp32, rounded once
    dict(M=3, K=3, N=1, R=1, G=5, bias=True, rank_scale=None, out_scale="per_adapter", base_scale=False,
         deterministic=False, rank_mask=None, dropout_p=0.0, strided_x=True, strided_bank=False, seed=2581),
]


def _fuzz(case, spec):
    check(case, spec)


def _with_examples(fn):
    for ex in EXAMPLES:
        fn = example(spec=ex)(fn)
    return fn


# On a GPU a failing draw is reported as drawn, not shrunk: shrinking there recompiles kernels for
# every smaller shape, and in H100 run D it used up the time limit before the draw was printed.
GPU_PHASES = (Phase.explicit, Phase.reuse, Phase.generate)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture],
          phases=GPU_PHASES if torch.cuda.is_available() else tuple(Phase))
@_with_examples
@given(spec=SPEC)
def test_fuzz_against_oracle(case, spec):
    if case.device == "cpu" and case.backend == "triton":
        pytest.skip("the interpreter tier fuzzes in test_fuzz_interpret")
    check(case, spec)


@pytest.mark.interpret
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@_with_examples
@given(spec=SPEC)
def test_fuzz_interpret(spec):
    from conftest import Case

    check(Case("triton", "cpu", torch.float32), spec)
