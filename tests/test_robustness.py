"""Numerics at the edges, determinism, state round trips and memory stability."""
from __future__ import annotations

import gc

import pytest
import torch
from torch import nn

import lorakern
from lorakern.reference import reference_lora_linear
from lorakern.testing import rel_err, run_op
from test_op import make, run_and_check


def _fwd_bwd(case, t, kw, p, seed):
    y, leaves = run_op(t, kw, backend=case.backend, grad_args=("x", "lora_A", "lora_B"), dropout_p=p, seed=seed)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y)
    grads = torch.autograd.grad(y, [leaves["x"], leaves["lora_A"], leaves["lora_B"]], g)
    return (y, *grads)


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_same_seed_bitwise_outputs_and_grads(case, p):
    t, kw = make(case, 37, 48, 40, 8)
    a = _fwd_bwd(case, t, kw, p, 99)
    b = _fwd_bwd(case, t, kw, p, 99)
    for u, v in zip(a, b):
        assert torch.equal(u, v)


def test_fp16_partial_sums_that_overflow_accumulate_in_fp32(case):
    """Each product x*w = 4e4 fits fp16, but the running sum over the first 32 terms reaches 1.3e6
    (fp16 max 65504) before the last 31 cancel it: only fp32 accumulation gives the finite answer."""
    if case.dtype != torch.float16:
        pytest.skip("fp16 only")
    K = 63
    t, kw = make(case, 4, K, 8, 4)
    t["x"] = torch.full((4, K), 200.0, device=case.device, dtype=case.dtype)
    sign = torch.ones(8, K)
    sign[:, 32:] = -1.0
    sign[::2, 31] = -1.0  # even rows of W sum to -1 term, odd rows to +1 term
    t["weight"] = (200.0 * sign).to(device=case.device, dtype=case.dtype)
    y = run_and_check(case, t, kw, grads=False)
    assert torch.isfinite(y).all()


def test_nan_inf_rows_exactly_as_the_oracle(case):
    t, kw = make(case, 9, 32, 24, 4, G=3)
    t["x"][1, 5] = float("nan")
    t["x"][6, 0] = float("-inf")
    args = [t[k] for k in ("x", "weight", "bias", "lora_A", "lora_B")]
    y = lorakern.lora_linear(*args, backend=case.backend, **kw)
    ref = reference_lora_linear(*args, **kw)
    assert torch.equal(y.isnan().cpu(), ref.isnan().cpu())
    assert torch.equal(y.isinf().cpu(), ref.isinf().cpu())


@pytest.mark.parametrize("K,R", [(65536, 16), (256, 256)])
def test_large_K_and_large_rank(case, K, R):
    if case.device == "cpu" and case.backend == "triton" and K > 4096:
        pytest.skip("too slow under the interpreter")
    t, kw = make(case, 3, K, 16, R)
    run_and_check(case, t, kw, dropout_p=0.1, seed=4)


def test_merge_unmerge_drift_over_100_cycles():
    torch.manual_seed(0)
    layer = lorakern.LoRALinear(64, 48, r=8, lora_alpha=16)
    nn.init.normal_(layer.lora_B, std=0.1)
    w0 = layer.weight.detach().clone()
    for _ in range(100):
        layer.merge()
        layer.unmerge()
    assert rel_err(layer.weight, w0) < 1e-6


def test_state_dict_wrong_shape_raises_clearly():
    a = lorakern.LoRALinear(32, 16, r=8)
    b = lorakern.LoRALinear(32, 16, r=4)
    with pytest.raises(RuntimeError, match="size mismatch for lora_A"):
        b.load_state_dict(a.state_dict())


def test_state_round_trip_into_a_fresh_model():
    torch.manual_seed(0)
    model = nn.Sequential(lorakern.LoRALinear(16, 16, r=4), nn.ReLU(), lorakern.LoRALinear(16, 8, r=2))
    for m in (model[0], model[2]):
        nn.init.normal_(m.lora_B)
    fresh = nn.Sequential(lorakern.LoRALinear(16, 16, r=4), nn.ReLU(), lorakern.LoRALinear(16, 8, r=2))
    fresh.load_state_dict(model.state_dict())
    x = torch.randn(5, 16)
    assert torch.equal(model(x), fresh(x))


def test_no_memory_growth_over_1000_calls():
    psutil = pytest.importorskip("psutil")
    layer = lorakern.LoRALinear(64, 64, r=8, lora_dropout=0.1)
    nn.init.normal_(layer.lora_B)
    x = torch.randn(32, 64, requires_grad=True)

    def step():
        layer(x).sum().backward()

    for _ in range(200):
        step()
    gc.collect()
    proc = psutil.Process()
    before = proc.memory_info().rss
    for _ in range(1000):
        step()
    gc.collect()
    grown = proc.memory_info().rss - before
    assert grown < 8 * 2**20, f"RSS grew by {grown / 2**20:.1f} MiB over 1000 calls"


def test_no_cuda_memory_growth(case):
    if case.device != "cuda":
        pytest.skip("allocator statistics on a GPU")
    t, kw = make(case, 64, 256, 128, 8)
    for _ in range(10):
        _fwd_bwd(case, t, kw, 0.1, 3)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    for _ in range(1000):
        _fwd_bwd(case, t, kw, 0.1, 3)
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() - before <= 0


def test_rel_err_rejects_nan():
    with pytest.raises(AssertionError, match="NaN"):
        rel_err(torch.tensor([float("nan")]), torch.tensor([1.0]))
