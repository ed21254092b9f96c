"""``lorakern bench``: lorakern's backends beside the frozen base, PEFT and the addmm style.

Times every provider on the shapes of docs/contract.md section 6 in one process and writes records
in the schema of ``bench/README.md``. One job per module:

    cases.py        shapes, variants, cases, the quick and full sets
    providers.py    base, peft, addmm, lorakern-auto and lorakern-<backend>, over fresh inputs
    timing.py       the one timing module (GPU: do_bench and CUDA graphs; CPU: interleaved rounds)
    measure.py      a group's steps prepared and timed
    records.py      records and the ratios derived from them
    gates.py        the promised figures: targets marked UNMET, gates that fail the run
    report.py       the table, the verdicts, the plot
    environment.py  device, commit and versions of a run
    cli.py          ``lorakern bench``

>>> from lorakern.benchmark import Case, Shape, Variant, Settings, run
>>> recs, skipped = run([Case("fwd", Shape(4, 32, 16, 4), Variant())], ["base", "lorakern-torch"],
...                     torch.device("cpu"), torch.float32, Settings(cpu_budget_s=0.01), log=len)
>>> len(recs)
2
"""
from __future__ import annotations

import torch  # noqa: F401  (the doctest above)

from lorakern.benchmark.cases import BASE_VARIANT, MODES, Case, Shape, Variant, select_cases
from lorakern.benchmark.cli import main, parser
from lorakern.benchmark.environment import device_slug
from lorakern.benchmark.measure import Item, Settings, prepare, prepare_group, run, time_items
from lorakern.benchmark.providers import PROVIDERS, Skip, available_providers
from lorakern.benchmark.records import add_ratios, to_record
from lorakern.benchmark.report import plot, print_table
from lorakern.benchmark.timing import bench_stream, l2_bytes

__all__ = [
    "Case", "Shape", "Variant", "BASE_VARIANT", "Item", "Settings", "Skip", "PROVIDERS", "MODES", "run", "prepare",
    "prepare_group", "time_items", "to_record", "add_ratios", "bench_stream", "l2_bytes", "available_providers",
    "device_slug", "select_cases", "print_table", "plot", "main", "parser",
]
