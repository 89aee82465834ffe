"""Reading what training leaves in a run directory: metrics.csv, summary.json, the
config (``config.yaml``, else Hydra's ``.hydra/config.yaml``) and Hydra's overrides."""
from __future__ import annotations

import csv
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from omegaconf import OmegaConf

from nmt.config import Config, from_dict, to_config
from nmt.lrtools import LRToolError
from nmt.metrics import read_metrics

log = logging.getLogger(__name__)

Row = dict[str, Optional[float]]


@dataclass
class Run:
    """One training run as read from disk."""

    path: Path
    rows: list[Row]                          # metrics.csv rows in file order
    lr_text: list[Optional[str]]             # the lr cells as written (their precision matters)
    summary: dict = field(default_factory=dict)
    cfg: Optional[Config] = None
    cfg_note: str = ""                       # why cfg is None
    overrides: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def train_rows(self) -> list[Row]:
        """Rows logged by training (they carry the train loss)."""
        return [r for r in self.rows if r.get("loss") is not None]

    @property
    def valid_rows(self) -> list[Row]:
        """Rows logged by validation (they carry valid_loss)."""
        return [r for r in self.rows if r.get("valid_loss") is not None]


def require_dir(path: Path, what: str) -> Path:
    path = Path(path)
    if not path.exists():
        raise LRToolError(f"{what} {path} does not exist")
    if not path.is_dir():
        raise LRToolError(f"{what} {path} is not a directory")
    return path


def read_lr_text(path: Path) -> list[Optional[str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return [(row.get("lr") or None) for row in csv.DictReader(f)]


def load_config(run_dir: Path) -> tuple[Optional[Config], str]:
    """The run's validated config and an empty note, or None and why not."""
    resolved, hydra = run_dir / "config.yaml", run_dir / ".hydra" / "config.yaml"
    try:
        if resolved.is_file():
            return from_dict(OmegaConf.to_container(OmegaConf.load(resolved), resolve=True)), ""
        if hydra.is_file():
            return to_config(OmegaConf.load(hydra)), ""
    except Exception as e:  # a config from an older schema must not stop the analysis
        return None, f"could not read the run's config ({type(e).__name__}: {str(e).splitlines()[0]})"
    return None, "no config.yaml or .hydra/config.yaml in the run directory"


def load_overrides(run_dir: Path) -> list[str]:
    path = run_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return []
    try:
        items = OmegaConf.to_container(OmegaConf.load(path))
    except Exception as e:
        log.warning("could not read %s: %s", path, e)
        return []
    return [str(x) for x in items] if isinstance(items, list) else []


def load_run(run_dir: Path, need_metrics: bool = True) -> Run:
    """Read a run directory; ``need_metrics`` makes a missing metrics.csv an error."""
    run_dir = require_dir(Path(run_dir), "run directory")
    metrics = run_dir / "metrics.csv"
    rows: list[Row] = []
    lr_text: list[Optional[str]] = []
    if metrics.is_file():
        try:
            rows, lr_text = read_metrics(metrics), read_lr_text(metrics)
        except (ValueError, KeyError, csv.Error) as e:
            raise LRToolError(f"{metrics} is not a readable metrics file: {e}") from None
    elif need_metrics:
        raise LRToolError(f"{run_dir} has no metrics.csv: is it a training run directory "
                          "(written by scripts/train.py)?")
    summary: dict = {}
    if (run_dir / "summary.json").is_file():
        try:
            summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            log.warning("ignoring %s: %s", run_dir / "summary.json", e)
    cfg, note = load_config(run_dir)
    return Run(run_dir, rows, lr_text, summary, cfg, note, load_overrides(run_dir))


def _natural_key(path: Path) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(path))]


def find_runs(root: Path) -> list[Path]:
    """Run directories under ``root`` (a Hydra multirun folder, or any folder of runs):
    every folder holding metrics.csv or summary.json, in natural order (2 before 10)."""
    root = require_dir(Path(root), "multirun directory")
    found = {p.parent for name in ("metrics.csv", "summary.json") for p in root.rglob(name)
             if ".hydra" not in p.parts}
    if not found:
        raise LRToolError(f"{root} holds no training runs (no metrics.csv or summary.json below it); "
                          "pass the folder of a Hydra multirun, e.g. multirun/<date>/<time>")
    return sorted(found, key=_natural_key)
