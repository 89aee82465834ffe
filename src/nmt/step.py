"""The forward and backward passes of one optimizer update, shared by training and the LR range test.

The model computes the loss itself (``model(src, src_mask, tgt_in, tgt_out, eps)``),
projecting only real target positions and never storing the [tokens x vocab]
logits; a DistributedDataParallel wrapper sees the whole computation in its forward.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from nmt.batching import Batch
from nmt.distributed import SINGLE, Dist


@dataclass
class Update:
    """The outcome of :func:`train_step`: Python numbers, or device tensors when it did not synchronise."""

    loss: float | torch.Tensor      # per target token, over all ranks
    norm: float | torch.Tensor      # gradient norm before clipping
    tokens: int                     # target tokens, over all ranks
    ok: bool | torch.Tensor         # False: the loss or gradient was not finite and the update was skipped


def accumulate_gradients(model: torch.nn.Module, batches: Sequence[Batch], device: torch.device,
                         autocast: Optional[torch.dtype], label_smoothing: float,
                         dist: Dist = SINGLE) -> tuple[torch.Tensor, int]:
    """Backpropagate the label-smoothed loss of ``batches``, normalised by their target tokens (over
    all ranks when distributed: ``model`` is then the DDP wrapper, synchronised on the last batch).

    Gradients add up in ``.grad`` (the caller zeroes them before and steps after). Returns
    ``(loss per target token as a device tensor, target tokens)``, both over all ranks.
    """
    denominator, total = dist.scale_for_tokens(sum(b.n_tgt_tokens for b in batches), device)
    loss_sum = torch.zeros((), device=device)
    for i, b in enumerate(batches):
        b = b.to(device)
        with dist.no_sync(model, last=i == len(batches) - 1):
            with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
                loss, _, _ = model(b.src, b.src_mask, b.tgt_in, b.tgt_out, label_smoothing)
            (loss / denominator).backward()
        loss_sum += loss.detach()
    return dist.sum_tensor(loss_sum) / max(total, 1), total


def train_step(model: torch.nn.Module, forward: torch.nn.Module, opt, batches: Sequence[Batch],
               device: torch.device, autocast: Optional[torch.dtype], label_smoothing: float, clip_norm: float,
               dist: Dist = SINGLE, sync: bool = True) -> Update:
    """One optimizer update: gradients of ``batches`` through ``forward`` (``model`` or its DDP
    wrapper), clipping, and the step of ``opt`` (a ``ScheduledOptimizer``).

    ``sync=True`` (the CPU, where it costs nothing) reads loss and norm back and skips a
    non-finite update on the host. ``sync=False`` (CUDA) reads nothing back: the fused Adam
    kernel skips a non-finite update on the device (its ``found_inf`` input, as under AMP's
    grad scaler) and the returned values stay tensors for the caller to read when it logs.
    """
    model.train()
    opt.zero_grad()
    loss, tokens = accumulate_gradients(forward, batches, device, autocast, label_smoothing, dist)
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip_norm if clip_norm > 0 else math.inf)
    if not sync and opt.fused:
        bad = ~(torch.isfinite(loss) & torch.isfinite(norm))
        opt.step(found_inf=bad.float())
        return Update(loss, norm, tokens, ~bad)
    loss, norm = float(loss), float(norm)
    ok = math.isfinite(loss) and math.isfinite(norm)
    if ok:
        opt.step()
    else:
        opt.zero_grad()
    return Update(loss, norm, tokens, ok)
