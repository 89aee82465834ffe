"""Validation: teacher-forced loss, source use, and corpus translation + sacrebleu.

``src_gain`` measures whether the model uses its input: the dev loss is
computed a second time with every source replaced by an empty sentence, and
``src_gain = blind_loss - real_loss`` (nats per target token). A model that
has learnt only an English language model has ``src_gain`` near zero even
while its dev perplexity keeps falling.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import sacrebleu
import torch

from nmt.batching import Batch, batches_for_inference, collate
from nmt.config import DecodeConfig, ValidConfig
from nmt.loss import label_smoothed_nll, n_correct
from nmt.search import Hypothesis, search
from nmt.tokenizer import BOS, EOS, PAD


@dataclass
class LossStats:
    loss: float        # mean NLL per target token (nats), no label smoothing
    ppl: float
    accuracy: float    # share of target tokens predicted exactly (teacher forcing)
    n_tokens: int


def make_batches(src_ids: Sequence[list[int]], tgt_ids: Sequence[list[int]], max_tokens: int) -> list[Batch]:
    """Length-sorted batches of a fixed evaluation set (built once, reused every validation)."""
    lengths = [max(len(s), len(t) + 1) for s, t in zip(src_ids, tgt_ids)]
    order = batches_for_inference(lengths, max_tokens=max_tokens)
    return [collate([src_ids[i] for i in idx], [tgt_ids[i] for i in idx], idx) for idx in order]


def blind_sources(n: int) -> list[list[int]]:
    """``n`` empty source sentences (just EOS): the input of the source-blind dev loss."""
    return [[EOS] for _ in range(n)]


@torch.inference_mode()
def corpus_loss(model: torch.nn.Module, batches: list[Batch], device: torch.device,
                autocast_dtype: Optional[torch.dtype] = None) -> LossStats:
    """Mean token NLL, perplexity and accuracy of ``batches`` under teacher forcing."""
    was_training = model.training
    model.eval()
    nll_sum, correct, n = 0.0, 0, 0
    for b in batches:
        b = b.to(device)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            logits = model(b.src, b.src_mask, b.tgt_in)
        _, nll, ntok = label_smoothed_nll(logits, b.tgt_out, PAD, 0.0)
        nll_sum += nll.item()
        correct += int(n_correct(logits, b.tgt_out, PAD).item())
        n += int(ntok.item())
    model.train(was_training)
    loss = nll_sum / max(n, 1)
    return LossStats(loss=loss, ppl=math.exp(min(loss, 50.0)), accuracy=correct / max(n, 1), n_tokens=n)


@torch.inference_mode()
def translate_hypotheses(model: torch.nn.Module, src_ids: Sequence[list[int]], decode: DecodeConfig,
                         device: torch.device, max_sentences: int = 64, max_tokens: int = 0,
                         autocast_dtype: Optional[torch.dtype] = None) -> list[list[Hypothesis]]:
    """Decode id sequences in length-sorted batches; returns, in input order, the n-best hypotheses."""
    was_training = model.training
    model.eval()
    results: list[list[Hypothesis]] = [[] for _ in src_ids]
    for idx in batches_for_inference([len(s) for s in src_ids], max_sentences=max_sentences, max_tokens=max_tokens):
        b = collate([src_ids[i] for i in idx], None, idx).to(device)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            hyps = search(model, b.src, b.src_mask, decode, bos_id=BOS, eos_id=EOS, pad_id=PAD)
        for i, sent in zip(idx, hyps):
            results[i] = sent
    model.train(was_training)
    return results


def translate_ids(model: torch.nn.Module, src_ids: Sequence[list[int]], decode: DecodeConfig,
                  device: torch.device, max_sentences: int = 64, max_tokens: int = 0,
                  autocast_dtype: Optional[torch.dtype] = None) -> list[list[list[int]]]:
    """Decode id sequences in length-sorted batches; returns, in input order, the n-best token lists."""
    nbest = translate_hypotheses(model, src_ids, decode, device, max_sentences, max_tokens, autocast_dtype)
    return [[h.tokens for h in sent] for sent in nbest]


def corpus_scores(hyps: Sequence[str], refs: Sequence[str]) -> dict[str, float]:
    """sacrebleu BLEU and chrF, plus the share of distinct hypotheses."""
    return {
        "bleu": sacrebleu.corpus_bleu(list(hyps), [list(refs)]).score,
        "chrf": sacrebleu.corpus_chrf(list(hyps), [list(refs)]).score,
        "distinct": len(set(hyps)) / max(len(hyps), 1),
    }


def validate(model: torch.nn.Module, dev_batches: list[Batch], blind_batches: list[Batch],
             dev_src: Sequence[list[int]], refs: Sequence[str], tokenizer, v: ValidConfig, device: torch.device,
             autocast_dtype: Optional[torch.dtype] = None) -> tuple[dict[str, float], list[str]]:
    """Dev loss, perplexity, accuracy, source use and BLEU/chrF of the first ``v.max_sentences``
    dev sentences decoded with ``v.decode``; returns (metrics, those translations)."""
    real = corpus_loss(model, dev_batches, device, autocast_dtype)
    blind = corpus_loss(model, blind_batches, device, autocast_dtype)
    n = v.max_sentences or len(dev_src)
    out = translate_ids(model, dev_src[:n], v.decode, device, v.batch_size, 0, autocast_dtype)
    hyps = [tokenizer.decode_tgt(h[0]) if h else "" for h in out]
    s = corpus_scores(hyps, refs[:n])
    return dict(valid_loss=real.loss, valid_ppl=real.ppl, valid_acc=real.accuracy, valid_bleu=s["bleu"],
                valid_chrf=s["chrf"], valid_src_gain=blind.loss - real.loss, valid_blind_loss=blind.loss,
                valid_distinct=s["distinct"]), hyps
