"""End to end: the tiny model trains on a slice of real data; loss falls, logs hold the
scalars, early stopping stops, and resume is exact."""
import csv
import json

import pytest
import torch

from nmt.checkpoint import load_checkpoint
from nmt.metrics import read_metrics
from nmt.train import train

pytestmark = pytest.mark.slow


def params(path):
    return load_checkpoint(path)["model"]


def test_training_loss_falls_and_outputs_are_written(make_cfg, tmp_path):
    cfg = make_cfg("train.max_steps=24", "train.valid_every=12", "optim.warmup_steps=8", "model.dropout=0.0")
    summary = train(cfg, tmp_path)
    assert summary["step"] == 24 and "max_steps" in summary["stop_reason"]
    rows = read_metrics(tmp_path / "metrics.csv")
    losses = [r["loss"] for r in rows if r["loss"] is not None]
    assert len(losses) == 12 and losses[-1] < losses[0] - 0.5
    valid = [r for r in rows if r["valid_loss"] is not None]
    assert [int(r["step"]) for r in valid] == [12, 24]
    for key in ("valid_bleu", "valid_chrf", "valid_src_gain", "valid_distinct", "valid_ppl"):
        assert all(r[key] is not None for r in valid), key
    with open(tmp_path / "metrics.csv", newline="") as f:
        header = next(csv.reader(f))
    for col in ("step", "epoch", "lr", "loss", "grad_norm", "tokens_per_sec", "valid_loss", "valid_bleu",
                "valid_chrf", "valid_src_gain", "valid_distinct"):
        assert col in header
    for name in ("best.pt", "last.pt", "step-12.pt", "step-24.pt"):
        assert (tmp_path / "checkpoints" / name).is_file(), name
    ck = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    for key in ("model", "config", "step", "tokenizer", "optimizer", "sampler", "rng", "early_stopping"):
        assert key in ck
    assert json.loads((tmp_path / "summary.json").read_text())["step"] == 24
    assert (tmp_path / "tokenizer").is_dir() and (tmp_path / "config.yaml").is_file()

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in ("train/loss", "train/lr", "train/grad_norm", "train/tokens_per_sec", "valid/loss", "valid/ppl",
                "valid/bleu", "valid/chrf", "valid/src_gain", "valid/distinct"):
        assert tag in tags, tag
    lrs = [e.value for e in acc.Scalars("train/lr")]
    assert lrs[3] > lrs[0]  # warmup


def test_resume_is_exact(make_cfg, tmp_path):
    common = ("train.valid_every=5", "train.save_every=0", "train.accumulate=2", "model.dropout=0.2")
    full = tmp_path / "full"
    train(make_cfg("train.max_steps=10", *common), full)
    part = tmp_path / "part"
    train(make_cfg("train.max_steps=5", *common), part)
    summary = train(make_cfg("train.max_steps=10", "train.resume=true", *common), part)
    assert summary["step"] == 10
    a, b = params(full / "checkpoints" / "last.pt"), params(part / "checkpoints" / "last.pt")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    steps = [int(r["step"]) for r in read_metrics(part / "metrics.csv") if r["valid_loss"] is not None]
    assert steps == [5, 10]


def test_early_stopping_stops_and_says_why(make_cfg, tmp_path):
    cfg = make_cfg("optim=noam", "train.max_steps=100", "train.valid_every=3", "train.early_stopping.metric=valid_loss",
                   "train.early_stopping.patience=2", "train.early_stopping.min_delta=100")
    summary = train(cfg, tmp_path)
    assert summary["step"] == 9 and summary["stop_reason"].startswith("early stopping")
    assert summary["best_step"] == 3
    best = load_checkpoint(tmp_path / "checkpoints" / "best.pt")
    assert best["step"] == 3
    log_text = (tmp_path / "summary.json").read_text()
    assert "did not improve" in log_text


def test_epoch_limit_and_epoch_validation(make_cfg, tmp_path):
    summary = train(make_cfg("train.max_epochs=1", "train.max_steps=0", "train.valid_every=0", "train.valid_every_epoch=true",
                             "train.max_tokens=4096"), tmp_path)
    assert "max_epochs" in summary["stop_reason"]
    rows = [r for r in read_metrics(tmp_path / "metrics.csv") if r["valid_loss"] is not None]
    assert len(rows) == 1 and rows[0]["epoch"] == pytest.approx(1.0)


def test_early_stopping_under_wsd_decays_first_and_resume_finishes_the_decay(make_cfg, tmp_path):
    """At full LR, early stopping starts the wsd decay instead of stopping; the run ends when the LR
    reaches 0, and a run resumed inside that decay finishes it rather than stopping at once."""
    from nmt.schedules import wsd_decay_start

    common = ("optim=wsd", "optim.lr=2e-3", "optim.warmup_steps=4", "optim.decay_fraction=0.2", "train.max_steps=200",
              "train.valid_every=8", "train.log_every=1", "train.keep_last=10", "train.early_stopping.metric=valid_loss",
              "train.early_stopping.patience=1", "train.early_stopping.min_delta=100")
    summary = train(make_cfg(*common), tmp_path / "full")
    total = summary["step"]
    assert total == 20 and "decay began when early stopping" in summary["stop_reason"]     # 16 / (1 - 0.2)
    assert wsd_decay_start(total, 0.2, 4) == 16
    assert json.loads((tmp_path / "full" / "summary.json").read_text())["schedule_total_steps"] == total
    lrs = {int(r["step"]): r["lr"] for r in read_metrics(tmp_path / "full" / "metrics.csv") if r["loss"] is not None}
    assert lrs[16] == pytest.approx(2e-3) and lrs[18] < 2e-3 and lrs[20] == pytest.approx(0.0, abs=1e-12)
    resumed = train(make_cfg(*common, f"train.resume={tmp_path / 'full' / 'checkpoints' / 'step-16.pt'}"),
                    tmp_path / "again")
    assert resumed["step"] == total and resumed["stop_reason"] == summary["stop_reason"]
    a, b = params(tmp_path / "full" / "checkpoints" / "last.pt"), params(tmp_path / "again" / "checkpoints" / "last.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_decay_that_runs_slower_than_planned_may_finish_a_little_past_the_budget(make_cfg, tmp_path, monkeypatch):
    """The decay's end is fixed from the update rate before it; if the decay then runs slower, the run
    may go on past train.max_minutes, by at most DECAY_GRACE of the budget, until the LR reaches 0.
    Outside a decay the budget is exact."""
    from nmt import budget
    from nmt.train import DECAY_GRACE, Trainer

    clock = {"t": 0.0}
    monkeypatch.setattr(budget, "now", lambda: clock["t"])
    cfg = make_cfg("optim=wsd", "optim.warmup_steps=5", "train.max_steps=0", "train.max_epochs=0",
                   "train.max_minutes=1")
    trainer = Trainer(cfg, tmp_path)
    trainer.budget.start(0)
    trainer.step = 90
    clock["t"] = 60.5                                   # the budget is spent ...
    assert trainer._time_up()                           # ... and no decay has begun
    trainer.budget.fixed_total = 100                    # a decay to step 100 has begun
    assert not trainer._time_up()
    clock["t"] = 60 * (1 + DECAY_GRACE) + 0.1           # ... but the grace is spent too
    assert trainer._time_up()
    clock["t"], trainer.step = 60.5, 100                # the decay has ended
    assert trainer._time_up() and "end of the wsd schedule" in trainer._schedule_end_reason()


def test_under_a_time_budget_a_step_limit_that_comes_first_ends_the_decay_and_says_so(make_cfg, tmp_path,
                                                                                       monkeypatch, caplog):
    """train.max_minutes and train.max_steps (or max_epochs) both bound a run: whichever comes first.
    When the limit comes first, the decay ends at it, and the log says that it, not the time, set the end."""
    from nmt import budget

    ticks = iter(range(10 ** 9))      # 0.02 s per clock reading: 60 minutes would hold far more than 12 steps
    monkeypatch.setattr(budget, "now", lambda: 0.02 * next(ticks))
    cfg = make_cfg("optim=wsd", "optim.lr=2e-3", "optim.warmup_steps=2", "optim.decay_fraction=0.5",
                   "train.max_steps=12", "train.max_epochs=0", "train.max_minutes=60", "train.log_every=1",
                   "train.valid_every=12")
    with caplog.at_level("INFO", logger="nmt.train"):
        summary = train(cfg, tmp_path)
    assert summary["step"] == 12
    assert json.loads((tmp_path / "summary.json").read_text())["schedule_total_steps"] == 12
    lrs = {int(r["step"]): r["lr"] for r in read_metrics(tmp_path / "metrics.csv") if r["loss"] is not None}
    assert lrs[4] == pytest.approx(2e-3) and lrs[9] < 2e-3 and lrs[12] == pytest.approx(0.0, abs=1e-12)
    assert "or is step 12 (train.max_steps=12) if that comes first" in caplog.text
    assert "train.max_steps=12 ends the run before the time budget would" in caplog.text


def test_wsd_under_a_time_budget_fixes_its_end_and_every_lr_is_recomputable(make_cfg, tmp_path, monkeypatch):
    from nmt import budget
    from nmt.lrtools.lrcheck import check_logged_lr
    from nmt.lrtools.rundir import load_run

    ticks = iter(range(10 ** 9))      # a clock that advances 0.02 s per reading: the run is the same on any machine
    monkeypatch.setattr(budget, "now", lambda: 0.02 * next(ticks))

    cfg = make_cfg("optim=wsd", "optim.lr=3e-3", "optim.warmup_steps=5", "optim.decay_fraction=0.5",
                   "train.max_steps=0", "train.max_epochs=0", "train.max_minutes=0.3", "train.log_every=1")
    summary = train(cfg, tmp_path)
    run = load_run(tmp_path)
    total = run.summary["schedule_total_steps"]
    assert 5 < total < 10 ** 9 and run.summary["train_seconds"] > 0
    assert ("end of the wsd schedule" in summary["stop_reason"]) or ("max_minutes" in summary["stop_reason"])
    check = check_logged_lr(run.rows, run.lr_text, run.cfg, run.summary.get("updates_per_epoch"), run.summary)
    assert check.checked > 10 and check.mismatches == []
    lrs = [r["lr"] for r in run.rows if r["lr"] is not None and r["valid_loss"] is None]
    assert max(lrs) == pytest.approx(3e-3) and lrs[-1] < 3e-3      # it reached the decay
    ckpt = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert ckpt["budget"]["fixed_total"] == total and ckpt["budget"]["seconds"] > 0
