"""Early stopping on a validation metric, with state that survives resume."""
from __future__ import annotations

from typing import Optional

# config name -> (metrics column, higher is better)
METRICS = {"valid_loss": ("valid_loss", False), "bleu": ("valid_bleu", True), "chrf": ("valid_chrf", True)}


class EarlyStopping:
    """Counts validations without an improvement larger than ``min_delta``.

    ``patience`` 0 turns stopping off (the best score is still tracked for best.pt).
    """

    def __init__(self, metric: str, patience: int, min_delta: float = 0.0):
        if metric not in METRICS:
            raise ValueError(f"unknown early-stopping metric {metric!r}; choose one of: {', '.join(METRICS)}")
        self.metric, self.patience, self.min_delta = metric, patience, min_delta
        self.column, self.higher_is_better = METRICS[metric]
        self.best: Optional[float] = None
        self.best_step = 0
        self.bad = 0

    def update(self, value: float, step: int) -> bool:
        """Record a validation result; returns True when it is a new best."""
        if self.best is None:
            improved = True
        elif self.higher_is_better:
            improved = value > self.best + self.min_delta
        else:
            improved = value < self.best - self.min_delta
        if improved:
            self.best, self.best_step, self.bad = value, step, 0
        else:
            self.bad += 1
        return improved

    @property
    def should_stop(self) -> bool:
        return self.patience > 0 and self.bad >= self.patience

    def state_dict(self) -> dict:
        return {"best": self.best, "best_step": self.best_step, "bad": self.bad}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.best_step, self.bad = state["best"], state["best_step"], state["bad"]
