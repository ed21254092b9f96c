"""How the csrc extension is built, shared by ``setup.py`` (ahead of time) and ``lorakern.cuda`` (JIT).

Installed beside the package (``py-modules``); wheels carry csrc/ as ``lorakern/csrc/`` (setup.py's
build_py), so an installed copy builds from there and a checkout or sdist from its top-level csrc/.

>>> from lorakern_build import cuda_extension        # in setup.py, with LORAKERN_BUILD_CUDA=1
>>> ext_modules, cmdclass = cuda_extension()
"""
from __future__ import annotations

import glob
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent
INSTALLED_CSRC = Path("lorakern", "csrc")  # csrc/'s place in a wheel, relative to ROOT once installed
CSRC = ROOT / INSTALLED_CSRC if (ROOT / INSTALLED_CSRC).is_dir() else ROOT / "csrc"
SHIPPED = ("*.cpp", "*.cu", "*.cuh", "*.h", "exports.map", "cpu/*.cpp", "cpu/*.h")  # MANIFEST.in: the same
EXT_NAME = "lorakern._lorakern_cuda"  # the prebuilt library's module name (loaded with torch.ops.load_library)
DEFAULT_ARCHS = "8.0;9.0"


def sources() -> list[str]:
    """The extension's sources: ops.cpp (schemas, checks) and one .cu per kernel family."""
    return sorted(str(p) for p in CSRC.glob("*.cpp")) + sorted(str(p) for p in CSRC.glob("*.cu"))


def shipped() -> list[str]:
    """Every csrc/ file the builds read (the CUDA and the CPU extension's): sources, headers, the
    linker's export map."""
    return sorted(str(p) for pattern in SHIPPED for p in CSRC.glob(pattern))


def include_dirs() -> list[str]:
    """csrc/ plus the pip CUDA packages' headers (cusparse.h & co. live in nvidia/cu*/include)."""
    dirs = [str(CSRC)]
    try:
        import nvidia  # the pip CUDA runtime packages, when installed

        for base in nvidia.__path__:
            dirs += sorted(glob.glob(os.path.join(base, "cu*", "include")))
    except ImportError:
        pass
    return dirs


def archs() -> str:
    """``LORAKERN_CUDA_ARCHS`` (``;``-separated, e.g. ``8.0;9.0``), the list torch's builders read."""
    return os.environ.get("LORAKERN_CUDA_ARCHS", DEFAULT_ARCHS)


def cflags() -> dict[str, list[str]]:
    return {
        "cxx": ["-O3", "-DNDEBUG"],
        "nvcc": ["-O3", "-DNDEBUG", "--expt-relaxed-constexpr", "-lineinfo"],
    }


def ldflags() -> list[str]:
    """Export nothing from the library (csrc/exports.map): it is loaded RTLD_GLOBAL beside torch."""
    return [f"-Wl,--version-script={CSRC / 'exports.map'}"]


def cuda_extension():
    """``(ext_modules, cmdclass)`` for setuptools: the CUDAExtension and torch's BuildExtension."""
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    os.environ["TORCH_CUDA_ARCH_LIST"] = archs()
    rel = [os.path.relpath(s, ROOT) for s in sources()]
    ext = CUDAExtension(EXT_NAME, rel, include_dirs=include_dirs(), extra_compile_args=cflags(),
                        extra_link_args=ldflags())
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


# --------------------------------------------------------------------------- the CPU extension
# csrc/cpu/ -> torch.ops.lorakern_cpu, built on first use by lorakern.cpu_ext (JIT only).


def cpu_sources() -> list[str]:
    """The CPU extension's sources: csrc/cpu/ops.cpp (ATen) and one row-kernel file per instruction set."""
    return sorted(str(p) for p in (CSRC / "cpu").glob("*.cpp"))


def cpu_inputs() -> list[str]:
    """Every file the CPU build reads (csrc/cpu/ and philox.h): their hash names the library."""
    return sorted(cpu_sources() + [str(p) for p in (CSRC / "cpu").glob("*.h")] + [str(CSRC / "philox.h")])


def _openmp() -> list[str]:
    """-fopenmp where torch's at::parallel_for is OpenMP (it is inline: without the flag every pass
    of the CPU extension would run on one thread). torch's own libgomp.so.1 is the one loaded."""
    import torch

    return ["-fopenmp"] if torch.backends.openmp.is_available() else []


def cpu_cflags() -> list[str]:
    """-O3 and no -march: each instruction-set file sets its own target and ops.cpp picks one at run
    time, so the library runs on any x86-64 (or other) CPU."""
    return ["-O3", "-DNDEBUG"] + _openmp()


def cpu_ldflags() -> list[str]:
    return ldflags() + _openmp()
