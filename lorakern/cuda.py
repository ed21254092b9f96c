"""The ``cuda`` backend: the csrc extension (CUDA C++ kernels + cuBLAS through ATen).

The library registers ``torch.ops.lorakern_cuda.{forward, backward, dropout_keep}``. It is
loaded from the prebuilt ``lorakern/_lorakern_cuda*.so`` (``LORAKERN_BUILD_CUDA=1 pip install
.``) when present, else built on first use with ninja (``torch.utils.cpp_extension.load``, in a
cached build folder that ninja rebuilds when a source changes).

>>> from lorakern import cuda
>>> cuda.available()              # doctest: +SKIP
(True, '')
>>> python -m lorakern.extension build cuda  # compile and link here (no GPU needed); prints the path
"""
from __future__ import annotations

import functools
import glob
import importlib.util
import os
import shutil
import sys
from pathlib import Path
from typing import Optional

import torch

from lorakern import extension
from lorakern.backends.interface import Grads, Needs, Operands, Problem

__all__ = ["available", "runs_on", "build", "forward", "backward", "dropout_keep"]

_ROOT = Path(__file__).resolve().parent.parent


def _cuda_home() -> Optional[str]:
    """The CUDA toolkit to build with: CUDA_HOME / CUDA_PATH, else torch's guess, /usr/local/cuda or
    the toolkit of the real nvcc on PATH, the first holding both bin/nvcc and include/cuda_runtime.h
    (a wrapper script at /usr/local/bin/nvcc makes torch guess /usr/local, which has no headers)."""
    cpp_extension = extension.cpp_extension()
    nvcc = shutil.which("nvcc")
    real = os.path.dirname(os.path.dirname(os.path.realpath(nvcc))) if nvcc else None
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), cpp_extension.CUDA_HOME,
                 "/usr/local/cuda", real):
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")) and \
                os.path.exists(os.path.join(home, "include", "cuda_runtime.h")):
            return home
    return None


def _nvcc() -> Optional[str]:
    home = _cuda_home()
    return os.path.join(home, "bin", "nvcc") if home else None


def _prebuilt() -> Optional[str]:
    spec = importlib.util.find_spec("lorakern")
    for base in spec.submodule_search_locations or []:
        hits = glob.glob(os.path.join(base, "_lorakern_cuda*.so"))
        if hits:
            return hits[0]
    return None


def _jit_archs(lb) -> str:
    """The visible GPU's architecture when there is one (fast builds), else LORAKERN_CUDA_ARCHS."""
    if "LORAKERN_CUDA_ARCHS" not in os.environ and torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        return f"{major}.{minor}"
    return lb.archs()


def build(verbose: bool = False) -> str:
    """Compile and link the extension with ninja (no GPU needed) and return the library's path."""
    cpp_extension = extension.cpp_extension()
    lb = extension.build_module()
    if torch.version.cuda is None:
        raise RuntimeError("torch is a CPU-only build")
    home = _cuda_home()
    if home is None:
        raise RuntimeError("no CUDA toolkit with nvcc and headers found (set CUDA_HOME)")
    cpp_extension.CUDA_HOME = home  # torch's builders read this module global
    arch = _jit_archs(lb)
    os.environ["TORCH_CUDA_ARCH_LIST"] = arch
    inputs = [f for d in {os.path.dirname(s) for s in lb.sources()} for f in glob.glob(os.path.join(d, "*.*"))]
    tag = f"lorakern_cuda_t{torch.__version__.split('+')[0].replace('.', '_')}_cu{torch.version.cuda.replace('.', '')}" \
          f"_sm{arch.replace('.', '').replace(';', '_').replace('+PTX', 'p')}_{extension.source_tag(inputs)}"
    folder = cpp_extension._get_build_directory(tag, verbose)
    cf = lb.cflags()
    library = os.path.join(folder, f"{tag}.so")
    if not os.path.exists(library):
        print("lorakern: building the CUDA extension once (about 2 minutes)...", file=sys.stderr, flush=True)
    try:
        path = cpp_extension.load(name=tag, sources=lb.sources(), extra_include_paths=lb.include_dirs(),
                                  extra_cflags=cf["cxx"], extra_cuda_cflags=cf["nvcc"], extra_ldflags=lb.ldflags(),
                                  build_directory=folder, is_python_module=False, verbose=verbose)
    except Exception as e:  # the compiler's output is in the message: keep all of it beside the build
        log = Path(folder) / "build.log"
        log.write_text(f"{type(e).__name__}: {e}\n")
        raise RuntimeError(f"building the CUDA extension failed; the build log: {log}\n{e}") from e
    return path if isinstance(path, str) else library


@functools.lru_cache(maxsize=None)
def _load() -> tuple[bool, str]:
    """Load the op library once: (True, "") or (False, one-line reason)."""
    if hasattr(torch.ops, "lorakern_cuda") and hasattr(torch.ops.lorakern_cuda, "forward"):
        return True, ""
    pre = _prebuilt()
    return extension.built((lambda: torch.ops.load_library(pre)) if pre is not None else build, "CUDA extension")


@functools.lru_cache(maxsize=None)
def available() -> tuple[bool, str]:
    """``(True, "")`` when the extension runs here, else ``(False, "unavailable: <reason>")``.

    Cached: the op asks on every call, and the toolkit search costs about 0.2 ms."""
    if torch.version.cuda is None:
        return False, "unavailable: torch is a CPU-only build"
    if _prebuilt() is None and _nvcc() is None:
        return False, "unavailable: nvcc not found (set CUDA_HOME) and no prebuilt extension"
    if not torch.cuda.is_available():
        return False, "unavailable: no CUDA GPU"
    return _load()


def _ops():
    ok, why = _load()
    if not ok:
        raise RuntimeError(f"cuda backend {why}")
    return torch.ops.lorakern_cuda


def runs_on(device: torch.device, dtype: torch.dtype) -> bool:
    """CUDA devices; float16, bfloat16 and float32."""
    return device.type == "cuda" and dtype in (torch.float16, torch.bfloat16, torch.float32)


def forward(pb: Problem, op: Operands) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, q) per ARCHITECTURE.md: y [M, N] in x's dtype, q float32 [M, Ra]. The op has checked
    every argument, so the C++ value checks (which sync) are skipped.

    x, weight, bias, base_scale: float16, bfloat16 or float32. lora_A / lora_B: x's dtype, or
    float32 beside a float16 / bfloat16 x (PEFT's default precision); rank_scale / out_scale: x's
    dtype or the adapters'. With fp32 adapters the base product is cuBLAS's in x's dtype and the
    adapter branch runs in the kernels in fp32 (adapters loaded as fp32), added with one rounding
    to x's dtype: PEFT's arithmetic. That path is compiled, not yet run on a GPU.
    Raises RuntimeError (from the C++ checks) for a tensor off x's device or of another dtype."""
    return _ops().forward(op.x, op.weight, op.bias, op.lora_A, op.lora_B, pb.scaling, op.scaling_g, op.rank_scale,
                          op.rank_idx, op.out_scale, pb.dropout_p, pb.seed, op.adapter_index, op.base_scale,
                          pb.deterministic, False)


def backward(pb: Problem, op: Operands, grad_y: torch.Tensor, q: torch.Tensor, needs: Needs) -> Grads:
    """Gradients per ARCHITECTURE.md, each in its input's dtype; None where ``needs`` is False.

    With fp32 adapters beside a half-precision x (``forward``), dt, dq, dA, dB, du and dv are summed
    in fp32 by the kernels from the fp32 adapters (dA, dB fp32; du, dv in rank_scale's / out_scale's
    dtype), and dx is cuBLAS's g W in x's dtype plus the adapter term (fp32) with one rounding.
    Compiled, not yet run on a GPU."""
    flags = [needs.x, needs.weight, needs.bias, needs.lora_A, needs.lora_B, needs.rank_scale, needs.out_scale,
             needs.base_scale]
    grads = _ops().backward(grad_y, op.x, op.weight, op.lora_A, op.lora_B, pb.scaling, op.scaling_g, op.rank_scale,
                            op.rank_idx, op.out_scale, pb.dropout_p, pb.seed, op.adapter_index, op.base_scale, q,
                            [int(n) for n in flags], pb.deterministic, False)
    return Grads(*(gr if n else None for gr, n in zip(grads, flags)))


def dropout_keep(seed: int, M: int, K: int, dropout_p: float, device) -> torch.Tensor:
    """bool [M, K]: the keep-mask the kernels use, the triton backend's stream (ARCHITECTURE.md)."""
    return _ops().dropout_keep(int(seed), int(M), int(K), float(dropout_p), torch.device(device))
