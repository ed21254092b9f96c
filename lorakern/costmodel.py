"""The cost model: for one problem, what a plan launches, the traffic it adds to the base GEMMs, its
host syncs, and a predicted GPU time. No GPU needed: CI checks it (tests/test_plan.py), and
``lorakern plan`` prints it.

A plan is a list of :class:`Launch` per part (forward, backward): each GPU kernel the code issues,
in order, with the tensors it reads and writes. The triton plan comes from the same
``configs.forward_route`` / ``backward_route`` decisions the backend takes (tests/test_plan.py
checks its launch list against the launches the backend makes); the torch backend's follows
``backends/composed.py``; the addmm style's and the base's are PyTorch autograd's, modelled.

Conventions (also bench/NOTES.md):

- A *pass* over M x K (or M x N) is M * K * esize bytes, esize that of x: an fp32 copy of a
  bf16 tensor is two passes, a bool mask half of one. Reads and writes are counted apart.
- *Extra* traffic is every M x K / M x N read and write of a launch that is not a base GEMM
  (``Launch.base``: x W^T forward, g W for dx). A base GEMM's own reads of x / g and W and its
  write of y / dx are the floor and not counted. What a base GEMM's epilogue reads of an
  accumulated buffer (``addmm_`` with beta = 1 onto C or the dx term) is counted apart as
  *epilogue reads*: it overlaps a compute-bound GEMM. Traffic of size r, N x r or K x r is small
  and not counted in passes (it is in the bytes).
- *Host syncs*: device-to-host reads in forward and backward: 0 in every plan here (no
  ``.item()``, no ``.tolist()``, no host-read count: the one-adapter path reads nothing).

Predicted times (labelled *predicted* wherever printed) use a roofline per launch,
``max(flops / (GEMM_EFF * PEAK), bytes / (BW_EFF * BW)) + LAUNCH_US``, with an epilogue read
costing ``epilogue_exposed`` of its time at bandwidth. ``gemm_eff``, ``bw_eff`` and ``launch_us``
are fitted to run B's measured H100 times of the base, the addmm style and the torch backend
(:func:`fit`; bench/NOTES.md has the table); ``epilogue_exposed`` is an assumption (0.5) until a
GPU measures a plan with an epilogue read.

>>> p = triton_plan(8192, 4096, 4096, 16, dropout=0.1)
>>> p.path, [l.name for l in p.forward]
('fold-in', ['shrink_kernel', 'lora_fwd_kernel', 'aten.addmm_'])
>>> p.passes("forward").extra, p.passes("forward").epilogue_reads, p.syncs
(2.0, 1.0, (0, 0))
"""
from __future__ import annotations

import itertools
import math
from typing import NamedTuple, Optional, Sequence

from lorakern import autotable
from lorakern.triton import configs

__all__ = ["Traffic", "Launch", "Passes", "Plan", "PEAK_TFLOPS", "BW_TBS", "Constants", "CONSTANTS",
           "triton_plan", "torch_plan", "addmm_plan", "base_plan", "plan", "auto_backend", "predict_ms", "fit"]

PEAK_TFLOPS, BW_TBS = 798.0, 3.0  # H100 SXM: bf16 dense TFLOP/s and HBM3 TB/s, as measured (bench/NOTES.md)


class Constants(NamedTuple):
    """The fitted figures of the time model: ``gemm_eff``, ``bw_eff`` and ``launch_us`` from
    :func:`fit` over run B's base, addmm and torch records (bench/results/h100.json);
    ``epilogue_exposed`` assumed (half of an epilogue read shows), not measured yet."""
    gemm_eff: float  # a big GEMM's fraction of PEAK_TFLOPS
    bw_eff: float  # a memory-bound launch's fraction of BW_TBS
    launch_us: float  # per launch: its fixed cost on the GPU (tail, ramp), graph-replayed
    epilogue_exposed: float  # the fraction of an epilogue read's time that the GEMM does not hide


CONSTANTS = Constants(gemm_eff=0.89, bw_eff=0.85, launch_us=2.5, epilogue_exposed=0.5)


class Traffic(NamedTuple):
    """A tensor a launch reads or writes: its name, rows x cols and bytes per element."""
    tensor: str
    rows: int
    cols: int
    esize: float
    kind: str = ""  # "MK" or "MN": counted in passes over M x K / M x N; "": small

    @property
    def bytes(self) -> float:
        return self.rows * self.cols * self.esize


class Launch(NamedTuple):
    """One GPU kernel: a Triton kernel's name, or ``aten.<op>`` for a torch op (cuBLAS for mm)."""
    name: str
    what: str
    reads: tuple = ()
    writes: tuple = ()
    flops: float = 0.0
    base: bool = False  # a base GEMM (x W^T, g W): its own traffic is the floor
    epilogue: tuple = ()  # what its epilogue reads of an accumulated buffer (beta = 1)

    @property
    def bytes(self) -> float:
        return sum(t.bytes for t in self.reads + self.writes + self.epilogue)


class Passes(NamedTuple):
    """Extra traffic of a part in passes (see the module docstring)."""
    mk_reads: float
    mk_writes: float
    mn_reads: float
    mn_writes: float
    epilogue_reads: float

    @property
    def extra(self) -> float:
        """Reads and writes beyond the base GEMMs, epilogue reads not included."""
        return self.mk_reads + self.mk_writes + self.mn_reads + self.mn_writes

    def __add__(self, other: "Passes") -> "Passes":
        return Passes(*(a + b for a, b in zip(self, other)))


class Plan(NamedTuple):
    """What one backend launches for a problem: ``forward`` and ``backward`` launch lists."""
    backend: str
    path: str
    M: int
    K: int
    N: int
    esize: int
    forward: tuple
    backward: tuple
    syncs: tuple = (0, 0)  # device-to-host syncs in (forward, backward)

    def launches(self, part: str) -> tuple:
        """The launches of ``"forward"``, ``"backward"`` or ``"both"``."""
        return self.forward + self.backward if part == "both" else getattr(self, part)

    def passes(self, part: str) -> Passes:
        """Extra passes over M x K and M x N of ``part``."""
        mk, mn = self.M * self.K * self.esize, self.M * self.N * self.esize
        out = [0.0] * 5

        def add(ts, read_slot):
            for t in ts:
                if t.kind == "MK":
                    out[read_slot] += t.bytes / mk
                elif t.kind == "MN":
                    out[read_slot + 2] += t.bytes / mn

        for launch in self.launches(part):
            if not launch.base:
                add(launch.reads, 0)
                add(launch.writes, 1)
            for t in launch.epilogue:
                out[4] += t.bytes / (mn if t.kind == "MN" else mk)
        return Passes(*out)


# --------------------------------------------------------------------------- the plans


class _Sizes(NamedTuple):
    M: int
    K: int
    N: int
    r: int
    e: int  # bytes per element of x
    ea: int  # of the adapters

    def x(self, name="x"):
        return Traffic(name, self.M, self.K, self.e, "MK")

    def mn(self, name="y"):
        return Traffic(name, self.M, self.N, self.e, "MN")

    def small(self, name, rows, cols, esize=4):
        return Traffic(name, rows, cols, esize)


def _base_gemm(s: _Sizes, what: str, name: str, out: str, epilogue: bool, bias: bool = False) -> Launch:
    """A base GEMM by cuBLAS: x W^T into y (forward) or g W into dx (``out`` "dx")."""
    if out == "y":
        reads, writes = (s.x(), Traffic("W", s.N, s.K, s.e)), (s.mn(),)
        ep = (s.mn("C"),) if epilogue else ()
    else:
        reads, writes = (s.mn("g"), Traffic("W", s.N, s.K, s.e)), (s.x("dx"),)
        ep = (s.x("dx term"),) if epilogue else ()
    if bias:
        reads += (s.small("bias", 1, s.N, s.e),)
    return Launch(name, what, reads, writes, 2.0 * s.M * s.N * s.K, True, ep)


def triton_plan(M: int, K: int, N: int, r: int, *, esize: int = 2, dropout: float = 0.0, mixed: bool = False,
                table: str = "default", sms: int = 132) -> Plan:
    """The triton backend's launches for one adapter (every rank, no scales, a frozen bias) in a
    training step (x, A and B need gradients), as ``lorakern/triton/backend.py`` makes them for
    the routes of ``configs`` in launch-plan table ``table`` on a GPU of ``sms`` SMs. ``mixed``:
    fp32 adapters beside a half-precision x.

    Raises:
        KeyError: an unknown table.
        ValueError: ``mixed`` beside an fp32 x; a table whose g^T t takes the row-reduction kernel.
    """
    s = _Sizes(M, K, N, r, esize, 4 if mixed else esize)
    if mixed and esize != 2:
        raise ValueError(f"mixed: fp32 adapters go beside a half-precision x (esize 2), got esize {esize}")
    with configs.planning(table=table, sms=sms):
        fr = configs.forward_route(M, N, K, r, banked=False, dropout=dropout > 0, esize=esize, sms=sms, mixed=mixed,
                                   base_scale=False)
        br = configs.backward_route(M, N, K, r, banked=False, dropout=dropout > 0, esize=esize, sms=sms,
                                    mixed=mixed, base_scale=False, deterministic=False, need_x=True, need_dt=True,
                                    need_P=True, need_A=True)
    if br.p_apart:
        raise ValueError(f"table {table!r}: g^T t by the row-reduction kernel (P_APART) has no model here")
    A, B = Traffic("A", r, K, s.ea), Traffic("B", N, r, s.ea)
    fwd = []
    if not fr.fuse_q:
        fwd.append(Launch("shrink_kernel", "q = x~ A^T (dropout in-kernel)", (s.x(), A),
                          (s.small("q", fr.split * M, r),), 2.0 * M * K * r))
    if fr.fold:
        fwd.append(Launch("lora_fwd_kernel", "C = b + t (vB)^T (K = 0)", (s.small("q", fr.split * M, r), B),
                          (s.mn("C"),), 2.0 * M * N * r))
        fwd.append(_base_gemm(s, "y = C + x W^T (cuBLAS, beta = 1)", "aten.addmm_", "y", True))
    else:
        fwd.append(Launch("lora_fwd_kernel", "y = [x | t] [W | vB]^T + b" + (" (q inside)" if fr.fuse_q else ""),
                          (s.x(), Traffic("W", N, K, s.e), A, B), (s.mn(),), 2.0 * M * N * (K + r), True))
    bwd = []
    if br.cublas:
        bwd += [Launch("aten.mm", "dt = g (vB)", (s.mn("g"), B), (s.small("dt", M, r, s.e),), 2.0 * M * N * r),
                Launch("aten.mul", "t = q s", (s.small("q", M, r),), (s.small("t", M, r),)),
                Launch("aten._to_copy", "t in g's dtype", (s.small("t", M, r),), (s.small("t", M, r, s.e),)),
                Launch("aten.mm", "g^T t", (s.mn("g"), s.small("t", M, r, s.e)), (s.small("P", N, r, s.e),),
                       2.0 * M * N * r)]
    else:
        bwd += [Launch("aten.zeros", "P = 0", (), (s.small("P", N, r),)),
                Launch("gpass_kernel", "dt = g (vB), P += g^T t (one pass over g)", (s.mn("g"), B),
                       (s.small("dt", br.gpass_split * M, r), s.small("P", N, r)), 4.0 * M * N * r)]
        if br.gpass_split > 1:
            bwd.append(Launch("aten.sum", "dt: the slices' partials", (s.small("dt", br.gpass_split * M, r),),
                              (s.small("dt", M, r),)))
    bwd.append(Launch("aten.zeros", "dA = 0", (), (s.small("dA", r, K),)))
    x_for_dA = (s.x(),) if br.fuse_da else ()
    if br.fold:
        bwd.append(Launch("dx_kernel", "dx term (dq A) keep / (1-p) (N = 0)" + (", dA" if br.fuse_da else ""),
                          x_for_dA + (A,), (s.x("dx term"),), 2.0 * M * K * r * (2 if br.fuse_da else 1)))
        bwd.append(_base_gemm(s, "dx = term + g W (cuBLAS, beta = 1)", "aten.addmm_", "dx", True))
    else:
        bwd.append(Launch("dx_kernel", "dx = g W + (dq A) keep / (1-p)" + (", dA" if br.fuse_da else ""),
                          (s.mn("g"), Traffic("W", N, K, s.e), A) + x_for_dA, (s.x("dx"),),
                          2.0 * M * K * (N + r), True))
    if not br.fuse_da:
        bwd.append(Launch("dA_kernel", "dA = dq^T x~ (mask regenerated)", (s.x(),), (s.small("dA", r, K),),
                          2.0 * M * K * r))
    if not mixed:  # fp32 accumulators of dA and (g-pass) P rounded to the adapters' dtype
        bwd.append(Launch("aten._to_copy", "dA in A's dtype", (s.small("dA", r, K),), (s.small("dA", r, K, s.e),)))
        if not br.cublas:
            bwd.append(Launch("aten._to_copy", "dB in B's dtype", (s.small("P", N, r),), (s.small("dB", N, r, s.e),)))
    path = "fold-in" if fr.fold and br.fold else "fused" if not (fr.fold or br.fold) else "fold-in fwd / fused dx"
    return Plan("triton", path, M, K, N, esize, tuple(fwd), tuple(bwd))


def _mask_launches(s: _Sizes, what: str) -> list:
    """torch's keep-mask and x~ (backends/portable.py): bernoulli_ into bool, where."""
    return [Launch("aten.bernoulli_", f"keep [M, K] bool ({what})", (), (Traffic("keep", s.M, s.K, 1, "MK"),)),
            Launch("aten.where", "x~ = keep ? x : 0", (s.x(), Traffic("keep", s.M, s.K, 1, "MK")), (s.x("x~"),))]


def torch_plan(M: int, K: int, N: int, r: int, *, esize: int = 2, dropout: float = 0.0, mixed: bool = False) -> Plan:
    """The torch backend's launches (``backends/composed.py`` with ``portable``'s mask) for one
    adapter, a frozen bias, in a training step. ``mixed``: fp32 adapters (PEFT's arithmetic: the
    M x K / M x N operands of the adapter products converted to fp32)."""
    s = _Sizes(M, K, N, r, esize, 4 if mixed else esize)
    A, B = Traffic("A", r, K, s.ea), Traffic("B", N, r, s.ea)
    xk = "x~" if dropout else "x"

    def small_cast(what, name, rows, cols, src, dst):
        return [] if src == dst else [Launch("aten._to_copy", what, (s.small(name, rows, cols, src),),
                                             (s.small(name, rows, cols, dst),))]

    def wide(name, rows, cols):  # an M x K / M x N operand converted to the adapters' fp32
        kind = "MK" if cols == K else "MN"
        return [Launch("aten._to_copy", f"{name} in fp32", (Traffic(name, rows, cols, s.e, kind),),
                       (Traffic(name, rows, cols, 4, kind),))] if mixed else []

    masks = _mask_launches(s, "forward") if dropout else []
    fwd = [_base_gemm(s, "y = x W^T + b", "aten.addmm", "y", False, bias=True)] + masks + wide(xk, M, K) + [
        Launch("aten.mm", "q = x~ A^T", (Traffic(xk, M, K, s.ea, "MK"), A), (s.small("q", M, r, s.ea),), 2.0 * M * K * r)]
    fwd += small_cast("q in fp32", "q", M, r, s.ea, 4)
    if dropout:
        fwd.append(Launch("aten.mul_", "q /= 1 - p", (s.small("q", M, r),), (s.small("q", M, r),)))
    fwd.append(Launch("aten.mul", "t = q s", (s.small("q", M, r),), (s.small("t", M, r),)))
    if mixed:
        fwd += [Launch("aten.mm", "t B^T (fp32)", (s.small("t", M, r), B), (Traffic("tB", M, N, 4, "MN"),), 2.0 * M * N * r),
                Launch("aten.add_", "y += t B^T, rounded once", (s.mn(), Traffic("tB", M, N, 4, "MN")), (s.mn(),))]
    else:
        fwd += small_cast("t in y's dtype", "t", M, r, 4, s.e) + [
            Launch("aten.addmm_", "y += t B^T", (s.mn(), s.small("t", M, r, s.e), B), (s.mn(),), 2.0 * M * N * r)]
    gw = Traffic("g", M, N, s.ea, "MN")
    bwd = (_mask_launches(s, "backward") if dropout else []) + [
        _base_gemm(s, "dx = g W", "aten.mm", "dx", False),
        Launch("aten.mul", "t = q s", (s.small("q", M, r),), (s.small("t", M, r),))] + wide("g", M, N) + [
        Launch("aten.mm", "dt = g B", (gw, B), (s.small("dt", M, r, s.ea),), 2.0 * M * N * r)]
    bwd += small_cast("dt in fp32", "dt", M, r, s.ea, 4)
    bwd.append(Launch("aten.mul", "dq = dt s / (1-p)", (s.small("dt", M, r),), (s.small("dq", M, r),)))
    bwd += small_cast("t in B's dtype", "t", M, r, 4, s.ea) + wide("g", M, N)
    bwd.append(Launch("aten.mm", "P = t^T g", (gw,), (s.small("P", N, r, s.ea),), 2.0 * M * N * r))
    bwd += small_cast("P in fp32", "P", N, r, s.ea, 4)
    bwd += small_cast("dq in A's dtype", "dq", M, r, 4, s.ea)
    if dropout or mixed:  # dx += (dq A) * keep, through an M x K temporary
        term = Traffic("dq A", M, K, s.ea, "MK")
        bwd.append(Launch("aten.mm", "dq A", (A,), (term,), 2.0 * M * K * r))
        if dropout:
            bwd.append(Launch("aten.where", "(dq A) * keep", (term, Traffic("keep", M, K, 1, "MK")), (term,)))
        bwd.append(Launch("aten.add_", "dx += term", (s.x("dx"), term), (s.x("dx"),)))
    else:
        bwd.append(Launch("aten.addmm_", "dx += dq A", (s.x("dx"), A), (s.x("dx"),), 2.0 * M * K * r))
    bwd += small_cast("dq^T in A's dtype", "dq", M, r, 4, s.ea) + wide(xk, M, K)
    bwd.append(Launch("aten.mm", "dA = dq^T x~", (Traffic(xk, M, K, s.ea, "MK"),), (s.small("dA", r, K, s.ea),),
                      2.0 * M * K * r))
    bwd += small_cast("dB in B's dtype", "dB", N, r, 4, s.ea)
    bwd.append(Launch("aten.clone", "dB contiguous", (s.small("dB", N, r, s.ea),), (s.small("dB", N, r, s.ea),)))
    return Plan("torch", "composed", M, K, N, esize, tuple(fwd), tuple(bwd))


def addmm_plan(M: int, K: int, N: int, r: int, *, esize: int = 2, dropout: float = 0.0) -> Plan:
    """The addmm style of the benchmark (``F.linear(x, W, b).addmm_(dropout(x) A^T, B^T, alpha=s)``)
    under PyTorch autograd, modelled (not checked against launches): dropout saves its mask and x~."""
    s = _Sizes(M, K, N, r, esize, esize)
    A, B = Traffic("A", r, K, s.e), Traffic("B", N, r, s.e)
    xk = "x~" if dropout else "x"
    fwd = []
    if dropout:
        fwd.append(Launch("aten.native_dropout", "x~, mask", (s.x(),), (s.x("x~"), Traffic("mask", M, K, 1, "MK"))))
    fwd += [Launch("aten.mm", "t = x~ A^T", (s.x(xk), A), (s.small("t", M, r, s.e),), 2.0 * M * K * r),
            _base_gemm(s, "y = x W^T + b", "aten.addmm", "y", False, bias=True),
            Launch("aten.addmm_", "y += s t B^T", (s.mn(), B), (s.mn(),), 2.0 * M * N * r)]
    bwd = [Launch("aten.mm", "dt = g B", (s.mn("g"), B), (s.small("dt", M, r, s.e),), 2.0 * M * N * r),
           Launch("aten.mul", "dt s", (s.small("dt", M, r, s.e),), (s.small("dt", M, r, s.e),)),
           Launch("aten.mm", "dB = g^T t", (s.mn("g"),), (s.small("dB", N, r, s.e),), 2.0 * M * N * r),
           Launch("aten.mul", "dB s", (s.small("dB", N, r, s.e),), (s.small("dB", N, r, s.e),)),
           _base_gemm(s, "dx = g W", "aten.mm", "dx", False),
           Launch("aten.mm", "dx~ = dt A", (A,), (s.x("dx~"),), 2.0 * M * K * r),
           Launch("aten.mm", "dA = dt^T x~", (s.x(xk),), (s.small("dA", r, K, s.e),), 2.0 * M * K * r)]
    if dropout:
        bwd.append(Launch("aten.native_dropout_backward", "dx~ * mask / (1-p)",
                          (s.x("dx~"), Traffic("mask", M, K, 1, "MK")), (s.x("dx~"),)))
    bwd.append(Launch("aten.add", "dx = dx + dx~ (autograd's sum)", (s.x("dx"), s.x("dx~")), (s.x("dx"),)))
    return Plan("addmm", "addmm style", M, K, N, esize, tuple(fwd), tuple(bwd))


def base_plan(M: int, K: int, N: int, r: int = 0, *, esize: int = 2, dropout: float = 0.0) -> Plan:
    """The frozen ``F.linear`` (the floor): its forward GEMM and, for x's gradient, the dx GEMM."""
    s = _Sizes(M, K, N, r, esize, esize)
    return Plan("base", "F.linear", M, K, N, esize, (_base_gemm(s, "y = x W^T + b", "aten.addmm", "y", False, True),),
                (_base_gemm(s, "dx = g W", "aten.mm", "dx", False),))


def auto_backend(M: int, K: int, N: int, r: int, *, device: str = "NVIDIA H100 80GB HBM3",
                 dtype: str = "bfloat16") -> str:
    """The backend ``backend="auto"`` picks on a GPU named ``device`` (``lorakern/autotable.json``)."""
    return autotable.order(device, dtype, M)[0]


def plan(backend: str, M: int, K: int, N: int, r: int, *, esize: int = 2, dropout: float = 0.0,
         mixed: bool = False, device: str = "NVIDIA H100 80GB HBM3") -> Plan:
    """The plan of ``backend`` (``"auto"``: the one auto picks on ``device``; ``"triton"``,
    ``"torch"``, ``"addmm"`` (the addmm style) or ``"base"``).

    Raises:
        ValueError: a backend without a model here (``cuda``, ``cpu``), or ``mixed`` for the addmm style or base.
    """
    if backend == "auto":
        backend = auto_backend(M, K, N, r, device=device, dtype={2: "bfloat16", 4: "float32"}[esize])
    if backend == "triton":
        return triton_plan(M, K, N, r, esize=esize, dropout=dropout, mixed=mixed)
    if backend == "torch":
        return torch_plan(M, K, N, r, esize=esize, dropout=dropout, mixed=mixed)
    if backend in ("addmm", "base") and not mixed:
        return (addmm_plan if backend == "addmm" else base_plan)(M, K, N, r, esize=esize, dropout=dropout)
    raise ValueError(f"backend: no cost model for {backend!r}{' with mixed precision' if mixed else ''}; "
                     "expected auto, triton, torch, addmm or base")


# --------------------------------------------------------------------------- predicted time


def _launch_us(launch: Launch, c: Constants) -> float:
    bw = c.bw_eff * BW_TBS * 1e6  # bytes per us
    own = sum(t.bytes for t in launch.reads + launch.writes)
    compute = launch.flops / (c.gemm_eff * PEAK_TFLOPS * 1e6) if launch.base else 0.0
    epilogue = sum(t.bytes for t in launch.epilogue) / bw * c.epilogue_exposed
    return max(compute, own / bw) + epilogue + c.launch_us


def predict_ms(p: Plan, part: str, c: Constants = CONSTANTS) -> float:
    """Predicted GPU time (ms, an H100, graph-replayed: no host time) of ``part`` of plan ``p``:
    ``"forward"``, ``"backward"`` or ``"both"``. A prediction, not a measurement."""
    return sum(_launch_us(launch, c) for launch in p.launches(part)) / 1e3


_MODES = {"fwd": "forward", "bwd": "backward", "fwdbwd": "both"}
_PROVIDERS = {"base": "base", "addmm": "addmm", "lorakern-torch": "torch"}


def comparable(records: Sequence[dict]) -> list[dict]:
    """The records a fit may use: providers with a model (base, addmm, lorakern-torch), one adapter,
    no mask, bf16, and only rows measured as CUDA graphs or GPU-bound (M >= 8192 or the base at
    its size): eager rows below that are bound by host dispatch, which the model leaves out."""
    return [rec for rec in records
            if rec["provider"] in _PROVIDERS and not rec.get("masked") and not rec.get("adapters")
            and rec["dtype"] == "bfloat16" and (rec.get("cuda_graph") or rec["M"] >= 8192 or rec["provider"] == "base")]


def _record_plan(rec: dict) -> tuple[Plan, str]:
    p = plan(_PROVIDERS[rec["provider"]], rec["M"], rec["K"], rec["N"], rec["r"], dropout=rec["dropout"])
    return p, _MODES[rec["mode"]]


def predicted_for(rec: dict, c: Constants = CONSTANTS) -> float:
    """The model's time (ms, predicted) for a :func:`comparable` record's provider, mode and shape."""
    return predict_ms(*_record_plan(rec), c)


def fit(records: Sequence[dict]) -> tuple[Constants, float]:
    """(constants, mean |log(predicted / measured)|) minimising that mean over :func:`comparable`
    records, by a grid search over gemm_eff, bw_eff and launch_us. ``epilogue_exposed`` stays
    CONSTANTS' assumption: no measured plan reads an accumulated buffer in a GEMM epilogue."""
    recs = [(_record_plan(r), r["median_ms"]) for r in comparable(records)]
    best = None
    for ge, be, lu in itertools.product((0.80, 0.83, 0.86, 0.89, 0.92), (0.75, 0.8, 0.85, 0.9, 0.95),
                                        (1.5, 2.0, 2.5, 3.0, 4.0)):
        c = Constants(ge, be, lu, CONSTANTS.epilogue_exposed)
        err = sum(abs(math.log(predict_ms(p, part, c) / ms)) for (p, part), ms in recs) / max(1, len(recs))
        if best is None or err < best[1]:
            best = (c, err)
    return best


def describe(p: Plan, c: Constants = CONSTANTS, base: Optional[Plan] = None) -> str:
    """A plan as text: each part's launches with their traffic, its extra passes and syncs, and the
    predicted time (against ``base``'s when given)."""
    lines = [f"{p.backend} ({p.path}), M={p.M} K={p.K} N={p.N}"]
    for part in ("forward", "backward"):
        ps = p.passes(part)
        ms = predict_ms(p, part, c)
        ratio = f", {ms / predict_ms(base, part, c):.2f}x base" if base is not None else ""
        lines.append(f"  {part}: {len(p.launches(part))} launches, extra passes {ps.extra:g} (M x K: "
                     f"{ps.mk_reads:g} read, {ps.mk_writes:g} written; M x N: {ps.mn_reads:g} read, "
                     f"{ps.mn_writes:g} written), epilogue reads {ps.epilogue_reads:g}, host syncs "
                     f"{p.syncs[part == 'backward']}; predicted {ms * 1e3:.0f} us{ratio}")
        for launch in p.launches(part):
            mb = launch.bytes / 1e6
            lines.append(f"    {launch.name:<16} {launch.what:<46} {mb:9.1f} MB{'  (base GEMM)' if launch.base else ''}")
    both = p.passes("both")
    ms = predict_ms(p, "both", c)
    ratio = f", {ms / predict_ms(base, 'both', c):.2f}x base" if base is not None else ""
    lines.append(f"  forward+backward: extra passes {both.extra:g}, epilogue reads {both.epilogue_reads:g}; "
                 f"predicted {ms * 1e3:.0f} us{ratio}")
    return "\n".join(lines)
