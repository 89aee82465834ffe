"""``train(cfg, run_dir)``: build everything, then one readable loop.

The loop: take ``accumulate`` token-budget batches, one optimizer update,
log every ``log_every`` updates, validate every ``valid_every`` updates (and
at epoch ends), checkpoint after validation, stop on max steps/epochs/minutes,
early stopping, a stop signal, or too many non-finite updates in a row.
Under ``torchrun`` each rank trains on its share of the batches; rank 0 logs,
validates and writes files, and the ranks agree on when to stop
(:mod:`nmt.distributed`; a one-process run is unchanged by it).
"""
from __future__ import annotations

import json
import logging
import math
import signal
import time
from pathlib import Path
from typing import Optional

import torch
from omegaconf import OmegaConf

from nmt import distributed
from nmt.average import average_checkpoints
from nmt.batching import collate, training_sampler
from nmt.budget import TimeBudget, schedule_end
from nmt.checkpoint import FORMAT, CheckpointManager, all_finite
from nmt.config import Config, to_dict
from nmt.data import PreparedData, prepare_data
from nmt.early_stopping import EarlyStopping
from nmt.evaluate import blind_sources, make_batches, validate
from nmt.finetune import report_unknowns
from nmt.lrtools.lrcheck import lower_lr_advice
from nmt.metrics import MetricsLogger
from nmt.model import Transformer
from nmt.optim import ScheduledOptimizer, build_optimizer, describe_schedule, peak_lr, warmup_end
from nmt.runtime import (BF16_MIN_SPEEDUP, StopSignal, autocast_dtype, configure_backends, cpu_bf16_speedup,
                         dtype_name, rng_state, seed_everything, select_device, set_rng_state)
from nmt.schedules import wsd_decay_start, wsd_end_not_before
from nmt.startup import find_init, find_resume
from nmt.step import train_step
from nmt.tokenizer import PAD, Tokenizer

log = logging.getLogger(__name__)

# the provisional end of a schedule whose end the time budget sets: far enough to keep any decay away
UNKNOWN_END = 10 ** 12
# how far past train.max_minutes a decay that has begun may run to reach its end (a share of the budget)
DECAY_GRACE = 0.05


class TrainingError(Exception):
    """Training cannot go on (too many non-finite updates in a row, non-finite weights)."""


class Trainer:
    """Holds the objects of one run; ``run()`` is the training loop."""

    def __init__(self, cfg: Config, run_dir: Path):
        self.cfg, self.run_dir, t = cfg, Path(run_dir), cfg.train
        self.dist = distributed.init(cfg.device)
        self.device = self.dist.device(select_device(cfg.device))
        configure_backends(self.device)
        if t.threads:
            torch.set_num_threads(t.threads)
        seed_everything(t.seed)
        self.ckpt = CheckpointManager(self.run_dir / "checkpoints", max(t.keep_last, t.average_last))
        if self.dist.main:
            self.ckpt.prepare()                # an unwritable folder fails now, not at the first save
        resume = find_resume(cfg, self.run_dir)
        self.amp = self._training_precision(resume)
        self.eval_amp = autocast_dtype(cfg.precision, self.device)    # validation decodes as the translator does
        init, self.init_from = find_init(cfg) if not resume else (None, None)
        if resume:
            self.init_from = resume.get("init_from")
        start = resume or init
        with self.dist.main_first():           # rank 0 builds the tokenizer and token caches, the others map them
            self.data: PreparedData = prepare_data(cfg, Tokenizer.from_state(start["tokenizer"]) if start else None)
        self.tok = self.data.tokenizer
        if init:
            src, tgt = self.data.train_src, self.data.train_tgt      # the new corpus, without data.mix's pairs
            report_unknowns(getattr(src, "primary", src), getattr(tgt, "primary", tgt), inherited=True)
        self.sampler = training_sampler(self.data.train_src_lens, self.data.train_tgt_lens, t,
                                        rank=self.dist.rank, world=self.dist.world)
        self.model = Transformer(cfg.model, self.tok.src_vocab_size, self.tok.tgt_vocab_size, PAD).to(self.device)
        # the run's length in steps when steps or epochs bound it (0: only the time budget does)
        self.total_steps = t.max_steps or (t.max_epochs * math.ceil(len(self.sampler) / t.accumulate))
        self.budget = TimeBudget(t.max_minutes)
        # a decaying schedule whose end comes from the time budget: estimated as training goes
        self.timed_end = cfg.optim.name == "wsd" and not cfg.optim.total_steps and t.max_minutes > 0
        total = self.total_steps or (UNKNOWN_END if self.timed_end else 0)
        self.opt: ScheduledOptimizer = build_optimizer(self.model.parameters(), cfg.optim, cfg.model.d_model, total)
        self.stopper = EarlyStopping(t.early_stopping.metric, t.early_stopping.patience, t.early_stopping.min_delta)
        self.step, self.bad_in_row, self.skipped = 0, 0, 0
        # CUDA: updates skipped on the device, read back at logging steps
        self.pending_bad, self.bad_run, self.max_bad_run = (torch.zeros((), dtype=torch.int32, device=self.device)
                                                            for _ in range(3))
        self.last_valid: dict[str, float] = {}
        self._saved_at = time.time()              # of the last periodic checkpoint (train.save_every_minutes)
        self.averaged: Optional[dict] = None      # dev scores of checkpoints/averaged.pt (train.average_last)
        self.dev_batches = make_batches(self.data.dev_src, self.data.dev_tgt, t.max_tokens)
        self.blind_batches = make_batches(blind_sources(len(self.data.dev_tgt)), self.data.dev_tgt, t.max_tokens)
        if resume:
            self._restore(resume)
        elif init:
            self._initialize(init)
        if self.dist.enabled and not resume:     # the same initial weights everywhere, a dropout stream per rank
            torch.manual_seed(t.seed + 1000 * self.dist.rank)
        self.forward = self.dist.wrap(self.model, self.device)     # DDP when distributed: runs the forward passes
        if t.compile:                             # the compiled wrapper runs; self.model keeps the plain weights
            self.forward = torch.compile(self.forward, dynamic=True)
        self.metrics = MetricsLogger(self.run_dir, resume_step=self.step if resume else None, enabled=self.dist.main)
        if self.dist.main:
            self.tok.save(self.run_dir / "tokenizer")
            (self.run_dir / "config.yaml").write_text(OmegaConf.to_yaml(to_dict(cfg)), encoding="utf-8")
        self._log_setup()

    # ------------------------------------------------------------------ setup helpers
    def _training_precision(self, resume: Optional[dict]) -> Optional[torch.dtype]:
        """The autocast dtype of the training steps. ``precision=auto`` on a CPU is measured
        (:func:`cpu_bf16_speedup`): rank 0's choice holds for every rank, and a resumed run keeps the
        one its checkpoint records, so that its batch shapes and numerics stay those of the run."""
        recorded = (resume or {}).get("precision")
        self.precision_kept = (self.cfg.precision == "auto" and self.device.type == "cpu"
                               and recorded in ("bf16", "fp32"))
        if self.precision_kept:
            return torch.bfloat16 if recorded == "bf16" else None
        amp = autocast_dtype(self.cfg.precision, self.device, training=True)
        return torch.bfloat16 if self.dist.broadcast(dtype_name(amp)) == "bf16" else None

    def _initialize(self, obj: dict) -> None:
        """Fine-tuning: the checkpoint's weights (and, if asked, its optimizer state / schedule step)."""
        self.model.load_state_dict(obj["model"])
        keep = self.cfg.train.init_keep
        if keep:
            self.opt.load_state_dict(obj["optimizer"], adam="optimizer" in keep, schedule="schedule" in keep)
        if "schedule" in keep:
            self.step = self.opt.step_num

    def _restore(self, obj: dict) -> None:
        self.model.load_state_dict(obj["model"])
        self.opt.load_state_dict(obj["optimizer"])
        self.sampler.load_state_dict(obj["sampler"])
        self.stopper.load_state_dict(obj["early_stopping"])
        ranks = obj.get("rng_ranks") or [obj["rng"]]
        if self.dist.world != len(ranks):
            log.warning("resuming a run of %d process(es) with %d: each rank's batches and random streams "
                        "start afresh from this epoch (the result is not that of an uninterrupted run)",
                        len(ranks), self.dist.world)
        set_rng_state(ranks[self.dist.rank % len(ranks)])
        self.step = obj["step"]
        self.budget.load_state_dict(obj.get("budget", {}))
        if self.budget.fixed_total:                 # a wsd decay already scheduled (time budget or cool-down)
            self.opt.total_steps = self.budget.fixed_total
        self.skipped = obj.get("skipped_steps", 0)
        self.last_valid = dict(obj.get("metrics", {}))

    def _log_setup(self) -> None:
        n_params = sum(p.numel() for p in self.model.parameters())
        log.info("run directory: %s", self.run_dir.resolve())
        log.info("device %s, %s; model %.2fM parameters (%s-norm, share_embeddings=%s); %s", self.device,
                 "bf16 autocast" if self.amp else "fp32", n_params / 1e6, self.cfg.model.norm,
                 self.cfg.model.share_embeddings, self.dist.describe())
        if self.precision_kept:
            log.info("precision=auto: %s, as the resumed run trained", "bf16 autocast" if self.amp else "fp32")
        elif self.device.type == "cpu" and self.cfg.precision == "auto":
            speedup = cpu_bf16_speedup()
            if not speedup:
                log.info("this CPU has no native bf16 matmuls (AVX512-BF16/AMX), so training runs in fp32: about "
                         "half the updates per minute of a CPU whose bf16 matmuls are fast (docs/results.md)")
            else:
                log.info("precision=auto: bf16 matmuls run at %.2fx the fp32 speed on this CPU, so training runs in "
                         "%s (bf16 needs %.1fx; set precision=fp32 or bf16 to choose)", speedup,
                         "bf16 autocast" if self.amp else "fp32", BF16_MIN_SPEEDUP)
        s = self.sampler
        log.info("data %s: %d training pairs, %d dev pairs; vocab %d/%d; %d batches per epoch%s (max_tokens %d%s; "
                 "lengths padded to multiples of %d, sentences in multiples of %d)",
                 self.cfg.data.name, len(self.data.train_src), len(self.data.dev_src), self.tok.src_vocab_size,
                 self.tok.tgt_vocab_size, len(s), " per rank" if self.dist.enabled else "",
                 self.cfg.train.max_tokens, " per rank and batch" if self.dist.enabled else "", s.length_multiple,
                 s.batch_multiple)
        if self.timed_end and not self.budget.fixed_total:
            log.info("%s schedule: peak LR %.2e after %d warmup steps; the decay takes the last %g%% of the run, "
                     "whose end is estimated from train.max_minutes=%g as training goes%s", self.cfg.optim.name,
                     peak_lr(self.cfg.optim, self.cfg.model.d_model), self.cfg.optim.warmup_steps,
                     100 * self.cfg.optim.decay_fraction, self.cfg.train.max_minutes,
                     f", or is step {self.total_steps} ({self._step_limit()}) if that comes first"
                     if self.total_steps else "")
        else:
            log.info(describe_schedule(self.cfg.optim, self.cfg.model.d_model, self.opt.total_steps))

    # ------------------------------------------------------------------ the loop
    def run(self) -> dict:
        t = self.cfg.train
        reason = self._already_done()          # a resumed run may have ended just before it was killed
        window = {"loss": 0.0, "tokens": 0, "real": 0, "padded": 0, "norm": 0.0, "n": 0, "t0": time.time()}
        start = self._saved_at = time.time()
        self.budget.start(self.step)
        bar = _progress(t.progress and self.dist.main, self.budget.fixed_total or (0 if self.budget.limited else
                                                                                 self.total_steps), self.step)
        with StopSignal() as stop:
            while reason is None:
                group = self._next_group()
                if group is None:                      # epoch finished: move on first, so a checkpoint
                    self.sampler.set_epoch(self.sampler.epoch + 1)   # saved now resumes in the next epoch
                    if t.valid_every_epoch and self.last_valid.get("step") != self.step:
                        reason = self._validate_and_save()
                    if reason is None and t.max_epochs and self.sampler.epoch >= t.max_epochs:
                        reason = f"reached train.max_epochs={t.max_epochs}"
                    continue
                batches = [self._collate(idx) for idx in group]
                loss, norm, ntok, ok = self._update(batches)
                if not ok:
                    reason = self._bad_update(loss, norm)
                    continue
                self.step += 1
                self.bad_in_row = 0
                _accumulate(window, loss, norm, ntok, batches)
                if self.step % t.log_every == 0:
                    self._log_train(window, bar)
                if t.valid_every and self.step % t.valid_every == 0:
                    reason = self._validate_and_save()
                elif t.save_every_minutes and time.time() - self._saved_at >= 60 * t.save_every_minutes:
                    self._save(periodic=True)
                elif t.save_every and self.step % t.save_every == 0:
                    self._save()
                if reason is None and t.max_steps and self.step >= t.max_steps:
                    reason = f"reached train.max_steps={t.max_steps}"
                if reason is None:
                    reason = self._agree(stop)         # signals, time budget, the schedule's end
                bar.update(1)
            bar.close()
            if not self.last_valid or self.last_valid.get("step") != self.step:
                if not reason.startswith("interrupted") and self.step > 0:
                    self._validate_and_save(final=True)
                else:
                    self._save()
            if t.average_last and not reason.startswith("interrupted") and not stop.received and self.dist.main:
                self._average()
        return self._finish(reason, time.time() - start)

    def _agree(self, stop: StopSignal) -> Optional[str]:
        """Why to stop now, the same on every rank: a signal any rank received, rank 0's clock, and
        (under a time budget) the schedule's end that rank 0 estimates from its update rate."""
        total, fixed = schedule_end(self.budget, self.step, self.total_steps, self.cfg.optim) \
            if self.timed_end and self.dist.main else (None, False)
        received = int(getattr(signal, stop.received)) if stop.received else 0     # the signal's number
        received, expired, total, fixed = self.dist.agree(
            [received, self.dist.main and self._time_up(), total or 0, fixed], self.device)
        if self.timed_end and total:
            self.opt.total_steps = int(total)
            if fixed and not self.budget.fixed_total:
                self.budget.fixed_total = int(total)
                capped = (f"; {self._step_limit()} ends the run before the time budget would, whose estimate is step "
                          f"{self.budget.estimate_total(self.step)}" if self._limit_ends_run() else "")
                log.info("time budget: the LR decay starts after step %d and ends at step %d (%.2f s per update so "
                         "far, %.1f of %g minutes used%s)", self.step, total, self.budget.seconds / max(self.step, 1),
                         self.budget.seconds / 60, self.cfg.train.max_minutes, capped)
        if received:
            return f"interrupted by {signal.Signals(int(received)).name}"
        if expired:
            return f"reached train.max_minutes={self.cfg.train.max_minutes:g}"
        return self._schedule_end_reason()

    def _step_limit(self) -> str:
        """The option that sets ``total_steps``, for messages."""
        t = self.cfg.train
        return f"train.max_steps={t.max_steps}" if t.max_steps else f"train.max_epochs={t.max_epochs}"

    def _limit_ends_run(self) -> bool:
        """Under a time budget, the schedule's fixed end is the one that steps or epochs set, not the time's."""
        return bool(self.total_steps and self.budget.fixed_total and self.budget.fixed_total >= self.total_steps)

    @property
    def _decaying(self) -> bool:
        """A wsd decay with a fixed end (placed by the time budget or by early stopping) is under way."""
        return self.cfg.optim.name == "wsd" and bool(self.budget.fixed_total) and self.step < self.budget.fixed_total

    def _time_up(self) -> bool:
        """The time budget is spent. A decay that the budget placed and that has begun may run up to
        DECAY_GRACE past it to reach its end: the end was estimated from the update rate before the
        decay, and a slower finish would otherwise leave the LR well above zero."""
        if not self.budget.expired():
            return False
        grace = self.timed_end and self._decaying
        return not (grace and self.budget.seconds < 60 * self.cfg.train.max_minutes * (1 + DECAY_GRACE))

    def _schedule_end_reason(self) -> Optional[str]:
        if self.budget.fixed_total and self.step >= self.budget.fixed_total:
            minutes = f"train.max_minutes={self.cfg.train.max_minutes:g}"
            if not self.timed_end:
                why = f"its decay began when early stopping found no improvement, best at step {self.stopper.best_step}"
            elif self._limit_ends_run():
                why = f"set by {self._step_limit()}, which came before {minutes}"
            else:
                why = f"estimated from {minutes}"
            return f"reached the end of the {self.cfg.optim.name} schedule at step {self.step} ({why})"
        return None

    def _cool_down(self) -> bool:
        """Under wsd, early stopping at full LR starts the decay instead of stopping: a model stopped at
        a high LR is far from what its run can give (the decay is where wsd gains most). The run then
        ends after a decay of optim.decay_fraction of its new length. Early stopping does not cut a
        decay short. False when the decay has begun anyway (then the stop goes ahead)."""
        o = self.cfg.optim
        if o.name != "wsd":
            return False
        if self.budget.fixed_total:                 # decaying already: let the decay finish
            return self._decaying
        if self.opt.total_steps and self.opt.total_steps != UNKNOWN_END and \
                self.step >= wsd_decay_start(self.opt.total_steps, o.decay_fraction, o.warmup_steps):
            return False
        total = wsd_end_not_before(max(self.step + 1, math.ceil(self.step / (1 - o.decay_fraction))), self.step,
                                   o.decay_fraction, o.warmup_steps)
        if self.total_steps:
            total = min(total, self.total_steps)
        self.budget.fixed_total = self.opt.total_steps = total
        log.info("early stopping: %s did not improve for %d validations at full LR (best %.4f at step %d); the "
                 "wsd decay starts now and training ends after it, at step %d", self.stopper.metric,
                 self.stopper.patience, self.stopper.best, self.stopper.best_step, total)
        return True

    def _already_done(self) -> Optional[str]:
        t = self.cfg.train
        if t.max_steps and self.step >= t.max_steps:
            return f"reached train.max_steps={t.max_steps}"
        if t.max_epochs and self.sampler.epoch >= t.max_epochs:
            return f"reached train.max_epochs={t.max_epochs}"
        if self._time_up():
            return f"reached train.max_minutes={t.max_minutes:g}"
        return self._schedule_end_reason() or (None if self._decaying else self._early_stop_reason())

    def _early_stop_reason(self) -> Optional[str]:
        if not self.stopper.should_stop:
            return None
        return (f"early stopping: {self.stopper.metric} did not improve by more than {self.stopper.min_delta} "
                f"for {self.stopper.patience} validations (best {self.stopper.best:.4f} at step "
                f"{self.stopper.best_step})")

    def _collate(self, idx: list[int]):
        batch = collate([self.data.train_src[i] for i in idx], [self.data.train_tgt[i] for i in idx], idx,
                        self.sampler.length_multiple)
        return batch.pin_memory() if self.device.type == "cuda" else batch   # the copy overlaps with compute

    def _next_group(self) -> Optional[list[list[int]]]:
        group = []
        for idx in self.sampler:
            group.append(idx)
            if len(group) == self.cfg.train.accumulate:
                break
        return group or None

    def _update(self, batches) -> tuple[float, float, int, bool]:
        """One optimizer update over ``batches``; loss normalised by their target tokens (of all ranks).
        On CUDA nothing is read back here (loss, norm and ok are device tensors until the next log)."""
        t = self.cfg.train
        try:
            u = train_step(self.model, self.forward, self.opt, batches, self.device, self.amp, t.label_smoothing,
                           t.clip_norm, self.dist, sync=self.device.type != "cuda")
        except RuntimeError as e:  # e.g. an LR beyond float32's range: "cannot be converted ... overflow"
            if "learning rate" not in str(e) and "overflow" not in str(e):
                raise
            self._abort(f"the optimizer update failed at step {self.step + 1} with learning rate "
                        f"{self.opt.lr:.3g}: {str(e).splitlines()[0]}", "optimizer update failed")
        if isinstance(u.ok, torch.Tensor):     # skipped on the device, if at all: counted at the next log
            self.pending_bad = self.pending_bad + (~u.ok).int()
            self.bad_run = (self.bad_run + (~u.ok).int()) * (~u.ok).int()
            self.max_bad_run = torch.maximum(self.max_bad_run, self.bad_run)
            return u.loss.nan_to_num(0.0), u.norm.nan_to_num(0.0), u.tokens, True
        return u.loss, u.norm, u.tokens, u.ok

    def _check_device_skips(self) -> None:
        """CUDA: count the updates the device skipped since the last check; abort as _bad_update would."""
        bad, run = int(self.pending_bad), int(self.max_bad_run)
        if not bad:
            return
        self.skipped += bad
        log.warning("%d non-finite update(s) skipped on the device before step %d; %d in total", bad, self.step,
                    self.skipped)
        self.pending_bad.zero_()
        self.max_bad_run.copy_(self.bad_run)
        if run >= self.cfg.train.max_bad_steps:
            self._abort(f"{run} non-finite updates in a row before step {self.step} (train.max_bad_steps="
                        f"{self.cfg.train.max_bad_steps}); the learning rate is probably too high (current "
                        f"{self.opt.lr:.3g})", f"{run} non-finite updates in a row")

    def _bad_update(self, loss: float, norm: float) -> Optional[str]:
        self.bad_in_row += 1
        self.skipped += 1
        log.warning("non-finite update skipped at step %d (loss %s, grad norm %s); %d in a row, %d in total",
                    self.step + 1, loss, norm, self.bad_in_row, self.skipped)
        if self.bad_in_row >= self.cfg.train.max_bad_steps:
            self._abort(f"{self.bad_in_row} non-finite updates in a row at step {self.step + 1} "
                        f"(train.max_bad_steps={self.cfg.train.max_bad_steps}); the learning rate is probably too "
                        f"high (current {self.opt.lr:.3g}). No checkpoint was written after the last good step.",
                        f"{self.bad_in_row} non-finite updates in a row")
        return None

    def _abort(self, message: str, reason: str) -> None:
        """Record a diverged run in summary.json and stop with TrainingError (exit code 3)."""
        self.write_summary(f"diverged: {reason}", 0.0, diverged=True)
        self.metrics.close()
        raise TrainingError(f"aborting: {message}")

    # ------------------------------------------------------------------ logging, validation, checkpoints
    def _log_train(self, w: dict, bar) -> None:
        self._check_device_skips()
        w.update(loss=float(w["loss"]), norm=float(w["norm"]))      # the one read-back of the window (CUDA)
        n = max(w["n"], 1)
        elapsed = max(time.time() - w["t0"], 1e-9)
        row = dict(epoch=self._epoch(), lr=self.opt.lr, loss=w["loss"] / max(w["tokens"], 1), grad_norm=w["norm"] / n,
                   tokens_per_sec=w["tokens"] / elapsed, padding_eff=w["real"] / max(w["padded"], 1),
                   bad_steps=self.skipped)
        self.metrics.log(self.step, **row)
        bar.set_postfix(loss=f"{row['loss']:.3f}", lr=f"{row['lr']:.2e}", tok_s=f"{row['tokens_per_sec']:.0f}")
        if self.budget.limited:                 # under a time budget the end is the estimate, not max_epochs'
            bar.total = max(self.budget.expected_end(self.step, self.total_steps), self.step) or None
        if self.dist.main:
            log.info("step %d epoch %.2f | loss %.4f | lr %.3e | grad_norm %.3f | %.0f tok/s | padding eff %.2f",
                     self.step, row["epoch"], row["loss"], row["lr"], row["grad_norm"], row["tokens_per_sec"],
                     row["padding_eff"])
        w.update(loss=0.0, tokens=0, real=0, padded=0, norm=0.0, n=0, t0=time.time())

    def _epoch(self) -> float:
        return self.sampler.epoch + self.sampler.state_dict()["position"] / max(len(self.sampler), 1)

    def validate(self) -> dict[str, float]:
        """Validate the current weights (on rank 0 when distributed); logs sample translations."""
        v, d = self.cfg.valid, self.data
        m, hyps = validate(self.model, self.dev_batches, self.blind_batches, d.dev_src, d.dev_ref_text, self.tok, v,
                           self.device, self.eval_amp)
        for i in range(min(v.samples, len(hyps))):
            self.metrics.text(f"samples/{i}", f"**src:** {d.dev_src_text[i]}  \n**ref:** {d.dev_ref_text[i]}  \n"
                              f"**hyp:** {hyps[i]}", self.step)
            log.info("sample %d: %s => %s", i, d.dev_src_text[i][:80], hyps[i][:120])
        return m

    def _validate_and_save(self, final: bool = False) -> Optional[str]:
        """Rank 0 validates; every rank updates early stopping (and the plateau schedule) with its
        result, so they stop together; then a checkpoint."""
        m = self.dist.broadcast(self.validate() if self.dist.main else None)
        self.metrics.log(self.step, epoch=self._epoch(), lr=self.opt.lr, **m)
        self.last_valid = {"step": self.step, **m}
        improved = self.stopper.update(m[self.stopper.column], self.step)
        self.opt.report_metric(m[self.stopper.column], self.stopper.higher_is_better)
        if self.dist.main:
            log.info("validation step %d: loss %.4f ppl %.2f acc %.3f | BLEU %.2f chrF %.2f | src_gain %.3f "
                     "distinct %.2f%s", self.step, m["valid_loss"], m["valid_ppl"], m["valid_acc"], m["valid_bleu"],
                     m["valid_chrf"], m["valid_src_gain"], m["valid_distinct"], " (new best)" if improved else "")
        if self.dist.main and self.step > warmup_end(self.cfg.optim) and \
                m["valid_src_gain"] < self.cfg.train.src_gain_warn:
            log.warning("src_gain %.3f nats/token after warmup: the model barely uses its source sentence (it may be "
                        "learning only an English language model; distinct outputs %.0f%%). This often means the peak "
                        "LR is too high for this model (%s) or the warmup too short.",
                        m["valid_src_gain"], 100 * m["valid_distinct"], lower_lr_advice(self.cfg))
        reason = None if final else self._early_stop_reason()
        if reason and self._cool_down():
            reason = None
        self._save(best=improved, periodic=True)
        return reason

    def _save(self, best: bool = False, periodic: bool = False) -> None:
        """Checkpoint (rank 0 writes; every rank contributes its random state)."""
        # an update can leave NaN/inf weights even when its loss and gradient were finite; such a model
        # is lost (every later loss is NaN), so stop here and keep the earlier checkpoints as they are
        # (the weights are the same on every rank, so all ranks stop)
        if not all_finite(self.model.state_dict()):
            self._abort(f"the weights became non-finite (NaN/inf) by step {self.step}; nothing was saved, the "
                        f"checkpoints in {self.ckpt.folder} are from earlier steps. Lower the learning rate "
                        f"(current {self.opt.lr:.3g}).", "non-finite weights")
        rngs = self.dist.gather(rng_state())
        if periodic:
            self._saved_at = time.time()
        if not self.dist.main:
            return
        self.ckpt.save({
            "format": FORMAT, "model": self.model.state_dict(), "config": to_dict(self.cfg),
            "tokenizer": self.tok.to_state(), "decode": to_dict(self.cfg.decode), "step": self.step,
            "epoch": self._epoch(), "optimizer": self.opt.state_dict(), "sampler": self.sampler.state_dict(),
            "precision": dtype_name(self.amp),
            "rng": rngs[0], "rng_ranks": rngs if self.dist.enabled else None,
            "early_stopping": self.stopper.state_dict(), "skipped_steps": self.skipped,
            "budget": self.budget.state_dict(), "init_from": self.init_from,
            "metrics": {k: float(v) for k, v in self.last_valid.items()},
        }, best=best, periodic=periodic)

    def _average(self) -> None:
        """Average the newest ``train.average_last`` step-N.pt into averaged.pt and validate it."""
        paths = self.ckpt.periodic_files()[-self.cfg.train.average_last:]
        if len(paths) < 2:
            log.info("train.average_last=%d: only %d periodic checkpoint(s), nothing to average",
                     self.cfg.train.average_last, len(paths))
            return
        averaged = average_checkpoints(paths, self.ckpt.folder / "averaged.pt")
        self.model.load_state_dict(averaged["model"])
        m = self.validate()
        self.averaged = {"from_steps": [a["step"] for a in averaged["averaged_from"]], **m}
        log.info("averaged checkpoint (steps %s): loss %.4f | BLEU %.2f chrF %.2f (last: BLEU %.2f); written to %s",
                 ", ".join(map(str, self.averaged["from_steps"])), m["valid_loss"], m["valid_bleu"], m["valid_chrf"],
                 self.last_valid.get("valid_bleu", float("nan")), self.ckpt.folder / "averaged.pt")

    def write_summary(self, reason: str, seconds: float, diverged: bool = False) -> dict:
        """``summary.json``: how the run ended, read by ``scripts/lr.py report``/``diagnose`` (rank 0)."""
        summary = {"step": self.step, "epoch": self._epoch(), "stop_reason": reason, "diverged": diverged,
                   "best_metric": self.stopper.metric, "best": self.stopper.best, "best_step": self.stopper.best_step,
                   "skipped_steps": self.skipped, "updates_per_epoch": len(self.sampler) / self.cfg.train.accumulate,
                   "peak_lr": peak_lr(self.cfg.optim, self.cfg.model.d_model), "seconds": round(seconds, 1),
                   "train_seconds": round(self.budget.seconds, 1), "schedule_total_steps": self.opt.total_steps,
                   "world_size": self.dist.world, "last_valid": self.last_valid, "averaged": self.averaged,
                   "init_from": self.init_from}
        if self.dist.main:
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        return summary

    def _finish(self, reason: str, seconds: float) -> dict:
        self.write_summary(reason, seconds)
        self.metrics.close()
        if self.dist.main:
            log.info("training stopped at step %d (epoch %.2f) after %.0f s: %s", self.step, self._epoch(), seconds,
                     reason)
            if self.stopper.best is not None:
                log.info("best %s %.4f at step %d; checkpoints in %s", self.stopper.metric, self.stopper.best,
                         self.stopper.best_step, self.ckpt.folder)
        distributed.close(self.dist)
        return {"step": self.step, "stop_reason": reason, "best": self.stopper.best,
                "best_step": self.stopper.best_step, "last_valid": self.last_valid}


def _accumulate(w: dict, loss: float, norm: float, ntok: int, batches) -> None:
    w["loss"] += loss * ntok
    w["tokens"] += ntok
    w["norm"] += norm
    w["n"] += 1
    w["real"] += sum(b.n_tgt_tokens + b.n_src_tokens for b in batches)
    w["padded"] += sum(b.src.numel() + b.tgt_out.numel() for b in batches)


def _progress(enabled: bool, total: int, initial: int):
    from tqdm import tqdm

    return tqdm(total=total or None, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True,
                mininterval=1.0)


def train(cfg: Config, run_dir: Path) -> dict:
    """Train a model as configured, writing everything into ``run_dir``; returns a summary."""
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    return Trainer(cfg, run_dir).run()
