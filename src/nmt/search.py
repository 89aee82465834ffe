"""Batched greedy / sampling and beam search over ``Transformer.encode`` / ``decode``.

Shapes: B = sentences, K = beam size, N = active rows (sentences still being
decoded, times K in beam search), S = source length, t = tokens generated so
far, V = target vocabulary.

Length conventions (shared by both strategies):

* a hypothesis' length L counts generated tokens including EOS;
* ``max_len`` per sentence = min(max_len_a * src_len + max_len_b,
  model.max_positions - 1) decoding steps; a sentence that reaches it stops
  without EOS;
* EOS is forbidden while fewer than ``min_len`` tokens were generated, so
  ``min_len >= max_len`` yields exactly ``max_len`` tokens;
* PAD and BOS are never generated.

Each step the last position's logits go through: repetition penalty (on the
logits, as Hugging Face does), [temperature], log_softmax (in float32),
n-gram blocking, the bans above. Sentences that are finished leave the
active batch, so late steps only compute what is still needed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from nmt.config import DecodeConfig
from nmt.logits import (NEG_INF, apply_repetition_penalty, block_repeated_ngrams, length_penalty,
                        top_k_top_p_filter)


@dataclass
class Hypothesis:
    """One translation: ``tokens`` without BOS/EOS, ``score`` = logprob / length penalty."""

    tokens: list[int]
    score: float
    logprob: float


def max_lengths(src_mask: Tensor, cfg: DecodeConfig, max_positions: int) -> Tensor:
    """Per-sentence step limit [B] (at least 1): min(a * src_len + b, max_positions - 1)."""
    src_len = src_mask.sum(dim=1).to(torch.float64)
    limit = torch.floor(cfg.max_len_a * src_len + cfg.max_len_b).long()
    return limit.clamp(min=1, max=max(1, max_positions - 1))


def next_logprobs(logits: Tensor, history: Tensor, step: int, cfg: DecodeConfig, bos_id: int, eos_id: int,
                  pad_id: int, temperature: float = 1.0, out: Optional[Tensor] = None) -> Tensor:
    """Processed next-token log-probs [N, V] from last-position logits [N, V].

    history [N, t+1] starts with BOS; ``step`` = t tokens generated so far.
    With ``out`` (float32 [N, V]) the result is written there and ``logits``
    is overwritten as scratch: the search loop then allocates no [N, V]
    tensor per step besides the model's logits.
    """
    inplace = out is not None
    logits = logits.float()
    if cfg.repetition_penalty != 1.0:
        logits = apply_repetition_penalty(logits, history, cfg.repetition_penalty, (bos_id, pad_id), inplace)
    if temperature != 1.0:
        logits = logits.div_(temperature) if inplace else logits / temperature
    lprobs = torch.log_softmax(logits, dim=-1, out=out) if inplace else F.log_softmax(logits, dim=-1)
    if cfg.no_repeat_ngram_size > 0:
        lprobs = block_repeated_ngrams(lprobs, history, cfg.no_repeat_ngram_size, inplace=True)
    banned = [bos_id, pad_id] + ([eos_id] if step < cfg.min_len else [])
    lprobs[:, banned] = NEG_INF  # lprobs is ours (fresh or ``out``): in place is safe
    return lprobs


def _scratch(rows: int, logits: Tensor) -> Tensor:
    """Float32 [rows, V] buffer for the processed log-probs, reused every step (``[:n]`` views)."""
    return torch.empty((rows, logits.shape[-1]), dtype=torch.float32, device=logits.device)


def search(model, src: Tensor, src_mask: Tensor, cfg: DecodeConfig, bos_id: int = 2, eos_id: int = 3,
           pad_id: int = 0, generator: Optional[torch.Generator] = None) -> list[list[Hypothesis]]:
    """Greedy (or sampling) when ``cfg.beam_size == 1``, beam search otherwise."""
    fn = greedy_search if cfg.beam_size == 1 else beam_search
    return fn(model, src, src_mask, cfg, bos_id, eos_id, pad_id, generator)


def _finalise(tokens: list[int], logprob: float, length: int, cfg: DecodeConfig, eos_id: int) -> Hypothesis:
    if tokens and tokens[-1] == eos_id:
        tokens = tokens[:-1]
    lp = length_penalty(float(length), cfg.length_penalty, cfg.length_penalty_mode)
    return Hypothesis(tokens=tokens, score=logprob / lp, logprob=logprob)


def greedy_search(model, src: Tensor, src_mask: Tensor, cfg: DecodeConfig, bos_id: int = 2, eos_id: int = 3,
                  pad_id: int = 0, generator: Optional[torch.Generator] = None) -> list[list[Hypothesis]]:
    """Greedy decoding, or sampling when ``cfg.sampling`` (temperature, top_k, top_p).

    src [B, S], src_mask [B, S] (True = real token) -> per sentence a list with
    one :class:`Hypothesis`. When sampling, ``logprob`` sums the log-probs of
    the temperature-scaled distribution before top-k/top-p truncation.
    """
    with torch.inference_mode():
        device, b = src.device, src.shape[0]
        limit = max_lengths(src_mask, cfg, model.max_positions).to(device)
        steps = int(limit.max())
        out = torch.full((b, steps), pad_id, dtype=torch.long, device=device)
        logprob = torch.zeros(b, device=device)
        length = torch.zeros(b, dtype=torch.long, device=device)
        rows = torch.arange(b, device=device)            # sentence of each active row
        hist = torch.full((b, 1), bos_id, dtype=torch.long, device=device)
        memory, mask, cache, work = model.encode(src, src_mask), src_mask, None, None
        temperature = cfg.temperature if cfg.sampling else 1.0
        for step in range(steps):
            logits, cache = model.decode(hist[:, -1:], memory if cache is None else None, mask, cache)
            work = _scratch(b, logits) if work is None else work
            lprobs = next_logprobs(logits[:, -1], hist, step, cfg, bos_id, eos_id, pad_id, temperature,
                                   out=work[:hist.shape[0]])
            if cfg.sampling:
                probs = top_k_top_p_filter(lprobs, cfg.top_k, cfg.top_p).softmax(dim=-1)
                tok = torch.multinomial(probs, 1, generator=generator).squeeze(1)
            else:
                tok = lprobs.argmax(dim=-1)
            out[rows, step] = tok
            logprob[rows] += lprobs.gather(1, tok[:, None]).squeeze(1)
            length[rows] = step + 1
            hist = torch.cat((hist, tok[:, None]), dim=1)
            keep = (tok != eos_id) & (step + 1 < limit[rows])
            if not bool(keep.all()):
                if not bool(keep.any()):
                    break
                idx = keep.nonzero().squeeze(1)
                rows, hist, mask, cache = rows[idx], hist[idx], mask[idx], cache.reorder_(idx, idx)
        toks, lps, lens = out.tolist(), logprob.tolist(), length.tolist()
        return [[_finalise(toks[i][:lens[i]], lps[i], lens[i], cfg, eos_id)] for i in range(b)]


class _Finished:
    """Up to K finished hypotheses per sentence, best first, kept as tensors.

    key [B, K]: score used for ranking (-inf = empty slot); raw [B, K]: summed
    log-prob; length [B, K]; tokens [B, K, T] (PAD-padded, EOS included).
    """

    def __init__(self, b: int, k: int, steps: int, pad_id: int, device: torch.device) -> None:
        self.key = torch.full((b, k), NEG_INF, device=device)
        self.raw = torch.full((b, k), NEG_INF, device=device)
        self.length = torch.zeros((b, k), dtype=torch.long, device=device)
        self.tokens = torch.full((b, k, steps), pad_id, dtype=torch.long, device=device)
        self.pad_id = pad_id

    def add(self, sent: Tensor, seqs: Tensor, raw: Tensor, ok: Tensor, lp: float) -> None:
        """Merge candidates of the active sentences ``sent`` [N]: seqs [N, C, t], raw/ok [N, C]."""
        k, steps = self.key.shape[1], self.tokens.shape[2]
        n, c, t = seqs.shape
        # a valid candidate with score -inf still ranks above an empty slot
        key = torch.where(ok, (raw / lp).clamp(min=torch.finfo(raw.dtype).min), NEG_INF)
        best, pick = torch.cat((self.key[sent], key), dim=1).topk(k, dim=1)
        seqs = F.pad(seqs, (0, steps - t), value=self.pad_id)
        self.key[sent] = best
        self.raw[sent] = torch.cat((self.raw[sent], raw), dim=1).gather(1, pick)
        new_len = torch.full((n, c), t, dtype=torch.long, device=raw.device)
        self.length[sent] = torch.cat((self.length[sent], new_len), dim=1).gather(1, pick)
        all_tokens = torch.cat((self.tokens[sent], seqs), dim=1)
        self.tokens[sent] = all_tokens.gather(1, pick[:, :, None].expand(-1, -1, steps))

    def hypotheses(self, nbest: int, cfg: DecodeConfig, eos_id: int) -> list[list[Hypothesis]]:
        keys, raws, lens, toks = (x.tolist() for x in (self.key, self.raw, self.length, self.tokens))
        return [[_finalise(toks[i][j][:lens[i][j]], raws[i][j], lens[i][j], cfg, eos_id)
                 for j in range(nbest) if keys[i][j] > NEG_INF] for i in range(len(keys))]


def beam_search(model, src: Tensor, src_mask: Tensor, cfg: DecodeConfig, bos_id: int = 2, eos_id: int = 3,
                pad_id: int = 0, generator: Optional[torch.Generator] = None) -> list[list[Hypothesis]]:
    """Batched beam search with the incremental KV cache.

    src [B, S], src_mask [B, S] -> per sentence up to ``cfg.nbest`` hypotheses,
    best score first. Each step ranks 2K candidates per sentence over K * V;
    EOS candidates within the top K are finished, the best K others go on. A
    sentence stops at its max length (its alive beams are then finished too)
    or once it holds K finished hypotheses that no alive beam can beat: log-probs
    only fall, so an alive beam's best final score is raw / max(lp(t+1), lp(max_len)).
    ``generator`` is unused (beam search is deterministic).
    """
    if cfg.sampling:
        raise ValueError("sampling works only with beam_size=1 (decode.sampling=true, "
                         f"decode.beam_size={cfg.beam_size})")
    k = cfg.beam_size
    alpha, mode = cfg.length_penalty, cfg.length_penalty_mode
    with torch.inference_mode():
        device, b = src.device, src.shape[0]
        limit = max_lengths(src_mask, cfg, model.max_positions).to(device)
        steps = int(limit.max())
        fin = _Finished(b, k, steps, pad_id, device)
        sent = torch.arange(b, device=device)              # active sentences [Ba]
        hist = torch.full((b, 1), bos_id, dtype=torch.long, device=device)
        scores = torch.zeros((b, 1), device=device)        # [Ba, beams]; one beam before step 0
        memory, mask, cache, work = model.encode(src, src_mask), src_mask, None, None   # mask: [Ba, S]
        for step in range(steps):
            logits, cache = model.decode(hist[:, -1:], memory if cache is None else None, mask, cache)
            work = _scratch(b * k, logits) if work is None else work
            lprobs = next_logprobs(logits[:, -1], hist, step, cfg, bos_id, eos_id, pad_id, out=work[:hist.shape[0]])
            ba, beams, v = scores.shape[0], scores.shape[1], lprobs.shape[1]
            if v < 2 * k:
                raise ValueError(f"beam_size={k} needs a target vocabulary of at least {2 * k} tokens, got {v}")
            cand = lprobs.add_(scores.reshape(-1, 1)).view(ba, beams * v)
            top, idx = cand.topk(2 * k, dim=1)                               # [Ba, 2K], best first
            beam, tok = idx // v, idx % v
            last = step + 1 >= limit[sent]                                   # [Ba]
            is_eos = tok == eos_id
            finishing = (is_eos | last[:, None]) & (top > NEG_INF)
            finishing[:, k:] = False
            if bool(finishing.any()):
                rows = torch.arange(ba, device=device)[:, None] * beams + beam   # rows of hist/cache
                seqs = torch.cat((hist[rows.view(-1), 1:], tok.view(-1, 1)), dim=1).view(ba, 2 * k, step + 1)
                fin.add(sent, seqs, top, finishing, length_penalty(float(step + 1), alpha, mode))
            # the K best non-EOS candidates go on (at most K of the 2K are EOS, one per beam)
            order = is_eos.to(torch.uint8).argsort(dim=1, stable=True)[:, :k]
            beam, tok, scores = beam.gather(1, order), tok.gather(1, order), top.gather(1, order)
            if step > 0:  # beams' order within a sentence is free: move few cache rows
                order = _stay_in_place(beam)
                beam, tok, scores = beam.gather(1, order), tok.gather(1, order), scores.gather(1, order)
            done = last | _cannot_improve(fin.key[sent], scores, step, limit[sent], alpha, mode)
            keep = None
            if bool(done.any()):
                if bool(done.all()):
                    break
                keep = (~done).nonzero().squeeze(1)
                sent, beam, tok, scores, mask = sent[keep], beam[keep], tok[keep], scores[keep], mask[keep]
            old = torch.arange(ba, device=device) if keep is None else keep  # their rows in the cache
            flat = (old[:, None] * beams + beam).reshape(-1)
            if step == 0:  # 1 -> K hypotheses per sentence, room for every step; cross K/V stay shared
                cache = cache.for_beams(flat, k, capacity=steps)
            else:
                cache = cache.reorder_(flat, keep)
            hist = torch.cat((hist.index_select(0, flat), tok.reshape(-1, 1)), dim=1)
        return fin.hypotheses(cfg.nbest, cfg, eos_id)


def _stay_in_place(parent: Tensor) -> Tensor:
    """Order [Ba, K] that puts each parent's best child in the parent's own slot.

    parent [Ba, K]: the beam (slot, < K) each continuing candidate extends, best
    first. The other children fill the free slots in rank order. Which slot a
    hypothesis takes changes no score (only how exactly tied candidates of
    different beams rank); it decides which cache rows ``KVCache.reorder_``
    must copy: those whose parent sits in another slot.
    """
    k = parent.shape[1]
    slots = torch.arange(k, device=parent.device)
    same = parent[:, :, None] == parent[:, None, :]                        # [Ba, K, K]
    first = ~(same & (slots[None, :] < slots[:, None])).any(dim=2)         # no earlier sibling
    taken = (parent[:, :, None] == slots).any(dim=1)                       # [Ba, K] slot is some parent's
    free = taken.to(torch.uint8).argsort(dim=1, stable=True)              # free slots first, increasing
    rank = (~first).cumsum(dim=1) - 1                                      # among the later siblings
    slot = torch.where(first, parent, free.gather(1, rank.clamp(min=0)))
    return torch.empty_like(slot).scatter_(1, slot, slots.expand_as(slot))


def _cannot_improve(fin_key: Tensor, alive: Tensor, step: int, limit: Tensor, alpha: float, mode: str) -> Tensor:
    """[Ba] True where K hypotheses are finished and no alive beam [Ba, K] can beat the worst."""
    full = fin_key[:, -1] > NEG_INF
    # alive beams hold step + 1 tokens; they can finish with step + 2 .. limit tokens
    lp_next = length_penalty(float(step + 2), alpha, mode)
    lp_max = length_penalty(limit.to(alive.dtype), alpha, mode)
    bound = alive.max(dim=1).values / torch.clamp(lp_max, min=lp_next)
    return full & (bound <= fin_key[:, -1])
