"""``python3 -m bench.triton_tune``: the command line (see the package's docstring)."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

from . import __doc__ as DOC
from .aot import aot
from .check import correctness
from .sweep import sweep
from .timings import timings


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python3 -m bench.triton_tune", description=DOC.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=DOC.split("\n\n")[1])
    ap.add_argument("--sweep", action="store_true", help="time every candidate plan (default: two per kernel "
                    "kind, until 175 s have passed)")
    ap.add_argument("--no-check", action="store_true", help="skip the correctness pass")
    ap.add_argument("--full-check", action="store_true", help="every correctness case (default: two per dtype)")
    ap.add_argument("--sweep-only", action="store_true", help="only the breakdown and every candidate plan")
    ap.add_argument("--json", metavar="OUT.json", help="write the sweep's timings there (for bench/make_autotable.py)")
    ap.add_argument("--aot", type=int, metavar="ARCH", help="only compile every kernel variant for sm_ARCH "
                    "(no GPU needed), e.g. --aot 90")
    return ap


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Exit status 0; 1 when a check or a compilation failed; 2 without a GPU (except --aot)."""
    args = _parser().parse_args(argv)
    if args.aot:
        return 0 if aot(args.aot) else 1
    if not torch.cuda.is_available():
        print("needs a CUDA GPU (--aot ARCH compiles without one)")
        return 2
    import triton

    name = torch.cuda.get_device_name()
    print(f"{name} torch {torch.__version__} triton {triton.__version__}")
    t0 = time.time()
    ok = True
    if not args.sweep_only:
        if not args.no_check:
            ok = correctness(args.full_check)
            print(f"correctness: {'all ok' if ok else 'FAILURES'} ({time.time() - t0:.0f} s)")
        timings()
        print(f"({time.time() - t0:.0f} s)")
    everything = args.sweep or args.sweep_only
    results = sweep(t0 + (1e9 if everything else 175), full=everything)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"device": name, "M": 8192, "results": results}, indent=1) + "\n")
    print(f"total {time.time() - t0:.0f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
