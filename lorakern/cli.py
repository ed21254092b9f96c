"""``lorakern check | bench | demo | plan``: the command line.

Each subcommand takes its own flags (``lorakern <command> --help``): ``check`` and ``plan`` live here,
``bench`` in ``lorakern.benchmark``, ``demo`` in ``lorakern.demo``; this module dispatches and
turns a missing optional dependency into one line that says what to install.

>>> main(["--help"])  # doctest: +ELLIPSIS
usage: lorakern [-h] [--version] COMMAND [options]
...
0
"""
from __future__ import annotations

import argparse
import importlib
import sys
from importlib import metadata
from typing import Callable, Optional, Sequence

import torch

from lorakern import autotable
from lorakern.extras import MissingDependency, ensure, quiet

__all__ = ["COMMANDS", "check", "plan", "main", "device"]

# name: (one line of help, the function "module:attribute" taking argv, optional modules it needs)
COMMANDS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "check": ("run the op on every backend here: error against the float64 oracle, time against F.linear",
              "lorakern.cli:check", ()),
    "bench": ("time lorakern beside F.linear, PEFT's layer and the addmm style (bench/README.md)",
              "lorakern.benchmark:main", ()),
    "demo": ("fine-tune a small Llama with PEFT LoRA, stock and patched, side by side",
             "lorakern.demo:main", ("peft", "transformers", "tqdm")),
    "plan": ("print what each plan launches for a shape: traffic beyond the base GEMMs, host syncs, "
             "predicted GPU time (no GPU needed)", "lorakern.cli:plan", ()),
}


def device(text: str) -> torch.device:
    """``--device``'s type for argparse: ``text`` ("cpu", "cuda", "cuda:N") as a ``torch.device`` this
    machine has.

    Raises:
        argparse.ArgumentTypeError: torch cannot parse ``text``, it is neither cpu nor cuda, or it names
            a CUDA device torch does not see here (argparse prints one line under the usage, exit 2).
    """
    try:
        dev = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count()  # 0 without a driver: torch raises only when a device is used
        if count == 0:
            raise argparse.ArgumentTypeError(f"expected a device this machine has, got {text!r}: torch sees no "
                                             "CUDA GPU here (use --device cpu)")
        if (dev.index or 0) >= count:
            raise argparse.ArgumentTypeError(f"expected cuda:0 to cuda:{count - 1}, got {text!r}")
    elif dev.type != "cpu":
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}")
    return dev


def _fwd_bwd(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> None:
    xx = x.detach().requires_grad_()
    y = fn(xx)
    y.backward(torch.ones_like(y))


def _command_parser(name: str, epilog: str) -> argparse.ArgumentParser:
    """The parser of ``lorakern <name>``: its line of COMMANDS as the description (capitalised)."""
    help_ = COMMANDS[name][0]
    return argparse.ArgumentParser(prog=f"lorakern {name}", description=help_[0].upper() + help_[1:] + ".",
                                   epilog=epilog)


def _positive(text: str) -> int:
    """An int >= 1 (argparse type): a usage error otherwise."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an int >= 1, got {text!r}")
    return value


def _probability(text: str) -> float:
    """A float in [0, 1) (argparse type): a dropout probability."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a float in [0, 1), got {text!r}")
    return value


def _shape_options(ap: argparse.ArgumentParser, dash: str, M: int, K: int, N: int) -> None:
    """The shape's options ``<dash>M``, ``<dash>K``, ``<dash>N``, ``<dash>r`` (rank 16) with these defaults."""
    for name, default, what in (("M", M, "rows of x (tokens)"), ("K", K, "in-features"), ("N", N, "out-features"),
                                ("r", 16, "LoRA rank")):
        ap.add_argument(dash + name, type=_positive, default=default, help=f"{what}, default {default}")


def _check_parser() -> argparse.ArgumentParser:
    ap = _command_parser(
        "check",
        "One forward and backward with dropout 0.1 and scaling 2 per backend that runs here; a backend that "
               "does not says why. Under TRITON_INTERPRET=1 the triton backend runs in the interpreter on CPU (slow: "
               "use small sizes, -M 64 -K 64 -N 64). Exit status 1 when a backend's error is over tolerance "
               "(lorakern.testing's: docs/contract.md section 5).")
    ap.add_argument("--device", type=device, default="cuda" if torch.cuda.is_available() else "cpu",
                    help="where to run (default: cuda when there is a GPU, else cpu); bf16 on cuda, fp32 on cpu")
    _shape_options(ap, "-", 1024, 1024, 1024)
    return ap


def check(argv: Optional[Sequence[str]] = None) -> int:
    """``lorakern check [--device D] [-M M] [-K K] [-N N] [-r R]``: every backend against the float64
    oracle (``lorakern.testing.check_against_oracle``, its tolerances) and F.linear; returns 1 if
    a backend is wrong, else 0."""
    from lorakern import backends
    from lorakern.benchmark import timing
    from lorakern.ops import lora_linear, resolve_backend
    from lorakern.testing import check_against_oracle, random_problem

    args = _check_parser().parse_args(argv)
    dev = args.device
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    M, K, N, r = args.M, args.K, args.N, args.r
    t, kw = random_problem(M, K, N, r, scaling=2.0, device=dev, dtype=dtype)
    x, W, b, A, B = t["x"], t["weight"], t["bias"], t["lora_A"], t["lora_B"]
    with quiet():
        auto = resolve_backend("auto", x, M, K, N, r)
    print(f"lorakern check on {dev} ({torch.cuda.get_device_name(dev) if dev.type == 'cuda' else 'CPU'}), "
          f"{str(dtype)[6:]}, M={M} K={K} N={N} r={r}, dropout 0.1, forward+backward; auto picks {auto}")
    print(f"{'backend':<8} {'status':<12} {'rel err fwd':>12} {'rel err dx':>12} {'ms':>9} {'x base':>8}")
    base_ms = timing.median_ms(lambda: _fwd_bwd(lambda xx: torch.nn.functional.linear(xx, W, b), x), dev)
    print(f"{'F.linear':<8} {'(floor)':<12} {'':>12} {'':>12} {base_ms:9.3f} {1.0:8.2f}")
    failed = False
    for name in backends.NAMES:
        with quiet():
            ok, why = backends.status(name)
            if ok and not backends.runs_on(name, dev, dtype):
                ok, why = False, f"does not run {str(dtype)[6:]} on {dev.type}"
        if not ok:
            print(f"{name:<8} {why}")
            continue
        keep = backends.get(name).dropout_keep(7, M, K, 0.1, dev)
        try:
            errors = check_against_oracle(t, kw, backend=name, dropout_p=0.1, seed=7, keep=keep,
                                          grad_args=("x",)).errors
        except AssertionError as e:  # past the tolerance, or an element left unwritten
            failed = True
            print(f"{name:<8} {'WRONG':<12} {e}")
            continue

        def fn(xx, name=name):
            return lora_linear(xx, W, b, A, B, scaling=2.0, dropout_p=0.1, seed=7, backend=name)

        ms = timing.median_ms(lambda: _fwd_bwd(fn, x), dev)
        print(f"{name:<8} {'ok':<12} {errors['y']:12.2e} {errors['dx']:12.2e} {ms:9.3f} {ms / base_ms:8.2f}")
    if dev.type == "cpu":
        print("(CPU times vary from run to run, by tens of percent on a shared or loaded machine; the errors do "
              "not. For steadier ratios: bench/bench_cpu_peft.py's interleaved medians)")
    return 1 if failed else 0


def _plan_parser() -> argparse.ArgumentParser:
    ap = _command_parser(
        "plan",
        "One adapter, a frozen bias, x, A and B trained (the benchmark's step). Times are predicted by "
               "lorakern.costmodel (a roofline fitted to run B's H100 measurements), never measured. Passes: "
               "bytes over M x K / M x N in units of one pass of x's dtype, reads and writes apart; epilogue reads "
               "(cuBLAS reading the buffer it accumulates onto, beta = 1) are listed apart.")
    _shape_options(ap, "--", 8192, 4096, 4096)
    ap.add_argument("--dropout", type=_probability, default=0.0, help="dropout probability in [0, 1), default 0")
    ap.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16",
                    help="x's dtype, default bfloat16")
    ap.add_argument("--mixed", action="store_true",
                    help="fp32 adapters beside a half-precision x (PEFT's default precision)")
    ap.add_argument("--device", default="NVIDIA H100 80GB HBM3", choices=autotable.devices(),
                    help="the GPU (by name) whose measured autotable.json rows decide what auto picks there, "
                         "default the H100's; the plans are GPU plans whatever machine runs this")
    ap.add_argument("--backend", action="append", choices=("auto", "triton", "torch", "addmm", "base"),
                    help="a plan to print (repeat for several); default: auto, triton, torch, addmm and base")
    return ap


def plan(argv: Optional[Sequence[str]] = None) -> int:
    """``lorakern plan [--M M] [--K K] [--N N] [--r R] [--dropout P] ...``: each plan's launches,
    extra passes, host syncs and predicted time (``lorakern.costmodel``); returns 0."""
    from lorakern import costmodel

    args = _plan_parser().parse_args(argv)
    esize = 4 if args.dtype == "float32" else 2
    shape = (args.M, args.K, args.N, args.r)
    auto = costmodel.auto_backend(*shape, device=args.device, dtype=args.dtype)
    print(f"lorakern plan: M={args.M} K={args.K} N={args.N} r={args.r} {args.dtype}"
          f"{' + fp32 adapters' if args.mixed else ''}, dropout {args.dropout:g}; auto picks {auto} on {args.device} "
          "(autotable.json); times are predicted (costmodel.CONSTANTS), not measured")
    base = costmodel.base_plan(*shape, esize=esize)
    for name in args.backend or ("auto", "triton", "torch", "addmm", "base"):
        try:
            p = costmodel.plan(name, *shape, esize=esize, dropout=args.dropout, mixed=args.mixed, device=args.device)
        except ValueError as e:
            print(f"{name}: {e}")
            continue
        print(("auto = " if name == "auto" else "") + costmodel.describe(p, base=base))
    return 0


def _parser() -> argparse.ArgumentParser:
    width = max(map(len, COMMANDS))
    listing = "\n".join(f"  {name:<{width}}  {help_}" for name, (help_, _, _) in COMMANDS.items())
    ap = argparse.ArgumentParser(
        prog="lorakern", usage="lorakern [-h] [--version] COMMAND [options]",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="lorakern: fused LoRA-family kernels.\n\ncommands:\n" + listing,
        epilog="`lorakern COMMAND --help` lists the command's options. Optional dependencies: "
               'pip install "lorakern[peft]" (PEFT integration, the demo), "lorakern[bench]" '
               '(the PEFT provider of bench, plots), "lorakern[all]" (both).')
    ap.add_argument("--version", action="version", version=f"lorakern {_version()}")
    ap.add_argument("command", metavar="COMMAND", choices=list(COMMANDS), help="one of: " + ", ".join(COMMANDS))
    return ap


def _version() -> str:
    try:
        return metadata.version("lorakern")
    except metadata.PackageNotFoundError:
        return "(not installed)"


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``lorakern COMMAND [options]``; returns the exit status: the command's, 2 on a usage error,
    1 when a dependency the command needs is missing (the message says what to install)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    split = next((i + 1 for i, a in enumerate(argv) if not a.startswith("-")), len(argv))
    try:
        args = _parser().parse_args(argv[:split])
    except SystemExit as e:  # --help, --version and usage errors
        return int(e.code or 0)
    _, target, needs = COMMANDS[args.command]
    module, attr = target.split(":")
    try:
        if not {"-h", "--help"} & set(argv[split:]):  # help needs no optional package
            ensure(needs, f"lorakern {args.command}")
        return getattr(importlib.import_module(module), attr)(argv[split:])
    except MissingDependency as e:
        print(f"lorakern {args.command}: {e}", file=sys.stderr)
        return 1
    except SystemExit as e:  # the command's --help or usage error
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
            return 1
        return int(e.code or 0)


if __name__ == "__main__":
    sys.exit(main())
