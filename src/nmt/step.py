"""The forward and backward passes of one optimizer update, shared by training and the LR range test.

The model computes the loss itself (``model(src, src_mask, tgt_in, tgt_out, eps)``),
projecting only real target positions and never storing the [tokens x vocab]
logits; a DistributedDataParallel wrapper sees the whole computation in its forward.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from nmt.batching import Batch


def accumulate_gradients(model: torch.nn.Module, batches: Sequence[Batch], device: torch.device,
                         autocast: Optional[torch.dtype], label_smoothing: float) -> tuple[float, int]:
    """Backpropagate the label-smoothed loss of ``batches``, normalised by their total target tokens.

    Gradients add up in ``.grad`` (the caller zeroes them before and steps after).
    Returns ``(loss per target token, target tokens)``; the loss is read back from
    the device once, after the last backward pass.
    """
    total = sum(b.n_tgt_tokens for b in batches)
    loss_sum = torch.zeros((), device=device)
    for b in batches:
        b = b.to(device)
        with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
            loss, _, _ = model(b.src, b.src_mask, b.tgt_in, b.tgt_out, label_smoothing)
        (loss / total).backward()
        loss_sum += loss.detach()
    return float(loss_sum) / max(total, 1), total
