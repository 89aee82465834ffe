"""Learning-rate schedules: pure functions of the step, one dispatcher, clipping."""
from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

from nmt.config import ConfigError, OptimConfig
from nmt.schedules import (SCHEDULES, check_config, decay_curve, describe_schedule, lr_at, noam,
                           noam_factor_for_peak, peak_lr, restart_position, warmup_end, wsd_decay_start)

CONF = Path(__file__).resolve().parents[1] / "conf" / "optim"


def cfg_for(name: str, **kw) -> OptimConfig:
    return replace(OptimConfig(name=name), **kw)


# ----------------------------------------------------------------------------- noam
@pytest.mark.parametrize("step, expected", [(3263, 0.000570022641452), (6526, 0.000547068217585),
                                            (32630, 0.000244656344570)])
def test_noam_reference_values(step, expected):
    assert noam(step, 512, 4000, 1.0) == pytest.approx(expected, rel=1e-12)
    cfg = cfg_for("noam", warmup_steps=4000, factor=1.0)
    assert lr_at(step, cfg, 512) == pytest.approx(expected, rel=1e-12)


def test_noam_peaks_at_warmup_end_and_is_monotone():
    cfg = cfg_for("noam", warmup_steps=100)
    lrs = [lr_at(s, cfg, 64) for s in range(1, 1001)]
    top = max(range(len(lrs)), key=lrs.__getitem__) + 1
    assert top == warmup_end(cfg) == 100
    assert lrs[99] == pytest.approx(peak_lr(cfg, 64), rel=1e-12)
    assert peak_lr(cfg, 64) == pytest.approx((64 * 100) ** -0.5, rel=1e-12)
    assert all(a < b for a, b in zip(lrs[:100], lrs[1:100]))
    assert all(a > b for a, b in zip(lrs[99:], lrs[100:]))
    assert lrs[0] == pytest.approx(peak_lr(cfg, 64) / 100, rel=1e-12)   # linear rise from 0


def test_noam_peak_lr_option_gives_that_peak():
    cfg = cfg_for("noam", warmup_steps=4000, peak_lr=7e-4, factor=123.0)   # factor is ignored
    assert lr_at(4000, cfg, 256) == pytest.approx(7e-4, rel=1e-12)
    assert peak_lr(cfg, 256) == pytest.approx(7e-4, rel=1e-12)
    assert max(lr_at(s, cfg, 256) for s in range(3900, 4100)) == pytest.approx(7e-4, rel=1e-12)
    factor = noam_factor_for_peak(7e-4, 256, 4000)
    assert noam(4000, 256, 4000, factor) == pytest.approx(7e-4, rel=1e-12)


# ----------------------------------------------------------------------------- other schedules
def test_inverse_sqrt_hand_values():
    cfg = cfg_for("inverse_sqrt", lr=1e-3, warmup_steps=100, warmup_init_lr=1e-5)
    assert lr_at(50, cfg, 512) == pytest.approx(1e-5 + (1e-3 - 1e-5) * 0.5, rel=1e-12)
    assert lr_at(100, cfg, 512) == pytest.approx(1e-3, rel=1e-12)
    assert lr_at(400, cfg, 512) == pytest.approx(5e-4, rel=1e-12)
    assert lr_at(10_000, cfg, 512) == pytest.approx(1e-4, rel=1e-12)
    no_warmup = cfg_for("inverse_sqrt", lr=1e-3, warmup_steps=0)
    assert lr_at(1, no_warmup, 512) == pytest.approx(1e-3)
    assert lr_at(4, no_warmup, 512) == pytest.approx(5e-4)


def test_cosine_hand_values_and_floor():
    cfg = cfg_for("cosine", lr=1e-3, warmup_steps=100, min_lr_ratio=0.1, warmup_init_lr=0.0)
    at = lambda s: lr_at(s, cfg, 512, total_steps=1100)   # noqa: E731
    assert at(50) == pytest.approx(5e-4, rel=1e-12)
    assert at(100) == pytest.approx(1e-3, rel=1e-12)
    assert at(600) == pytest.approx(1e-4 + 0.5 * 9e-4, rel=1e-12)   # halfway down
    assert at(350) == pytest.approx(1e-4 + 0.5 * 9e-4 * (1 + math.cos(math.pi / 4)), rel=1e-12)
    assert at(1100) == pytest.approx(1e-4, rel=1e-12)
    assert at(1101) == at(50_000) == pytest.approx(1e-4, rel=1e-12)
    lrs = [at(s) for s in range(100, 1101)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_cosine_total_steps_from_config_wins_and_missing_total_is_a_config_error():
    cfg = cfg_for("cosine", lr=1.0, warmup_steps=0, total_steps=10)
    assert lr_at(10, cfg, 512, total_steps=1000) == pytest.approx(0.0, abs=1e-15)
    with pytest.raises(ConfigError, match=r"optim.total_steps or train.max_steps"):
        lr_at(5, cfg_for("cosine"), 512)
    with pytest.raises(ConfigError, match=r"optim.total_steps or train.max_steps"):
        lr_at(5, cfg_for("cosine"), 512, total_steps=0)       # train.max_steps=0 means "no limit"
    with pytest.raises(ConfigError, match=r"train.max_steps \(100\) must be greater"):
        check_config(cfg_for("cosine", warmup_steps=4000), total_steps=100)


def test_cosine_restarts_restart_with_period_mult():
    cfg = cfg_for("cosine_restarts", lr=1.0, warmup_steps=10, restart_period=100, period_mult=2.0,
                  min_lr_ratio=0.0)
    at = lambda s: lr_at(s, cfg, 512)   # noqa: E731
    assert at(5) == pytest.approx(0.5)
    assert at(10) == 1.0
    assert at(60) == pytest.approx(0.5, rel=1e-12)                     # half of the first period
    assert at(109) == pytest.approx(0.5 * (1 + math.cos(math.pi * 99 / 100)), rel=1e-12)
    for start, length in [(110, 200), (310, 400), (710, 800)]:         # periods of 100, 200, 400, 800
        assert at(start) == 1.0                                         # back to lr ...
        assert at(start - 1) < 0.01                                     # ... from near the floor
        assert at(start + length // 2) == pytest.approx(0.5, rel=1e-12)
    assert restart_position(0, 100, 2.0) == (0, 100)
    assert restart_position(299, 100, 2.0) == (199, 200)
    assert restart_position(250, 100, 1.0) == (50, 100)


def test_cosine_restarts_floor():
    cfg = cfg_for("cosine_restarts", lr=1.0, warmup_steps=0, restart_period=10, min_lr_ratio=0.2)
    lrs = [lr_at(s, cfg, 512) for s in range(1, 60)]
    assert min(lrs) >= 0.2 and max(lrs) == 1.0
    assert lrs[9] == 1.0 and lrs[19] == 1.0                             # steps 10, 20 restart


def test_constant_and_plateau_hand_values():
    cfg = cfg_for("constant", lr=1e-3, warmup_steps=10)
    assert [lr_at(s, cfg, 512) for s in (5, 10, 10**6)] == pytest.approx([5e-4, 1e-3, 1e-3], rel=1e-12)
    plateau = cfg_for("plateau", lr=1e-3, warmup_steps=10)
    assert lr_at(20, plateau, 512) == pytest.approx(1e-3, rel=1e-12)
    assert lr_at(20, plateau, 512, scale=0.25) == pytest.approx(2.5e-4, rel=1e-12)


# ----------------------------------------------------------------------------- clipping, errors
@pytest.mark.parametrize("name", SCHEDULES)
def test_min_max_clipping_applies_to_every_schedule(name):
    cfg = cfg_for(name, lr=1e-3, warmup_steps=100, total_steps=1000, restart_period=200,
                  min_lr=2e-4, max_lr=6e-4)
    lrs = [lr_at(s, cfg, 512, scale=0.01 if name == "plateau" and s > 500 else 1.0) for s in range(1, 1500)]
    assert min(lrs) == 2e-4 and max(lrs) == 6e-4
    assert lr_at(1, cfg, 512) == 2e-4                                   # warmup starts below min_lr
    assert peak_lr(cfg, 512) == 6e-4


@given(step=st.integers(1, 10**7), lo=st.floats(0, 1e-3), width=st.floats(0, 1e-3),
       name=st.sampled_from(SCHEDULES))
@settings(max_examples=200, deadline=None)
def test_every_schedule_stays_inside_the_clip_range(step, lo, width, name):
    cfg = cfg_for(name, warmup_steps=1000, total_steps=50_000, min_lr=lo, max_lr=lo + width)
    assert lo <= lr_at(step, cfg, 256) <= lo + width


def test_bad_names_and_steps():
    with pytest.raises(ConfigError) as err:
        lr_at(1, cfg_for("linear"), 512)
    for name in SCHEDULES:
        assert name in str(err.value)
    with pytest.raises(ValueError, match="from 1"):
        lr_at(0, cfg_for("noam"), 512)
    with pytest.raises(ConfigError, match="period_mult"):
        check_config(cfg_for("cosine_restarts", period_mult=0.5))


# ----------------------------------------------------------------------------- describe, yaml
def test_describe_schedule_states_the_peak():
    line = describe_schedule(cfg_for("noam", warmup_steps=4000, factor=1.0), 256)
    assert line == "noam schedule: peak LR 9.88e-04 at step 4000 (factor 1.0, d_model 256, warmup 4000)"
    assert "peak LR 7.00e-04" in describe_schedule(cfg_for("noam", peak_lr=7e-4), 512)
    for name in SCHEDULES:
        line = describe_schedule(cfg_for(name, lr=3e-4, total_steps=10_000), 512)
        assert line.startswith(f"{name} schedule: peak LR 3.00e-04") or name == "noam"


@pytest.mark.parametrize("name", SCHEDULES)
def test_yaml_presets_match_the_schema(name):
    raw = OmegaConf.load(CONF / f"{name}.yaml")
    assert raw.name == name
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(OptimConfig), raw))
    check_config(cfg, total_steps=100_000)
    assert lr_at(warmup_end(cfg), cfg, 256, total_steps=100_000) == pytest.approx(peak_lr(cfg, 256), rel=1e-12)


# ----------------------------------------------------------------------------- wsd
@pytest.mark.parametrize("shape", ["linear", "sqrt", "cosine"])
def test_wsd_warms_up_holds_then_decays_to_the_floor_at_the_end(shape):
    cfg = cfg_for("wsd", lr=2e-3, warmup_steps=10, decay_fraction=0.25, decay_shape=shape, min_lr_ratio=0.1)
    lrs = [lr_at(s, cfg, 256, total_steps=100) for s in range(1, 121)]
    assert lrs[4] == pytest.approx(1e-3, rel=1e-12)                # halfway through warmup
    assert all(lr == pytest.approx(2e-3, rel=1e-12) for lr in lrs[9:75])   # stable to the decay start
    assert wsd_decay_start(100, 0.25, 10) == 75
    decay = lrs[75:100]
    assert all(a > b for a, b in zip(decay, decay[1:]))          # strictly falling ...
    assert lrs[99] == pytest.approx(2e-4, rel=1e-12)               # ... to lr * min_lr_ratio at total_steps
    assert all(lr == pytest.approx(2e-4, rel=1e-12) for lr in lrs[100:])   # the floor holds after


def test_wsd_shapes_and_the_decay_never_starts_inside_warmup():
    assert decay_curve(0.25, "linear") == pytest.approx(0.75)
    assert decay_curve(0.25, "sqrt") == pytest.approx(0.5)
    assert decay_curve(0.5, "cosine") == pytest.approx(0.5)
    assert decay_curve(2.0, "linear") == 0.0 and decay_curve(-1.0, "sqrt") == 1.0
    assert wsd_decay_start(100, 1.0, 30) == 30                     # decay over the whole run after warmup
    cfg = cfg_for("wsd", lr=1.0, warmup_steps=30, decay_fraction=1.0)
    assert lr_at(30, cfg, 8, 100) == 1.0 and lr_at(65, cfg, 8, 100) == pytest.approx(0.5)


def test_wsd_needs_an_end_and_says_which_settings_give_one():
    cfg = cfg_for("wsd", lr=1e-3, warmup_steps=10)
    with pytest.raises(ConfigError, match="train.max_minutes"):
        lr_at(5, cfg, 256)
    assert lr_at(100, replace(cfg, total_steps=100), 256, total_steps=5000) == 0.0   # optim.total_steps wins
    with pytest.raises(ConfigError, match="decay_shape"):
        check_config(replace(cfg, decay_shape="exp"), 100)
    with pytest.raises(ConfigError, match="decay_fraction"):
        check_config(replace(cfg, decay_fraction=0.0), 100)
    assert "linear decay to 0.00e+00 at step 1000" in describe_schedule(cfg, 256, 1000)
