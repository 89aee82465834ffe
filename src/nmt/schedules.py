"""Learning-rate schedules as pure functions of the update step.

Steps count optimizer updates from 1: the first update uses ``lr_at(1, ...)``.
Every schedule is a plain function ``step -> LR`` of its own arguments; the
dispatcher :func:`lr_at` picks one by ``OptimConfig.name``, applies the plateau
multiplier ``scale`` and then the ``min_lr`` / ``max_lr`` clipping, which holds
for every schedule.  The stateful part (step counter, plateau bookkeeping,
Adam) lives in :mod:`nmt.optim`.
"""
from __future__ import annotations

import math
from typing import Optional

from nmt.config import CHOICES, ConfigError, OptimConfig, validate_optim

# The valid values of ``optim.name`` (one source of truth: the config schema).
SCHEDULES: tuple[str, ...] = tuple(CHOICES["optim.name"])


# ----------------------------------------------------------------------------- pure schedules
def noam(step: int, d_model: int, warmup: int, factor: float = 1.0) -> float:
    """Vaswani et al. (2017): ``factor * d_model^-0.5 * min(step^-0.5, step * warmup^-1.5)``.

    Rises linearly to its peak ``factor * (d_model * warmup)^-0.5`` at ``step == warmup``,
    then decays as ``step^-0.5``.
    """
    return factor * d_model ** -0.5 * min(step ** -0.5, step * warmup ** -1.5)


def noam_factor_for_peak(peak: float, d_model: int, warmup: int) -> float:
    """The Noam ``factor`` whose peak (reached at ``step == warmup``) equals ``peak``."""
    return peak * math.sqrt(d_model * warmup)


def linear_warmup(step: int, warmup: int, init_lr: float, lr: float) -> float:
    """``init_lr`` at step 0 rising linearly to ``lr`` at ``step == warmup`` (``lr`` after)."""
    if step >= warmup:
        return lr
    return init_lr + (lr - init_lr) * step / warmup


def constant(step: int, lr: float, warmup: int, warmup_init_lr: float = 0.0) -> float:
    """Linear warmup, then ``lr`` forever."""
    return linear_warmup(step, warmup, warmup_init_lr, lr)


def inverse_sqrt(step: int, lr: float, warmup: int, warmup_init_lr: float = 0.0) -> float:
    """fairseq's ``inverse_sqrt``: linear warmup to ``lr``, then ``lr * sqrt(warmup / step)``.

    With ``warmup == 0`` the decay starts from ``lr`` at step 1 (``lr / sqrt(step)``)
    instead of collapsing to 0 as ``sqrt(0 / step)`` would.
    """
    if step < warmup:
        return linear_warmup(step, warmup, warmup_init_lr, lr)
    return lr * math.sqrt(max(warmup, 1) / step)


def _half_cosine(progress: float, lr: float, floor: float) -> float:
    """``lr`` at progress 0 down to ``floor`` at progress 1 along half a cosine."""
    return floor + 0.5 * (lr - floor) * (1.0 + math.cos(math.pi * progress))


def cosine(step: int, lr: float, warmup: int, total_steps: int,
           min_lr_ratio: float = 0.0, warmup_init_lr: float = 0.0) -> float:
    """Linear warmup, then a half cosine from ``lr`` at ``warmup`` to ``lr * min_lr_ratio``
    at ``total_steps``; the floor holds after that. Needs ``total_steps > warmup``."""
    if step < warmup:
        return linear_warmup(step, warmup, warmup_init_lr, lr)
    progress = min(1.0, (step - warmup) / (total_steps - warmup))
    return _half_cosine(progress, lr, lr * min_lr_ratio)


def restart_position(t: int, period: int, period_mult: float = 1.0) -> tuple[int, int]:
    """Where step ``t`` (0-based, counted from the end of warmup) falls in SGDR's periods.

    Period ``i`` lasts ``round(period * period_mult**i)`` steps (whole steps, so every
    restart lands on a step). Returns ``(position in its period, that period's length)``.
    """
    if period_mult == 1.0:
        return t % period, period
    i, length = 0, period
    while t >= length:                 # period_mult > 1: a logarithmic number of turns
        t -= length
        i += 1
        length = max(1, round(period * period_mult ** i))
    return t, length


def cosine_restarts(step: int, lr: float, warmup: int, restart_period: int, period_mult: float = 1.0,
                    min_lr_ratio: float = 0.0, warmup_init_lr: float = 0.0) -> float:
    """SGDR (Loshchilov & Hutter, 2017): linear warmup, then half-cosine periods that each
    restart at ``lr`` and decay towards ``lr * min_lr_ratio``; the first lasts
    ``restart_period`` steps and each next one ``period_mult`` times longer."""
    if step < warmup:
        return linear_warmup(step, warmup, warmup_init_lr, lr)
    pos, length = restart_position(step - warmup, restart_period, period_mult)
    return _half_cosine(pos / length, lr, lr * min_lr_ratio)


def decay_curve(progress: float, shape: str) -> float:
    """The WSD decay's multiplier, 1 at progress 0 down to 0 at progress 1 (clamped to [0, 1]).

    ``linear``: 1 - p; ``sqrt``: 1 - sqrt(p) (Hägele et al., 2024, who found it
    slightly better than linear); ``cosine``: a half cosine.
    """
    p = min(max(progress, 0.0), 1.0)
    if shape == "linear":
        return 1.0 - p
    if shape == "sqrt":
        return 1.0 - math.sqrt(p)
    if shape == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * p))
    raise ConfigError(f"optim.decay_shape={shape!r} is not valid; choose one of: {', '.join(CHOICES['optim.decay_shape'])}")


def wsd_decay_start(total_steps: int, decay_fraction: float, warmup: int) -> int:
    """The last step at full LR before the decay: ``total - round(fraction * total)``, not before warmup ends."""
    return max(int(warmup), int(total_steps) - round(decay_fraction * total_steps))


def wsd_end_not_before(total_steps: int, step: int, decay_fraction: float, warmup: int) -> int:
    """``total_steps``, or the end found by moving it up, whose decay starts at ``step`` at the earliest:
    a decay fixed at ``step`` must not reach back over steps already taken at full LR."""
    total = int(total_steps)
    while wsd_decay_start(total, decay_fraction, warmup) < step:
        total += max(1, step - wsd_decay_start(total, decay_fraction, warmup))
    return total


def wsd(step: int, lr: float, warmup: int, total_steps: int, decay_fraction: float = 0.2,
        shape: str = "linear", min_lr_ratio: float = 0.0, warmup_init_lr: float = 0.0) -> float:
    """Warmup-stable-decay: linear warmup to ``lr``, ``lr`` until the last ``decay_fraction`` of
    ``total_steps``, then down to ``lr * min_lr_ratio`` at ``total_steps`` along ``shape``
    (the floor holds after that). A budget that ends in a decay to zero beats one still at a
    high LR when it runs out (Hägele et al., 2024; Bergsma et al., 2025, "Straight to Zero")."""
    if step < warmup:
        return linear_warmup(step, warmup, warmup_init_lr, lr)
    start = wsd_decay_start(total_steps, decay_fraction, warmup)
    if step <= start:
        return lr
    floor = lr * min_lr_ratio
    return floor + (lr - floor) * decay_curve((step - start) / max(total_steps - start, 1), shape)


# ----------------------------------------------------------------------------- config level
def warmup_end(cfg: OptimConfig) -> int:
    """The last warmup step, where every schedule reaches its peak (0 = no warmup)."""
    return int(cfg.warmup_steps)


def noam_factor(cfg: OptimConfig, d_model: int) -> float:
    """The Noam factor in effect: derived from ``cfg.peak_lr`` when that is set."""
    if cfg.peak_lr is not None:
        return noam_factor_for_peak(cfg.peak_lr, d_model, cfg.warmup_steps)
    return cfg.factor


def needs_total_steps(cfg: OptimConfig) -> bool:
    """Whether the schedule's shape depends on where training ends."""
    return cfg.name in ("cosine", "wsd")


def decay_steps(cfg: OptimConfig, total_steps: Optional[int] = None) -> int:
    """Where the cosine or WSD decay ends: ``optim.total_steps``, else ``total_steps`` (the
    trainer's: train.max_steps, max_epochs x updates per epoch, or the estimate under
    train.max_minutes)."""
    total = cfg.total_steps or total_steps
    if not total:
        timed = ", or train.max_minutes" if cfg.name == "wsd" else ""
        raise ConfigError(f"optim.name={cfg.name} needs to know when training ends: set optim.total_steps or "
                          f"train.max_steps (or train.max_epochs{timed})")
    if total <= cfg.warmup_steps and cfg.name == "cosine":   # (a wsd run that short ends inside its warmup)
        key = "optim.total_steps" if cfg.total_steps else "train.max_steps"
        raise ConfigError(f"{key} ({total}) must be greater than optim.warmup_steps ({cfg.warmup_steps}) "
                          f"for the {cfg.name} schedule")
    return int(total)


def clip(lr: float, cfg: OptimConfig) -> float:
    """Apply ``optim.min_lr`` / ``optim.max_lr`` when set."""
    if cfg.min_lr is not None:
        lr = max(lr, cfg.min_lr)
    if cfg.max_lr is not None:
        lr = min(lr, cfg.max_lr)
    return lr


def unclipped_lr_at(step: int, cfg: OptimConfig, d_model: int, total_steps: Optional[int] = None) -> float:
    """The named schedule at ``step`` before the plateau scale and the clipping."""
    w, lr, init = cfg.warmup_steps, cfg.lr, cfg.warmup_init_lr
    name = cfg.name
    if name == "noam":
        return noam(step, d_model, w, noam_factor(cfg, d_model))
    if name == "inverse_sqrt":
        return inverse_sqrt(step, lr, w, init)
    if name == "cosine":
        return cosine(step, lr, w, decay_steps(cfg, total_steps), cfg.min_lr_ratio, init)
    if name == "wsd":
        return wsd(step, lr, w, decay_steps(cfg, total_steps), cfg.decay_fraction, cfg.decay_shape,
                   cfg.min_lr_ratio, init)
    if name == "cosine_restarts":
        return cosine_restarts(step, lr, w, cfg.restart_period, cfg.period_mult, cfg.min_lr_ratio, init)
    if name in ("constant", "plateau"):    # plateau = constant times the wrapper's scale
        return constant(step, lr, w, init)
    raise ConfigError(f"optim.name={name!r} is not valid; choose one of: {', '.join(SCHEDULES)}")


def lr_at(step: int, cfg: OptimConfig, d_model: int, total_steps: Optional[int] = None,
          scale: float = 1.0) -> float:
    """The learning rate of update ``step`` (counted from 1) under ``cfg``.

    ``total_steps`` is train.max_steps (the cosine decay length unless optim.total_steps
    is set); ``scale`` is the plateau multiplier kept by the optimizer wrapper (1.0 for
    the other schedules). ``min_lr`` / ``max_lr`` clip the result of every schedule.
    """
    if step < 1:
        raise ValueError(f"steps count optimizer updates from 1, got step={step}")
    return clip(scale * unclipped_lr_at(step, cfg, d_model, total_steps), cfg)


def peak_lr(cfg: OptimConfig, d_model: int) -> float:
    """The highest LR of the schedule (at the end of warmup and at every SGDR restart),
    after clipping. For noam this is ``factor * (d_model * warmup)^-0.5``."""
    if cfg.name == "noam":
        return clip(noam_factor(cfg, d_model) * (d_model * cfg.warmup_steps) ** -0.5, cfg)
    return clip(cfg.lr, cfg)


def check_config(cfg: OptimConfig, total_steps: Optional[int] = None) -> None:
    """Range checks for the schedule settings, including those that need ``total_steps``."""
    validate_optim(cfg)
    if needs_total_steps(cfg):
        decay_steps(cfg, total_steps)


def _num(x: float) -> str:
    return f"{x:.2e}"


def describe_schedule(cfg: OptimConfig, d_model: int, total_steps: Optional[int] = None) -> str:
    """One log line that states the schedule's actual peak LR (users often confuse
    Noam's ``factor`` with a learning rate), e.g. ``noam schedule: peak LR 9.88e-04 at
    step 4000 (factor 1.0, d_model 256, warmup 4000)``."""
    name, w = cfg.name, cfg.warmup_steps
    head = f"{name} schedule: peak LR {_num(peak_lr(cfg, d_model))} at step {max(w, 1)}"
    if name == "noam":
        origin = f"from peak_lr {cfg.peak_lr:g}, " if cfg.peak_lr is not None else ""
        text = f"{head} ({origin}factor {round(noam_factor(cfg, d_model), 4)}, d_model {d_model}, warmup {w})"
    else:
        warm = f"warmup from {_num(cfg.warmup_init_lr)} over {w} steps" if w else "no warmup"
        if name == "inverse_sqrt":
            tail = f"then lr * sqrt({max(w, 1)} / step)"
        elif name == "cosine":
            total = decay_steps(cfg, total_steps)
            tail = f"cosine decay to {_num(cfg.lr * cfg.min_lr_ratio)} at step {total}"
        elif name == "wsd":
            total = decay_steps(cfg, total_steps)
            start = wsd_decay_start(total, cfg.decay_fraction, w)
            tail = (f"constant to step {start}, then {cfg.decay_shape} decay to "
                    f"{_num(cfg.lr * cfg.min_lr_ratio)} at step {total}")
        elif name == "cosine_restarts":
            tail = (f"cosine periods of {cfg.restart_period} steps (x{cfg.period_mult:g} each) "
                    f"restarting at {_num(cfg.lr)}, floor {_num(cfg.lr * cfg.min_lr_ratio)}")
        elif name == "plateau":
            tail = (f"then x{cfg.plateau_factor:g} after {cfg.plateau_patience} validations "
                    "without improvement")
        else:
            tail = "then constant"
        text = f"{head} ({warm}), {tail}"
    if cfg.min_lr is not None or cfg.max_lr is not None:
        text += f"; clipped to [{cfg.min_lr}, {cfg.max_lr}]"
    return text
