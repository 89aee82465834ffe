"""``lr.py plot``: the LR of every update under a config, with warmup end and epochs marked.

What is plotted is what will train: the same composed config, the same
:func:`nmt.schedules.lr_at`, and (unless given) the same batches per epoch as the
trainer computes from the data and ``train.max_tokens`` / ``train.accumulate``.
"""
from __future__ import annotations

import csv
import math
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from nmt.config import Config
from nmt.lrtools.checks import warmup_too_long
from nmt.lrtools.figures import pyplot, save
from nmt.lrtools.stats import fmt_lr
from nmt.schedules import describe_schedule, lr_at, peak_lr, warmup_end

DEFAULT_AT_EPOCHS = (1, 2, 5, 10, 20, 50)


@dataclass
class EpochLR:
    epoch: float
    step: int          # the last update of that epoch
    lr: float
    pct_of_peak: float


@dataclass
class ScheduleFacts:
    """What a user should know about a schedule before training with it."""

    description: str
    peak_lr: float
    warmup_steps: int
    updates_per_epoch: float
    training_steps: Optional[int]       # when training will stop (None = unknown)
    steps: int                          # steps plotted
    at_epochs: list[EpochLR] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def warmup_end_epoch(self) -> float:
        return self.warmup_steps / self.updates_per_epoch

    def lines(self) -> list[str]:
        """The facts as short lines for the terminal."""
        out = [self.description, f"peak LR: {fmt_lr(self.peak_lr)} at step {max(self.warmup_steps, 1):,}"]
        if self.warmup_steps:
            out.append(f"warmup ends at step {self.warmup_steps:,} = epoch {self.warmup_end_epoch:.2f} "
                       f"({self.updates_per_epoch:,.0f} updates per epoch)")
        else:
            out.append(f"no warmup ({self.updates_per_epoch:,.0f} updates per epoch)")
        if self.training_steps:
            out.append(f"training stops after {self.training_steps:,} updates "
                       f"= {self.training_steps / self.updates_per_epoch:.2f} epochs")
        for e in self.at_epochs:
            out.append(f"  end of epoch {e.epoch:g} (step {e.step:,}): LR {fmt_lr(e.lr)} = {e.pct_of_peak:.1f}% of peak")
        return out + [f"note: {n}" for n in self.notes]


def updates_per_epoch(batches_per_epoch: float, accumulate: int) -> float:
    """Optimizer updates per epoch: the last, partial group of an epoch is an update too."""
    return float(math.ceil(batches_per_epoch / accumulate))


def training_steps(cfg: Config, per_epoch: float) -> Optional[int]:
    """The trainer's training length: train.max_steps, else max_epochs * updates per epoch."""
    t = cfg.train
    if t.max_steps:
        return int(t.max_steps)
    return int(t.max_epochs * per_epoch) if t.max_epochs else None


def batches_per_epoch_from_data(cfg: Config) -> tuple[int, int, float]:
    """Batches of epoch 0 as the trainer cuts them: (batches, training pairs, seconds taken).

    Reads and tokenizes the training data; the tokenizer is trained on first use
    and cached, so the first call on a big corpus can take ~20 s.
    """
    from nmt.batching import training_sampler
    from nmt.data import prepare_data

    t0 = time.time()
    data = prepare_data(cfg)
    sampler = training_sampler(data.train_src_lens, data.train_tgt_lens, cfg.train)
    return len(sampler), len(data.train_src), time.time() - t0


def schedule(cfg: Config, steps: int, total_steps: Optional[int]) -> list[float]:
    """LR of updates 1..steps (``total_steps``: the cosine decay length when not configured)."""
    d_model = cfg.model.d_model
    return [lr_at(s, cfg.optim, d_model, total_steps) for s in range(1, steps + 1)]


def schedule_facts(cfg: Config, lrs: Sequence[float], per_epoch: float,
                   at_epochs: Sequence[float] = DEFAULT_AT_EPOCHS) -> ScheduleFacts:
    total = training_steps(cfg, per_epoch)
    peak = peak_lr(cfg.optim, cfg.model.d_model)
    facts = ScheduleFacts(describe_schedule(cfg.optim, cfg.model.d_model, total), peak, warmup_end(cfg.optim),
                          per_epoch, total, len(lrs))
    for e in at_epochs:
        step = max(1, round(e * per_epoch))
        if step > len(lrs):
            facts.notes.append(f"epoch {e:g} (step {step:,}) is past the {len(lrs):,} plotted steps")
            continue
        facts.at_epochs.append(EpochLR(e, step, lrs[step - 1], 100.0 * lrs[step - 1] / peak))
    if cfg.optim.name == "plateau":
        facts.notes.append("plateau: the reductions depend on validation results, so the plot shows the LR "
                           "before any reduction (an upper bound)")
    if total and facts.warmup_steps >= total:
        facts.notes.append(f"training stops at step {total:,}, before warmup ends: the peak LR is never reached")
    elif total and facts.warmup_steps > 0.25 * total:
        facts.notes.append(f"warmup takes {100 * facts.warmup_steps / total:.0f}% of training "
                           f"({facts.warmup_steps:,} of {total:,} updates): the peak LR comes late")
    if warmup_too_long(facts.warmup_steps, per_epoch):
        facts.notes.append(f"warmup ({facts.warmup_steps:,} steps) is longer than one epoch "
                           f"({per_epoch:,.0f} updates): the first epoch trains at a low LR")
    return facts


def write_csv(path: Path, lrs: Sequence[float], per_epoch: float, peak: float) -> Path:
    """``step,epoch,lr,pct_of_peak`` for every plotted update (epoch = epochs done after it)."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["step", "epoch", "lr", "pct_of_peak"])
        for s, lr in enumerate(lrs, start=1):
            w.writerow([s, f"{s / per_epoch:.6f}", repr(lr), f"{100.0 * lr / peak:.6g}"])
    return path


def plot(path: Path, lrs: Sequence[float], facts: ScheduleFacts, title: str = "") -> Path:
    """LR vs step (epochs on the top axis); warmup end, peak, epoch boundaries and the end
    of training marked."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9, 4.5))
    n, per = len(lrs), facts.updates_per_epoch
    stride = max(1, n // 4000)                 # a line needs no more points than pixels
    xs = list(range(1, n + 1, stride))
    ax.plot(xs, [lrs[s - 1] for s in xs], color="tab:blue", lw=1.6, label="LR")
    epochs = int(n // per)
    every = max(1, math.ceil(epochs / 40))
    for e in range(every, epochs + 1, every):
        ax.axvline(e * per, color="0.85", lw=0.7, zorder=0)
    if facts.warmup_steps and facts.warmup_steps <= n:
        w = facts.warmup_steps
        ax.axvline(w, color="tab:red", ls="--", lw=1.2,
                   label=f"warmup end: step {w:,} = epoch {facts.warmup_end_epoch:.2f}")
    peak_step = max(facts.warmup_steps, 1)
    if peak_step <= n:
        ax.plot([peak_step], [lrs[peak_step - 1]], "o", color="tab:red")
        ax.annotate(f"peak {fmt_lr(facts.peak_lr)}", (peak_step, lrs[peak_step - 1]), xytext=(8, 4),
                    textcoords="offset points", fontsize=9)
    if facts.training_steps and facts.training_steps <= n:
        ax.axvline(facts.training_steps, color="k", ls=":", lw=1.0, label="end of training")
    for e in facts.at_epochs:
        ax.plot([e.step], [e.lr], ".", color="0.3")
        ax.annotate(f"ep {e.epoch:g}: {e.pct_of_peak:.0f}%", (e.step, e.lr), xytext=(4, 8),
                    textcoords="offset points", fontsize=8, color="0.3")
    top = ax.secondary_xaxis("top", functions=(lambda s: s / per, lambda e: e * per))
    top.set_xlabel(f"epoch ({per:,.0f} updates each; grey lines mark every {every} epoch(s))")
    ax.set_xlabel("update step")
    ax.set_ylabel("learning rate")
    ax.set_xlim(0, n)
    ax.set_ylim(bottom=0)
    ax.yaxis.set_major_formatter(lambda y, _: f"{y:.1e}" if y else "0")
    ax.set_title(textwrap.fill(title or facts.description, 110), fontsize=9)   # long descriptions wrap
    ax.legend(loc="upper right", fontsize=8)
    return save(fig, path)
