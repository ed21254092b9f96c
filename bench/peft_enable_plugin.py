"""pytest plugin: PEFT's test suite with ``lorakern.peft.enable()`` in effect for the whole session.

Loaded by ``bench/peft_suite.sh`` as ``-p peft_enable_plugin`` (this folder on PYTHONPATH), so PEFT's
own files stay untouched. Importing it calls ``lorakern.peft.enable()`` before any test module is
collected: every PEFT ``lora.Linear`` the tests build runs lorakern's forward.

It also counts what that forward did (lorakern's per-layer counters, summed over the session by
wrapping lorakern's ``_count(layer, outcome)``, in ``lorakern.peft.patching`` or, before that
module existed, ``lorakern.peft.layer``; nothing else of lorakern changes), so a green run shows
how many calls were fused rather than passed through to PEFT's own forward. The summary is
printed at the end; with ``LORAKERN_PEFT_CALLS`` set to a path, the per-test counts are written
there as JSON ({test id: {outcome: calls}}).
"""
from __future__ import annotations

import collections
import importlib
import json
import os

import lorakern.peft
from peft.tuners.lora.layer import Linear as PeftLoraLinear

lorakern.peft.enable()
_INSTALLED = PeftLoraLinear.__dict__["forward"]  # the forward enable() put on PEFT's class

_TOTAL: collections.Counter = collections.Counter()  # outcome ("fused" or the fallback's reason) -> calls
_PER_TEST: dict = {}  # test id -> Counter of outcomes
_RESTORED: list = []  # tests after which enable() had to be put back
_current = [None]


def _counter_module():
    """The lorakern module whose ``_count(layer, outcome)`` every patched call goes through."""
    for name in ("lorakern.peft.patching", "lorakern.peft.layer"):
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        if callable(getattr(mod, "_count", None)):
            return mod
    return None


_MOD = _counter_module()
FUSED = getattr(_MOD, "FUSED", "fused")
if _MOD is not None:
    _count = _MOD._count

    def _counting(module, outcome):
        _count(module, outcome)
        _TOTAL[outcome] += 1
        if _current[0] is not None:
            _PER_TEST.setdefault(_current[0], collections.Counter())[outcome] += 1

    _MOD._count = _counting


def pytest_report_header(config):
    return [f"lorakern.peft.enable(): in effect (lorakern from {os.path.dirname(lorakern.__file__)})"]


def pytest_runtest_setup(item):
    _current[0] = item.nodeid


def pytest_runtest_teardown(item, nextitem):
    if not lorakern.peft.is_enabled() or PeftLoraLinear.__dict__.get("forward") is not _INSTALLED:
        # a test turned it off (or replaced PEFT's forward): put it back for the tests after it
        lorakern.peft.enable()
        _RESTORED.append(item.nodeid)


def pytest_runtest_logfinish(nodeid, location):
    _current[0] = None


def pytest_terminal_summary(terminalreporter):
    tr = terminalreporter
    tr.section("lorakern.peft.enable(): lora.Linear forward calls")
    if _MOD is None:
        tr.write_line("not counted: no lorakern.peft module with _count(layer, outcome) found")
        return
    fused_tests = sum(1 for c in _PER_TEST.values() if c.get(FUSED))
    tr.write_line(f"{_TOTAL.get(FUSED, 0)} calls fused, {sum(_TOTAL.values()) - _TOTAL.get(FUSED, 0)} "
                  f"ran PEFT's own forward; {fused_tests} of {len(_PER_TEST)} tests that called a "
                  f"lora.Linear had at least one fused call")
    for outcome, n in _TOTAL.most_common():
        if outcome != FUSED:
            tr.write_line(f"  {n:8d}  {outcome}")
    if _RESTORED:
        tr.write_line(f"enable() was undone by {len(_RESTORED)} tests and put back after each: {_RESTORED}")
    path = os.environ.get("LORAKERN_PEFT_CALLS")
    if path:
        with open(path, "w") as f:
            json.dump({k: dict(v) for k, v in _PER_TEST.items()}, f, indent=0, sort_keys=True)
