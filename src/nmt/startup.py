"""Where a run starts from: nothing, its own checkpoint (``train.resume``) or another run's
(``train.init_from``, fine-tuning). Either returns the checkpoint with what it implies for the config."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

from nmt.checkpoint import CheckpointError, check_compatible, load_resume_checkpoint
from nmt.config import Config, from_dict
from nmt.finetune import inherited_tokenizer_config, load_init, provenance

log = logging.getLogger(__name__)


def _asked(value) -> bool:
    return not (value is False or value is None or str(value).lower() in ("false", "no", ""))


def find_resume(cfg: Config, run_dir: Path) -> Optional[dict]:
    """The checkpoint ``train.resume`` names (true: this run's newest readable one), checked against
    the config; None when not resuming or when ``resume=true`` finds no checkpoint yet. A fine-tuning
    run's tokenizer settings are its checkpoint's (``cfg.tokenizer`` is replaced)."""
    r = cfg.train.resume
    if not _asked(r):
        return None
    where = Path(run_dir) / "checkpoints" if str(r).lower() in ("true", "yes") else Path(str(r))
    if str(r).lower() in ("true", "yes") and not any(where.glob("*.pt")):
        log.info("train.resume=true but %s holds no checkpoint: starting from scratch", where)
        return None
    obj, path = load_resume_checkpoint(where)
    if "optimizer" not in obj:
        raise CheckpointError(f"{path} holds weights only (an averaged or inference checkpoint), not the "
                              "training state that train.resume needs; resume from last.pt or a step-N.pt")
    if cfg.train.init_from:
        cfg.tokenizer = inherited_tokenizer_config(cfg, obj)
    check_compatible(from_dict(obj["config"]), cfg, path)
    log.info("resuming from %s (step %d)", path, obj["step"])
    return obj


def find_init(cfg: Config) -> tuple[Optional[dict], Optional[dict]]:
    """``train.init_from``: (the checkpoint a new fine-tuning run starts from, where it came from).
    Its tokenizer settings replace ``cfg.tokenizer``, so that config.yaml says what the run uses."""
    if not cfg.train.init_from:
        return None, None
    obj, path = load_init(cfg)
    cfg.tokenizer = inherited_tokenizer_config(cfg, obj)
    origin = provenance(obj, path, cfg.train.init_keep)
    fresh = [p for p in ("optimizer", "schedule", "sampler", "early stopping") if p not in cfg.train.init_keep]
    log.info("starting from %s (step %d, trained on %s): its weights and tokenizer; fresh %s", path, obj["step"],
             origin["data"], ", ".join(fresh))
    return obj, origin
