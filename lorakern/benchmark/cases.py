"""What ``lorakern bench`` measures: shapes, variants, cases, and the sets of docs/contract.md section 6.

>>> import argparse, torch
>>> args = argparse.Namespace(quick=True, M=(16,), KN=((64, 64),), r=(4,), shapes=None, modes=("fwd",),
...                           variants=("plain",), dropout=(0.0,), part=None)
>>> [(c.mode, c.shape, c.variant.label) for c in select_cases(args, torch.device("cpu"))]
[('fwd', Shape(M=16, K=64, N=64, r=4), 'p=0')]
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch

__all__ = ["Shape", "Variant", "Case", "BASE_VARIANT", "MODES", "VARIANTS", "ADAPTERS", "group_key",
           "select_cases"]

MODES = ("fwd", "bwd", "fwdbwd")
VARIANTS = ("plain", "masked", "adapters")
ADAPTERS = 8  # bank size of the multi-adapter variant

# docs/contract.md section 6
FULL_M = (1, 16, 128, 2048, 8192)
FULL_KN = ((4096, 4096), (4096, 1024), (4096, 14336), (14336, 4096))
FULL_R = (8, 16, 64)
QUICK_M = (1, 16, 2048, 8192)
QUICK_KN = ((4096, 4096), (4096, 14336))
QUICK_VARIANT_M = (16, 2048)
# CPU: the same grid scaled down 16x in K and N, so that `--device cpu --quick` checks the path
CPU_QUICK_M = (1, 16, 128, 512)
CPU_QUICK_KN = ((256, 256), (256, 896))
CPU_QUICK_VARIANT_M = (16, 128)


@dataclass(frozen=True, order=True)
class Shape:
    """Tokens M, in-features K, out-features N, rank r (all ints >= 1)."""

    M: int
    K: int
    N: int
    r: int


@dataclass(frozen=True, order=True)
class Variant:
    """What the adapter does beyond plain LoRA: dropout, half of its ranks masked, a bank of adapters."""

    dropout: float = 0.0
    masked: bool = False
    adapters: int = 0  # 0: one adapter; G: a bank of G adapters chosen per row by adapter_index

    @property
    def label(self) -> str:
        """``"p=0.1 masked 8 adapters"`` and the like."""
        parts = [f"p={self.dropout:g}"]
        if self.masked:
            parts.append("masked")
        if self.adapters:
            parts.append(f"{self.adapters} adapters")
        return " ".join(parts)


BASE_VARIANT = Variant()


@dataclass(frozen=True, order=True)
class Case:
    """One measurement: a mode (one of MODES) of a shape with a variant (the base ignores the variant)."""

    mode: str
    shape: Shape
    variant: Variant


def group_key(case: Case) -> tuple:
    """Cases with the same key are prepared and timed together, beside one base measurement."""
    return (case.shape, case.mode)


def _grids(args: argparse.Namespace, cpu: bool) -> tuple[list[Shape], list[Shape]]:
    """(plain shapes, shapes of the masked and adapter variants) that the flags ask for."""
    if args.quick:
        Ms, KNs, rs = (CPU_QUICK_M, CPU_QUICK_KN, (16,)) if cpu else (QUICK_M, QUICK_KN, (16,))
        variant_M, variant_KN = (CPU_QUICK_VARIANT_M, CPU_QUICK_KN[:1]) if cpu else (QUICK_VARIANT_M, QUICK_KN[:1])
    else:
        Ms, KNs, rs = FULL_M, FULL_KN, FULL_R
        variant_M, variant_KN = FULL_M, FULL_KN
    Ms, KNs, rs = args.M or Ms, args.KN or KNs, args.r or rs
    if args.M or args.KN:
        variant_M, variant_KN = Ms, KNs
    if args.shapes:
        return list(args.shapes), list(args.shapes)
    return ([Shape(M, K, N, r) for M in Ms for K, N in KNs for r in rs],
            [Shape(M, K, N, r) for M in variant_M for K, N in variant_KN for r in rs])


def select_cases(args: argparse.Namespace, device: torch.device) -> list[Case]:
    """The cases the flags of ``lorakern bench`` ask for, sorted: the quick set, the full set of
    docs/contract.md section 6, or the overrides (``M``, ``KN``, ``r``, ``shapes``, ``modes``,
    ``variants``, ``dropout``, ``part``). The masked variant brings its plain cases at half the
    rank (what a masked half of the ranks should cost)."""
    plain, extra = _grids(args, device.type != "cuda")
    extras = []
    half = []
    if "masked" in args.variants:
        extras.append(Variant(masked=True))
        half = [Shape(sh.M, sh.K, sh.N, sh.r // 2) for sh in extra if sh.r >= 2]
    if "adapters" in args.variants:
        extras.append(Variant(adapters=ADAPTERS))
    cases = []
    for mode in args.modes or MODES:
        if "plain" in args.variants:
            cases += [Case(mode, sh, Variant(dropout=p)) for sh in plain for p in args.dropout]
        cases += [Case(mode, sh, v) for sh in extra for v in extras]
        cases += [Case(mode, sh, Variant()) for sh in half]
    cases = sorted(set(cases))
    if args.part:
        k, n = args.part
        mine = set(sorted({group_key(c) for c in cases})[k - 1::n])
        cases = [c for c in cases if group_key(c) in mine]
    return cases
