"""The promised figures, checked against a run's records: targets are marked, gates fail the run.

A :class:`Target` names a figure (docs/contract.md, an issue), the records it applies to, a value per
record and the limit that value must not exceed. A target that is missed is marked ``UNMET``
in the report; a target with ``gate=True`` that is missed is ``FAILED`` and makes ``lorakern
bench`` (and ``make bench``) exit 1.

>>> recs = [{"provider": "lorakern-torch", "mode": "fwd", "M": 16, "K": 64, "N": 64, "r": 16,
...          "dropout": 0.0, "masked": True, "adapters": 0, "ratio_to_half_rank": 1.5}]
>>> [(v.target.name, v.met) for v in evaluate(recs, "cpu")]
[('masked ranks cost nothing', False)]
>>> failed(evaluate(recs, "cpu"))
[]
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Sequence

__all__ = ["Target", "Verdict", "TARGETS", "CPU_GATE_SHAPE", "evaluate", "failed", "report_lines"]

LK = "lorakern-"
TRAIN_KN = ((4096, 4096), (4096, 14336))
CPU_GATE_SHAPE = (4096, 2048, 2048, 16)  # M, K, N, r of bench/bench_cpu.py


@dataclass(frozen=True)
class Target:
    """A figure: ``value(record) <= limit`` for every record ``applies(record)`` selects on ``devices``."""

    name: str
    source: str
    what: str                              # the value, in words, for the report
    limit: float
    applies: Callable[[dict], bool]
    value: Callable[[dict], Optional[float]]
    devices: tuple[str, ...] = ("cpu", "cuda")
    gate: bool = False


@dataclass(frozen=True)
class Verdict:
    """One record's standing against one target."""

    target: Target
    record: dict
    value: float

    @property
    def met(self) -> bool:
        return self.value <= self.target.limit

    @property
    def mark(self) -> str:
        return "ok" if self.met else ("FAILED" if self.target.gate else "UNMET")


def _plain(r: dict) -> bool:
    return not r["masked"] and not r["adapters"]


def _auto(r: dict) -> bool:
    return r["provider"] == LK + "auto" and _plain(r)


def _inverse(key: str) -> Callable[[dict], Optional[float]]:
    return lambda r: 1.0 / r[key] if r.get(key) else None


def _key(key: str) -> Callable[[dict], Optional[float]]:
    return lambda r: r.get(key)


def _saved_limit(r: dict) -> float:
    return 8 * r["M"] * r["r"] + 64 * 1024


def _cpu_gate_shape(r: dict, mode: str, dropout: float) -> bool:
    return (r["provider"] == LK + "auto" and r["mode"] == mode and r["dropout"] == dropout and _plain(r)
            and (r["M"], r["K"], r["N"], r["r"]) == CPU_GATE_SHAPE)


GPU_SPEED = "bench/NOTES.md: open work on GPU training speed"  # the source of the GPU speed targets

TARGETS: tuple[Target, ...] = (
    Target("masked ranks cost nothing", "docs/contract.md section 1", "time / plain time at half the rank", 1.02,
           lambda r: r["provider"].startswith(LK) and r["masked"], _key("ratio_to_half_rank")),
    Target("nothing M x K saved", "docs/contract.md section 1", "newly saved bytes / (8 M r + 64 KiB)", 1.0,
           lambda r: r["provider"].startswith(LK) and r["mode"] != "fwd" and "saved_bytes" in r,
           lambda r: r["saved_bytes"] / _saved_limit(r), gate=True),
    Target("CPU fwd+bwd near the base", "bench/bench_cpu.py", "paired time / base time, p=0", 1.10,
           lambda r: _cpu_gate_shape(r, "fwdbwd", 0.0), _key("paired_ratio_to_base"), ("cpu",), gate=True),
    Target("CPU fwd+bwd with dropout near the base", "bench/bench_cpu.py", "paired time / base time, p=0.1", 1.45,
           lambda r: _cpu_gate_shape(r, "fwdbwd", 0.1), _key("paired_ratio_to_base"), ("cpu",), gate=True),
    Target("never slower than PEFT or the addmm style", GPU_SPEED, "time / the faster of PEFT and addmm", 0.95,
           lambda r: _auto(r) and r["mode"] == "fwdbwd" and r["M"] in (2048, 8192) and (r["K"], r["N"]) in TRAIN_KN,
           _inverse("speedup_vs_reference"), ("cuda",)),
    Target("training near the base", GPU_SPEED, "fwd+bwd time / base time at M=8192, K=N=4096", 1.15,
           lambda r: _auto(r) and r["mode"] == "fwdbwd" and (r["M"], r["K"], r["N"]) == (8192, 4096, 4096),
           _key("ratio_to_base"), ("cuda",)),
    Target("forward near the base", GPU_SPEED, "fwd time / base time at M=8192, K=N=4096", 1.12,
           lambda r: _auto(r) and r["mode"] == "fwd" and (r["M"], r["K"], r["N"]) == (8192, 4096, 4096),
           _key("ratio_to_base"), ("cuda",)),
    Target("decode at the floor", GPU_SPEED, "fwd time / base time at M = 1, 16", 1.05,
           lambda r: _auto(r) and r["mode"] == "fwd" and r["M"] <= 16, _key("ratio_to_base"), ("cuda",)),
)


def evaluate(records: Iterable[dict], device_type: str, targets: Sequence[Target] = TARGETS) -> list[Verdict]:
    """Every (target, record) pair where the target applies on ``device_type`` ("cpu", "cuda") and
    the record has the value."""
    out = []
    for t in targets:
        if device_type not in t.devices:
            continue
        for r in records:
            v = t.value(r) if t.applies(r) else None
            if v is not None:
                out.append(Verdict(t, r, v))
    return out


def failed(verdicts: Iterable[Verdict]) -> list[Verdict]:
    """The verdicts of gates that were missed: any of them fails the run."""
    return [v for v in verdicts if v.target.gate and not v.met]


def _where(r: dict) -> str:
    extra = (" masked" if r["masked"] else "") + (f" {r['adapters']} adapters" if r["adapters"] else "")
    return (f"{r['provider']:<16} {r['mode']:<6} M={r['M']:<5} K={r['K']:<5} N={r['N']:<5} r={r['r']:<3} "
            f"p={r['dropout']:g}{extra}")


def report_lines(verdicts: Sequence[Verdict]) -> list[str]:
    """Per target: how many records meet it, then every record that does not, marked."""
    lines = []
    for t in dict.fromkeys(v.target for v in verdicts):
        mine = [v for v in verdicts if v.target is t]
        missed = [v for v in mine if not v.met]
        kind = "gate" if t.gate else "target"
        state = "met" if not missed else ("FAILED" if t.gate else "UNMET")
        lines.append(f"{kind} {t.name!r} ({t.source}; {t.what} <= {t.limit:g}): {state}, "
                     f"{len(mine) - len(missed)} of {len(mine)} records meet it")
        lines += [f"  {v.mark:<6} {_where(v.record)}: {v.value:.3f}" for v in missed]
    return lines
