"""Training on several processes (``torchrun``): PyTorch's DistributedDataParallel, and the few
collective steps that keep the ranks in agreement. A one-process run gets :data:`SINGLE`, whose
methods do nothing, so the training loop reads the same either way.

- ``torchrun --nproc_per_node=N scripts/train.py ...`` sets WORLD_SIZE, RANK and LOCAL_RANK;
  :func:`init` joins the process group (NCCL on GPUs, gloo on the CPU) and picks the GPU
  of the local rank.
- Each rank trains on its share of every epoch's batches (``TokenBatchSampler`` with
  ``rank``/``world``); gradients are averaged by DDP, and the loss is normalised by the target
  tokens of all ranks together (:meth:`Dist.scale_for_tokens`), so an update equals the one
  a single process makes with ``train.accumulate=world`` on the same batches.
- Decisions are shared: every step the ranks agree on a stop signal received by any of them,
  on rank 0's time budget and on the schedule's estimated end (:meth:`Dist.agree`); rank 0
  validates and checkpoints, and broadcasts whether to stop (:meth:`Dist.broadcast`).
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    local_rank: int = 0
    world: int = 1
    backend: str = ""

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        """Rank 0: the process that logs, validates and writes files."""
        return self.rank == 0

    def device(self, device: torch.device) -> torch.device:
        """This rank's device: the local rank's GPU."""
        return torch.device("cuda", self.local_rank) if device.type == "cuda" and self.enabled else device

    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module:
        """The module to run forward passes through (DDP when distributed)."""
        if not self.enabled:
            return model
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    def no_sync(self, model: nn.Module, last: bool):
        """DDP's no_sync() for all but the last micro-batch of an accumulated update."""
        return model.no_sync() if self.enabled and not last else contextlib.nullcontext()

    def _reduce(self, values: Sequence[float], device: torch.device, op: str) -> list[float]:
        """Element-wise reduction over ranks (float64) with ``ReduceOp.<op>``."""
        if not self.enabled:
            return [float(v) for v in values]
        t = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(t, op=getattr(dist.ReduceOp, op))
        return t.tolist()

    def sum(self, values: Sequence[float], device: torch.device) -> list[float]:
        """Element-wise sums over ranks (float64)."""
        return self._reduce(values, device, "SUM")

    def sum_tensor(self, t: torch.Tensor) -> torch.Tensor:
        """Sum of a device tensor over ranks, without reading it back to the host."""
        if self.enabled:
            t = t.clone()
            dist.all_reduce(t)
        return t

    def scale_for_tokens(self, local_tokens: int, device: torch.device) -> tuple[float, int]:
        """(what to divide a rank's loss sum by, target tokens over all ranks): DDP averages the
        ranks' gradients, so dividing by (all tokens / world) makes the update sum/all tokens."""
        total = int(self.sum([local_tokens], device)[0])
        return max(total, 1) / self.world, total

    def agree(self, values: Sequence[float], device: torch.device) -> list[float]:
        """Element-wise maxima over ranks: a flag raised by any rank is raised for all."""
        return self._reduce(values, device, "MAX")

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (picklable builtins)."""
        if not self.enabled:
            return obj
        box = [obj if self.main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """Rank 0 runs the block first (e.g. building caches), then the others (reading them)."""
        if not self.main:
            self.barrier()
        yield
        if self.main:
            self.barrier()

    def describe(self) -> str:
        return f"{self.world} processes ({self.backend}), this is rank {self.rank}" if self.enabled else "1 process"


SINGLE = Dist()


def init(device_name: str) -> Dist:
    """Join the process group that torchrun describes in the environment; one process without it."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return SINGLE
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device_name == "cuda" or (device_name == "auto" and torch.cuda.is_available())
    backend = "nccl" if cuda else "gloo"
    if cuda:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group(backend)
    return Dist(rank, local, world, backend)


def close(d: Dist) -> None:
    """Leave the process group together: a rank that tears its gloo connections down while another is
    still using them can abort ("terminate called without an active exception")."""
    if d.enabled and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
