"""Label-smoothed cross-entropy as pure functions over (logits, target).

All sums run over non-pad target positions only, so callers can add them up
across batches (and gradient-accumulation steps) and divide once by the total
token count.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def label_smoothed_nll(logits: Tensor, target: Tensor, pad_id: int, epsilon: float) -> tuple[Tensor, Tensor, Tensor]:
    """Label-smoothed negative log-likelihood, summed over non-pad targets.

    logits [..., V] (any float dtype; computed in float32), target [...] (Long).
    Returns ``(loss_sum, nll_sum, n_tokens)``: two float32 scalars and a long scalar.

    Convention: per token, ``loss = (1 - eps) * nll + eps * mean_v(-log p_v)``,
    i.e. the cross-entropy against ``(1 - eps) * onehot + eps / V`` where the
    uniform part covers all V entries, the target included (the convention of
    ``F.cross_entropy(label_smoothing=eps)``; fairseq spreads eps over the
    other V - 1 entries instead). ``nll_sum`` is the plain NLL, for perplexity.
    """
    if not 0.0 <= epsilon < 1.0:
        raise ValueError(f"label smoothing epsilon must be in [0, 1), got {epsilon}")
    lprobs = F.log_softmax(logits.float(), dim=-1)
    keep = target != pad_id
    # gather needs a valid index at pad positions too; their value is masked away
    safe_target = target.masked_fill(~keep, 0).unsqueeze(-1)
    nll = -lprobs.gather(-1, safe_target).squeeze(-1)
    loss = nll if epsilon == 0.0 else (1.0 - epsilon) * nll - epsilon * lprobs.mean(dim=-1)
    # masked_fill (not multiply) so inf/NaN at pad positions cannot leak into the sums
    loss_sum = loss.masked_fill(~keep, 0.0).sum()
    nll_sum = nll.masked_fill(~keep, 0.0).sum()
    return loss_sum, nll_sum, keep.sum()


def n_correct(logits: Tensor, target: Tensor, pad_id: int) -> Tensor:
    """Number of non-pad positions where argmax(logits [..., V]) == target [...] (long scalar)."""
    keep = target != pad_id
    return ((logits.argmax(dim=-1) == target) & keep).sum()
