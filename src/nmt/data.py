"""From corpus files to token ids: tokenizer, the training split's token cache, the dev split.

The training split is encoded once into a memory-mapped token cache
(:mod:`nmt.tokcache`), filtered and truncated there; later runs, sweep jobs and
every rank of a multi-GPU run map it instead of re-encoding, so resident memory
does not grow with the corpus beyond the length index. The dev split is small
and read, encoded and truncated (never filtered) at every start.
"""
from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np

from nmt.config import Config, MixConfig
from nmt.corpus import find_split, iter_parallel, load_split
from nmt.tokcache import cached_split
from nmt.tokenizer import EOS, Tokenizer, cache_key_of_pairs, load_cached, train_and_cache

log = logging.getLogger(__name__)


@dataclass
class PreparedData:
    tokenizer: Tokenizer
    train_src: Sequence[np.ndarray]  # source ids + EOS (nmt.tokcache.TokenArrays: views of the mapped cache)
    train_tgt: Sequence[np.ndarray]  # target ids, no BOS/EOS (the batcher adds them)
    dev_src: list[list[int]]
    dev_tgt: list[list[int]]
    dev_src_text: list[str]
    dev_ref_text: list[str]
    filter_counts: dict[str, int] = field(default_factory=dict)

    @property
    def train_src_lens(self) -> np.ndarray:
        return _lengths(self.train_src)

    @property
    def train_tgt_lens(self) -> np.ndarray:
        """Target lengths including the added BOS (tgt_in) / EOS (tgt_out)."""
        return _lengths(self.train_tgt) + 1


class Mixture(Sequence):
    """One side of the training split followed by a fixed sample of another corpus's pairs (data.mix)."""

    def __init__(self, primary: Sequence, extra: Sequence, picks: np.ndarray) -> None:
        self.primary, self.extra, self.picks = primary, extra, picks

    def __len__(self) -> int:
        return len(self.primary) + len(self.picks)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        n = len(self.primary)
        if i < 0:
            i += len(self)
        return self.primary[i] if i < n else self.extra[int(self.picks[i - n])]

    def lengths(self) -> np.ndarray:
        return np.concatenate([_lengths(self.primary), _lengths(self.extra)[self.picks]])


def _lengths(seqs: Sequence) -> np.ndarray:
    if hasattr(seqs, "lengths"):
        return seqs.lengths()
    return np.fromiter(map(len, seqs), dtype=np.int64, count=len(seqs))


def token_cache_dir(cfg: Config) -> str:
    """data.cache_dir, else ``tokens/`` beside the tokenizer cache."""
    return cfg.data.cache_dir or str(Path(os.path.expanduser(cfg.tokenizer.cache_dir)).parent / "tokens")


def tokenizer_for(cfg: Config, files: tuple[Path, Path]) -> Tokenizer:
    """The tokenizer of this training text: its cache key streams the files (nothing is held in
    memory), and only a cache miss reads the lines to train sentencepiece on."""
    limit = cfg.data.train_limit
    key = cache_key_of_pairs(cfg.tokenizer, iter_parallel(*files, limit))
    cached = load_cached(cfg.tokenizer, key)
    if cached is not None:
        return cached
    t = cfg.tokenizer
    # sentencepiece samples input_sentence_size sentences anyway, but only after holding every line
    pairs_needed = t.input_sentence_size // (2 if t.joint else 1) if t.input_sentence_size else 0
    pairs, total = sample_pairs(iter_parallel(*files, limit), pairs_needed)
    log.info("training the tokenizer on %s of %s pairs (cached for later runs)", f"{len(pairs):,}", f"{total:,}")
    return train_and_cache(t, key, [a for a, _ in pairs], [b for _, b in pairs])


def sample_pairs(pairs: Iterable[tuple[str, str]], k: int, seed: int = 1) -> tuple[list[tuple[str, str]], int]:
    """All pairs if there are at most ``k`` (or ``k`` is 0), else a seeded uniform sample of ``k``
    (reservoir sampling: one pass, ``k`` pairs in memory). Returns (sample, pairs seen)."""
    rng = random.Random(seed)
    sample: list[tuple[str, str]] = []
    n = 0
    for n, pair in enumerate(pairs, start=1):
        if not k or n <= k:
            sample.append(pair)
        else:
            j = rng.randrange(n)
            if j < k:
                sample[j] = pair
    return sample, n


def mix_in(cfg: Config, tokenizer: Tokenizer, src: Sequence, tgt: Sequence) -> tuple[Mixture, Mixture]:
    """``src``/``tgt`` followed by a sample of corpus ``data.mix.name``'s training split (same tokenizer,
    filters and token cache), fixed by ``train.seed``: ``data.mix.ratio`` of its pairs per pair of
    ``src`` (``data.mix.unit=pairs``), or as many pairs as hold, at that corpus's mean length,
    ``ratio`` of its tokens per token of ``src``/``tgt`` (``tokens``). Drawn without replacement while
    that corpus has enough pairs, with replacement beyond."""
    d = cfg.data
    other = replace(d, name=d.mix.name, train_limit=0, mix=MixConfig())
    split = cached_split(find_split(other, "train"), tokenizer, other, cfg.model.max_positions, token_cache_dir(cfg),
                         cfg.train.progress)
    if len(split.src) == 0:
        raise ValueError(f"data.mix: every training pair of {other.name} was filtered out ({split.counts})")
    own_tokens = int(_lengths(src).sum() + _lengths(tgt).sum())
    other_lens = split.src.lengths() + split.tgt.lengths()
    # pairs to draw: ratio per pair of src, or ratio per token of src/tgt at the other corpus's mean pair length
    k = max(1, round(d.mix.ratio * (len(src) if d.mix.unit == "pairs" else own_tokens / other_lens.mean())))
    rng = np.random.default_rng(cfg.train.seed)
    picks = rng.choice(len(split.src), size=k, replace=k > len(split.src)).astype(np.int64)
    mixed_tokens = int(other_lens[picks].sum())
    log.info("data.mix: %s pairs of %s (of %s) mixed into %s training pairs of %s: %.1f%% of the mixture's pairs, "
             "%.1f%% of its tokens", f"{k:,}", other.name, f"{len(split.src):,}", f"{len(src):,}", d.name,
             100 * k / (k + len(src)), 100 * mixed_tokens / (mixed_tokens + own_tokens))
    return Mixture(src, split.src, picks), Mixture(tgt, split.tgt, picks)


def truncate(ids: list[list[int]], limit: int, name: str, keep_last: Optional[int] = None) -> list[list[int]]:
    """Cut sequences to ``limit`` tokens (keeping a final ``keep_last`` id, e.g. EOS); warn with the count."""
    out, n = [], 0
    for s in ids:
        if len(s) > limit:
            n += 1
            s = s[: limit - 1] + [keep_last] if keep_last is not None else s[:limit]
        out.append(s)
    if n:
        log.warning("%s: %d sentence(s) longer than %d tokens were truncated", name, n, limit)
    return out


def prepare_data(cfg: Config, tokenizer: Optional[Tokenizer] = None) -> PreparedData:
    """The tokenizer (unless given, e.g. from a checkpoint), the training split from its token cache
    (encoded, filtered and truncated on first use) and the dev split."""
    d = cfg.data
    files = find_split(d, "train")
    dev_pairs = load_split(d, "dev")
    if not dev_pairs:
        raise ValueError(f"the dev split of {d.name} is empty")
    if tokenizer is None:
        tokenizer = tokenizer_for(cfg, files)
    split = cached_split(files, tokenizer, d, cfg.model.max_positions, token_cache_dir(cfg), cfg.train.progress)
    if split.total == 0:
        raise ValueError(f"the training split of {d.name} is empty")
    if len(split.src) == 0:
        raise ValueError(f"every training pair of {d.name} was filtered out ({split.counts}); "
                         "relax data.max_len/max_ratio")
    log.info("train: %s pairs, %s source and %s target tokens", f"{len(split.src):,}", f"{len(split.src.data):,}",
             f"{len(split.tgt.data):,}")
    train_src, train_tgt = split.src, split.tgt
    if d.mix.ratio > 0:
        train_src, train_tgt = mix_in(cfg, tokenizer, split.src, split.tgt)
    limit = cfg.model.max_positions - 1
    dev_src_text = [s for s, _ in dev_pairs]
    dev_ref_text = [t for _, t in dev_pairs]
    return PreparedData(
        tokenizer=tokenizer,
        train_src=train_src,
        train_tgt=train_tgt,
        dev_src=truncate(tokenizer.encode_src(dev_src_text), limit, "dev source", EOS),
        dev_tgt=truncate(tokenizer.encode_tgt(dev_ref_text), limit - 1, "dev target"),
        dev_src_text=dev_src_text,
        dev_ref_text=dev_ref_text,
        filter_counts=split.counts,
    )
