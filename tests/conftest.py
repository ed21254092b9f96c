"""Shared test fixtures: the (backend, device, dtype) cases each tier runs.

Tiers (markers): default = the torch backend on CPU; ``interpret`` = the triton backend on CPU
under TRITON_INTERPRET=1 (fp32, fp16); ``gpu`` = every backend on CUDA in bf16, fp16 and fp32.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
import torch

from lorakern.ops import backend_status

HAS_CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# relative-error bounds of DESIGN.md section 5
TOL = {
    ("torch", torch.float64): 1e-10,
    ("torch", torch.float32): 1e-5,
    ("tf32", torch.float32): 5e-4,
    ("any", torch.float16): 1e-2,
    ("any", torch.bfloat16): 1e-2,
}


@dataclass(frozen=True)
class Case:
    backend: str
    device: str
    dtype: torch.dtype

    @property
    def tol(self) -> float:
        if self.dtype in (torch.float16, torch.bfloat16):
            return TOL[("any", self.dtype)]
        if self.backend == "torch" and self.device == "cpu":
            return TOL[("torch", self.dtype)]
        return TOL[("tf32", torch.float32)] if self.dtype == torch.float32 else 1e-10

    def __str__(self) -> str:
        return f"{self.backend}-{self.device}-{str(self.dtype)[6:]}"


def _cases():
    out = [pytest.param(Case("torch", "cpu", torch.float32), id="torch-cpu-fp32"),
           pytest.param(Case("torch", "cpu", torch.float64), id="torch-cpu-fp64")]
    for dt in (torch.float32, torch.float16):
        out.append(pytest.param(Case("triton", "cpu", dt), id=f"triton-interp-{str(dt)[6:]}",
                                marks=pytest.mark.interpret))
    for be in ("torch", "triton", "cuda"):
        for dt in (torch.bfloat16, torch.float16, torch.float32):
            out.append(pytest.param(Case(be, "cuda", dt), id=f"{be}-cuda-{str(dt)[6:]}", marks=pytest.mark.gpu))
    return out


CASES = _cases()


@pytest.fixture(params=CASES)
def case(request) -> Case:
    c: Case = request.param
    if c.device == "cuda" and not HAS_CUDA:
        pytest.skip("no CUDA device")
    if c.backend == "triton" and c.device == "cpu" and not INTERPRET:
        pytest.skip("triton on CPU needs TRITON_INTERPRET=1 (the interpret tier)")
    ok, why = backend_status(c.backend)
    if not ok:
        if c.device == "cuda":
            pytest.fail(f"backend {c.backend} {why}")  # on a GPU every backend must run
        pytest.skip(f"backend {c.backend} {why}")
    return c


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(pytest.mark.skip(reason="no CUDA device"))
        if "interpret" in item.keywords and not INTERPRET:
            item.add_marker(pytest.mark.skip(reason="needs TRITON_INTERPRET=1"))
