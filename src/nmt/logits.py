"""Logit processors for search: pure, batched functions on score tensors.

Shapes: N = hypotheses (batch * beam), V = vocabulary, L = tokens so far.
``history`` [N, L] holds each hypothesis' tokens so far (it may start with BOS
and may be right-padded with PAD). Every function returns a new tensor and
leaves its inputs untouched, unless called with ``inplace=True``: the search
loop uses that on its own scratch tensors, because a fresh [N, V] tensor per
step costs more in page faults (~2 ms for 160 x 8000 floats) than the
arithmetic itself.
"""
from __future__ import annotations

from typing import Sequence, Union

import torch
from torch import Tensor

NEG_INF = float("-inf")


def apply_repetition_penalty(scores: Tensor, history: Tensor, penalty: float,
                             ignore_ids: Sequence[int] = (2, 0), inplace: bool = False) -> Tensor:
    """CTRL repetition penalty (Keskar et al., 2019), as Hugging Face applies it.

    scores [N, V] are LOGITS (call this before ``log_softmax``): for every
    distinct token of ``history`` [N, L] except ``ignore_ids`` (BOS and PAD by
    default), a positive logit is divided by ``penalty`` and a negative one
    multiplied by it, so with ``penalty > 1`` the token always becomes less
    likely. A token seen several times is penalised once. Returns [N, V].

    On log-probabilities (all <= 0) the rule would only ever multiply, which is
    why the penalty is defined on logits.
    """
    if penalty == 1.0 or history.shape[1] == 0:
        return scores
    seen = scores.gather(1, history)                                     # [N, L]
    penalised = torch.where(seen > 0, seen / penalty, seen * penalty)
    if ignore_ids:
        ignored = torch.isin(history, torch.tensor(list(ignore_ids), device=history.device))
        penalised = torch.where(ignored, seen, penalised)
    # duplicates in history write the same value, so each token counts once
    return scores.scatter_(1, history, penalised) if inplace else scores.scatter(1, history, penalised)


def block_repeated_ngrams(scores: Tensor, history: Tensor, n: int, inplace: bool = False) -> Tensor:
    """Ban (-inf) every token that would complete an n-gram already in ``history``.

    scores [N, V], history [N, L] -> [N, V]. The next n-gram is the last
    ``n - 1`` tokens of the history plus the candidate token; any earlier
    n-gram starting with those ``n - 1`` tokens bans its last token. ``n == 1``
    bans every token already seen. Example: n=3, history [5, 6, 7, 5, 6] bans 7.
    Vectorised over hypotheses and n-grams (no Python loop).
    """
    if n <= 0 or history.shape[1] < n:
        return scores
    grams = history.unfold(1, n, 1)                                      # [N, W, n], W = L - n + 1
    suffix = history[:, history.shape[1] - n + 1:]                       # [N, n-1]
    match = (grams[:, :, :-1] == suffix[:, None, :]).all(dim=-1)         # [N, W]
    # min-reduce: -inf wherever at least one matching n-gram names the token
    ban = torch.where(match, NEG_INF, float("inf")).to(scores.dtype)
    reduce = scores.scatter_reduce_ if inplace else scores.scatter_reduce
    return reduce(1, grams[:, :, -1], ban, reduce="amin", include_self=True)


def length_penalty(length: Union[Tensor, int, float], alpha: float, mode: str = "power") -> Union[Tensor, float]:
    """Divisor that normalises a hypothesis' summed log-prob by its length.

    ``length`` counts generated tokens including EOS. ``power``: L ** alpha
    (fairseq / Hugging Face); ``gnmt``: ((5 + L) / 6) ** alpha (Wu et al., 2016).
    alpha = 0 gives 1 (no normalisation). Works on ints, floats and tensors.
    """
    if mode == "power":
        return length ** alpha
    if mode == "gnmt":
        return ((5 + length) / 6) ** alpha
    raise ValueError(f"length penalty mode {mode!r} is not one of: power, gnmt")


def top_k_top_p_filter(logits: Tensor, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """Keep the ``top_k`` best tokens and the smallest set whose probability reaches ``top_p``.

    logits [N, V] -> [N, V] with the rest set to -inf. ``top_k=0`` and
    ``top_p=1`` turn the filters off. The best token always survives.
    """
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, NEG_INF)
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # drop a token when the tokens before it already reach top_p
        drop_sorted = (cum - sorted_logits.softmax(dim=-1)) >= top_p
        drop = drop_sorted.scatter(1, order, drop_sorted)
        logits = logits.masked_fill(drop, NEG_INF)
    return logits
