"""ScheduledOptimizer / NoamOptimizer: LR handling, plateau bookkeeping, exact resume."""
from __future__ import annotations

import io
from dataclasses import replace

import pytest
import torch

from nmt.config import ConfigError, OptimConfig
from nmt.optim import SCHEDULES, NoamOptimizer, ScheduledOptimizer, build_optimizer, lr_at


def tiny_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))


def train_steps(model, opt, start: int, stop: int, metrics: dict[int, float] | None = None) -> None:
    """Updates start+1..stop on a fixed toy regression; reports metrics[step] after that step."""
    for step in range(start + 1, stop + 1):
        g = torch.Generator().manual_seed(step)
        x = torch.randn(16, 4, generator=g)
        loss = (model(x).squeeze(-1) - x.sum(-1)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if metrics and step in metrics:
            opt.report_metric(metrics[step], higher_is_better=False)


def roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def plateau_cfg(**kw) -> OptimConfig:
    return replace(OptimConfig(name="plateau", lr=1e-2, warmup_steps=2, plateau_patience=2,
                               plateau_factor=0.5), **kw)


# ----------------------------------------------------------------------------- LR handling
def test_first_update_uses_lr_at_1_and_groups_follow_the_schedule():
    model = tiny_model()
    first, last = list(model[0].parameters()), list(model[2].parameters())
    opt = NoamOptimizer([{"params": first}, {"params": last}], d_model=16, warmup_steps=10, factor=2.0)
    assert opt.step_num == 0 and opt.lr == opt.lr_at(1)
    before = [p.detach().clone() for p in model.parameters()]
    train_steps(model, opt, 0, 1)
    # Adam's first update moves every weight by lr * g / (|g| + eps), i.e. by lr_at(1)
    for p, q in zip(model.parameters(), before):
        moved = (p.detach() - q).abs()
        assert torch.allclose(moved[moved > 0], torch.tensor(opt.lr_at(1)), rtol=1e-4)
    assert opt.step_num == 1 and opt.lr == lr_at(1, opt.cfg, 16)
    for step in range(2, 15):
        train_steps(model, opt, step - 1, step)
        assert [g["lr"] for g in opt.param_groups] == [opt.lr_at(step)] * 2 == [opt.lr] * 2


def test_noam_optimizer_api():
    opt = NoamOptimizer(tiny_model().parameters(), d_model=512, warmup_steps=4000)
    assert opt.lr_at(3263) == pytest.approx(0.000570022641452, rel=1e-12)
    assert opt.peak_lr == pytest.approx((512 * 4000) ** -0.5, rel=1e-12)
    sched = opt.get_lr_schedule(5000)
    assert len(sched) == 5000 and sched[0] == opt.lr_at(1) and sched[-1] == opt.lr_at(5000)
    assert max(sched) == sched[3999]
    clipped = NoamOptimizer(tiny_model().parameters(), d_model=512, warmup_steps=4000, min_lr=1e-4, max_lr=5e-4)
    assert clipped.lr_at(1) == 1e-4 and clipped.peak_lr == 5e-4


def test_adamw_only_with_weight_decay():
    params = list(tiny_model().parameters())
    assert type(NoamOptimizer(params, 16, 10).optimizer) is torch.optim.Adam
    wd = NoamOptimizer(params, 16, 10, weight_decay=0.01, betas=(0.9, 0.997), eps=1e-8)
    assert type(wd.optimizer) is torch.optim.AdamW
    group = wd.param_groups[0]
    assert (group["weight_decay"], group["betas"], group["eps"]) == (0.01, (0.9, 0.997), 1e-8)


def test_build_optimizer_picks_the_schedule():
    params = list(tiny_model().parameters())
    noam = build_optimizer(params, OptimConfig(name="noam", peak_lr=1e-3, warmup_steps=50), 64, None)
    assert isinstance(noam, NoamOptimizer) and noam.lr_at(50) == pytest.approx(1e-3, rel=1e-12)
    assert "peak LR 1.00e-03 at step 50" in noam.describe()
    for name in SCHEDULES:
        opt = build_optimizer(params, OptimConfig(name=name, lr=3e-4, warmup_steps=10), 64, 1000)
        assert opt.lr_at(10) == pytest.approx(3e-4 if name != "noam" else (64 * 10) ** -0.5)
    with pytest.raises(ConfigError) as err:
        build_optimizer(params, OptimConfig(name="adam"), 64, None)
    assert all(name in str(err.value) for name in SCHEDULES)
    with pytest.raises(ConfigError, match="train.max_steps"):
        build_optimizer(params, OptimConfig(name="cosine"), 64, 0)


# ----------------------------------------------------------------------------- plateau
def test_plateau_reduces_after_patience_and_resets_on_improvement():
    opt = ScheduledOptimizer(tiny_model().parameters(), plateau_cfg(), d_model=64)
    lr = lambda: opt.lr_at(10)                            # noqa: E731  (after warmup)
    assert lr() == 1e-2
    opt.report_metric(5.0, higher_is_better=False)      # first value is an improvement
    opt.report_metric(5.0, higher_is_better=False)      # bad 1 (not a strict improvement)
    assert lr() == 1e-2
    opt.report_metric(4.0, higher_is_better=False)      # improvement: the bad count restarts
    opt.report_metric(4.5, higher_is_better=False)      # bad 1
    assert lr() == 1e-2
    opt.report_metric(float("nan"), higher_is_better=False)   # bad 2 -> reduce
    assert lr() == pytest.approx(5e-3)
    opt.report_metric(4.1, higher_is_better=False)      # bad 1 of a fresh count
    assert lr() == pytest.approx(5e-3)
    opt.report_metric(4.2, higher_is_better=False)      # bad 2 -> reduce again
    assert lr() == pytest.approx(2.5e-3)
    assert opt.get_lr_schedule(20)[-1] == pytest.approx(2.5e-3)


def test_plateau_higher_is_better_and_min_lr_floor():
    opt = ScheduledOptimizer(tiny_model().parameters(), plateau_cfg(plateau_patience=1, min_lr=3e-3), 64)
    opt.report_metric(20.0, higher_is_better=True)
    opt.report_metric(25.0, higher_is_better=True)
    assert opt.lr_at(10) == 1e-2
    for expected in (5e-3, 3e-3, 3e-3):
        opt.report_metric(24.0, higher_is_better=True)
        assert opt.lr_at(10) == pytest.approx(expected)


def test_report_metric_is_a_no_op_for_other_schedules():
    opt = NoamOptimizer(tiny_model().parameters(), 16, 10)
    for v in (1.0, 2.0, 3.0, 4.0, 5.0):
        opt.report_metric(v, higher_is_better=False)
    assert opt.state_dict()["plateau"] == {"scale": 1.0, "best": None, "bad": 0}


# ----------------------------------------------------------------------------- resume
def make_noam(model):
    return NoamOptimizer(model.parameters(), d_model=16, warmup_steps=5, factor=0.5, weight_decay=0.01)


def make_plateau(model):
    return ScheduledOptimizer(model.parameters(), plateau_cfg(), d_model=16)


# metrics for the plateau run: improvement at 2 and 4, bad at 6 (count 1 at the save after
# step 7), bad at 8 -> the LR halves only if the bad count survived the resume
METRICS = {2: 1.0, 4: 0.9, 6: 0.95, 8: 0.96}


@pytest.mark.parametrize("make", [make_noam, make_plateau], ids=["noam", "plateau"])
def test_resume_continues_exactly(make):
    total, cut = 12, 7
    ref = tiny_model()
    ref_opt = make(ref)
    train_steps(ref, ref_opt, 0, total, METRICS)

    model = tiny_model()
    opt = make(model)
    train_steps(model, opt, 0, cut, METRICS)
    saved = roundtrip({"model": model.state_dict(), "optim": opt.state_dict()})
    del model, opt

    resumed = tiny_model(seed=123)                      # different init: everything must come from the save
    resumed.load_state_dict(saved["model"])
    resumed_opt = make(resumed)
    resumed_opt.load_state_dict(saved["optim"])
    assert resumed_opt.step_num == cut
    train_steps(resumed, resumed_opt, cut, total, METRICS)

    assert resumed_opt.step_num == ref_opt.step_num == total
    assert resumed_opt.lr == ref_opt.lr
    for p, q in zip(resumed.parameters(), ref.parameters()):
        assert torch.equal(p, q)
    if make is make_plateau:
        assert ref_opt.state_dict()["plateau"]["scale"] == 0.5


def test_state_dict_is_weights_only_loadable():
    model = tiny_model()
    opt = make_plateau(model)
    train_steps(model, opt, 0, 5, {2: 1.0, 4: 2.0})
    state = opt.state_dict()
    loaded = roundtrip(state)
    assert loaded["step"] == 5 and loaded["plateau"] == {"scale": 1.0, "best": 1.0, "bad": 1}
    assert loaded["schedule"] == "plateau"
    assert torch.equal(loaded["optimizer"]["state"][0]["exp_avg"], state["optimizer"]["state"][0]["exp_avg"])
