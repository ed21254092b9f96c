"""Compile every triton kernel variant the benchmark and check shapes launch, for sm_<arch>, on any
machine (no GPU): ``lorakern.lora_linear(..., backend="triton")`` runs on CPU tensors with the
kernels replaced by recorders (``TRITON_INTERPRET=1`` lets the backend take CPU tensors; nothing
is interpreted), planned from the ``"default"`` table for a 132-SM GPU; each distinct
(signature, constexprs, options) goes through ``triton.compile``. Ints equal to 1 become
constexprs, as Triton's launcher specialises them.
"""
from __future__ import annotations

import contextlib
import os
import time
from unittest import mock

import torch

import lorakern
from lorakern.triton import backend, configs

SMEM_LIMIT = 232448  # bytes of shared memory a block may use on sm_90 (227 KB)
KERNELS = ("lora_fwd_kernel", "shrink_kernel", "gpass_kernel", "dx_kernel", "dA_kernel")
_TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.int64: "i64",
          torch.int32: "i32", torch.int8: "i8", torch.bool: "i1"}


class _Compiler:
    """Stands in for every kernel: a launch compiles its variant once for ``arch`` and records how it went."""

    def __init__(self, arch: int) -> None:
        self.arch = arch
        self.seen: dict[tuple, str] = {}
        self.failures: list[tuple] = []

    def kernel(self, fn):
        compiler = self

        class Recorder:
            def __getitem__(self, grid):
                return lambda *args, **kw: compiler.launch(fn, args, **kw)

        return Recorder()

    @staticmethod
    def _signature(fn, args, consts) -> tuple[dict, dict, dict]:
        from triton.tools.tensor_descriptor import TensorDescriptor

        sig, cst, attrs = {}, dict(consts), {}
        for i, (name, a) in enumerate(zip(fn.arg_names, args)):
            if (isinstance(a, torch.Tensor) and a.data_ptr() % 16 == 0) or (type(a) is int and a % 16 == 0):
                attrs[(i,)] = [["tt.divisibility", 16]]  # as Triton's launcher marks 16-divisible arguments
            if isinstance(a, TensorDescriptor):
                sig[name] = f"tensordesc<{_TYPES[a.base.dtype]}{list(a.block_shape)}>"
            elif isinstance(a, torch.Tensor):
                sig[name] = "*" + _TYPES[a.dtype]
            elif isinstance(a, bool) or a is None or (isinstance(a, int) and a == 1):
                cst[name] = a
            elif isinstance(a, int):
                sig[name] = "i32" if -2 ** 31 <= a < 2 ** 31 else "i64"
            else:
                sig[name] = "fp32"
        for name in cst:
            sig[name] = "constexpr"
        return sig, cst, attrs

    def launch(self, fn, args, num_warps=4, num_stages=3, **consts) -> None:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource

        sig, cst, attrs = self._signature(fn, args, consts)
        key = (fn.__name__, tuple(sorted(sig.items())), tuple(sorted(cst.items())), tuple(sorted(attrs)),
               num_warps, num_stages)
        if key in self.seen:
            return
        src = ASTSource(fn=fn, signature={n: sig[n] for n in fn.arg_names},
                        constexprs={(fn.arg_names.index(k),): v for k, v in cst.items()},
                        attrs={k: v for k, v in attrs.items() if sig[fn.arg_names[k[0]]] != "constexpr"})
        t0 = time.time()
        try:
            k = triton.compile(src, target=GPUTarget("cuda", self.arch, 32),
                               options=dict(num_warps=num_warps, num_stages=num_stages))
            self.seen[key] = f"ok {time.time() - t0:4.1f} s, {k.metadata.shared} B smem"
            if k.metadata.shared > SMEM_LIMIT:
                self.seen[key] = f"FAILED {k.metadata.shared} B smem > {SMEM_LIMIT}"
                self.failures.append(key)
        except Exception as e:  # report every failing variant, then go on
            self.seen[key] = f"FAILED {type(e).__name__}: {str(e).splitlines()[-1][:100]}"
            self.failures.append(key)
        flags = " ".join(f"{k}={v}" for k, v in sorted(cst.items()) if not isinstance(v, int) or isinstance(v, bool)
                         or k in ("BM", "BN", "BK", "RP"))
        dts = sorted({v[1:] for v in sig.values() if v.startswith("*") and "f" in v})
        print(f"{fn.__name__:16s} {'/'.join(dts):9s} w{num_warps} s{num_stages} {flags}: {self.seen[key]}",
              flush=True)


def _record_call(dt, M, K, N, R, p, *, G=None, scales=False, mask=False, strided=False, base_scale=False,
                 deterministic=False) -> None:
    """One forward and four backwards (every gradient; x, A, B alone) through the op, on CPU tensors."""
    bank = () if G is None else (G,)
    e = lambda *s: torch.ones(*s, dtype=dt)  # noqa: E731
    x = e(M, 2 * K)[:, ::2] if strided else e(M, K)
    A = e(*bank, 2 * R, K)[..., ::2, :] if strided else e(*bank, R, K)
    t = dict(x=x, bias=e(N), A=A, B=e(*bank, N, R), u=e(*bank, R) if scales else None,
             v=e(*bank, N) if scales else None, c=e(N) if base_scale else None)
    every = [k for k, v in t.items() if v is not None]
    for wrt in (every, ["x"], ["A"], ["B"]):
        leaf = {k: None if v is None else v.detach().requires_grad_(k in wrt) for k, v in t.items()}
        y = lorakern.lora_linear(
            leaf["x"], e(N, K), leaf["bias"], leaf["A"], leaf["B"], scaling=torch.ones(G) if G else 1.0,
            rank_scale=leaf["u"], rank_mask=(torch.arange(R) % 2 == 0) if mask else None, out_scale=leaf["v"],
            dropout_p=p, seed=5, adapter_index=(torch.arange(M) % (G + 1) - 1) if G else None,
            base_scale=leaf["c"], deterministic=deterministic, backend="triton")
        torch.autograd.grad(y, [leaf[k] for k in wrt], e(M, N))


def _calls(dtypes, quick: bool, tma: bool) -> None:
    """The problems of the benchmark (K = N = 4096, r = 16; TMA on and off) and of the checks."""
    for dt in dtypes:
        for M in (16,) if quick else (1, 16, 128, 2048, 8192):
            for p in (0.1,) if quick else (0.0, 0.1):
                _record_call(dt, M, 4096, 4096, 16, p)
                if tma:
                    with configs.planning(fwd={"TMA": True}, dx={"TMA": True}):
                        _record_call(dt, M, 4096, 4096, 16, p)
        if not quick:
            _record_call(dt, 1031, 1000, 777, 13, 0.1, G=5, scales=True, mask=True, strided=True)
            _record_call(dt, 16, 1000, 777, 13, 0.0, G=5)
        # base_scale and deterministic mode (the fuzz's space)
        for M, G in ((13, 5),) if quick else ((13, None), (13, 5), (1031, 5)):
            _record_call(dt, M, 1000, 777, 13, 0.1, G=G, scales=True, mask=True, base_scale=True, deterministic=True)
            _record_call(dt, M, 1000, 777, 13, 0.0, G=G, base_scale=True)


def aot(arch: int = 90, dtypes=(torch.bfloat16, torch.float16, torch.float32), quick: bool = False) -> bool:
    """Compile every variant for sm_<arch>; True when all compile within the shared-memory limit.
    ``quick``: one decode shape with dropout (TMA on and off) and one bank in deterministic mode
    with base_scale (CI's smoke test). TMA variants only for arch >= 90.

    Raises:
        TypeError: the kernels were made by the interpreter (TRITON_INTERPRET=1 at import).
    """
    import triton

    if not all(isinstance(getattr(backend, n), triton.JITFunction) for n in KERNELS):
        raise TypeError("aot: the kernels are interpreted (TRITON_INTERPRET=1 when lorakern.triton was imported)")
    comp = _Compiler(arch)
    with contextlib.ExitStack() as stack:
        for n in KERNELS:
            stack.enter_context(mock.patch.object(backend, n, comp.kernel(getattr(backend, n))))
        stack.enter_context(mock.patch.dict(os.environ, {"TRITON_INTERPRET": "1"}))
        stack.enter_context(configs.planning(table="default", sms=132))
        _calls(dtypes, quick, tma=arch >= 90)
    print(f"aot sm_{arch}: {len(comp.seen)} variants, {len(comp.failures)} failed")
    return not comp.failures
