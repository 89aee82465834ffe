"""The findings of ``lr.py diagnose``: one pure function per question, each returning a
:class:`Finding` (or None) from a run's rows, summary and config.

Codes (machine-checkable, in diagnosis.json): source_ignored, diverged,
grad_explosion, lr_mismatch, overfitting, plateau, grad_spikes, nonfinite_steps,
warmup_longer_than_epoch, still_improving, healthy.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

from nmt.config import Config
from nmt.lrtools.lrcheck import LRCheck, higher_lr_advice, lower_lr_advice
from nmt.lrtools.rundir import Row
from nmt.lrtools.stats import diverged_tail, finite, fmt_lr, median
from nmt.schedules import noam_factor_for_peak, peak_lr

# report order: a model that ignores its source makes every other number misleading
ORDER = ("source_ignored", "diverged", "grad_explosion", "lr_mismatch", "overfitting", "plateau", "grad_spikes",
         "nonfinite_steps", "warmup_longer_than_epoch", "still_improving", "healthy")


@dataclass
class Finding:
    code: str
    severity: str                    # problem | warning | note
    title: str
    details: list[str] = field(default_factory=list)
    recommendations: list[str] = field(default_factory=list)
    data: dict = field(default_factory=dict)


@dataclass
class Thresholds:
    src_gain: float = 0.1            # nats/token: below this after warmup the source is ignored
    distinct: float = 0.5            # fraction of distinct dev translations
    overfit_k: int = 3               # consecutive validations of rising valid loss
    plateau_n: int = 4               # validations within plateau_tol
    plateau_tol: float = 0.005       # relative spread of valid_loss that counts as flat
    spike: float = 5.0               # grad norm over this x its running median
    explosion: float = 100.0         # grad norm growth that counts as an explosion


def lr_context(cfg: Optional[Config], lr: Optional[float], peak: Optional[float]) -> str:
    if cfg is None:
        return f"LR then {fmt_lr(lr)}"
    m, pct = cfg.model, (f" = {100 * lr / peak:.0f}% of peak" if lr and peak else "")
    return (f"LR then {fmt_lr(lr)}{pct}; peak LR {fmt_lr(peak)}, warmup {cfg.optim.warmup_steps} steps, "
            f"{m.norm}-norm, share_embeddings={m.share_embeddings}")


def source_ignored(valid: Sequence[Row], warmup: int, cfg: Optional[Config], peak: Optional[float],
                   th: Thresholds) -> Optional[Finding]:
    """The last validation after warmup shows (almost) no gain from the source, or few distinct outputs."""
    def bad(r: Row) -> bool:
        g, d = r.get("valid_src_gain"), r.get("valid_distinct")
        return (g is not None and g < th.src_gain) or (d is not None and d < th.distinct)

    after = [r for r in valid if r["step"] > warmup]
    if not after or not bad(after[-1]):
        return None
    start = len(after) - 1
    while start > 0 and bad(after[start - 1]):
        start -= 1
    first, last = after[start], after[-1]
    gain = last.get("valid_src_gain")
    blind = gain is not None and gain < th.src_gain
    title = "the model ignores its source sentence" if blind else \
        "few distinct translations: the output barely depends on the source"
    f = Finding("source_ignored", "problem", title, data={
        "since_step": int(first["step"]), "src_gain": gain, "distinct": last.get("valid_distinct"),
        "lr_then": first.get("lr")})
    f.details.append(f"from step {int(first['step'])} to the last validation (step {int(last['step'])}), after "
                     f"warmup: valid_src_gain {_g(gain)} nats/token (threshold {th.src_gain:g}), "
                     f"distinct dev translations {_pct(last.get('valid_distinct'))} (threshold {_pct(th.distinct)})")
    lowest = min((r["valid_loss"] for r in valid if finite(r.get("valid_loss"))), default=math.inf)
    looks = "may look healthy, but" if last["valid_loss"] <= 1.05 * lowest else "aside,"
    if blind:
        f.details.append(f"dev loss {last['valid_loss']:.3f} {looks}, a blank source predicts the references "
                         "almost as well: the decoder acts as an English language model, so dev loss, perplexity "
                         "and accuracy say little about translation here")
    else:
        f.details.append("the source lowers the dev loss, but greedy decoding maps many sentences to the same "
                         "output: the decoder leans on a few generic sentences, so loss and accuracy overstate "
                         "translation quality")
    f.details.append(f"at step {int(first['step'])}: {lr_context(cfg, first.get('lr'), peak)}")
    if cfg is not None:
        if peak and peak > 2e-4:
            f.recommendations.append(f"lower the peak LR ({lower_lr_advice(cfg)})")
        else:
            f.recommendations.append("the peak LR is already low: check that source and target lines are aligned")
        if cfg.model.norm == "post":
            f.recommendations.append("use model.norm=pre: post-norm Transformers need a gentler LR to learn attention")
        f.recommendations.append(f"a longer warmup (optim.warmup_steps={2 * max(cfg.optim.warmup_steps, 1)})")
    return f


def divergence(train: Sequence[Row], valid: Sequence[Row], summary: dict, cfg: Optional[Config]) -> Optional[Finding]:
    reasons = []
    if summary.get("diverged"):
        reasons.append(f"summary.json: diverged ({summary.get('stop_reason', 'no reason given')})")
    for name, rows, key in (("train loss", train, "loss"), ("valid loss", valid, "valid_loss")):
        why = diverged_tail([r.get(key) for r in rows])
        if why and (key == "loss" or "non-finite" in why):   # a rising valid loss alone is overfitting
            reasons.append(f"{name}: {why}")
    if not reasons:
        return None
    f = Finding("diverged", "problem", "training diverged", details=reasons)
    if cfg is not None:
        f.recommendations.append(f"lower the peak LR ({lower_lr_advice(cfg)})")
        if cfg.train.clip_norm == 0:
            f.recommendations.append("clip gradients: train.clip_norm=1.0")
        f.recommendations.append(f"or a longer warmup (optim.warmup_steps={2 * max(cfg.optim.warmup_steps, 1)})")
    return f


def gradients(train: Sequence[Row], summary: dict, cfg: Optional[Config], th: Thresholds) -> tuple[list[Finding], dict]:
    """Spikes over ``th.spike`` x the running median, explosions, non-finite updates; plus facts."""
    norms = [(int(r["step"]), r.get("grad_norm")) for r in train if r.get("grad_norm") is not None]
    ok = [(s, g) for s, g in norms if math.isfinite(g)]
    facts: dict = {"grad_norm_median": median([g for _, g in ok]) if ok else None}
    out: list[Finding] = []
    spikes = []
    for i in range(5, len(ok)):
        ref = median([g for _, g in ok[max(0, i - 20):i]])
        if ref > 0 and ok[i][1] > th.spike * ref:
            spikes.append((ok[i][0], ok[i][1], ref))
    facts["grad_spikes"] = len(spikes)
    nonfinite = [s for s, g in norms if not math.isfinite(g)]
    third = max(1, len(ok) // 3)
    early = median([g for _, g in ok[:third]]) if ok else 0.0
    late = max((g for _, g in ok[-third:]), default=0.0)
    if nonfinite or (early > 0 and late >= th.explosion * early):
        f = Finding("grad_explosion", "problem", "the gradient norm exploded", data={"early_median": early, "late_max": late})
        if nonfinite:
            f.details.append(f"{len(nonfinite)} non-finite grad norm value(s), first at step {nonfinite[0]}")
        if early > 0 and late >= th.explosion * early:
            f.details.append(f"grad norm grew {late / early:.0f}x: from a median of {early:.3g} early to {late:.3g} late")
        if cfg is not None:
            f.recommendations.append(f"lower the peak LR ({lower_lr_advice(cfg)})")
        if spikes:
            f.details.append(f"{len(spikes)} spike(s) over {th.spike:g}x the running median on the way")
        out.append(f)
    elif spikes:
        s, g, ref = spikes[0]
        f = Finding("grad_spikes", "warning", f"{len(spikes)} gradient-norm spike(s) over {th.spike:g}x the running median",
                    details=[f"first at step {s}: {g:.3g} vs a running median of {ref:.3g}"],
                    data={"steps": [x[0] for x in spikes]})
        if cfg is not None:
            f.recommendations.append("spikes that repeat announce divergence: "
                                     f"{'clip gradients (train.clip_norm=1.0) or ' if cfg.train.clip_norm == 0 else ''}"
                                     f"lower the LR ({lower_lr_advice(cfg)})")
        out.append(f)
    skipped = max([int(r["bad_steps"]) for r in train if finite(r.get("bad_steps"))] + [int(summary.get("skipped_steps") or 0)])
    facts["skipped_steps"] = skipped
    if skipped:
        out.append(Finding("nonfinite_steps", "warning", f"{skipped} update(s) skipped for a non-finite loss or gradient",
                           recommendations=["a few are harmless; many in a row mean the LR is too high"]))
    return out, facts


def train_loss_at(train: Sequence[Row], step: float) -> Optional[float]:
    """The last train loss logged at or before ``step``."""
    before = [r["loss"] for r in train if r["step"] <= step]
    return before[-1] if before else None


def overfitting(train: Sequence[Row], valid: Sequence[Row], cfg: Optional[Config], th: Thresholds) -> Optional[Finding]:
    """Valid loss rising for ``overfit_k`` validations in a row (by more than the plateau
    tolerance in all: noise on a flat curve is no rise) while the train loss falls."""
    k = th.overfit_k
    for i in range(len(valid) - k):
        win = valid[i:i + k + 1]
        rising = all(b["valid_loss"] > a["valid_loss"] for a, b in zip(win, win[1:])) and \
            win[-1]["valid_loss"] - win[0]["valid_loss"] > th.plateau_tol * abs(win[0]["valid_loss"])
        t0, t1 = train_loss_at(train, win[0]["step"]), train_loss_at(train, win[-1]["step"])
        if rising and t0 is not None and t1 is not None and t1 < t0:
            s0, s1 = int(win[0]["step"]), int(win[-1]["step"])
            f = Finding("overfitting", "problem", f"overfitting from step {s0}", data={"onset_step": s0, "k": k})
            f.details.append(f"valid loss rose {k} validations in a row, {win[0]['valid_loss']:.3f} -> "
                             f"{win[-1]['valid_loss']:.3f} (steps {s0} -> {s1}), while the train loss fell "
                             f"{t0:.3f} -> {t1:.3f}")
            if cfg is not None:
                es, m = cfg.train.early_stopping, cfg.model
                f.recommendations.append(f"stop earlier: train.early_stopping.patience={max(1, min(es.patience, k) - 1)} "
                                         f"(now {es.patience}), or keep best.pt, which is from before the rise")
                f.recommendations.append(f"more regularisation: model.dropout={min(0.5, m.dropout + 0.1):.1f} "
                                         f"(now {m.dropout:g}), train.label_smoothing, or a smaller model "
                                         f"(model.layers={max(1, m.n_encoder_layers - 1)} or a smaller preset)")
            return f
    return None


def plateau(valid: Sequence[Row], cfg: Optional[Config], peak: Optional[float], th: Thresholds) -> Optional[Finding]:
    """The latest stretch of ``plateau_n`` or more validations whose valid loss stays within ``plateau_tol``."""
    n, best, i = th.plateau_n, None, 0
    while i + n <= len(valid):
        j = i + n
        if not _flat(valid[i:j], th.plateau_tol):
            i += 1
            continue
        while j < len(valid) and _flat(valid[i:j + 1], th.plateau_tol):
            j += 1
        best, i = (i, j), j          # a maximal stretch; keep looking for a later one
    if best is None:
        return None
    win = valid[best[0]:best[1]]
    s0, s1, lr = int(win[0]["step"]), int(win[-1]["step"]), win[-1].get("lr")
    f = Finding("plateau", "warning", f"validation loss flat for {len(win)} validations (steps {s0}-{s1})",
                data={"start_step": s0, "end_step": s1, "validations": len(win)})
    f.details.append(f"valid loss {min(r['valid_loss'] for r in win):.3f}-{max(r['valid_loss'] for r in win):.3f} "
                     f"(within {100 * th.plateau_tol:g}%); {lr_context(cfg, lr, peak)}")
    if cfg is not None and lr and peak:
        if lr < 0.3 * peak:
            f.recommendations.append(f"the LR had decayed to {100 * lr / peak:.0f}% of its peak: a higher factor "
                                     f"({higher_lr_advice(cfg)}) or a slower decay (optim=cosine with optim.total_steps)")
        else:
            f.recommendations.append(f"the LR is still {100 * lr / peak:.0f}% of its peak: it may be too high to "
                                     f"settle ({lower_lr_advice(cfg)}), or use optim=plateau to cut it when "
                                     "validation stalls")
    return f


def _flat(rows: Sequence[Row], tol: float) -> bool:
    v = [r["valid_loss"] for r in rows]
    if not all(math.isfinite(x) for x in v):
        return False
    return (max(v) - min(v)) <= tol * abs(sum(v) / len(v))


# A warmup is "longer than an epoch" when it exceeds one epoch by more than 10%. About one epoch is a
# sound choice (the default's 600 updates are 1.07 epochs of the bible corpus with bf16's rounded
# batches, about when the model starts to use its source), so a few percent over is no finding; the
# paper's 4,000 steps on 3,262 batches per epoch (1.23 epochs) still is one.
WARMUP_EPOCHS_TOLERANCE = 1.1


def warmup_too_long(warmup: int, per_epoch: Optional[float]) -> bool:
    return bool(per_epoch) and warmup > WARMUP_EPOCHS_TOLERANCE * per_epoch


def warmup_vs_epoch(warmup: int, per_epoch: Optional[float], cfg: Optional[Config],
                    last_step: int = 0) -> Optional[Finding]:
    if not warmup_too_long(warmup, per_epoch):
        return None
    f = Finding("warmup_longer_than_epoch", "warning",
                f"warmup lasts {warmup / per_epoch:.2f} epochs ({warmup} steps, {per_epoch:,.0f} updates per epoch)",
                details=["the whole first epoch trains at a low, rising LR"])
    if 0 < last_step < warmup:
        f.details.append(f"training ended at step {last_step}, before warmup did: the peak LR was never reached")
    if cfg is not None:
        step = 100 if per_epoch >= 1000 else 10 if per_epoch >= 100 else 1
        new = max(1, int(per_epoch // step * step))
        tip = f"optim.warmup_steps={new} (about one epoch)"
        if cfg.optim.name == "noam":
            same = noam_factor_for_peak(peak_lr(cfg.optim, cfg.model.d_model), cfg.model.d_model, new)
            tip += f" with optim.factor={same:.3g} to keep the same peak (noam's peak grows as warmup shrinks)"
        f.recommendations.append(tip)
    return f


def _g(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{x:.3g}"


def _pct(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{100 * x:.0f}%"


def collect(findings: Sequence[Optional[Finding]]) -> list[Finding]:
    """Drop Nones, sort in report order, and add ``healthy`` when nothing is wrong."""
    out = sorted((f for f in findings if f is not None), key=lambda f: ORDER.index(f.code))
    if not any(f.severity in ("problem", "warning") for f in out):
        out.append(Finding("healthy", "note", "no problem found", details=[
            "no check found a problem: source use, divergence, LR formula, overfitting, plateaus, gradient "
            "norms (the facts below say what could be measured)"]))
    return out


def lr_mismatch(check: LRCheck) -> Optional[Finding]:
    if not check.mismatches:
        return None
    step, logged, expected = check.mismatches[0]
    f = Finding("lr_mismatch", "problem", "the logged LR does not follow the configured schedule",
                data={"mismatches": len(check.mismatches), "checked": check.checked, "ratio": check.ratio})
    f.details.append(f"{len(check.mismatches)} of {check.checked} logged LRs differ from lr_at(step); first at "
                     f"step {step}: logged {logged:.6g}, configured schedule gives {expected:.6g}")
    if check.ratio is not None:
        f.details.append(f"every logged LR is {check.ratio:.4g}x the configured one: a factor typo, or a config "
                         "edited after training")
    f.recommendations.append("compare optim.* in the run's config.yaml with what you meant to train; the curves "
                             "below reflect the logged LR, not the configured one")
    return f
