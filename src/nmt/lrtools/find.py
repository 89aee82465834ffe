"""``lr.py find``: the LR range test (Smith, 2017; popularised by fastai's lr_find).

Train from the initial weights for a few hundred updates while the LR grows
exponentially from ``lo`` to ``hi``, recording the loss. The smoothed loss falls
while the LR is useful and blows up once it is too high; good peak LRs lie where
it falls fastest, and about a tenth of the LR at its minimum. Nothing is saved
but the curve: the model lives in memory only.
"""
from __future__ import annotations

import csv
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Sequence

from nmt.config import Config
from nmt.lrtools import LRToolError
from nmt.lrtools.figures import pyplot, save
from nmt.lrtools.stats import finite, fmt_lr
from nmt.schedules import noam_factor_for_peak

log = logging.getLogger(__name__)


@dataclass
class RangeTest:
    """The curve of one range test: ``losses[i]`` was measured with ``lrs[i]``."""

    lrs: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    smoothed: list[float] = field(default_factory=list)
    planned: int = 0
    stop_reason: str = ""


@dataclass
class Suggestion:
    steepest: Optional[float]        # LR where the smoothed loss falls fastest (per log LR)
    min_loss_lr: Optional[float]     # LR at the smoothed loss's minimum
    min_loss: Optional[float]

    @property
    def min_over_10(self) -> Optional[float]:
        return None if self.min_loss_lr is None else self.min_loss_lr / 10

    @property
    def recommended(self) -> Optional[float]:
        """The more careful of the two rules (a peak LR that is too high costs a run)."""
        cands = [x for x in (self.steepest, self.min_over_10) if x is not None]
        return min(cands) if cands else None


def lr_ladder(lo: float, hi: float, steps: int) -> list[float]:
    """``steps`` LRs growing geometrically from ``lo`` to ``hi`` (both included)."""
    if not (0 < lo < hi) or not math.isfinite(hi):
        raise LRToolError(f"the range test needs 0 < --min < --max, got --min {lo:g} --max {hi:g}")
    if steps < 2:
        raise LRToolError(f"the range test needs --steps >= 2, got {steps}")
    ratio = hi / lo
    return [lo * ratio ** (i / (steps - 1)) for i in range(steps)]


def stop_reason(smoothed: float, best: float, stop_factor: float) -> Optional[str]:
    """Why the test should stop now: a non-finite loss, or an explosion above ``stop_factor``x the best."""
    if not math.isfinite(smoothed):
        return "the loss became non-finite"
    if smoothed > stop_factor * best:
        return f"the smoothed loss exploded ({smoothed:.3g} > {stop_factor:g} x best {best:.3g})"
    return None


def suggest(lrs: Sequence[float], smoothed: Sequence[float], skip: Optional[int] = None) -> Suggestion:
    """Steepest descent of ``smoothed`` against log LR before its minimum, and the minimum.

    ``skip`` first points are ignored for the slope (default: a tenth, at most 10),
    where the average has seen too few losses to mean anything.
    """
    pts = [(lr, s) for lr, s in zip(lrs, smoothed) if finite(s)]
    if not pts:
        return Suggestion(None, None, None)
    i_min = min(range(len(pts)), key=lambda i: pts[i][1])
    skip = min(10, len(pts) // 10) if skip is None else skip
    steepest = None
    seg = pts[skip:i_min + 1]
    if len(seg) >= 3:
        slopes = [(seg[i + 1][1] - seg[i - 1][1]) / math.log(seg[i + 1][0] / seg[i - 1][0])
                  for i in range(1, len(seg) - 1)]
        j = min(range(len(slopes)), key=lambda k: slopes[k])
        if slopes[j] < 0:
            steepest = seg[j + 1][0]
    return Suggestion(steepest, pts[i_min][0], pts[i_min][1])


def _batches(sampler) -> Iterator[list[int]]:
    """The sampler's batches, epoch after epoch."""
    while True:
        yield from sampler
        sampler.set_epoch(sampler.epoch + 1)


def range_test(cfg: Config, lo: float, hi: float, steps: int, beta: float = 0.9, stop_factor: float = 4.0,
               progress: bool = False) -> RangeTest:
    """Run the range test with the model, data and batching of ``cfg`` (plain Adam with
    its betas/eps, the LR set before every update; clipping and label smoothing as in
    training). Stops early on a non-finite or exploded smoothed loss."""
    import torch
    from tqdm import tqdm

    from nmt.batching import collate, training_sampler
    from nmt.data import prepare_data
    from nmt.model import Transformer
    from nmt.runtime import autocast_dtype, seed_everything, select_device
    from nmt.step import accumulate_gradients
    from nmt.tokenizer import PAD

    lrs = lr_ladder(lo, hi, steps)
    device = select_device(cfg.device)
    amp = autocast_dtype(cfg.precision, device, training=True)
    seed_everything(cfg.train.seed)
    data = prepare_data(cfg)
    tok, t = data.tokenizer, cfg.train
    sampler = training_sampler(data.train_src_lens, data.train_tgt_lens, t)
    model = Transformer(cfg.model, tok.src_vocab_size, tok.tgt_vocab_size, PAD).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=lrs[0], betas=tuple(float(b) for b in cfg.optim.betas),
                           eps=cfg.optim.eps)
    batches = _batches(sampler)
    out = RangeTest(planned=steps)
    avg, best = 0.0, math.inf
    model.train()
    for i, lr in enumerate(tqdm(lrs, disable=not progress, unit="step", desc="LR range test")):
        for g in opt.param_groups:
            g["lr"] = lr
        opt.zero_grad(set_to_none=True)
        group = [collate([data.train_src[j] for j in idx], [data.train_tgt[j] for j in idx], idx, sampler.length_multiple)
                 for idx in (next(batches) for _ in range(t.accumulate))]
        loss = float(accumulate_gradients(model, group, device, amp, t.label_smoothing)[0])
        # the same smoothing as stats.ema_smooth, one value at a time
        avg = beta * avg + (1 - beta) * loss
        smooth = avg / (1 - beta ** (i + 1))
        out.lrs.append(lr), out.losses.append(loss), out.smoothed.append(smooth)
        reason = stop_reason(smooth, best, stop_factor)
        if reason:
            out.stop_reason = f"stopped at step {i + 1}/{steps} (LR {fmt_lr(lr)}): {reason}"
            break
        best = min(best, smooth)
        if t.clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.clip_norm)
        opt.step()
    if not out.stop_reason:
        out.stop_reason = f"ran all {steps} steps up to LR {fmt_lr(lrs[-1])} without an explosion"
    return out


def write_csv(path: Path, rt: RangeTest) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["step", "lr", "loss", "smoothed_loss"])
        for i, (lr, loss, s) in enumerate(zip(rt.lrs, rt.losses, rt.smoothed), start=1):
            w.writerow([i, repr(lr), f"{loss:.6g}", f"{s:.6g}"])
    return path


def advice(cfg: Config, sug: Suggestion) -> list[str]:
    """Terminal lines: the suggested LRs and the settings that give them as the peak."""
    o, d_model = cfg.optim, cfg.model.d_model
    lines = [f"steepest descent of the smoothed loss at LR {fmt_lr(sug.steepest)}",
             f"minimum smoothed loss {sug.min_loss:.3f} at LR {fmt_lr(sug.min_loss_lr)} "
             f"-> minimum / 10 = {fmt_lr(sug.min_over_10)}" if sug.min_loss is not None else "no finite loss",
             f"suggested peak LR: {fmt_lr(sug.recommended)} (the lower of the two)"]
    if sug.recommended is None:
        return lines
    if o.name == "noam":
        warmup = max(o.warmup_steps, 1)
        f = noam_factor_for_peak(sug.recommended, d_model, warmup)
        lines.append(f"noam with d_model {d_model} and warmup {warmup}: optim.factor={f:.3g} "
                     f"(or optim.peak_lr={sug.recommended:.2g}) gives that peak")
    else:
        lines.append(f"{o.name}: optim.lr={sug.recommended:.2g} sets that peak")
    if sug.steepest is not None and sug.min_over_10 is not None and sug.steepest != sug.min_over_10:
        lo, hi = sorted((sug.steepest, sug.min_over_10))
        peaks = [lo, math.sqrt(lo * hi), hi]
        key, values = ("optim.factor", [noam_factor_for_peak(p, d_model, max(o.warmup_steps, 1)) for p in peaks]) \
            if o.name == "noam" else ("optim.lr", peaks)
        lines.append(f"to choose between the two, sweep: python scripts/train.py -m {key}="
                     + ",".join(f"{v:.2g}" for v in values) + " then: python scripts/lr.py report multirun/...")
    return lines


def plot(path: Path, rt: RangeTest, sug: Suggestion, title: str = "") -> Path:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot(rt.lrs, rt.losses, color="0.75", lw=0.8, label="loss")
    ax.plot(rt.lrs, rt.smoothed, color="tab:blue", lw=1.8, label="smoothed loss")
    for lr, name, color in ((sug.steepest, "steepest", "tab:green"), (sug.min_over_10, "min / 10", "tab:orange"),
                            (sug.min_loss_lr, "min", "tab:red")):
        if lr is not None:
            ax.axvline(lr, color=color, ls="--", lw=1.1, label=f"{name}: {fmt_lr(lr)}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (log scale)")
    ax.set_ylabel("training loss (label-smoothed, per token)")
    finite_s = [s for s in rt.smoothed if finite(s)]
    if finite_s:   # keep the explosion from flattening the interesting part
        lo, hi = min(finite_s + [x for x in rt.losses if finite(x)]), finite_s[0]
        ax.set_ylim(lo - 0.1 * (hi - lo) - 0.05, max(hi, lo) + 0.6 * (hi - lo) + 0.05)
    ax.set_title(title or "LR range test", fontsize=9)
    ax.legend(fontsize=8)
    return save(fig, path)
