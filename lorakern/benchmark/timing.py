"""The one timing module: every time lorakern, ``bench/`` and the command line measure comes from here.

- GPU: ``triton.testing.do_bench``'s median in milliseconds (device events after warm-up; it
  flushes L2 before every run). A step that cycles through several input sets (:func:`rotate`,
  :func:`n_sets`: together more bytes than L2) sees fresh inputs each run. :func:`graph_ms`
  captures the steps in one CUDA graph and times its replays.
- CPU: ``time.perf_counter`` around each call after warm-up; the median. :func:`interleaved_ms`
  runs several steps in rounds (every step once a round, starting one later each round), so
  that a load that drifts between rounds moves all of them alike.
- Host-bound loops (:func:`loop_us`) and a timed region of a larger program (:class:`Stopwatch`)
  synchronise with the device at their ends only.

>>> import torch
>>> ms = median_ms(lambda: torch.ones(64).sum(), torch.device("cpu"), warmup_ms=1, rep_ms=5)
>>> ms > 0
True
"""
from __future__ import annotations

import contextlib
import math
import statistics
import time
from typing import Callable, Optional, Sequence

import torch

__all__ = ["sync", "l2_bytes", "n_sets", "rotate", "median_ms", "graph_ms", "interleaved_ms", "loop_us",
           "Stopwatch", "bench_stream", "MIN_SETS", "MAX_SETS"]

MIN_SETS, MAX_SETS = 2, 8  # input sets a GPU step rotates through


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA); nothing on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def l2_bytes(device: torch.device) -> int:
    """The device's L2 cache size in bytes (0 on CPU): input sets are rotated past it.

    >>> l2_bytes(torch.device("cpu"))
    0
    """
    if device.type != "cuda":
        return 0
    props = torch.cuda.get_device_properties(device)
    return int(getattr(props, "L2_cache_size", 50 * 2**20))


def n_sets(per_set: int, l2: int) -> int:
    """How many input sets of ``per_set`` bytes make up twice ``l2`` bytes (1 without an L2 size),
    clamped to [MIN_SETS, MAX_SETS].

    >>> n_sets(10 * 2**20, 50 * 2**20), n_sets(1, 0)
    (8, 1)
    """
    if not l2:
        return 1
    return max(MIN_SETS, min(MAX_SETS, math.ceil(2 * l2 / max(per_set, 1))))


def rotate(steps: Sequence[Callable[[], object]]) -> Callable[[], None]:
    """One step that runs ``steps[0]``, then ``steps[1]``, ... cyclically, one per call."""
    state = [0]

    def step() -> None:
        steps[state[0] % len(steps)]()
        state[0] += 1

    return step


def median_ms(fn: Callable[[], object], device: torch.device, *, warmup_ms: float = 25, rep_ms: float = 100,
              min_reps: int = 5, clock: Callable[[], float] = time.perf_counter) -> float:
    """Median milliseconds of one call of ``fn``.

    On CUDA: ``triton.testing.do_bench(fn, warmup_ms, rep_ms, return_mode="median")``. On CPU:
    calls for ``warmup_ms`` (at least one), then timed calls for ``rep_ms`` (at least ``min_reps``),
    each timed by ``clock`` (seconds: ``time.perf_counter``, or ``time.process_time`` for the CPU
    time of this process, which a shared machine's other load disturbs less).

    Raises:
        ImportError: on CUDA without triton.
    """
    if device.type == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")
    t_end = time.perf_counter() + warmup_ms / 1e3
    fn()
    while time.perf_counter() < t_end:
        fn()
    times: list[float] = []
    t_end = time.perf_counter() + rep_ms / 1e3
    while len(times) < min_reps or time.perf_counter() < t_end:
        t0 = clock()
        fn()
        times.append((clock() - t0) * 1e3)
    return statistics.median(times)


def graph_ms(steps: Sequence[Callable[[], object]], *, warmup_ms: float = 25, rep_ms: float = 100) -> float:
    """Median milliseconds per step of the replays of one CUDA graph that runs every step once.

    The steps must have run eagerly on the current stream before (kernels compiled, memory
    pools warm), and capture must be allowed there (``bench_stream``).

    Raises:
        RuntimeError (or what the step raises): a step that cannot be captured.
    """
    from triton.testing import do_bench

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=torch.cuda.current_stream()):
        for st in steps:
            st()
    return do_bench(graph.replay, warmup=warmup_ms, rep=rep_ms, return_mode="median") / len(steps)


def interleaved_ms(steps: Sequence[Callable[[], object]], budget_s: float, min_rounds: int = 5,
                   max_rounds: int = 200) -> list[list[float]]:
    """CPU times in ms of every step in every round: ``out[i][k]`` is step i's time in round k.

    After one warm-up call each, every round runs every step once, starting one later each round;
    rounds go on until ``budget_s`` seconds have passed (at least ``min_rounds``, at most
    ``max_rounds``).
    """
    for st in steps:
        st()
    times: list[list[float]] = [[] for _ in steps]
    t_end = time.perf_counter() + budget_s
    for rnd in range(max_rounds if steps else 0):
        for j in range(len(steps)):
            k = (j + rnd) % len(steps)
            t0 = time.perf_counter()
            steps[k]()
            times[k].append((time.perf_counter() - t0) * 1e3)
        if rnd + 1 >= min_rounds and time.perf_counter() > t_end:
            break
    return times


def loop_us(fn: Callable[[], object], device: torch.device, calls: int = 300, warmup: int = 20) -> float:
    """Microseconds per call of ``calls`` back-to-back calls, synchronised only before and after:
    where the device work is small, this is the host's cost of a call."""
    for _ in range(warmup):
        fn()
    with Stopwatch(device) as clock:
        for _ in range(calls):
            fn()
    return clock.seconds / calls * 1e6


class Stopwatch:
    """Wall seconds of a region, synchronised with ``device`` at both ends.

    >>> with Stopwatch(torch.device("cpu")) as clock:
    ...     _ = sum(range(1000))
    >>> clock.seconds >= 0
    True
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds: float = math.nan
        self._t0: Optional[float] = None

    def __enter__(self) -> "Stopwatch":
        sync(self.device)
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        sync(self.device)
        self.seconds = time.perf_counter() - self._t0


def bench_stream(device: torch.device):
    """The context to prepare and time in: on CUDA one side stream, so that CUDA graphs can be
    captured and a backward runs on the stream its forward ran on; on CPU nothing."""
    return torch.cuda.stream(torch.cuda.Stream(device)) if device.type == "cuda" else contextlib.nullcontext()
