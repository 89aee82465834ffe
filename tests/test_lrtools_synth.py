"""Synthetic run directories for the LR-tool tests, written with the trainer's own
MetricsLogger so the CSV looks exactly like a real one (imported by test_lrtools_*.py).

Scenarios: 10..1000 updates logged every 10, validated every 50, 200 updates per
epoch, noam with d_model 64 and warmup 100; each scenario bends one curve.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable, Optional

import torch
from omegaconf import OmegaConf

from nmt.config import Config, to_dict, validate
from nmt.metrics import MetricsLogger, read_metrics
from nmt.optim import ScheduledOptimizer
from nmt.schedules import lr_at, peak_lr

STEPS, LOG_EVERY, VALID_EVERY, PER_EPOCH = 1000, 10, 50, 200.0


def make_cfg(**optim) -> Config:
    cfg = Config()
    cfg.model.d_model, cfg.model.heads = 64, 4
    cfg.optim.warmup_steps = 100
    cfg.train.max_steps, cfg.train.valid_every, cfg.train.log_every = STEPS, VALID_EVERY, LOG_EVERY
    cfg.train.early_stopping.metric = "valid_loss"
    for k, v in optim.items():
        setattr(cfg.optim, k, v)
    return validate(cfg)


def healthy_train(s: int) -> tuple[float, float]:
    """(train loss, grad norm) at step s."""
    return 2.0 + 6.0 * math.exp(-s / 250), 1.0 + 0.1 * math.sin(s)


def healthy_valid(s: int) -> dict:
    return dict(valid_loss=2.4 + 6.0 * math.exp(-s / 300), valid_src_gain=min(2.0, s / 200),
                valid_distinct=0.9, valid_bleu=30 * (1 - math.exp(-s / 300)), valid_chrf=50 * (1 - math.exp(-s / 300)),
                valid_acc=0.6 * (1 - math.exp(-s / 300)))


def overfit_valid(s: int) -> dict:
    return {**healthy_valid(s), "valid_loss": 2.4 + 6.0 * math.exp(-s / 150) + 0.002 * max(0, s - 400)}


def diverge_train(s: int) -> tuple[float, float]:
    if s <= 500:
        return healthy_train(s)
    return 3.0 * math.exp((s - 500) / 100), math.exp((s - 500) / 50)


def diverge_valid(s: int) -> dict:
    v = healthy_valid(s)
    if s > 500:
        v["valid_loss"] = 3.0 * math.exp((s - 500) / 100)
        v["valid_bleu"] = 0.0
    return v


def ignored_valid(s: int) -> dict:
    v = healthy_valid(s)
    if s >= 200:   # after warmup: blank sources do as well, one translation for everything; loss flat
        v.update(valid_src_gain=0.02, valid_distinct=0.2, valid_loss=3.0 + 0.0005 * math.sin(s), valid_bleu=0.5)
    return v


def few_distinct_valid(s: int) -> dict:
    return {**healthy_valid(s), "valid_distinct": 0.3}   # the source helps, but outputs repeat


def spike_train(s: int) -> tuple[float, float]:
    loss, g = healthy_train(s)
    return loss, g * 20 if s == 600 else g


SCENARIOS: dict[str, tuple[Callable, Callable]] = {
    "healthy": (healthy_train, healthy_valid),
    "overfitting": (healthy_train, overfit_valid),
    "diverged": (diverge_train, diverge_valid),
    "source_ignored": (healthy_train, ignored_valid),
    "grad_spikes": (spike_train, healthy_valid),
    "few_distinct": (healthy_train, few_distinct_valid),
}


def write_run(path: Path, scenario: str = "healthy", cfg: Optional[Config] = None, lr_scale: float = 1.0,
              overrides: Optional[list[str]] = None, summary: Optional[dict] = None, steps: int = STEPS) -> Path:
    """A run directory as the trainer leaves it: metrics.csv, summary.json, config.yaml, .hydra/."""
    cfg = cfg or make_cfg()
    train_fn, valid_fn = SCENARIOS[scenario]
    path.mkdir(parents=True, exist_ok=True)
    dummy = [torch.zeros(1, requires_grad=True)]
    opt = ScheduledOptimizer(dummy, cfg.optim, cfg.model.d_model, cfg.train.max_steps) if cfg.optim.name == "plateau" else None
    log = MetricsLogger(path, tensorboard=False)
    valid_rows = []
    for s in range(1, steps + 1):
        lr = lr_scale * (opt.lr_at(s) if opt else lr_at(s, cfg.optim, cfg.model.d_model, cfg.train.max_steps))
        epoch = s / PER_EPOCH
        if s % LOG_EVERY == 0:
            loss, g = train_fn(s)
            log.log(s, epoch=epoch, lr=lr, loss=loss, grad_norm=g, tokens_per_sec=1000.0, padding_eff=0.9, bad_steps=0)
        if s % VALID_EVERY == 0:
            v = valid_fn(s)
            v["valid_ppl"] = math.exp(min(v["valid_loss"], 700))
            log.log(s, epoch=epoch, lr=lr, **v)
            valid_rows.append((s, v))
            if opt:
                opt.report_metric(v["valid_loss"], higher_is_better=False)
    log.close()
    finite = [(s, v) for s, v in valid_rows if math.isfinite(v["valid_loss"])]
    best_step, best = min(finite, key=lambda x: x[1]["valid_loss"])
    info = {"step": steps, "epoch": steps / PER_EPOCH, "stop_reason": f"reached train.max_steps={steps}",
            "diverged": False, "best_metric": "valid_loss", "best": best["valid_loss"], "best_step": best_step,
            "skipped_steps": 0, "updates_per_epoch": PER_EPOCH, "peak_lr": peak_lr(cfg.optim, cfg.model.d_model),
            "seconds": 1.0, "last_valid": {"step": valid_rows[-1][0], **valid_rows[-1][1]}}
    info.update(summary or {})
    (path / "summary.json").write_text(json.dumps(info, indent=2), encoding="utf-8")
    (path / "config.yaml").write_text(OmegaConf.to_yaml(to_dict(cfg)), encoding="utf-8")
    (path / ".hydra").mkdir(exist_ok=True)
    (path / ".hydra" / "overrides.yaml").write_text(OmegaConf.to_yaml(overrides or []), encoding="utf-8")
    return path


def test_synthetic_run_reads_back_like_a_real_one(tmp_path):
    run = write_run(tmp_path / "r")
    rows = read_metrics(run / "metrics.csv")
    assert len([r for r in rows if r["loss"] is not None]) == STEPS // LOG_EVERY
    assert len([r for r in rows if r["valid_loss"] is not None]) == STEPS // VALID_EVERY
    assert OmegaConf.load(run / ".hydra" / "overrides.yaml") == []
