"""Shared test fixtures: the (backend, device, dtype) cases each tier runs, and the tiny Llama.

Tiers (markers): default = the torch and cpu backends on CPU; ``interpret`` = the triton backend on CPU
under TRITON_INTERPRET=1 (fp32, fp16); ``gpu`` = every backend on CUDA in bf16, fp16 and fp32.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
import torch

from lorakern.ops import backend_status
from lorakern.testing import tolerance

HAS_CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# the tiny Llama the PEFT and methods tests build from a config (no downloads)
TINY_LLAMA = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2)
# the narrower one of the PEFT-integration tests: tiny_llama(seed, **PEFT_LLAMA)
PEFT_LLAMA = dict(vocab_size=256, hidden_size=48, intermediate_size=80, max_position_embeddings=64)


def tiny_llama(seed: int = 0, **config):
    """A ``LlamaForCausalLM`` of ``TINY_LLAMA`` updated by ``config``, fp32 on the CPU, its weights
    drawn after ``torch.manual_seed(seed)``. Needs transformers (the calling test module
    importorskips it).

    >>> tiny_llama(hidden_size=48).config.hidden_size  # doctest: +SKIP
    48
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**{**TINY_LLAMA, **config}))


@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread for a module of tiny models (faster, far faster on a shared, busy
    machine): ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@dataclass(frozen=True)
class Case:
    backend: str
    device: str
    dtype: torch.dtype

    @property
    def tol(self) -> float:
        """The forward's bound (docs/contract.md section 5); gradients get ``GRAD_FACTOR`` times it."""
        return tolerance(self.backend, self.device, self.dtype)

    def __str__(self) -> str:
        return f"{self.backend}-{self.device}-{str(self.dtype)[6:]}"


def _cases():
    out = [pytest.param(Case("torch", "cpu", torch.float32), id="torch-cpu-fp32"),
           pytest.param(Case("torch", "cpu", torch.float64), id="torch-cpu-fp64")]
    out += [pytest.param(Case("cpu", "cpu", dt), id=f"cpu-cpu-{str(dt)[6:]}") for dt in (torch.float32, torch.bfloat16)]
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
        if c.device == "cuda" or (c.backend == "cpu" and not cpu_ext_cannot_build(why)):
            pytest.fail(f"backend {c.backend} {why}")  # on a GPU every backend must run
        pytest.skip(f"backend {c.backend} {why}")
    return c


# the reasons the CPU extension may be missing where the suite runs; any other (a build that
# failed, a library that does not load) fails the tests instead of skipping them
_CPU_EXT_ABSENT = ("no C++ compiler", "ninja not found", "no AVX2 or AVX-512")


def cpu_ext_cannot_build(why: str) -> bool:
    """Whether ``why`` (an unavailable cpu backend's reason) says this machine cannot have it."""
    return any(r in why for r in _CPU_EXT_ABSENT)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(pytest.mark.skip(reason="no CUDA device"))
        if "interpret" in item.keywords and not INTERPRET:
            item.add_marker(pytest.mark.skip(reason="needs TRITON_INTERPRET=1"))
