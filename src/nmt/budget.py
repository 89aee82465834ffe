"""The time budget of a run (``train.max_minutes``) and the schedule end it implies.

Training time is counted across resumes (it is stored in checkpoints), like
``train.max_steps``: a run with a 40-minute budget that is stopped after 25
minutes trains 15 more when resumed.

A schedule that ends in a decay (``optim=wsd``) must know when the run ends.
Under a time budget that is an estimate: the steps done so far, plus the time
left divided by the seconds per update measured over this invocation
(validations and checkpoint saves included, so their share of the time is
accounted for). The estimate follows the measured rate until the decay starts,
then it is fixed, so that the decay runs to its end in one piece and every LR
of the run is ``lr_at(step)`` for that one total (``lr.py diagnose`` recomputes
them from ``summary.json``).
"""
from __future__ import annotations

import time
from typing import Optional

from nmt.config import OptimConfig
from nmt.schedules import wsd_decay_start, wsd_end_not_before


def now() -> float:
    """The budget's clock (a module function, so that tests can replace it)."""
    return time.monotonic()


class TimeBudget:
    """Training time so far and, under ``max_minutes``, the schedule's estimated end."""

    def __init__(self, max_minutes: float, seconds_before: float = 0.0, fixed_total: Optional[int] = None) -> None:
        self.max_minutes = float(max_minutes)
        self.seconds_before = float(seconds_before)
        self.fixed_total = fixed_total      # the schedule's end, once its decay has begun
        self._t0 = now()
        self._step0 = 0

    def start(self, step: int) -> None:
        """Start the clock of this invocation at ``step`` (the step a resumed run continues from)."""
        self._t0, self._step0 = now(), int(step)

    @property
    def seconds(self) -> float:
        """Training time of the whole run so far (earlier invocations included)."""
        return self.seconds_before + now() - self._t0

    @property
    def limited(self) -> bool:
        return self.max_minutes > 0

    def expired(self) -> bool:
        return self.limited and self.seconds >= 60 * self.max_minutes

    def estimate_total(self, step: int) -> Optional[int]:
        """Steps the whole run will have when the time is up, at this invocation's rate so far
        (None before the first update of this invocation or without a time limit)."""
        done, spent = step - self._step0, now() - self._t0
        if not self.limited or done < 1 or spent <= 0:
            return None
        left = max(60 * self.max_minutes - self.seconds, 0.0)
        return step + int(left * done / spent)

    def expected_end(self, step: int, step_limit: int) -> int:
        """The step the run is expected to end at (for progress displays; 0 when unknown): a fixed
        schedule end, else the time budget's estimate capped by ``step_limit`` (steps or epochs)."""
        if self.fixed_total:
            return self.fixed_total
        estimate = self.estimate_total(step)
        return min(estimate, step_limit) if estimate is not None and step_limit else (estimate or step_limit)

    def state_dict(self) -> dict:
        return {"seconds": self.seconds, "fixed_total": self.fixed_total}

    def load_state_dict(self, state: dict) -> None:
        self.seconds_before = float(state.get("seconds", 0.0))
        fixed = state.get("fixed_total")
        self.fixed_total = None if fixed is None else int(fixed)


def schedule_end(budget: TimeBudget, step: int, step_limit: int, o: OptimConfig) -> tuple[Optional[int], bool]:
    """(the schedule's end to use after ``step``, whether it is now fixed) under a time budget.

    The estimate (capped by ``step_limit``, the end that steps or epochs set, 0 for none) moves
    until the decay would start; then it is fixed such that no step taken so far lies inside the
    decay. None while nothing is measured yet.
    """
    if budget.fixed_total:
        return budget.fixed_total, True
    estimate = budget.estimate_total(step)
    if estimate is None:
        return None, False
    total = min(estimate, step_limit) if step_limit else estimate
    total = max(total, o.warmup_steps + 1)         # a budget shorter than the warmup decays right after it
    if step < wsd_decay_start(total, o.decay_fraction, o.warmup_steps):
        return total, False
    return wsd_end_not_before(total, step, o.decay_fraction, o.warmup_steps), True
