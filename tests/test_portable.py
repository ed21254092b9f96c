"""The torch backend's keep-mask: one generator per (thread, device), reseeded per call, never made per call."""
from __future__ import annotations

import threading

import torch

from lorakern.backends import portable


def test_keep_mask_is_a_pure_function_of_its_arguments():
    """The same (seed, M, K, p) gives the same mask whatever was drawn in between; another seed another."""
    a = portable.dropout_keep(11, 40, 33, 0.3, "cpu")
    torch.rand(1000, generator=portable._generator("cpu"))  # the reused generator moved on
    portable.dropout_keep(12, 7, 5, 0.5, "cpu")
    assert torch.equal(a, portable.dropout_keep(11, 40, 33, 0.3, "cpu"))
    assert not torch.equal(a, portable.dropout_keep(12, 40, 33, 0.3, "cpu"))
    fresh = torch.Generator().manual_seed(11)
    want = torch.empty(40, 33, dtype=torch.bool).bernoulli_(0.7, generator=fresh)
    assert torch.equal(a, want), "the stream of a freshly seeded generator"


def test_no_generator_is_made_per_call(monkeypatch):
    portable.dropout_keep(1, 2, 3, 0.5, "cpu")
    made = []
    real = torch.Generator
    monkeypatch.setattr(torch, "Generator", lambda *a, **k: made.append(1) or real(*a, **k))
    for seed in range(5):
        portable.dropout_keep(seed, 4, 4, 0.5, "cpu")
    assert not made


def test_each_thread_draws_from_its_own_generator():
    """Threads reseeding and drawing at once each get their seed's mask (no shared generator state)."""
    want = {s: portable.dropout_keep(s, 64, 64, 0.5, "cpu") for s in range(8)}
    gens, bad = [], []  # the generators themselves: kept alive, so that no two share an id
    barrier = threading.Barrier(8)

    def run(s):
        barrier.wait()
        for _ in range(20):
            if not torch.equal(portable.dropout_keep(s, 64, 64, 0.5, "cpu"), want[s]):
                bad.append(s)
        gens.append(portable._generator("cpu"))

    threads = [threading.Thread(target=run, args=(s,)) for s in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not bad and len({id(g) for g in gens}) == 8
