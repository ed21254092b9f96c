"""The CPU extension (csrc/cpu/): the adapter branch's masked passes with the dropout mask made in SIMD lanes.

It registers ``torch.ops.lorakern_cpu.{shrink, add_masked_, masked_At, masked_At_add_, dropout, dropout_keep,
isa, isas}`` (csrc/cpu/ops.cpp says what each computes). It is built on first use with ninja
(``torch.utils.cpp_extension.load``, into torch's extension folder, about half a minute on 2
cores) and loaded from there afterwards; the library's name carries a hash of its sources, so
changed sources build a new one.
Without a C++ compiler (and no library built before) it is unavailable and callers use the torch path.

>>> from lorakern import cpu_ext
>>> cpu_ext.available()                 # doctest: +SKIP
(True, '')
>>> q = cpu_ext.ops().shrink(x, A, None, 0.1, seed)  # doctest: +SKIP

``python -m lorakern.extension build cpu`` compiles and links it here and prints the library's path.
"""
from __future__ import annotations

import os
import shutil
import sys
from typing import Optional

import torch

from lorakern import extension

__all__ = ["available", "isas", "build", "ops"]


def _compiler() -> Optional[str]:
    """The C++ compiler torch's builder will run (``CXX``, else ``c++``), when it is on PATH."""
    return shutil.which(os.environ.get("CXX", "c++"))


def _library() -> tuple[str, str]:
    """(name, path) of the built library: one per torch version (its ABI) and version of the sources."""
    tag = extension.source_tag(extension.build_module().cpu_inputs())
    name = f"lorakern_cpu_t{torch.__version__.split('+')[0].replace('.', '_')}_{tag}"
    return name, os.path.join(extension.cpp_extension()._get_build_directory(name, False), f"{name}.so")


def build(verbose: bool = False) -> str:
    """Compile and link the extension with ninja (when not built yet) and return the library's path."""
    load = extension.cpp_extension().load
    lb = extension.build_module()
    name, path = _library()
    if not os.path.exists(path):
        print("lorakern: building the CPU extension once (about a minute)...", file=sys.stderr, flush=True)
    load(name=name, sources=lb.cpu_sources(), extra_cflags=lb.cpu_cflags(), extra_ldflags=lb.cpu_ldflags(),
         build_directory=os.path.dirname(path), is_python_module=False, verbose=verbose)
    return path


_STATUS: list = []  # [(ok, reason, instruction sets)] once the first call has loaded or built it


def _status() -> tuple[bool, str, tuple[str, ...]]:
    if not _STATUS:
        ok, why = _load()
        _STATUS.append((ok, why, tuple(torch.ops.lorakern_cpu.isas()) if ok else ()))
    return _STATUS[0]


# torch.compile runs these as they are, never traces them: the op's backend choice asks inside
# compiled code, possibly before anything else loaded the extension.
@torch.compiler.assume_constant_result
def available() -> tuple[bool, str]:
    """``(True, "")`` once the extension is loaded, else ``(False, "unavailable: <reason>")``.

    The first call loads the built library, or builds it (a failed build prints its log to
    stderr); later calls return that answer."""
    return _status()[:2]


@torch.compiler.assume_constant_result
def isas() -> tuple[str, ...]:
    """The instruction sets the row kernels run here, best first (the one used by default); () when
    the extension is unavailable."""
    return _status()[2]


def _load() -> tuple[bool, str]:
    if hasattr(torch.ops, "lorakern_cpu") and hasattr(torch.ops.lorakern_cpu, "shrink"):
        return True, ""
    path = _library()[1]
    if os.path.exists(path):
        torch.ops.load_library(path)
        return True, ""
    if _compiler() is None:
        return False, f"unavailable: no C++ compiler found ({os.environ.get('CXX', 'c++')}; set CXX)"
    if not extension.cpp_extension().is_ninja_available():
        return False, "unavailable: ninja not found (pip install ninja)"
    return extension.built(build, "CPU extension")


def ops():
    """``torch.ops.lorakern_cpu``, built or loaded on first use; RuntimeError with the reason if it cannot be."""
    ok, why = available()
    if not ok:
        raise RuntimeError(f"the CPU extension is {why}")
    return torch.ops.lorakern_cpu
