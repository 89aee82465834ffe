"""Glue between the Hydra entry point and ``nmt.train``: errors become one-line messages."""
from __future__ import annotations

import logging
import sys
from pathlib import Path

from omegaconf import DictConfig

log = logging.getLogger("nmt")

# exit codes: 2 bad configuration or input, 3 training aborted, 130/143 interrupted
EXIT_INTERRUPTED = {"SIGINT": 130, "SIGTERM": 143}


def one_line(e: Exception) -> str:
    """The first line of an error; OmegaConf's type errors get the key they are about in front
    (theirs span several lines: "Value '/root' ... could not be converted to Integer / full_key: train.seed")."""
    lines = str(e).strip().splitlines()
    first = lines[0] if lines else type(e).__name__
    key = getattr(e, "full_key", None)
    return f"{key}: {first}" if key and key not in first else first


def _shared_run_dir(cfg, run_dir: Path) -> Path:
    """Under torchrun, every rank uses rank 0's run directory (each rank's Hydra picked its own from
    its clock); the others log warnings only, to the console, and remove the folder Hydra made for
    them if it holds nothing else."""
    import shutil

    from nmt import distributed

    d = distributed.init(cfg.device)
    if not d.enabled:
        return run_dir
    shared = Path(d.broadcast(str(run_dir)))
    if not d.main:
        root = logging.getLogger()
        for handler in list(root.handlers):
            if isinstance(handler, logging.FileHandler):
                root.removeHandler(handler)
        root.setLevel(logging.WARNING)
        if run_dir.resolve() != shared.resolve() and {p.name for p in run_dir.iterdir()} <= {".hydra", "train.log"}:
            shutil.rmtree(run_dir, ignore_errors=True)
    return shared


def run_training(dcfg: DictConfig) -> dict:
    """Validate the composed config and train in Hydra's run directory."""
    from hydra.core.hydra_config import HydraConfig

    from nmt.checkpoint import CheckpointError
    from nmt.config import ConfigError, to_config
    from nmt.corpus import CorpusError
    from nmt.train import TrainingError, train

    try:
        run_dir = Path(HydraConfig.get().runtime.output_dir)
        cfg = to_config(dcfg)
        run_dir = _shared_run_dir(cfg, run_dir)
        summary = train(cfg, run_dir)
    except (ConfigError, CorpusError, CheckpointError, TrainingError, ValueError) as e:
        log.error("%s", one_line(e))
        sys.exit(3 if isinstance(e, TrainingError) else 2)
    except KeyboardInterrupt:
        log.error("interrupted")
        sys.exit(130)
    reason = summary["stop_reason"]
    if reason.startswith("interrupted by"):
        log.warning("%s: last.pt written; continue with train.resume=true hydra.run.dir=%s", reason, run_dir)
        sys.exit(EXIT_INTERRUPTED.get(reason.split()[-1], 1))
    return summary
