"""What the two C++ extensions' loaders share: the build recipe module, the sources' tag, and the command
that builds one ahead of use.

``lorakern/cuda.py`` (csrc/, the CUDA kernels) and ``lorakern/cpu_ext.py`` (csrc/cpu/, the CPU
kernels) each build their library with ninja on first use; this builds either now and prints
the library's path (the CUDA one needs nvcc and a CUDA build of torch, not a GPU):

    python -m lorakern.extension build cuda      # or: build cpu   (-v: the compiler's output)
"""
from __future__ import annotations

import hashlib
import logging
import os
import sys
import time
from pathlib import Path
from typing import Callable, Iterable

__all__ = ["build_module", "cpp_extension", "source_tag", "built", "main"]

_ROOT = Path(__file__).resolve().parent.parent


def build_module():
    """``lorakern_build`` (the recipe shared with setup.py), which sits beside the package in a checkout."""
    if str(_ROOT) not in sys.path:
        sys.path.insert(0, str(_ROOT))
    import lorakern_build

    return lorakern_build


def cpp_extension():
    """``torch.utils.cpp_extension``, imported without the warning it logs on a machine without a
    CUDA runtime ("No CUDA runtime is found, using CUDA_HOME=..."): that guess is about CUDA
    builds, and the CPU extension (the one such a machine builds) uses no CUDA_HOME; the cuda
    loader finds its toolkit itself (``lorakern/cuda.py``)."""
    log = logging.getLogger("torch.utils.cpp_extension")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension as module
    finally:
        log.setLevel(level)
    return module


def source_tag(inputs: Iterable[str]) -> str:
    """12 hex digits of a hash of the build's input files (names and contents): part of the
    library's name, so that two checkouts, or two versions of the sources, never share a library
    (a built library is loaded only by the sources it was built from)."""
    h = hashlib.sha1()
    for f in sorted(inputs):
        h.update(os.path.basename(f).encode())
        h.update(Path(f).read_bytes())
    return h.hexdigest()[:12]


def built(build: Callable[[], object], what: str) -> tuple[bool, str]:
    """Run ``build``; ``(True, "")``, or, when it raises, the compiler's output on stderr and
    ``(False, "unavailable: build failed: <its first line>")``."""
    try:
        build()
    except Exception as e:  # noqa: BLE001 - any build failure makes the extension unavailable
        print(f"lorakern: the {what} did not build:\n{e}", file=sys.stderr)
        line = next((ln for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
        return False, f"unavailable: build failed: {line[:200]}"
    return True, ""


def main(argv: list[str]) -> int:
    """``build cuda|cpu [-v]``: build that extension now; prints its path and the time taken."""
    if len(argv) < 2 or argv[0] != "build" or argv[1] not in ("cuda", "cpu"):
        print("usage: python -m lorakern.extension build cuda|cpu [-v]   (compile and link, print the library path)")
        return 2
    if argv[1] == "cuda":
        from lorakern import cuda as ext
    else:
        from lorakern import cpu_ext as ext
    t0 = time.time()
    print(ext.build(verbose="-v" in argv))
    print(f"built in {time.time() - t0:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
