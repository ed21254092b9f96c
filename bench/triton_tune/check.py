"""Correctness of the triton backend's paths against the float64 oracle, forward and every gradient.

Paths: q fused or not, dropout, rank_scale / mask / out_scale, banks with adapter_index (-1 rows
and empty adapters included), strided views; in bf16, fp16 and fp32. Triton's compile time is
what limits it: two cases per dtype by default, all of them in bf16 with ``full``.
"""
from __future__ import annotations

import torch

import lorakern
import lorakern.triton
from lorakern.alloc import poisoned
from lorakern.reference import reference_lora_linear
from lorakern.triton import configs

GRADS = ("x", "lora_A", "lora_B", "bias", "rank_scale", "out_scale")
TENSORS = ("x", "weight", "bias", "lora_A", "lora_B")
CASES = [
    ("plain fused q, dA", dict(fuse=True)), ("plain separate passes", dict(fuse=False)),
    ("dropout 0.1", dict(p=0.1)), ("decode M=1 dropout", dict(M=1, p=0.1)),
    ("strided scales+mask+drop", dict(strided=True, scales=True, mask=True, p=0.2)),
    ("bank scales+mask+dropout", dict(G=5, scales=True, mask=True, p=0.1)),
    ("bank strided decode", dict(G=3, strided=True, M=16)), ("M=200 (q in the GEMM)", dict(M=200)),
]
EVERY_DTYPE = ("plain separate passes", "bank scales+mask+dropout")  # the rest in bf16 with --full-check


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64; NaN if a holds a NaN (an element left unwritten)."""
    a, b = a.double(), b.double()
    if torch.isnan(a).any():
        return float("nan")
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def inputs(M, K, N, R, dt, *, G=None, scales=False, mask=False, strided=False, seed=0):
    """(tensors by name, keyword arguments) of one problem on the GPU, fresh random values."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    rnd = lambda *s, sc=1.0, sh=0.0: (torch.randn(*s, generator=gen, device="cuda") * sc + sh).to(dt)  # noqa: E731
    bank = () if G is None else (G,)
    t = dict(x=rnd(M, K), weight=rnd(N, K, sc=K ** -0.5), bias=rnd(N),
             lora_A=rnd(*bank, R, K, sc=K ** -0.5), lora_B=rnd(*bank, N, R, sc=R ** -0.5),
             rank_scale=rnd(*bank, R, sh=1.0) if scales else None, out_scale=rnd(*bank, N, sh=1.0) if scales else None)
    if strided:
        t["x"] = rnd(M, 2 * K)[:, 1::2]
        t["lora_A"] = rnd(*bank, 2 * R, K, sc=K ** -0.5)[..., ::2, :]
        t["lora_B"] = rnd(*bank, R, N, sc=R ** -0.5).transpose(-1, -2)
    kw = {"scaling": 0.5}
    if mask:
        m = torch.rand(*bank, R, generator=gen, device="cuda") > 0.5
        m[..., 0] = True
        kw["rank_mask"] = m
    if G is not None:
        kw["adapter_index"] = torch.randint(-1, G - 1, (M,), generator=gen, device="cuda")
        kw["scaling"] = torch.rand(G, generator=gen, device="cuda") + 0.5
    return t, kw


def check_case(dt, M, K, N, R, p=0.0, **flags) -> tuple[float, dict]:
    """(worst relative error over y and every gradient, {name: error})."""
    t, kw = inputs(M, K, N, R, dt, **flags)
    keep = lorakern.triton.dropout_keep(5, M, K, p, "cuda") if p else None
    leaves = {k: (v.detach().clone().requires_grad_(k in GRADS) if v is not None else None) for k, v in t.items()}
    names = [k for k in GRADS if leaves[k] is not None]
    with poisoned():
        y = lorakern.lora_linear(*(leaves[k] for k in TENSORS), rank_scale=leaves["rank_scale"],
                                 out_scale=leaves["out_scale"], dropout_p=p, seed=5, backend="triton", **kw)
        g = torch.randn_like(y)
        got = torch.autograd.grad(y, [leaves[k] for k in names], g)
    refs = {k: (v.detach().double().requires_grad_(k in GRADS) if v is not None else None) for k, v in t.items()}
    yr = reference_lora_linear(*(refs[k] for k in TENSORS), rank_scale=refs["rank_scale"],
                               out_scale=refs["out_scale"], keep=keep, dropout_p=p, **kw)
    want = torch.autograd.grad(yr, [refs[k] for k in names], g.double())
    errs = {"y": rel(y, yr), **{"d" + k: rel(a, b) for k, a, b in zip(names, got, want)}}
    worst = max(errs.values(), key=lambda e: float("inf") if e != e else e)
    return worst, errs


def short(e: Exception) -> str:
    """One line of an exception: the compiler's first 'error:' line if any, else the last line."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()] or [type(e).__name__]
    err = [ln for ln in lines if "error:" in ln]
    return f"{type(e).__name__}: {(err or lines)[0 if err else -1][:160]}"


def correctness(full: bool) -> bool:
    """Print one line per (case, dtype); True when every case is within tolerance (2x the op's:
    fp32 5e-4, half types 1e-2)."""
    ok = True
    print(f"{'case':28s} {'dtype':9s} {'worst rel err':>13s}  (tolerance: fp32 5e-4 / half 1e-2, grads 2x)")
    for dt in (torch.bfloat16, torch.float16, torch.float32):
        tol = 2 * (5e-4 if dt == torch.float32 else 1e-2)
        for name, c in CASES:
            if (dt != torch.bfloat16 or not full) and name not in EVERY_DTYPE:
                continue
            c = dict(c)
            fuse = c.pop("fuse", None)
            forced = {} if fuse is None else dict(fwd={"FUSE_Q": fuse}, dx={"FUSE_DA": fuse})
            M = c.pop("M", 1031)
            try:
                with configs.planning(**forced):
                    worst, errs = check_case(dt, M, 1000, 777, c.pop("R", 13), **c)
            except Exception as e:  # a kernel that does not compile or launch: report it, go on
                print(f"{name:28s} {str(dt)[6:]:9s} {'ERROR':>13s}  {short(e)}")
                ok = False
                continue
            good = worst <= tol
            ok &= good
            bad = "" if good else "  " + " ".join(f"{k}={v:.1e}" for k, v in errs.items())
            print(f"{name:28s} {str(dt)[6:]:9s} {worst:13.2e}  {'ok' if good else 'FAIL'}{bad}")
    return ok
