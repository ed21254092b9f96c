"""Optional dependencies (what needs them and which extra installs them), and quiet third-party calls.

``pip install lorakern`` brings torch and triton only. The demo and the PEFT integration need
``pip install "lorakern[peft]"`` (peft, transformers); ``lorakern bench`` compares against PEFT
and plots (``bench --plot``, the demo's plot) with ``pip install "lorakern[bench]"``;
``"lorakern[all]"`` installs both. The demo runs without matplotlib and says how to get its plot.

>>> import pytest
>>> with pytest.raises(MissingDependency, match=r'pip install "lorakern\\[peft\\]"'):
...     require("no_such_module_here", "the demo", extra="peft")
"""
from __future__ import annotations

import contextlib
import importlib
import logging
import warnings
from types import ModuleType
from typing import Iterator, Optional, Sequence

__all__ = ["EXTRAS", "MissingDependency", "require", "ensure", "quiet"]

EXTRAS = {"peft": "peft", "transformers": "peft", "tqdm": "peft", "matplotlib": "bench"}


class MissingDependency(ImportError):
    """An optional dependency is not installed; the message names the ``pip install`` that brings it."""


def require(module: str, purpose: str, extra: Optional[str] = None) -> ModuleType:
    """Import ``module`` for ``purpose`` (``"lorakern demo"``) and return it.

    Raises:
        MissingDependency: it is not installed (or fails to import); the message says what to
            install: ``pip install "lorakern[<extra>]"``, the extra being ``EXTRAS[module]`` unless given.
    """
    try:
        with quiet():
            return importlib.import_module(module)
    except ImportError as e:
        raise MissingDependency(_message({module: e}, purpose, extra)) from e


def ensure(modules: Sequence[str], purpose: str) -> None:
    """Import every one of ``modules``; one error naming all that fail and the extras that bring them.

    Raises:
        MissingDependency: ``"lorakern demo needs peft, matplotlib, which do not import here (...);
            install them with: pip install "lorakern[peft,bench]"``.
    """
    errors = {}
    for module in modules:
        try:
            require(module, purpose)
        except MissingDependency as e:
            errors[module] = e.__cause__
    if errors:
        raise MissingDependency(_message(errors, purpose, None))


def _message(errors: dict, purpose: str, extra: Optional[str]) -> str:
    names = ", ".join(errors)
    why = "; ".join(f"{type(e).__name__}: {e}" for e in errors.values())
    extras = extra or ",".join(dict.fromkeys(EXTRAS.get(m.split(".")[0], "all") for m in errors))
    does, it = ("does", "it") if len(errors) == 1 else ("do", "them")
    return (f"{purpose} needs {names}, which {does} not import here ({why}); "
            f'install {it} with: pip install "lorakern[{extras}]"')


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Python warnings and log records up to WARNING (torch's "No CUDA runtime is found", a
    dependency's import-time notices) are dropped inside; used around the third-party calls that
    emit them while lorakern prints a table. Not thread-safe."""
    before = logging.root.manager.disable
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.disable(max(before, logging.WARNING))
        try:
            yield
        finally:
            logging.disable(before)
