"""The ``triton`` backend: forward and backward of ARCHITECTURE.md's interface, as kernel launches.

Forward: ``shrink`` (q, unless the GEMM computes it) + ``lora_fwd`` (y). Backward: ``gpass``
(dt, g^T t, db; one read of g) + ``dx`` (g W + dq A, masked) + ``dA`` (dq^T x~); the per-rank
and per-column reductions that remain (dB, dv, du: [G, N, Ra] at most) are small torch ops.
Nothing here syncs with the host, so the op can be captured in a CUDA graph.

``deterministic``: every sum in a fixed order. Atomics remain only where each element receives
one add per program, issued in program order (the row-reduction kernel with one row slice);
the atomics across row blocks (g-pass P and db, dx's fused dA) are turned off, and db comes
from a torch column sum. The split-K shrink and the split-N g-pass are deterministic in either
mode: each slice writes its partial q / dt, summed in slice order by the GEMM / a torch sum.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch

from lorakern import alloc
from lorakern.backends.interface import Grads, Needs, Operands, Problem, adapters_as_x, base_scale_grad, grads_as
from lorakern.triton import configs
from lorakern.triton.backward import dA_kernel, dx_kernel, gpass_kernel
from lorakern.triton.fused_gemm import lora_fwd_kernel
from lorakern.triton.grouping import SORT_MIN_ROWS
from lorakern.triton.shrink import shrink_kernel

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check(x: torch.Tensor) -> None:
    if x.dtype not in _DTYPES:
        raise TypeError(f"x: the triton backend takes float16, bfloat16 or float32, got {x.dtype}")
    if x.device.type != "cuda" and not configs.interpreting():
        raise ValueError(f"x: the triton backend runs on CUDA (or on CPU under TRITON_INTERPRET=1), got {x.device}")


def _cdiv(a: int, b: int) -> int:
    """ceil(a / b) in plain Python: triton.cdiv is a ConstexprFunction in recent triton, ~5 us a
    call on the host, and a launch computes several."""
    return -(-a // b)


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def _vec_strides(t: Optional[torch.Tensor]) -> tuple[int, int]:
    """(stride over adapters, stride over the last dim) of a [L] or [G, L] vector (0, 0 if None)."""
    if t is None:
        return 0, 0
    return (t.stride(0), t.stride(1)) if t.dim() == 2 else (0, t.stride(0))


@dataclass
class _Adapter:
    """The adapter arguments as kernels take them: pointers (a dummy for None), strides, flags."""
    A: torch.Tensor
    B: torch.Tensor
    banked: bool
    G: int
    Ra: int
    RP: int
    scaling: float
    ridx: Optional[torch.Tensor]
    u: Optional[torch.Tensor]
    v: Optional[torch.Tensor]
    sg: Optional[torch.Tensor]
    idx: Optional[torch.Tensor]
    perm: Optional[torch.Tensor]

    @classmethod
    def make(cls, pb: Problem, op: Operands):
        """From the op's problem; rows are visited in the batch's adapter order when there are
        enough of them for sorting to pay (SORT_MIN_ROWS)."""
        c = lambda t: None if t is None else t.contiguous()  # noqa: E731
        perm = c(op.row_order) if pb.banked and pb.M > SORT_MIN_ROWS else None
        return cls(A=op.lora_A, B=op.lora_B, banked=pb.banked, G=pb.G, Ra=pb.Ra,
                   RP=max(16, 1 << (pb.Ra - 1).bit_length()), scaling=pb.scaling, ridx=c(op.rank_idx),
                   u=op.rank_scale, v=op.out_scale, sg=c(op.scaling_g), idx=c(op.adapter_index), perm=perm)

    def ptrs(self, dummy: torch.Tensor) -> dict:
        d = lambda t: dummy if t is None else t  # noqa: E731
        return dict(RIDX=d(self.ridx), U=d(self.u), V=d(self.v), SG=d(self.sg), IDX=d(self.idx), PERM=d(self.perm))

    def A_strides(self):
        A = self.A
        return (A.stride(0), A.stride(1), A.stride(2)) if self.banked else (0, A.stride(0), A.stride(1))

    def B_strides(self):
        B = self.B
        return (B.stride(0), B.stride(1), B.stride(2)) if self.banked else (0, B.stride(0), B.stride(1))

    def flags(self) -> dict:
        return dict(HAS_RIDX=self.ridx is not None, HAS_U=self.u is not None, HAS_SG=self.sg is not None,
                    BANKED=self.banked, HAS_PERM=self.perm is not None)


@functools.lru_cache(maxsize=None)
def _tma_device(device: torch.device) -> bool:
    """Tensor descriptors: the interpreter, or a GPU with a copy engine for them (sm_90 on) and a
    triton that has them."""
    try:
        from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: F401
    except ImportError:
        return False
    return device.type != "cuda" or torch.cuda.get_device_capability(device)[0] >= 9


def _descriptors(*tiles: tuple[torch.Tensor, tuple[int, int]]) -> Optional[list]:
    """Tensor descriptors for (2-D tensor, (rows, cols) block) pairs, or None unless every tensor
    has a contiguous last dimension, a 16-byte aligned offset into its storage and row stride, and no
    empty dimension. Storages from torch's allocators start 16-byte aligned (256 and more on CUDA);
    triton's TensorDescriptor asserts the base address for one that does not."""
    if not _tma_device(tiles[0][0].device):
        return None
    for t, _ in tiles:
        esize = t.element_size()
        if t.stride(1) != 1 or (t.storage_offset() * esize) % 16 or (t.stride(0) * esize) % 16 or 0 in t.shape:
            return None
    from triton.tools.tensor_descriptor import TensorDescriptor
    return [TensorDescriptor(t, list(t.shape), [t.stride(0), 1], list(block)) for t, block in tiles]


def _launch_opts(cfg: dict, dtype: torch.dtype) -> dict:
    """Launch options; fp32 dots in full fp32 ("ieee": plain TF32 missed 5e-4 on the H100, and the
    launch-wide default_dot_input_precision option was not applied there), half types as tf32 (unused)."""
    return dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
                DOT_PREC="ieee" if dtype == torch.float32 else "tf32")


def _mixed(op: Operands) -> bool:
    """Adapters in their own dtype (fp32 beside a half-precision x: PEFT's default precision)."""
    return op.lora_A.dtype != op.x.dtype


def forward(pb: Problem, op: Operands) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, q) per ARCHITECTURE.md: y [M, N] in x's dtype, q fp32 [M, Ra].

    Two plans (``configs.forward_route``): the fused one (``shrink`` unless the GEMM computes q,
    then ``lora_fwd`` for y) and the fold-in one (``shrink``, then ``lora_fwd`` with K = 0 writes
    the adapter's part ``C = b + t (v*B)^T`` into y, then cuBLAS adds x W^T onto it: ``addmm_``,
    beta = 1). Adapters in fp32 beside a half-precision x take the fold-in plan with their
    products in fp32 (C rounded once to x's dtype), except with a base scale, where the fused
    GEMM rounds them to x's dtype first (``adapters_as_x``).
    """
    x = op.x
    _check(x)
    M, K, N, seed = pb.M, pb.K, pb.N, pb.seed
    p = pb.dropout_p
    route = configs.forward_route(M, N, K, pb.Ra, banked=pb.banked, dropout=p > 0, esize=x.element_size(),
                                  sms=_sm_count(x.device), mixed=_mixed(op), base_scale=op.base_scale is not None)
    if not route.fold:
        op = adapters_as_x(op)
    weight, bias, lora_A, lora_B, base_scale = op.weight, op.bias, op.lora_A, op.lora_B, op.base_scale
    ad = _Adapter.make(pb, op)
    y = alloc.empty((M, N), dtype=x.dtype, device=x.device)
    q = alloc.empty((M, ad.Ra), dtype=torch.float32, device=x.device)
    ptrs = ad.ptrs(x)
    sAg, sAr, sAk = ad.A_strides()
    sBg, sBn, sBr = ad.B_strides()
    cfg = route.fwd
    flags = ad.flags()
    split, qp = route.split, q
    if not route.fuse_q:
        sc = route.shrink
        if split > 1:  # one partial q per K slice, summed in slice order by the GEMM
            qp = alloc.empty((split, M, ad.Ra), dtype=torch.float32, device=x.device)
        shrink_kernel[(_cdiv(M, sc["BM"]), split)](
            x, lora_A, qp, ptrs["RIDX"], ptrs["IDX"], ptrs["PERM"],
            M, K, ad.Ra, ad.G, p, 1.0 / (1.0 - p), seed, route.k_per,
            x.stride(0), x.stride(1), sAg, sAr, sAk, M * ad.Ra, ad.Ra,
            BM=sc["BM"], BK=sc["BK"], RP=ad.RP, DROPOUT=p > 0, HAS_RIDX=flags["HAS_RIDX"],
            BANKED=ad.banked, HAS_PERM=flags["HAS_PERM"], **_launch_opts(sc, lora_A.dtype))
    sUg, sUr = _vec_strides(ad.u)
    sVg, sVn = _vec_strides(ad.v)
    descs = None
    if cfg["TMA"] and not ad.banked and not route.fold:
        descs = _descriptors((x, (cfg["BM"], cfg["BK"])), (weight, (cfg["BN"], cfg["BK"])))
    grid = (_cdiv(M, cfg["BM"]) * _cdiv(N, cfg["BN"]),)
    lora_fwd_kernel[grid](
        x, weight, *(descs or (x, weight)), bias if bias is not None else x, lora_A, lora_B, qp, q, y,
        ptrs["RIDX"], ptrs["U"], ptrs["V"], ptrs["SG"], ptrs["IDX"], ptrs["PERM"],
        base_scale if base_scale is not None else x,
        M, N, 0 if route.fold else K, ad.Ra, ad.G, ad.scaling, p, 1.0 / (1.0 - p), seed, split,
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), bias.stride(0) if bias is not None else 0,
        sAg, sAr, sAk, sBg, sBn, sBr, sUg, sUr, sVg, sVn, M * ad.Ra, ad.Ra, y.stride(0), y.stride(1),
        base_scale.stride(0) if base_scale is not None else 0,
        BM=cfg["BM"], BN=cfg["BN"], BK=cfg["BK"], RP=ad.RP, GROUP_M=cfg["GROUP_M"], FUSE_Q=route.fuse_q,
        TMA=descs is not None, DROPOUT=p > 0, HAS_BIAS=bias is not None,
        HAS_BS=base_scale is not None, HAS_V=ad.v is not None, **flags, **_launch_opts(cfg, lora_B.dtype))
    if route.fold:  # cuBLAS: y = x W^T + C, its epilogue reading C (beta = 1)
        y.addmm_(x, weight.T)
    return y, q


def _scatter_ranks(sel: torch.Tensor, like: torch.Tensor, ridx: Optional[torch.Tensor], dim: int) -> torch.Tensor:
    """``sel`` (the active ranks along ``dim``) placed in a zero tensor shaped like ``like``."""
    if ridx is None:
        return sel.to(like.dtype).reshape(like.shape).contiguous()
    full = torch.zeros(like.shape, dtype=like.dtype, device=like.device)
    return full.index_copy_(dim, ridx, sel.to(like.dtype).reshape(*like.shape[:dim], -1, *like.shape[dim + 1:]))


def _per_adapter(per_g: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A [G, L] per-adapter gradient for a [L] (shared: summed) or [G, L] parameter."""
    return per_g.sum(0) if like.dim() == 1 else per_g


def _dt_P_by_mm(g, q, ad: _Adapter, need_dt: bool, need_P: bool):
    """One adapter: dt = g (v*B) [M, Ra] and P = g^T t [1, N, Ra] as two skinny cuBLAS products
    (each reads g once at about full bandwidth), in g's dtype: the products round to it anyway,
    and the kernels and torch ops that take them compute in fp32 (no conversion launches)."""
    B = ad.B if ad.ridx is None else ad.B.index_select(1, ad.ridx)
    dt = P = None
    if need_dt:
        vB = B if ad.v is None else B * ad.v[:, None]
        dt = torch.mm(g, vB.to(g.dtype))
    if need_P:
        f = ad.u.float() if ad.u is not None else None
        if f is not None and ad.ridx is not None:
            f = f.index_select(0, ad.ridx)
        t = q * ad.scaling if f is None else q * (f * ad.scaling)
        P = torch.mm(g.t(), t.to(g.dtype)).unsqueeze(0)
    return dt, P


def _row_reduce(X, rowv, out, ad: _Adapter, ptrs: dict, flags: dict, p: float, seed: int,
                deterministic: bool) -> None:
    """``out[g] += (rowv * s * u / (1 - p))^T (X * keep)`` over each adapter's rows (dA_kernel):
    dA from (x, dt); P^T = t^T g from (g, q) with p = 0. ``out`` is fp32 [G, Ra, X.shape[1]]."""
    M, K = X.shape
    cfg = configs.dA(M, K, ad.Ra, _sm_count(X.device), X.element_size())
    if deterministic:
        cfg = {**cfg, "SPLIT_M": 1}
    rows_per = _cdiv(_cdiv(M, cfg["SPLIT_M"]), cfg["BM"]) * cfg["BM"]
    sUg, sUr = _vec_strides(ad.u)
    wide = ad.A.dtype != X.dtype  # fp32 adapters beside a half-precision X: the products in fp32
    dA_kernel[(_cdiv(K, cfg["BK"]), _cdiv(M, rows_per))](
        X, rowv, out, ptrs["RIDX"], ptrs["U"], ptrs["SG"], ptrs["IDX"], ptrs["PERM"],
        M, K, ad.Ra, ad.G, ad.scaling, p, seed, rows_per,
        X.stride(0), X.stride(1), sUg, sUr, rowv.stride(0),
        BM=cfg["BM"], BK=cfg["BK"], RP=ad.RP, DROPOUT=p > 0, WIDE=wide, **flags,
        **_launch_opts(cfg, ad.A.dtype))


def backward(pb: Problem, op: Operands, grad_y: torch.Tensor, q: torch.Tensor, needs: Needs) -> Grads:
    """Gradients per ARCHITECTURE.md; None where ``needs`` says so; each in its input's dtype.

    dt = g (v*B) and g^T t by two skinny torch products or the g-pass kernel; dx by the dx kernel
    (the fused plan) or, in the fold-in plan (``configs.backward_route``), the dx kernel with
    N = 0 writing the adapter's term ``(dq A) * keep / (1 - p)`` and cuBLAS adding g W onto it
    (``addmm_``, beta = 1); dA inside the dx kernel or by the row-reduction kernel. fp32 adapters
    beside a half-precision x: every adapter product in fp32, as forward (with a base scale:
    rounded to x's dtype as the fused forward, gradients returned in fp32).
    """
    x = op.x
    _check(x)
    g = grad_y
    M, K, N, seed = pb.M, pb.K, pb.N, pb.seed
    dev = x.device
    p = pb.dropout_p
    n_x, n_w, n_b, n_A, n_B, n_u, n_v, n_c = (needs.x, needs.weight, needs.bias, needs.lora_A, needs.lora_B,
                                              needs.rank_scale, needs.out_scale, needs.base_scale)
    need_dt, need_P = n_x or n_A or n_u, n_B or n_v
    deterministic = pb.deterministic
    route = configs.backward_route(M, N, K, pb.Ra, banked=pb.banked, dropout=p > 0, esize=x.element_size(),
                                   sms=_sm_count(dev), mixed=_mixed(op),
                                   base_scale=op.base_scale is not None, deterministic=deterministic,
                                   need_x=n_x, need_dt=need_dt, need_P=need_P, need_A=n_A)
    given = op
    if op.base_scale is not None:
        op = adapters_as_x(op)
    weight, lora_A, lora_B, base_scale = op.weight, op.lora_A, op.lora_B, op.base_scale
    rank_scale, out_scale = op.rank_scale, op.out_scale
    ad = _Adapter.make(pb, op)
    ptrs = ad.ptrs(x)
    flags = ad.flags()
    sAg, sAr, sAk = ad.A_strides()
    sBg, sBn, sBr = ad.B_strides()
    sUg, sUr = _vec_strides(ad.u)
    sVg, sVn = _vec_strides(ad.v)
    f32 = torch.float32
    db_apart = n_b and deterministic
    dt = P = db = None
    if route.cublas and (need_dt or need_P):
        dt, P = _dt_P_by_mm(g, q, ad, need_dt, need_P)
        db = g.sum(0) if n_b else None  # fp32 accumulation, rounded once
    elif route.gpass_split:
        cfg, split = route.gpass, route.gpass_split
        if need_dt:  # one partial dt per N slice, summed below in slice order (no atomics)
            dt = alloc.empty((split, M, ad.Ra), dtype=f32, device=dev)
        P = torch.zeros((ad.G, N, ad.Ra), dtype=f32, device=dev) if need_P and not route.p_apart else None
        db = torch.zeros(N, dtype=f32, device=dev) if n_b and not db_apart else None
        gpass_kernel[(_cdiv(M, cfg["BM"]), split)](
            g, lora_B, ptrs["V"], q, dt if dt is not None else q, P if P is not None else q,
            db if db is not None else q, ptrs["RIDX"], ptrs["U"], ptrs["SG"], ptrs["IDX"], ptrs["PERM"],
            M, N, ad.Ra, ad.G, ad.scaling, route.n_per,
            g.stride(0), g.stride(1), sBg, sBn, sBr, sUg, sUr, sVg, sVn, q.stride(0), M * ad.Ra, ad.Ra,
            BM=cfg["BM"], BN=cfg["BN"], RP=ad.RP, NEED_DT=need_dt, NEED_P=P is not None, NEED_DB=db is not None,
            HAS_V=ad.v is not None, **flags, **_launch_opts(cfg, lora_B.dtype))
        if need_dt:
            dt = dt[0] if split == 1 else dt.sum(0)
    if n_b and db is None:
        db = g.sum(0)
    if route.p_apart:
        PT = torch.zeros((ad.G, ad.Ra, N), dtype=f32, device=dev)
        _row_reduce(g, q, PT, ad, ptrs, flags, 0.0, 0, deterministic)
        P = PT.transpose(1, 2)

    dx = None
    da_buf = torch.zeros((ad.G, ad.Ra, K), dtype=f32, device=dev) if n_A else None
    if n_x:
        cfg = route.dx
        dx = alloc.empty((M, K), dtype=x.dtype, device=dev)
        descs = None
        if cfg["TMA"] and not ad.banked and not route.fold:
            descs = _descriptors((g, (cfg["BM"], cfg["BN"])), (weight, (cfg["BN"], cfg["BK"])))
        grid = (_cdiv(M, cfg["BM"]) * _cdiv(K, cfg["BK"]),)
        dx_kernel[grid](
            g, weight, *(descs or (g, weight)), lora_A, dt, dx, x, da_buf if route.fuse_da else dt,
            ptrs["RIDX"], ptrs["U"], ptrs["SG"],
            ptrs["IDX"], ptrs["PERM"], base_scale if base_scale is not None else g,
            M, 0 if route.fold else N, K, ad.Ra, ad.G, ad.scaling, p, seed,
            g.stride(0), g.stride(1), weight.stride(0), weight.stride(1), sAg, sAr, sAk, sUg, sUr,
            dt.stride(0), dx.stride(0), dx.stride(1), x.stride(0), x.stride(1),
            base_scale.stride(0) if base_scale is not None else 0,
            BM=cfg["BM"], BK=cfg["BK"], BN=cfg["BN"], RP=ad.RP, GROUP_M=cfg["GROUP_M"], FUSE_DA=route.fuse_da,
            TMA=descs is not None, HAS_BS=base_scale is not None,
            DROPOUT=p > 0, **flags, **_launch_opts(cfg, lora_A.dtype))
        if route.fold:  # cuBLAS: dx = g W + the adapter's term, its epilogue reading the term (beta = 1)
            dx.addmm_(g, weight)

    dA = None
    if n_A:
        if not route.fuse_da:
            _row_reduce(x, dt, da_buf, ad, ptrs, flags, p, seed, deterministic)
        dA = _scatter_ranks(da_buf, lora_A, ad.ridx, lora_A.dim() - 2)

    dB = dv = None
    if need_P:
        Bsel = lora_B if ad.ridx is None else lora_B.index_select(-1, ad.ridx)
        Bsel = Bsel.reshape(ad.G, N, ad.Ra)
        v = None if out_scale is None else out_scale.float().reshape(-1, N)[:, :, None]
        if n_B:
            dB = _scatter_ranks(P if v is None else P * v, lora_B, ad.ridx, lora_B.dim() - 1)
        if n_v:
            dv = _per_adapter((P.float() * Bsel.float()).sum(-1), out_scale).to(out_scale.dtype)

    du = None
    if n_u:
        contrib = dt * q
        if ad.banked:
            a = ad.idx
            a = torch.where((a >= 0) & (a < ad.G), a, 0)  # rows without an adapter have contrib 0
            rows_of = torch.zeros((ad.G, M), dtype=f32, device=dev).scatter_(0, a[None], 1.0)
            per_g = rows_of @ contrib  # a GEMM, not index_add_'s atomics: a fixed summation order
            per_g = per_g * (ad.sg[:, None] if ad.sg is not None else ad.scaling)
        else:
            per_g = contrib.sum(0, keepdim=True) * ad.scaling
        per_g = _per_adapter(per_g, rank_scale)
        du = _scatter_ranks(per_g, rank_scale, ad.ridx, rank_scale.dim() - 1)

    dW = torch.mm((g if base_scale is None else g * base_scale).t(), x) if n_w else None
    db = db.to(x.dtype) if db is not None else None
    dc = base_scale_grad(g, x, weight).to(base_scale.dtype) if n_c else None
    return grads_as(Grads(dx, dW, db, dA, dB, du, dv, dc), given)
