"""Say plainly why a GPU-only target cannot run with this python, before it runs anything.

    python3 bench/need_torch.py [--cuda] WHAT

Exit status 0 when this python imports torch (and, with ``--cuda``, torch sees a CUDA GPU); else
one line on stderr naming WHAT (``"make gpu-check"``), the python and what it lacks (torch, or a
CUDA device: a CPU build of torch, no driver, or ``CUDA_VISIBLE_DEVICES`` hiding them), exit 2.
Imports nothing of lorakern: it runs under a python that has no torch. Used by the Makefile's
GPU targets and bench/gpu_run.sh; what those need is in bench/README.md.
"""
from __future__ import annotations

import importlib.util
import sys
from typing import Optional, Sequence


def reason(cuda: bool) -> Optional[str]:
    """Why this python cannot run the target (None when it can)."""
    if importlib.util.find_spec("torch") is None:
        return f"{sys.executable} has no torch (install torch there, or name another python: PYTHON=/path/to/python)"
    if not cuda:
        return None
    import torch

    if not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        return (f"{sys.executable}'s torch {torch.__version__} ({build}) sees no CUDA GPU (no GPU or driver here, "
                "or CUDA_VISIBLE_DEVICES hides it)")
    return None


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    cuda = "--cuda" in args
    what = " ".join(a for a in args if a != "--cuda") or "this target"
    why = reason(cuda)
    if why is None:
        return 0
    needs = "a CUDA GPU and a python with torch" if cuda else "a python with torch"
    print(f"{what} needs {needs}: {why}; see bench/README.md", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
