"""Starting a new run from a trained checkpoint (``train.init_from``): fine-tuning on new data.

Unlike ``train.resume``, which continues the same run exactly, ``init_from``
starts a new run in its own folder: the model weights and the tokenizer come
from the checkpoint (a new tokenizer would make the embeddings meaningless),
while the data, schedule and training settings are the current config's. The
optimizer state, the schedule's step, the sampler position and early stopping
start fresh unless ``train.init_keep`` names ``optimizer`` (Adam's moments)
and/or ``schedule`` (the update counter, so the LR schedule goes on from the
checkpoint's step). Regularisation (dropouts) may differ; the model's shape
may not.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Sequence

import numpy as np

from nmt.checkpoint import CheckpointError, load_checkpoint, resolve_checkpoint_path, setting_diffs
from nmt.config import Config, TokenizerConfig, from_dict
from nmt.tokenizer import UNK

log = logging.getLogger(__name__)

KEEP_CHOICES = ("optimizer", "schedule")
UNK_WARN = 0.01          # warn when more than 1% of the new training tokens are <unk>


def load_init(cfg: Config) -> tuple[dict, Path]:
    """The checkpoint named by ``train.init_from`` (a .pt file or a run folder's best.pt), checked
    against the current model settings; raises CheckpointError naming every differing setting."""
    path = resolve_checkpoint_path(Path(str(cfg.train.init_from)).expanduser())
    obj = load_checkpoint(path)
    diffs = setting_diffs(from_dict(obj["config"]), cfg, "model")
    if diffs:
        raise CheckpointError(f"cannot start from {path}: the model differs ({'; '.join(diffs)}); fine-tuning keeps "
                              "the checkpoint's model, so pass the same model settings (dropouts may change)")
    missing = [k for k in cfg.train.init_keep if k == "optimizer" and "optimizer" not in obj]
    if missing:
        raise CheckpointError(f"train.init_keep asks for the optimizer state, but {path} holds weights only "
                              "(an averaged or inference checkpoint)")
    return obj, path


def inherited_tokenizer_config(cfg: Config, obj: dict) -> TokenizerConfig:
    """The checkpoint's tokenizer settings (the run's config records what it really uses)."""
    saved = from_dict(obj["config"]).tokenizer
    return dataclasses.replace(saved, cache_dir=cfg.tokenizer.cache_dir)


def provenance(obj: dict, path: Path, keep: Sequence[str]) -> dict:
    """What a fine-tuned run came from, stored in its checkpoints and summary.json."""
    return {"path": str(path), "step": int(obj["step"]), "data": obj["config"]["data"]["name"], "keep": list(keep)}


def unk_rate(sequences: Sequence[Sequence[int]]) -> float:
    """Share of <unk> ids among all ids of ``sequences`` (lists, arrays, or a token cache's side)."""
    flat = sequences.data if hasattr(sequences, "data") else \
        np.fromiter((x for s in sequences for x in s), dtype=np.int64)
    return float(np.count_nonzero(flat == UNK)) / len(flat) if len(flat) else 0.0


def report_unknowns(src: Sequence[Sequence[int]], tgt: Sequence[Sequence[int]], inherited: bool) -> dict:
    """Log the <unk> rate of the training data under the tokenizer in use; warn when it is high for an
    inherited tokenizer (text the checkpoint's tokenizer never saw)."""
    rates = {"source": unk_rate(src), "target": unk_rate(tgt)}
    log.info("<unk> in the training data: %.2f%% of source tokens, %.2f%% of target tokens",
             100 * rates["source"], 100 * rates["target"])
    high = [side for side, r in rates.items() if r > UNK_WARN]
    if inherited and high:
        log.warning("the inherited tokenizer spells %s of the new training data as <unk> (over %.0f%% of tokens): "
                    "the checkpoint's tokenizer never saw those characters. A tokenizer trained with "
                    "tokenizer.byte_fallback=true spells them as bytes instead.", " and ".join(high), 100 * UNK_WARN)
    return rates
