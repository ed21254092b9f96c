"""``lorakern bench``: the command line of the benchmark (flags, the run, the files it writes).

    lorakern bench --quick --json out/h100.json --plot out/h100.png
    lorakern bench --device cpu --quick          # K and N scaled down 16x: checks the code path
    lorakern bench --quick --dry-run             # the cases and the backend `auto` picks for each
    lorakern bench --show bench/results/h100.json

Exit status: 0, 1 when a gate failed (``lorakern.benchmark.gates``), 2 on a usage error.
``--plot`` without matplotlib raises ``MissingDependency`` before anything runs (``lorakern
bench`` prints what to install and exits 1).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Sequence, TextIO

import torch

from lorakern.benchmark import environment, report, timing
from lorakern.benchmark.cases import MODES, VARIANTS, Case, Shape, group_key, select_cases
from lorakern.benchmark.measure import Settings, run
from lorakern.benchmark.providers import PROVIDERS, available_providers, default_dtype
from lorakern.benchmark.records import dtype_name
from lorakern.extras import require

__all__ = ["parser", "main", "print_plan"]


def _parse_list(conv):
    return lambda text: tuple(conv(v) for v in text.split(",") if v)


def _parse_kn(text: str) -> tuple:
    return tuple(tuple(int(v) for v in kn.lower().split("x")) for kn in text.split(",") if kn)


def _parse_shapes(text: str) -> tuple:
    return tuple(Shape(*(int(v) for v in s.lower().split("x"))) for s in text.split(",") if s)


def _parse_part(text: str) -> tuple[int, int]:
    k, n = (int(v) for v in text.split("/"))
    if not 1 <= k <= n:
        raise argparse.ArgumentTypeError(f"--part: expected k/n with 1 <= k <= n, got {text!r}")
    return k, n


def parser() -> argparse.ArgumentParser:
    """The flags of ``lorakern bench`` (``lorakern bench --help`` prints them)."""
    ap = argparse.ArgumentParser(
        prog="lorakern bench", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Time lorakern's backends beside the frozen base F.linear, PEFT's layer and the addmm style, "
                    "in one process, on the shapes of docs/contract.md section 6.",
        epilog=__doc__.split("\n\n")[1] + "\nExit status: 0; 1 when a gate failed; 2 on a usage error.")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="where to run (default: cuda when there is a GPU, else cpu)")
    ap.add_argument("--quick", action="store_true", help="the quick set (a few minutes on an H100)")
    ap.add_argument("--json", metavar="OUT.json", help="write the records there (schema: bench/README.md)")
    ap.add_argument("--plot", metavar="OUT.png", help="plot ratio to base by shape there (needs matplotlib)")
    ap.add_argument("--dtype", choices=("bfloat16", "float16", "float32"),
                    help="default: bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--M", type=_parse_list(int), help="tokens, e.g. 1,16,2048")
    ap.add_argument("--KN", type=_parse_kn, help="in x out features, e.g. 4096x4096,4096x14336")
    ap.add_argument("--r", type=_parse_list(int), help="ranks, e.g. 8,16,64")
    ap.add_argument("--shapes", type=_parse_shapes, help="explicit MxKxNxr list (overrides --M/--KN/--r)")
    ap.add_argument("--modes", type=_parse_list(str), help=f"subset of {','.join(MODES)}")
    ap.add_argument("--dropout", type=_parse_list(float), default=(0.0, 0.1),
                    help="dropout probabilities of the plain variant (default 0,0.1)")
    ap.add_argument("--variants", type=_parse_list(str), default=VARIANTS, help=f"subset of {','.join(VARIANTS)}")
    ap.add_argument("--providers", type=_parse_list(str),
                    help=f"subset of {','.join(PROVIDERS)}; base is always timed (every ratio is to it)")
    ap.add_argument("--part", type=_parse_part, help="k/n: the k-th of n parts of the (shape, mode) groups")
    ap.add_argument("--warmup-ms", type=int, default=25, help="GPU: warm-up per timing, ms (default 25)")
    ap.add_argument("--rep-ms", type=int, default=100, help="GPU: timed runs per timing, ms (default 100)")
    ap.add_argument("--no-graphs", action="store_true", help="never capture CUDA graphs")
    ap.add_argument("--cpu-budget-s", type=float, default=None,
                    help="CPU: seconds of interleaved rounds per group (default 0.5 quick, 5 otherwise)")
    ap.add_argument("--dry-run", "--list", dest="dry_run", action="store_true",
                    help="print the cases and the backend `auto` picks for each, run nothing")
    ap.add_argument("--show", metavar="RESULT.json", help="print the table of a written result and exit")
    return ap


def print_plan(cases: Sequence[Case], device: torch.device, dtype: torch.dtype, out: Optional[TextIO] = None) -> None:
    """One line per case, to ``out`` (default stdout): mode, shape, variant and the backend
    ``backend="auto"`` resolves to (``lorakern.ops.resolve_backend``) on ``device`` for ``dtype``."""
    out = out or sys.stdout
    from lorakern.ops import resolve_backend

    x = torch.empty(0, device=device, dtype=dtype)
    print(f"{'mode':<6} {'M':>5} {'K':>5} {'N':>5} {'r':>3} {'variant':<18} auto on {device.type} "
          f"{dtype_name(dtype)}", file=out)
    for c in cases:
        s = c.shape
        pick = resolve_backend("auto", x, s.M, s.K, s.N, s.r)
        print(f"{c.mode:<6} {s.M:>5} {s.K:>5} {s.N:>5} {s.r:>3} {c.variant.label:<18} {pick}", file=out)


def _usage_error(args: argparse.Namespace, device: torch.device) -> Optional[str]:
    if device.type == "cuda" and not torch.cuda.is_available():
        return "--device cuda but CUDA is not available"
    bad = [m for m in (args.modes or ()) if m not in MODES] + [p for p in (args.providers or ()) if p not in PROVIDERS]
    bad += [v for v in args.variants if v not in VARIANTS]
    return f"unknown mode, provider or variant: {', '.join(bad)}" if bad else None


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``lorakern bench [--device D] [--quick] [--json OUT.json] [--plot OUT.png] ...``; returns the exit status."""
    args = parser().parse_args(argv)
    if args.show:
        return 1 if report.summary(json.loads(Path(args.show).read_text())) else 0
    device = torch.device(args.device)
    error = _usage_error(args, device)
    if error:
        print(f"lorakern bench: {error}", file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype) if args.dtype else default_dtype(device)
    cases = select_cases(args, device)
    if args.dry_run:
        print_plan(cases, device, dtype)
        return 0
    if args.plot:  # before the run, not after it
        require("matplotlib", "lorakern bench --plot")
    wanted = list(dict.fromkeys(["base", *(args.providers or PROVIDERS)]))
    runnable, why = available_providers(device, dtype)
    providers = [p for p in wanted if p in runnable]
    skipped = {p: [reason] for p, reason in why.items() if p in wanted}
    settings = Settings(
        warmup_ms=args.warmup_ms, rep_ms=args.rep_ms, graphs=not args.no_graphs, l2_bytes=timing.l2_bytes(device),
        cpu_budget_s=args.cpu_budget_s if args.cpu_budget_s is not None else (0.5 if args.quick else 5.0),
    )
    header = environment.describe(device)
    print(f"lorakern bench on {header['device']}, {dtype_name(dtype)}: {len(cases)} cases in "
          f"{len({group_key(c) for c in cases})} groups; providers {', '.join(providers)}", flush=True)
    with timing.Stopwatch(torch.device("cpu")) as clock:
        records, skips = run(cases, providers, device, dtype, settings, log=lambda s: print(s, flush=True))
    for p, reasons in skips.items():
        skipped.setdefault(p, []).extend(reasons)
    result = {**header, "wall_s": round(clock.seconds, 1), "skipped": skipped, "records": records}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    if args.plot:
        report.plot(records, providers, args.plot, result["device"])
    return 1 if report.summary(result) else 0
