"""Does the LR a run logged match its configured schedule? And LR advice in config terms.

Every logged ``lr`` is recomputed with :func:`nmt.schedules.lr_at` from the run's
config. They must agree to 1e-9 relative, or to the precision the CSV cell was
written with when that is coarser (the trainer writes 9 significant digits). The
plateau schedule's scale depends on the validation history, so rows are checked
only up to its first possible reduction, found by replaying the plateau rule on
the logged validation metric.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Optional, Sequence

from nmt.config import Config
from nmt.early_stopping import METRICS
from nmt.lrtools.stats import fmt_lr, median, nice_below
from nmt.schedules import lr_at, needs_total_steps, noam_factor_for_peak, peak_lr

REL_TOL = 1e-9


@dataclass
class LRCheck:
    checked: int = 0
    mismatches: list[tuple[int, float, float]] = field(default_factory=list)  # (step, logged, expected)
    max_rel_err: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def ratio(self) -> Optional[float]:
        """logged / expected when every mismatch shares one ratio (a factor typo), else None."""
        ratios = [a / b for _, a, b in self.mismatches if b]
        if not ratios or len(self.mismatches) < self.checked:
            return None
        m = median(ratios)
        return m if all(abs(r / m - 1) < 1e-6 for r in ratios) else None


def cell_resolution(text: Optional[str]) -> float:
    """Half a unit in the last written digit of a CSV number (0 when unknown)."""
    if not text:
        return 0.0
    try:
        exp = Decimal(text.strip()).as_tuple().exponent
    except InvalidOperation:
        return 0.0
    return 0.5 * 10.0 ** exp if isinstance(exp, int) else 0.0


def plateau_first_reduction(valid_rows: Sequence[dict], cfg: Config) -> Optional[int]:
    """The validation step after which the plateau schedule first cut its LR (None: never).
    Replays :meth:`nmt.optim.ScheduledOptimizer.report_metric` on the logged metric."""
    column, higher = METRICS[cfg.train.early_stopping.metric]
    best, bad = None, 0
    for r in valid_rows:
        v = r.get(column)
        v = math.nan if v is None else v
        if not math.isnan(v) and (best is None or (v > best if higher else v < best)):
            best, bad = v, 0
            continue
        bad += 1
        if bad >= cfg.optim.plateau_patience:
            return int(r["step"])
    return None


def total_steps(cfg: Config, per_epoch: Optional[float], summary: Optional[dict] = None) -> Optional[int]:
    """The trainer's total_steps: what summary.json recorded (the schedule's end, which a time
    budget may have set), else train.max_steps, else max_epochs * ceil(updates per epoch)."""
    t = cfg.train
    recorded = (summary or {}).get("schedule_total_steps")
    if recorded:
        return int(recorded)
    if t.max_steps:
        return int(t.max_steps)
    if t.max_epochs and per_epoch:
        return int(t.max_epochs * math.ceil(per_epoch - 1e-9))
    return None


def check_logged_lr(rows: Sequence[dict], lr_text: Sequence[Optional[str]], cfg: Config,
                    per_epoch: Optional[float], summary: Optional[dict] = None) -> LRCheck:
    """Compare every row's logged LR with ``lr_at(step)`` under ``cfg`` (and the schedule end
    recorded in ``summary``)."""
    out = LRCheck()
    o = cfg.optim
    total = total_steps(cfg, per_epoch, summary)
    if needs_total_steps(o) and not o.total_steps and total is None:
        out.notes.append(f"{o.name} decay length unknown (no optim.total_steps, train.max_steps, updates per "
                         "epoch or schedule_total_steps in summary.json): LR not checked")
        return out
    last = math.inf
    if o.name == "plateau":
        valid = [r for r in rows if r.get("valid_loss") is not None or r.get("valid_bleu") is not None]
        first = plateau_first_reduction(valid, cfg)
        if first is not None:
            last = first
            out.notes.append(f"plateau schedule: its scale depends on validation results, so the LR was checked "
                             f"only up to step {first}, where the first reduction happened")
    for r, text in zip(rows, lr_text):
        step, lr = r.get("step"), r.get("lr")
        if step is None or lr is None or step < 1 or step > last:
            continue
        expected = lr_at(int(step), o, cfg.model.d_model, total)
        err = abs(lr - expected)
        out.checked += 1
        out.max_rel_err = max(out.max_rel_err, err / abs(expected) if expected else (0.0 if err == 0 else math.inf))
        if err > max(REL_TOL * abs(expected), cell_resolution(text) * (1 + 1e-6)):
            out.mismatches.append((int(step), lr, expected))
    return out


def lr_setting(cfg: Config, peak: float) -> str:
    """The override that makes ``peak`` the schedule's peak, e.g. ``optim.factor=1.01``."""
    o = cfg.optim
    if o.name == "noam":
        return f"optim.factor={noam_factor_for_peak(peak, cfg.model.d_model, o.warmup_steps):.3g}"
    return f"optim.lr={peak:.2g}"


def lower_lr_advice(cfg: Config) -> str:
    """'peak LR 3.6e-03: try optim.factor=X for a peak of 1e-03' (about 2.5x lower, a round number)."""
    now = peak_lr(cfg.optim, cfg.model.d_model)
    target = nice_below(now / 2.5)
    return f"peak LR {fmt_lr(now)}: try {lr_setting(cfg, target)} for a peak of {target:.0e}"


def higher_lr_advice(cfg: Config) -> str:
    now = peak_lr(cfg.optim, cfg.model.d_model)
    target = float(f"{2 * now:.1g}")
    return f"peak LR {fmt_lr(now)}: try {lr_setting(cfg, target)} for a peak of {target:.0e}"
