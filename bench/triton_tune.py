"""Check and time the triton backend on a CUDA GPU: one command, about three minutes.

    PYTHONPATH=$PWD python3 bench/triton_tune.py                # quick checks, timings, kernel breakdown
    PYTHONPATH=$PWD python3 bench/triton_tune.py --full-check   # every correctness case in bf16
    PYTHONPATH=$PWD python3 bench/triton_tune.py --sweep        # all candidate configurations, no deadline
    PYTHONPATH=$PWD python3 bench/triton_tune.py --aot 90       # compile every kernel variant for sm_90, no GPU

Correctness (Triton's compile time is what limits it: two cases per dtype by default): paths
(q fused or not, dropout, rank_scale / mask / out_scale, banks with adapter_index incl. -1 rows
and empty adapters, strided views) in bf16 / fp16 / fp32 against the float64 oracle, forward and
gradients. Timings: median of ``triton.testing.do_bench`` (which clears L2 before each run;
inputs also rotate over three sets) at M in {1, 16, 128, 2048, 8192}, K = N = 4096, r = 16,
bf16, dropout 0 and 0.1; forward and forward+backward (grads of x, A, B, W frozen) of F.linear
(the floor), the addmm style, and lorakern's triton backend; decode sizes also as CUDA-graph
replays. Then a kernel breakdown at M = 8192 and candidate configurations until 175 s.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F

import lorakern
import lorakern.triton
from lorakern.alloc import poisoned
from lorakern.reference import reference_lora_linear
from lorakern.triton import configs

SMEM_LIMIT = 232448  # bytes of shared memory a block may use on sm_90 (227 KB)
GRADS = ("x", "lora_A", "lora_B", "bias", "rank_scale", "out_scale")


def rel(a, b):
    a, b = a.double(), b.double()
    if torch.isnan(a).any():
        return float("nan")
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def inputs(M, K, N, R, dt, *, G=None, scales=False, mask=False, strided=False, seed=0):
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
        idx = torch.randint(-1, G - 1, (M,), generator=gen, device="cuda")
        kw["adapter_index"] = idx
        kw["scaling"] = torch.rand(G, generator=gen, device="cuda") + 0.5
    return t, kw


def check_case(dt, M, K, N, R, p=0.0, **flags):
    """Worst relative error over y and every gradient (NaN if an element was left unwritten)."""
    t, kw = inputs(M, K, N, R, dt, **flags)
    keep = lorakern.triton.dropout_keep(5, M, K, p, "cuda") if p else None
    leaves = {k: (v.detach().clone().requires_grad_(k in GRADS) if v is not None else None) for k, v in t.items()}
    with poisoned():
        y = lorakern.lora_linear(*(leaves[k] for k in ("x", "weight", "bias", "lora_A", "lora_B")),
                                 rank_scale=leaves["rank_scale"], out_scale=leaves["out_scale"], dropout_p=p, seed=5,
                                 backend="triton", **kw)
        names = [k for k in GRADS if leaves[k] is not None]
        g = torch.randn_like(y)
        got = torch.autograd.grad(y, [leaves[k] for k in names], g)
    refs = {k: (v.detach().double().requires_grad_(k in GRADS) if v is not None else None) for k, v in t.items()}
    yr = reference_lora_linear(*(refs[k] for k in ("x", "weight", "bias", "lora_A", "lora_B")),
                               rank_scale=refs["rank_scale"], out_scale=refs["out_scale"], keep=keep, dropout_p=p, **kw)
    want = torch.autograd.grad(yr, [refs[k] for k in names], g.double())
    errs = {"y": rel(y, yr), **{"d" + k: rel(a, b) for k, a, b in zip(names, got, want)}}
    worst = max(errs.values(), key=lambda e: float("inf") if e != e else e)
    return worst, errs


def _short(e: Exception) -> str:
    """One line of an exception: the compiler's first 'error:' line if any, else the last line."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()] or [type(e).__name__]
    err = [ln for ln in lines if "error:" in ln]
    return f"{type(e).__name__}: {(err or lines)[0 if err else -1][:160]}"


def correctness(full: bool) -> bool:
    cases = [
        ("plain fused q, dA", dict(fuse=True)), ("plain separate passes", dict(fuse=False)),
        ("dropout 0.1", dict(p=0.1)), ("decode M=1 dropout", dict(M=1, p=0.1)),
        ("strided scales+mask+drop", dict(strided=True, scales=True, mask=True, p=0.2)),
        ("bank scales+mask+dropout", dict(G=5, scales=True, mask=True, p=0.1)),
        ("bank strided decode", dict(G=3, strided=True, M=16)), ("M=200 (q in the GEMM)", dict(M=200)),
    ]
    # compile time is the limit: these two in every dtype, the rest in bf16 with --full-check
    half = ("plain separate passes", "bank scales+mask+dropout")
    ok = True
    print(f"{'case':28s} {'dtype':9s} {'worst rel err':>13s}  (tolerance: fp32 5e-4 / half 1e-2, grads 2x)")
    for dt in (torch.bfloat16, torch.float16, torch.float32):
        tol = 2 * (5e-4 if dt == torch.float32 else 1e-2)
        for name, c in cases:
            if (dt != torch.bfloat16 or not full) and name not in half:
                continue
            c = dict(c)
            if "fuse" in c:
                fuse = c.pop("fuse")
                configs.OVERRIDE.update(fwd={"FUSE_Q": fuse}, dx={"FUSE_DA": fuse})
            M = c.pop("M", 1031)
            try:
                worst, errs = check_case(dt, M, 1000, 777, c.pop("R", 13), **c)
            except Exception as e:  # a kernel that does not compile or launch: report it, go on
                print(f"{name:28s} {str(dt)[6:]:9s} {'ERROR':>13s}  {_short(e)}")
                ok = False
                continue
            finally:
                configs.OVERRIDE.clear()
            good = worst <= tol
            ok &= good
            bad = "" if good else "  " + " ".join(f"{k}={v:.1e}" for k, v in errs.items())
            print(f"{name:28s} {str(dt)[6:]:9s} {worst:13.2e}  {'ok' if good else 'FAIL'}{bad}")
    return ok


# --------------------------------------------------------------------------- timing


def bench(fn, graph=False):
    from triton.testing import do_bench
    if graph:
        fn()
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        return do_bench(g.replay, warmup=25, rep=200, return_mode="median")
    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def make_timed(M, K, N, R, p, dt=torch.bfloat16, sets=3):
    gen = torch.Generator(device="cuda").manual_seed(1)
    rnd = lambda *s, sc=1.0: (torch.randn(*s, generator=gen, device="cuda") * sc).to(dt)  # noqa: E731
    W = rnd(N, K, sc=K ** -0.5)
    A = rnd(R, K, sc=K ** -0.5).requires_grad_()
    B = rnd(N, R, sc=0.1).requires_grad_()
    xs = [rnd(M, K).requires_grad_() for _ in range(sets)]
    gs = [rnd(M, N) for _ in range(sets)]
    it = [0]

    def nxt():
        it[0] = (it[0] + 1) % sets
        return xs[it[0]], gs[it[0]]

    def base(x):
        return F.linear(x, W)

    def addmm(x):
        xd = F.dropout(x, p) if p else x
        return F.linear(x, W).addmm_(xd @ A.T, B.T, alpha=2.0)

    def ours(x):
        return lorakern.lora_linear(x, W, None, A, B, scaling=2.0, dropout_p=p, backend="triton")

    def fwd(f):
        def run():
            with torch.no_grad():
                f(nxt()[0])
        return run

    def fwdbwd(f, params):
        def run():
            x, g = nxt()
            torch.autograd.grad(f(x), [x, *params], g)
        return run

    def kernels_fwd():
        x = nxt()[0]
        lorakern.triton.forward(x, W, None, A, B, 2.0, None, None, None, None, p, 5, None)

    return {"base": (fwd(base), fwdbwd(base, [])), "addmm": (fwd(addmm), fwdbwd(addmm, [A, B])),
            "triton": (fwd(ours), fwdbwd(ours, [A, B])), "kern": (kernels_fwd, None)}


def timings(Ms=(1, 16, 128, 2048, 8192), K=4096, N=4096, R=16):
    print(f"\nbf16 K=N={K} r={R}: median ms (ratio to F.linear); decode rows also as CUDA-graph replays")
    print(f"{'M':>5s} {'p':>4s} {'mode':7s} {'F.linear':>9s} {'addmm':>15s} {'triton':>15s} {'kernels':>15s}")
    for M in Ms:
        for p in (0.0, 0.1):
            fns = make_timed(M, K, N, R, p)
            for mode, i in (("fwd", 0), ("fwd+bwd", 1)):
                modes = [(mode, False)] + ([(mode + " cg", True)] if M <= 16 and i == 0 else [])
                for label, graph in modes:
                    tb = bench(fns["base"][i], graph)
                    cells = []
                    for name in ("addmm", "triton", "kern"):
                        f = fns[name][i]
                        if f is None:
                            cells.append(f"{'':>15s}")
                            continue
                        try:
                            t = bench(f, graph)
                            cells.append(f"{t:8.4f} ({t / tb:4.2f})")
                        except Exception as e:  # report, keep timing the rest
                            cells.append(f"{'ERR':>15s}")
                            print(f"  {name} {label} M={M} p={p}: {_short(e)}")
                    print(f"{M:5d} {p:4.1f} {label:7s} {tb:9.4f} " + " ".join(cells), flush=True)


def sweep(deadline: float, full: bool, M=8192, K=4096, N=4096, R=16):
    """Kernel breakdown at M=8192 (bf16, p = 0 and 0.1), then candidate configurations per
    kernel family (two each by default, all with ``full``) until ``deadline`` (time.time())."""
    from triton.testing import do_bench
    fwd_cands = [dict(BM=128, BN=256, BK=64, GROUP_M=8, num_warps=8, num_stages=3, FUSE_Q=True),
                 dict(BM=128, BN=256, BK=64, GROUP_M=8, num_warps=8, num_stages=3, FUSE_Q=True, TMA=True),
                 dict(BM=128, BN=256, BK=64, GROUP_M=8, num_warps=8, num_stages=4, FUSE_Q=True, TMA=True),
                 dict(BM=128, BN=256, BK=64, GROUP_M=8, num_warps=8, num_stages=3, FUSE_Q=False),
                 dict(BM=128, BN=128, BK=64, GROUP_M=8, num_warps=8, num_stages=4, FUSE_Q=False),
                 dict(BM=256, BN=128, BK=64, GROUP_M=8, num_warps=8, num_stages=3, FUSE_Q=False),
                 dict(BM=128, BN=256, BK=64, GROUP_M=8, num_warps=8, num_stages=4, FUSE_Q=False)]
    dx_cands = [dict(BM=128, BK=256, BN=64, GROUP_M=8, num_warps=8, num_stages=3, FUSE_DA=False),
                dict(BM=128, BK=256, BN=64, GROUP_M=8, num_warps=8, num_stages=3, FUSE_DA=False, TMA=True),
                dict(BM=128, BK=256, BN=64, GROUP_M=8, num_warps=8, num_stages=4, FUSE_DA=False, TMA=True),
                dict(BM=128, BK=256, BN=64, GROUP_M=8, num_warps=8, num_stages=3, FUSE_DA=True),
                dict(BM=128, BK=128, BN=64, GROUP_M=8, num_warps=8, num_stages=4, FUSE_DA=False),
                dict(BM=256, BK=128, BN=64, GROUP_M=8, num_warps=8, num_stages=3, FUSE_DA=False)]
    gpass_cands = [dict(CUBLAS=True), dict(BM=128, BN=128, num_warps=8, num_stages=3, CUBLAS=False),
                   dict(BM=128, BN=128, num_warps=8, num_stages=3, P_APART=True, CUBLAS=False),
                   dict(BM=64, BN=128, num_warps=4, num_stages=3, CUBLAS=False),
                   dict(BM=128, BN=64, num_warps=4, num_stages=4, CUBLAS=False)]
    dA_cands = [dict(BM=64, BK=128, num_warps=4, num_stages=3), dict(BM=128, BK=64, num_warps=4, num_stages=3),
                dict(BM=64, BK=64, num_warps=4, num_stages=4)]
    shrink_cands = [dict(BM=64, BK=128, num_warps=4, num_stages=4), dict(BM=128, BK=64, num_warps=4, num_stages=4),
                    dict(BM=32, BK=256, num_warps=4, num_stages=3)]
    dt = torch.bfloat16
    x = torch.randn(M, K, device="cuda", dtype=dt)
    W = torch.randn(N, K, device="cuda", dtype=dt) * K ** -0.5
    A = torch.randn(R, K, device="cuda", dtype=dt) * K ** -0.5
    B = torch.randn(N, R, device="cuda", dtype=dt) * 0.1
    g = torch.randn(M, N, device="cuda", dtype=dt)
    tb = do_bench(lambda: F.linear(x, W), return_mode="median")
    tdx = do_bench(lambda: torch.mm(g, W), return_mode="median")
    print(f"\nkernels at M={M} K={K} N={N} r={R} bf16: F.linear {tb:.4f} ms, g@W {tdx:.4f} ms; "
          f"ratios below are to F.linear (forward kinds) or g@W (backward kinds)")
    needs = {"dx(+gpass dt)": (True, False, False, False, False, False, False, False),
             "dA(+gpass dt)": (False, False, False, True, False, False, False, False),
             "dB(gpass P)": (False, False, False, False, True, False, False, False),
             "full bwd": (True, False, False, True, True, False, False, False)}
    for p in (0.0, 0.1):
        fwd = lambda: lorakern.triton.forward(x, W, None, A, B, 2.0, None, None, None, None, p, 5, None)  # noqa: E731
        _, q = fwd()

        def bwd(n, p=p, q=q):
            return lambda: lorakern.triton.backward(g, x, W, A, B, 2.0, None, None, None, None, p, 5, None, None, q,
                                                    needs[n])
        rows = [("forward", fwd, tb)] + [(n, bwd(n), tdx) for n in needs]
        for name, fn, ref in rows:
            if time.time() > deadline:
                print("(deadline: rest of the sweep skipped)")
                return
            try:
                t = do_bench(fn, return_mode="median")
                print(f"p={p} {name:14s} {t:8.4f} ms ({t / ref:4.2f})", flush=True)
            except Exception as e:  # report, keep going
                print(f"p={p} {name:14s} ERROR {_short(e)}")
        families = (("fwd", fwd_cands, fwd, tb), ("shrink", shrink_cands, fwd, tb),
                    ("dx", dx_cands, bwd("full bwd"), tdx), ("gpass", gpass_cands, bwd("dB(gpass P)"), tdx),
                    ("dA", dA_cands, bwd("dA(+gpass dt)"), tdx))
        for kind, cands, fn, ref in families:
            for c in cands if full else cands[:2]:
                if time.time() > deadline:
                    print("(deadline: rest of the sweep skipped)")
                    configs.OVERRIDE.clear()
                    return
                configs.OVERRIDE.clear()
                if kind == "shrink":
                    configs.OVERRIDE["fwd"] = {"FUSE_Q": False}
                if kind == "dA":
                    configs.OVERRIDE["dx"] = {"FUSE_DA": False}
                configs.OVERRIDE[kind] = c
                try:
                    t = do_bench(fn, return_mode="median")
                    print(f"p={p} {kind:6s} {t:8.4f} ms ({t / ref:4.2f}) {c}", flush=True)
                except Exception as e:  # a configuration that does not fit (shared memory): say so, go on
                    print(f"p={p} {kind:6s} failed {c}: {_short(e)}")
        configs.OVERRIDE.clear()


# --------------------------------------------------------------------------- compile-only (no GPU)


def aot(arch: int = 90, dtypes=(torch.bfloat16, torch.float16, torch.float32), quick: bool = False) -> bool:
    """Compile every kernel variant the benchmark and check shapes launch, for sm_<arch>, on any
    machine (no GPU): the launches are recorded from CPU tensors, never run, and each distinct
    (signature, constexprs, options) goes through triton.compile. Ints equal to 1 become
    constexprs, as Triton's launcher specialises them. ``quick``: one decode shape with dropout
    (TMA on and off) and one bank in deterministic mode with base_scale (CI's smoke test)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import mangle_type
    from triton.tools.tensor_descriptor import TensorDescriptor

    from lorakern.triton import backend

    names = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.int64: "i64",
             torch.int32: "i32", torch.int8: "i8"}
    seen, failures = {}, []

    class Recorder:
        def __init__(self, fn):
            self.fn = fn

        def __getitem__(self, grid):
            return self.launch

        def launch(self, *args, num_warps=4, num_stages=3, default_dot_input_precision="tf32", **consts):
            sig, cst, attrs = {}, dict(consts), {}
            for i, (name, a) in enumerate(zip(self.fn.arg_names, args)):
                if (isinstance(a, torch.Tensor) and a.data_ptr() % 16 == 0) or (
                        type(a) is int and a % 16 == 0):  # Triton's launcher marks these 16-divisible
                    attrs[(i,)] = [["tt.divisibility", 16]]
                if isinstance(a, TensorDescriptor):
                    sig[name] = mangle_type(a)
                elif isinstance(a, torch.Tensor):
                    sig[name] = "*" + names[a.dtype]
                elif isinstance(a, bool) or a is None or (isinstance(a, int) and a == 1):
                    cst[name] = a
                elif isinstance(a, int):
                    sig[name] = "i32" if -2 ** 31 <= a < 2 ** 31 else "i64"
                else:
                    sig[name] = "fp32"
            for name in cst:
                sig[name] = "constexpr"
            key = (self.fn.__name__, tuple(sorted(sig.items())), tuple(sorted(cst.items())), tuple(sorted(attrs)),
                   num_warps, num_stages, default_dot_input_precision)
            if key in seen:
                return
            src = ASTSource(fn=self.fn, signature={n: sig[n] for n in self.fn.arg_names},
                            constexprs={(self.fn.arg_names.index(k),): v for k, v in cst.items()},
                            attrs={k: v for k, v in attrs.items() if sig[self.fn.arg_names[k[0]]] != "constexpr"})
            t0 = time.time()
            try:
                k = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                   options=dict(num_warps=num_warps, num_stages=num_stages,
                                                default_dot_input_precision=default_dot_input_precision))
                seen[key] = f"ok {time.time() - t0:4.1f} s, {k.metadata.shared} B smem"
                if k.metadata.shared > SMEM_LIMIT:
                    seen[key] = f"FAILED {k.metadata.shared} B smem > {SMEM_LIMIT}"
                    failures.append(key)
            except Exception as e:  # report every failing variant, then go on
                seen[key] = f"FAILED {type(e).__name__}: {str(e).splitlines()[-1][:100]}"
                failures.append(key)
            flags = " ".join(f"{k}={v}" for k, v in sorted(cst.items()) if not isinstance(v, int) or isinstance(v, bool)
                             or k in ("BM", "BN", "BK", "RP"))
            dts = sorted({v[1:] for v in sig.values() if v.startswith("*") and "f" in v})
            print(f"{self.fn.__name__:16s} {'/'.join(dts):9s} w{num_warps} s{num_stages} {flags}: {seen[key]}",
                  flush=True)

    saved = {n: getattr(backend, n) for n in ("lora_fwd_kernel", "shrink_kernel", "gpass_kernel", "dx_kernel",
                                               "dA_kernel")}
    saved_interp, saved_check, saved_sms = configs.interpreting, backend._check, backend._sm_count
    saved_tma = backend._tma_device
    for n, fn in saved.items():
        setattr(backend, n, Recorder(fn))
    configs.interpreting = lambda: False
    backend._check = lambda x: None
    backend._sm_count = lambda dev: 132
    backend._tma_device = lambda dev: arch >= 90
    try:
        for dt in dtypes:
            for M in (16,) if quick else (1, 16, 128, 2048, 8192):
                for p in (0.1,) if quick else (0.0, 0.1):
                    _record_call(dt, M, 4096, 4096, 16, p)
                    configs.OVERRIDE.update(fwd={"TMA": True}, dx={"TMA": True})
                    _record_call(dt, M, 4096, 4096, 16, p)
                    configs.OVERRIDE.clear()
            if not quick:
                _record_call(dt, 1031, 1000, 777, 13, 0.1, G=5, scales=True, mask=True, strided=True)
                _record_call(dt, 16, 1000, 777, 13, 0.0, G=5)
            # base_scale and deterministic mode (the fuzz's space)
            for M, G in ((13, 5),) if quick else ((13, None), (13, 5), (1031, 5)):
                _record_call(dt, M, 1000, 777, 13, 0.1, G=G, scales=True, mask=True, base_scale=True,
                             deterministic=True)
                _record_call(dt, M, 1000, 777, 13, 0.0, G=G, base_scale=True)
    finally:
        for n, fn in saved.items():
            setattr(backend, n, fn)
        configs.interpreting, backend._check, backend._sm_count = saved_interp, saved_check, saved_sms
        backend._tma_device = saved_tma
        configs.OVERRIDE.clear()
    print(f"aot sm_{arch}: {len(seen)} variants, {len(failures)} failed")
    return not failures


def _record_call(dt, M, K, N, R, p, *, G=None, scales=False, mask=False, strided=False, base_scale=False,
                 deterministic=False):
    """One forward and one full backward through the backend with CPU tensors (kernels recorded)."""
    bank = () if G is None else (G,)
    e = lambda *s: torch.ones(*s, dtype=dt)  # noqa: E731
    x = e(M, 2 * K)[:, ::2] if strided else e(M, K)
    A = e(*bank, 2 * R, K)[..., ::2, :] if strided else e(*bank, R, K)
    B = e(*bank, N, R)
    u, v = (e(*bank, R), e(*bank, N)) if scales else (None, None)
    ridx = torch.arange(0, R, 2) if mask else None
    idx = (torch.arange(M) % (G + 1) - 1) if G else None
    sg = torch.ones(G) if G else None
    c = e(N) if base_scale else None
    args = (x, e(N, K), e(N), A, B, 1.0, sg, u, ridx, v, p, 5, idx)
    _, q = lorakern.triton.forward(*args, c, deterministic)
    x_, w_, _b, A_, B_, *rest = args
    every = (True, False, True, True, True, scales, scales, base_scale)
    only = lambda i: tuple(j == i for j in range(8))  # noqa: E731
    for needs in (every, only(0), only(3), only(4)):
        lorakern.triton.backward(e(M, N), x_, w_, A_, B_, *rest, c, q, needs, deterministic)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sweep", action="store_true", help="time every candidate configuration (default: two "
                    "per kernel family, until 175 s have passed)")
    ap.add_argument("--no-check", action="store_true", help="skip the correctness pass")
    ap.add_argument("--full-check", action="store_true", help="every correctness case (default: two per dtype)")
    ap.add_argument("--sweep-only", action="store_true", help="only the configuration sweep")
    ap.add_argument("--aot", type=int, metavar="ARCH", help="only compile every kernel variant for sm_ARCH "
                    "(no GPU needed), e.g. --aot 90")
    args = ap.parse_args()
    if args.aot:
        return 0 if aot(args.aot) else 1
    if not torch.cuda.is_available():
        print("needs a CUDA GPU")
        return 2
    import triton
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__} triton {triton.__version__}")
    t0 = time.time()
    ok = True
    if not args.sweep_only:
        if not args.no_check:
            ok = correctness(args.full_check)
            print(f"correctness: {'all ok' if ok else 'FAILURES'} ({time.time() - t0:.0f} s)")
        timings()
        print(f"({time.time() - t0:.0f} s)")
    sweep(t0 + (1e9 if args.sweep or args.sweep_only else 175), full=args.sweep or args.sweep_only)
    print(f"total {time.time() - t0:.0f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
