"""Launch plans of the triton kernels: block sizes, splits, fused or not, TMA. One function, JSON tables.

:func:`plan` is the one place a kernel's launch configuration comes from. It reads
``lorakern/launchplans.json`` (beside ``autotable.json``; both written by ``bench/make_autotable.py``)::

    {"<table>": {"<kind>": [row, ...], ...}, ...}

Tables: ``"interpret"`` (under ``TRITON_INTERPRET=1``: 16-wide blocks, so that tests cross block
boundaries on tiny shapes), ``"default"`` (tuned on an H100), and one per GPU name
(``torch.cuda.get_device_name``) holding the kinds measured there (other kinds: ``"default"``).
Kinds: ``fwd`` (the forward GEMM; ``FUSE_Q``: q computed inside it), ``shrink`` (q in its own
pass, ``SPLIT_K`` column slices), ``gpass`` (the pass over g; ``SPLIT_N``, ``P_APART``,
``CUBLAS``), ``dx`` (the dx GEMM; ``FUSE_DA``: dA in its epilogue), ``dA``; ``TMA``: x / g and W
tiles through tensor descriptors (ARCHITECTURE.md), off until timed on a GPU. ``FOLD`` (fwd, dx):
the fold-in plan (``lorakern/triton/folded.py``): the base GEMM by cuBLAS (``addmm_`` onto the
adapter's part, beta = 1) instead of the Triton GEMM; :func:`forward_route` and
:func:`backward_route` turn the entries into what the backend launches.

A row: ``{"M_max": 64, "BM": 16, ..., "dropout": {"FUSE_Q": false}}``: the first row with
M <= M_max (or without M_max) is used, its ``"dropout"`` entries replacing others for calls with
dropout. Then, in order: a split count the row leaves out is derived from the SM count (about two
programs per SM); fp32 inputs' inner (reduction) block is halved, at least 16, so the
shared-memory stages fit (227 KB on an H100); entries forced by :func:`planning` replace what is
there; ``FUSE_Q`` is off with per-row adapters (the kernel cannot).

>>> plan("fwd", M=8192, N=4096, K=4096, dropout=True, esize=2, table="default")["FUSE_Q"]
False
>>> with planning(fwd={"FUSE_Q": True, "BK": 32}):
...     sorted(plan("fwd", M=8192, N=4096, K=4096, dropout=True, table="default").items())[:3]
[('BK', 32), ('BM', 128), ('BN', 256)]
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, NamedTuple, Optional

import torch

__all__ = ["KINDS", "TABLES", "interpreting", "plan", "planning", "table_name", "load",
           "fwd", "shrink", "gpass", "dx", "dA", "ForwardRoute", "BackwardRoute", "forward_route", "backward_route"]

TABLES = Path(__file__).resolve().parent.parent / "launchplans.json"
KINDS = {"fwd": "BK", "shrink": "BK", "gpass": "BN", "dx": "BN", "dA": "BM"}  # kind: its inner block
# kind: (the split entry, the dimension split, its least slice (an entry or a count), the grid's other
# dimension, that dimension's block)
_SPLITS = {"shrink": ("SPLIT_K", "K", "BK", "M", "BM"), "gpass": ("SPLIT_N", "N", 512, "M", "BM"),
           "dA": ("SPLIT_M", "M", 256, "K", "BK")}


def interpreting() -> bool:
    """Whether triton's kernels run in the interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


@dataclass(frozen=True)
class _Planning:
    table: Optional[str] = None
    sms: Optional[int] = None
    forced: tuple = field(default=())  # ((kind, ((entry, value), ...)), ...)


_STATE: contextvars.ContextVar[_Planning] = contextvars.ContextVar("lorakern_triton_planning", default=_Planning())


@contextlib.contextmanager
def planning(*, table: Optional[str] = None, sms: Optional[int] = None, **forced: dict) -> Iterator[None]:
    """Within the block, plans come from ``table`` (a table of launchplans.json), for a GPU with
    ``sms`` SMs, with the entries of ``forced[kind]`` replacing the table's; a nested block adds
    to the outer one. Tests force paths with it, ``bench/triton_tune.py`` times candidates::

        with planning(fwd={"FUSE_Q": False}, dx={"FUSE_DA": False}):
            y = lorakern.lora_linear(..., backend="triton")

    Raises:
        ValueError: an unknown kind.
    """
    unknown = set(forced) - set(KINDS)
    if unknown:
        raise ValueError(f"planning: unknown kinds {sorted(unknown)}; expected some of {sorted(KINDS)}")
    outer = _STATE.get()
    merged = {k: dict(v) for k, v in outer.forced}
    for kind, entries in forced.items():
        merged[kind] = {**merged.get(kind, {}), **entries}
    token = _STATE.set(_Planning(table or outer.table, sms or outer.sms,
                                 tuple((k, tuple(sorted(v.items()))) for k, v in sorted(merged.items()))))
    try:
        yield
    finally:
        _STATE.reset(token)


@functools.lru_cache(maxsize=None)
def load() -> dict:
    """The tables of launchplans.json, read once."""
    return json.loads(TABLES.read_text())


@functools.lru_cache(maxsize=None)
def _gpu_name(index: Optional[int]) -> Optional[str]:
    return torch.cuda.get_device_name(index) if torch.cuda.is_available() else None


def table_name(device: Optional[torch.device] = None) -> str:
    """The table :func:`plan` reads: ``planning``'s, else ``"interpret"`` when interpreting, else
    the GPU's own where launchplans.json has one (``device``, or the current CUDA device), else
    ``"default"``."""
    forced = _STATE.get().table
    if forced:
        return forced
    if interpreting():
        return "interpret"
    name = _gpu_name(device.index if device is not None and device.type == "cuda" else None)
    return name if name in load() else "default"


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@functools.lru_cache(maxsize=4096)
def _plan(kind: str, table: str, dims: tuple, dropout: bool, esize: int, sms: int, forced: tuple) -> dict:
    tables = load()
    rows = tables[table].get(kind) or tables["default"][kind]
    M = dims[0]
    row = next(r for r in rows if M <= r.get("M_max", M))
    cfg = {k: v for k, v in row.items() if k not in ("M_max", "dropout")}
    if dropout:
        cfg.update(row.get("dropout", {}))
    if kind in _SPLITS and _SPLITS[kind][0] not in cfg:
        entry, dim, least, other, block = _SPLITS[kind]
        size = dict(zip("MNK", dims))
        slices = _cdiv(size[dim], cfg[least] if isinstance(least, str) else least)
        cfg[entry] = max(1, min(slices, _cdiv(2 * sms, _cdiv(size[other], cfg[block]))))
    inner = KINDS[kind]
    if esize == 4:
        cfg[inner] = max(16, cfg[inner] // 2)
    cfg.update(dict(dict(forced).get(kind, ())))
    return cfg


def plan(kind: str, *, M: int, N: int = 1, K: int = 1, Ra: int = 1, banked: bool = False, dropout: bool = False,
         esize: int = 2, sms: int = 1, device: Optional[torch.device] = None, table: Optional[str] = None) -> dict:
    """The launch plan of kernel ``kind`` (one of KINDS) for a call of M rows, K in-features, N
    out-features, Ra active ranks; ``banked``: per-row adapters; ``dropout``: p > 0; ``esize``:
    bytes per element of x (4: fp32); ``sms``: the GPU's SM count (``planning`` may replace it);
    ``device``: whose table (default: the current CUDA device's); ``table``: that table instead.

    Returns a new dict: block sizes (BM, BN, BK), GROUP_M, num_warps, num_stages and the kind's
    flags and split count.

    Raises:
        KeyError: an unknown kind or table.
    """
    state = _STATE.get()
    cfg = dict(_plan(kind, table or table_name(device), (M, N, K), bool(dropout), esize, state.sms or sms,
                     state.forced))
    if kind == "fwd" and banked:
        cfg["FUSE_Q"] = False
    return cfg


# The call signatures lorakern/triton/backend.py uses, each one plan() call.
def fwd(M: int, N: int, K: int, Ra: int, banked: bool, dropout: bool, esize: int) -> dict:
    """``plan("fwd", ...)``: the forward GEMM (FUSE_Q: q inside it; never with per-row adapters)."""
    return plan("fwd", M=M, N=N, K=K, Ra=Ra, banked=banked, dropout=dropout, esize=esize)


def shrink(M: int, K: int, Ra: int, sms: int, esize: int) -> dict:
    """``plan("shrink", ...)``: the shrink pass; SPLIT_K column slices (partial q each, summed by the GEMM)."""
    return plan("shrink", M=M, K=K, Ra=Ra, sms=sms, esize=esize)


def gpass(M: int, N: int, Ra: int, sms: int, esize: int) -> dict:
    """``plan("gpass", ...)``: the pass over g; SPLIT_N column slices. P_APART: g^T t by the
    row-reduction kernel instead of atomics here. CUBLAS (one adapter only): dt and g^T t as two
    skinny torch products (measured on an H100: the g-pass's dt part ran ~200 us at M = 8192)."""
    return plan("gpass", M=M, N=N, Ra=Ra, sms=sms, esize=esize)


def dx(M: int, N: int, K: int, Ra: int, dropout: bool, esize: int) -> dict:
    """``plan("dx", ...)``: the dx GEMM; FUSE_DA: dA in its epilogue too (one keep-mask generation for both)."""
    return plan("dx", M=M, N=N, K=K, Ra=Ra, dropout=dropout, esize=esize)


def dA(M: int, K: int, Ra: int, sms: int, esize: int) -> dict:
    """``plan("dA", ...)``: dA = dq^T x~; SPLIT_M row slices."""
    return plan("dA", M=M, K=K, Ra=Ra, sms=sms, esize=esize)


class ForwardRoute(NamedTuple):
    """What the triton backend's forward launches for one call (:func:`forward_route`)."""
    fold: bool          # fold-in plan: shrink, the adapter's part C by the forward kernel with K = 0, cuBLAS addmm_
    fuse_q: bool        # q inside the forward GEMM (no shrink launch)
    split: int          # the shrink's K slices (0: no shrink)
    k_per: int          # columns per slice
    fwd: dict           # plan("fwd")
    shrink: Optional[dict]  # plan("shrink"), None without a shrink


class BackwardRoute(NamedTuple):
    """What the triton backend's backward launches for one call (:func:`backward_route`)."""
    cublas: bool        # dt and g^T t as two skinny torch products (else the g-pass kernel)
    p_apart: bool       # g^T t by the row-reduction kernel
    gpass_split: int    # the g-pass's N slices (0: no g-pass launch)
    n_per: int          # columns per slice
    fold: bool          # dx: the adapter's term by the dx kernel with N = 0, then cuBLAS addmm_ of g W onto it
    fuse_da: bool       # dA inside the dx kernel (else the row-reduction kernel, where dA is needed)
    gpass: dict         # plan("gpass") (deterministic: P_APART)
    dx: Optional[dict]  # plan("dx"), None without dx


def _slices(size: int, split: int, block: int) -> tuple[int, int]:
    """(slices, size per slice) when ``size`` is cut into ``split`` pieces of whole ``block``s."""
    per = _cdiv(_cdiv(size, split), block) * block
    return _cdiv(size, per), per


def forward_route(M: int, N: int, K: int, Ra: int, *, banked: bool, dropout: bool, esize: int, sms: int,
                  mixed: bool, base_scale: bool) -> ForwardRoute:
    """The triton forward's launches: the fold-in plan where ``plan("fwd")`` says FOLD, and always
    for ``mixed`` (adapters in fp32 beside a half-precision x: their products in fp32, as PEFT),
    never with a base scale (cuBLAS's beta = 1 cannot scale the product per column: the fused GEMM
    does). ``esize``: bytes per element of x.

    >>> forward_route(8192, 4096, 4096, 16, banked=False, dropout=True, esize=2, sms=132, mixed=False,
    ...               base_scale=False).fold
    True
    """
    cfg = fwd(M, N, K, Ra, banked, dropout, esize)
    fold = not base_scale and (mixed or bool(cfg.get("FOLD", False)))
    fuse_q = not fold and cfg["FUSE_Q"]
    if fuse_q:
        return ForwardRoute(fold, True, 0, K, cfg, None)
    sc = shrink(M, K, Ra, sms, esize)
    split, k_per = _slices(K, sc["SPLIT_K"], sc["BK"])
    return ForwardRoute(fold, False, split, k_per, cfg, sc)


def backward_route(M: int, N: int, K: int, Ra: int, *, banked: bool, dropout: bool, esize: int, sms: int,
                   mixed: bool, base_scale: bool, deterministic: bool, need_x: bool, need_dt: bool,
                   need_P: bool, need_A: bool) -> BackwardRoute:
    """The triton backward's launches for the gradients asked for (``need_dt``: dx, dA or du need
    dt = g (v B); ``need_P``: dB or dv need g^T t). dt and g^T t by cuBLAS where ``plan("gpass")``
    says CUBLAS, one adapter, and the products in x's dtype (fp32 adapters with a base scale are
    rounded to it; without one they take the g-pass kernel, which widens g in registers); the dx
    fold-in plan as :func:`forward_route`'s;
    ``deterministic``: no atomics across programs (g^T t and dA by the one-slice row reduction).

    >>> backward_route(8192, 4096, 4096, 16, banked=False, dropout=True, esize=2, sms=132, mixed=False,
    ...                base_scale=False, deterministic=False, need_x=True, need_dt=True, need_P=True,
    ...                need_A=True)[:6]
    (True, False, 0, 4096, True, True)
    """
    gcfg = gpass(M, N, Ra, sms, esize)
    if deterministic:
        gcfg = {**gcfg, "P_APART": True}
    wide = mixed and not base_scale  # fp32 adapters' products in fp32: torch products would need g in fp32
    cublas = gcfg["CUBLAS"] and not banked and not wide
    p_apart = need_P and gcfg["P_APART"] and not cublas
    split, n_per = 0, N
    if not cublas and (need_dt or (need_P and not p_apart)):
        split, n_per = _slices(N, gcfg["SPLIT_N"], gcfg["BN"])
    dcfg = dx(M, N, K, Ra, dropout, esize) if need_x else None
    fold = need_x and not base_scale and (mixed or bool(dcfg.get("FOLD", False)))
    fuse_da = need_x and need_A and dcfg["FUSE_DA"] and not deterministic
    return BackwardRoute(cublas, p_apart, split, n_per, fold, fuse_da, gcfg, dcfg)
