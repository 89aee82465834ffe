"""The time budget: training time counted across resumes, and the schedule end it implies."""
from __future__ import annotations

import pytest

from nmt import budget as budget_module
from nmt.budget import TimeBudget


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(budget_module, "now", fake)
    return fake


def test_estimate_is_steps_done_plus_time_left_at_the_measured_rate(clock):
    b = TimeBudget(max_minutes=1.0)
    b.start(step=0)
    assert b.estimate_total(0) is None                   # nothing measured yet
    clock.now += 10.0                                     # 20 updates in 10 s: 0.5 s each
    assert b.estimate_total(20) == 20 + 100
    assert not b.expired() and b.seconds == pytest.approx(10.0)
    clock.now += 50.0
    assert b.expired() and b.estimate_total(120) == 120


def test_expected_end_follows_the_estimate_within_the_step_limit(clock):
    """What the progress bar shows as a timed run's total: not max_epochs' steps."""
    b = TimeBudget(max_minutes=1.0)
    b.start(step=0)
    assert b.expected_end(0, step_limit=5000) == 5000     # nothing measured yet: the limit
    clock.now += 10.0                                     # 0.5 s per update: 120 updates in the minute
    assert b.expected_end(20, step_limit=5000) == 120
    assert b.expected_end(20, step_limit=60) == 60        # the epochs or steps end first
    assert b.expected_end(20, step_limit=0) == 120
    b.fixed_total = 130                                   # a decay placed: its end
    assert b.expected_end(20, step_limit=5000) == 130


def test_time_is_counted_across_resumes(clock):
    first = TimeBudget(max_minutes=1.0)
    first.start(step=0)
    clock.now += 45.0
    state = first.state_dict()
    resumed = TimeBudget(max_minutes=1.0)
    resumed.load_state_dict(state)
    resumed.start(step=90)
    assert resumed.seconds == pytest.approx(45.0)
    clock.now += 5.0                                      # 10 updates in 5 s after the resume
    assert resumed.estimate_total(100) == 100 + 20        # 10 s left at 0.5 s per update
    clock.now += 10.0
    assert resumed.expired()


def test_no_limit_never_expires_nor_estimates(clock):
    b = TimeBudget(max_minutes=0)
    b.start(step=3)
    clock.now += 1e6
    assert not b.expired() and b.estimate_total(10) is None
    b.fixed_total = 42
    restored = TimeBudget(0)
    restored.load_state_dict(b.state_dict())
    assert restored.fixed_total == 42
