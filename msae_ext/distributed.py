"""Data-parallel training under `torchrun`: the process group, the rank's share of a batch, and
reductions of the trainer's firing statistics.

`torchrun --nproc_per_node N -m msae_ext.cli train run.yaml --out DIR` runs the same config on N
processes. Every rank reads the same global batch (same seed, same order) and trains on its
contiguous share of `batch_size / N` rows; gradients are averaged by torch's
DistributedDataParallel, so a step equals the single-process step on the whole batch (a batch mean
of per-sample losses) up to float summation order. BatchTopK is the exception: its top-k runs over
each rank's share, as in every DDP BatchTopK trainer. Rank 0 alone writes checkpoints, logs, wandb
and the final SAE; every rank resumes from the same checkpoint.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def shard(self, batch: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous share of a global batch."""
        if not self.enabled:
            return batch
        n = batch.shape[0] // self.world
        return batch[self.rank * n : (self.rank + 1) * n]


def init_distributed(device: str) -> tuple[DistEnv, str]:
    """Join the torchrun process group if WORLD_SIZE > 1. Returns (env, this rank's device)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistEnv(), device
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return DistEnv(rank, world, local_rank), device


def all_reduce_(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
    return t


class StepModule(torch.nn.Module):
    """`sae.training_forward_pass` as a module forward, so DistributedDataParallel can wrap it."""

    def __init__(self, sae: torch.nn.Module):
        super().__init__()
        self.sae = sae

    def forward(self, step_input):  # type: ignore[override]
        return self.sae.training_forward_pass(step_input=step_input)
