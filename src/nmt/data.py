"""From corpus files to token ids: read, tokenize, filter (train only), truncate (dev)."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Optional

from nmt.config import Config
from nmt.corpus import filter_pairs, load_split, log_filter_counts
from nmt.tokenizer import EOS, Tokenizer, train_or_load

log = logging.getLogger(__name__)


@dataclass
class PreparedData:
    tokenizer: Tokenizer
    train_src: list[list[int]]      # source ids + EOS
    train_tgt: list[list[int]]      # target ids, no BOS/EOS (the batcher adds them)
    dev_src: list[list[int]]
    dev_tgt: list[list[int]]
    dev_src_text: list[str]
    dev_ref_text: list[str]
    filter_counts: dict[str, int] = field(default_factory=dict)

    @property
    def train_src_lens(self) -> list[int]:
        return [len(s) for s in self.train_src]

    @property
    def train_tgt_lens(self) -> list[int]:
        """Target lengths including the added BOS (tgt_in) / EOS (tgt_out)."""
        return [len(t) + 1 for t in self.train_tgt]


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
    """Read train/dev, train or load the tokenizer (unless given, e.g. from a checkpoint), encode, filter."""
    d = cfg.data
    train_pairs = load_split(d, "train")
    dev_pairs = load_split(d, "dev")
    if not train_pairs:
        raise ValueError(f"the training split of {d.name} is empty")
    if not dev_pairs:
        raise ValueError(f"the dev split of {d.name} is empty")
    src_lines = [s for s, _ in train_pairs]
    tgt_lines = [t for _, t in train_pairs]
    if tokenizer is None:
        tokenizer = train_or_load(cfg.tokenizer, src_lines, tgt_lines)
    src_ids = tokenizer.encode_src(src_lines)
    tgt_ids = tokenizer.encode_tgt(tgt_lines)
    kept, counts = filter_pairs([len(s) - 1 for s in src_ids], [len(t) for t in tgt_ids], d)
    log_filter_counts(counts, len(train_pairs), "train")
    if not kept:
        raise ValueError(f"every training pair of {d.name} was filtered out ({counts}); relax data.max_len/max_ratio")
    limit = cfg.model.max_positions - 1
    dev_src_text = [s for s, _ in dev_pairs]
    dev_ref_text = [t for _, t in dev_pairs]
    return PreparedData(
        tokenizer=tokenizer,
        train_src=truncate([src_ids[i] for i in kept], limit, "train source", EOS),
        train_tgt=truncate([tgt_ids[i] for i in kept], limit - 1, "train target"),
        dev_src=truncate(tokenizer.encode_src(dev_src_text), limit, "dev source", EOS),
        dev_tgt=truncate(tokenizer.encode_tgt(dev_ref_text), limit - 1, "dev target"),
        dev_src_text=dev_src_text,
        dev_ref_text=dev_ref_text,
        filter_counts=counts,
    )
