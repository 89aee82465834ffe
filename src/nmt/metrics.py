"""Training metrics: one CSV row per logged step or validation, mirrored to TensorBoard."""
from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Optional

COLUMNS = (
    "step", "epoch", "lr", "loss", "grad_norm", "tokens_per_sec", "padding_eff", "bad_steps",
    "valid_loss", "valid_ppl", "valid_acc", "valid_bleu", "valid_chrf",
    "valid_src_gain", "valid_blind_loss", "valid_distinct", "elapsed_sec",
)
# CSV column -> TensorBoard tag
TB_TAGS = {
    "loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm",
    "tokens_per_sec": "train/tokens_per_sec", "padding_eff": "train/padding_eff",
    "valid_loss": "valid/loss", "valid_ppl": "valid/ppl", "valid_acc": "valid/acc",
    "valid_bleu": "valid/bleu", "valid_chrf": "valid/chrf", "valid_src_gain": "valid/src_gain",
    "valid_blind_loss": "valid/blind_loss", "valid_distinct": "valid/distinct",
}


def read_metrics(path: Path) -> list[dict[str, Optional[float]]]:
    """Rows of a metrics.csv as dicts of floats (None for empty cells)."""
    with open(path, newline="", encoding="utf-8") as f:
        return [{k: (float(v) if v not in ("", None) else None) for k, v in row.items()} for row in csv.DictReader(f)]


class MetricsLogger:
    """Appends to ``metrics.csv`` and writes TensorBoard scalars to ``tb/``.

    On resume, rows logged after the resumed step (by a run that was killed
    before its next checkpoint) are dropped so the file tells one story.
    """

    def __init__(self, run_dir: Path, resume_step: Optional[int] = None, tensorboard: bool = True,
                 enabled: bool = True):
        self.enabled = enabled           # False on the ranks > 0 of a distributed run: they write nothing
        self.tb = None
        if not enabled:
            return
        self.path = Path(run_dir) / "metrics.csv"
        if resume_step is not None and self.path.exists():
            kept = [r for r in self._raw_rows() if r.get("step") and int(float(r["step"])) <= resume_step]
            self._write_rows(kept)
        elif not self.path.exists() or resume_step is None:
            self._write_rows([])
        self._file = open(self.path, "a", newline="", encoding="utf-8")
        self._csv = csv.DictWriter(self._file, fieldnames=COLUMNS)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(Path(run_dir) / "tb"), purge_step=resume_step + 1 if resume_step else None)

    def _raw_rows(self) -> list[dict]:
        with open(self.path, newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))

    def _write_rows(self, rows: list[dict]) -> None:
        tmp = self.path.with_suffix(".csv.tmp")
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)
        tmp.replace(self.path)

    def log(self, step: int, **values: float) -> None:
        if not self.enabled:
            return
        row = {"step": step}
        for k, v in values.items():
            if k not in COLUMNS:
                raise KeyError(f"unknown metric column {k!r}")
            row[k] = _fmt(v)
        self._csv.writerow(row)
        self._file.flush()
        if self.tb is not None:
            for k, v in values.items():
                if k in TB_TAGS and v is not None and math.isfinite(v):
                    self.tb.add_scalar(TB_TAGS[k], v, step)

    def text(self, tag: str, text: str, step: int) -> None:
        if self.tb is not None:
            self.tb.add_text(tag, text, step)

    def flush(self) -> None:
        if not self.enabled:
            return
        self._file.flush()
        if self.tb is not None:
            self.tb.flush()

    def close(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        if self.tb is not None:
            self.tb.close()


def _fmt(v: object) -> object:
    if isinstance(v, float):
        return repr(v)  # exact: scripts/lr.py diagnose recomputes the LR to 1e-9
    return v
