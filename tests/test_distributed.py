"""Two CPU processes (gloo): DDP and FSDP2 training of lorakern layers equals one process.

The tests spawn the two ranks themselves (once, for both modes) on a free port of 127.0.0.1; each
rank trains on its half of the batch and rank 0 saves the first step's gradients and the
parameters after a few AdamW steps, which the tests compare with the same training run in this
process on the whole batch.
"""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import lorakern
from lorakern.testing import rel_err

WORLD = 2
STEPS = 3
MODES = ("ddp", "fsdp2")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_model() -> nn.Module:
    """Two lorakern layers with random A and B (every gradient nonzero), the same in every process."""
    torch.manual_seed(0)
    return nn.Sequential(
        lorakern.LoRALinear(16, 32, r=4, lora_alpha=8, init_lora_weights=False), nn.GELU(),
        lorakern.LoRALinear(32, 8, r=4, lora_alpha=8, init_lora_weights=False, bias=False),
    )


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 16, generator=g), torch.randn(8, 8, generator=g)


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[dict, dict]:
    """(gradients of the first step, parameters after STEPS AdamW steps), by parameter name."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    grads = {}
    for step in range(STEPS):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        if step == 0:
            grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        opt.step()
    return grads, dict(model.named_parameters())


def full(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor: the whole of an FSDP2 shard (DTensor), a detached copy otherwise."""
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


def _rank(rank: int, port: int, out: str) -> None:
    """One rank: DDP, then FSDP2 (each layer, then the whole model sharded), in one process group."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        from torch.distributed.fsdp import fully_shard

        x, y = batch()
        rows = slice(rank * len(x) // WORLD, (rank + 1) * len(x) // WORLD)
        for mode in MODES:
            model = make_model()
            if mode == "ddp":
                wrapped = nn.parallel.DistributedDataParallel(model)
            else:
                for layer in (model[0], model[2]):
                    fully_shard(layer)
                wrapped = fully_shard(model)
            grads, params = train(wrapped, x[rows], y[rows])
            # full_tensor() is a collective: every rank gathers, rank 0 saves
            got = {"grads": {n.removeprefix("module."): full(g) for n, g in grads.items()},
                   "params": {n.removeprefix("module."): full(p) for n, p in params.items()}}
            if rank == 0:
                torch.save(got, os.path.join(out, f"{mode}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> str:
    """Spawns the two ranks once for every mode; the folder of rank 0's results."""
    out = str(tmp_path_factory.mktemp("ranks"))
    for attempt in range(3):
        try:
            mp.spawn(_rank, args=(free_port(), out), nprocs=WORLD, join=True)
            return out
        except mp.ProcessExitedException as e:
            # a rank killed by a signal before training ("terminate called without an active
            # exception" in gloo's setup): about 1 spawn in 10 on this machine's torch 2.14, with
            # this file as it was at 2c8f47f too; a new spawn on a new port, at most twice
            if "signal" not in str(e) or attempt == 2:
                raise


@pytest.mark.parametrize("mode", MODES)
def test_two_processes_train_like_one(mode, ranks):
    got = torch.load(os.path.join(ranks, f"{mode}.pt"))
    start = {n: p.detach().clone() for n, p in make_model().named_parameters()}
    grads, params = train(make_model(), *batch())
    assert got["grads"].keys() == grads.keys() == {"0.lora_A", "0.lora_B", "2.lora_A", "2.lora_B"}
    for n, g in grads.items():
        assert g.abs().sum() > 0 and rel_err(got["grads"][n], g) <= 1e-5, n
    assert got["params"].keys() == params.keys()
    for n, p in params.items():
        if p.requires_grad:  # the update, STEPS AdamW steps
            assert rel_err(got["params"][n] - start[n], p.detach() - start[n]) <= 1e-4, n
        else:  # the frozen base stays as it was
            assert torch.equal(got["params"][n], start[n]), n
