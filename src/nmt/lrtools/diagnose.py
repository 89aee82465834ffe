"""``lr.py diagnose``: read a run directory and explain what its learning rate did.

Writes ``diagnosis.md`` (findings first, each with what to try, then the facts),
``diagnosis.json`` (finding codes and numbers, for scripts and tests) and two
plots, ``loss_curves.png`` and ``lr_gradnorm.png``. The findings come from
:mod:`nmt.lrtools.checks`; a model that ignores its source is always listed first.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from nmt.early_stopping import METRICS
from nmt.lrtools import LRToolError, checks
from nmt.lrtools.checks import Finding, Thresholds
from nmt.lrtools.figures import pyplot, save
from nmt.lrtools.lrcheck import LRCheck, check_logged_lr, total_steps
from nmt.lrtools.rundir import Row, Run
from nmt.lrtools.stats import finite, fmt_lr, json_safe
from nmt.schedules import describe_schedule, lr_at, peak_lr, warmup_end


@dataclass
class Diagnosis:
    run: Run
    findings: list[Finding]
    facts: dict = field(default_factory=dict)      # name -> value (numbers for the JSON)
    lines: list[str] = field(default_factory=list)  # the facts as sentences (for the Markdown)
    lr_check: Optional[LRCheck] = None

    @property
    def codes(self) -> list[str]:
        return [f.code for f in self.findings]


def updates_per_epoch(run: Run) -> Optional[float]:
    """From summary.json, else from the last row's step / epoch."""
    v = run.summary.get("updates_per_epoch")
    if finite(v) and v > 0:
        return float(v)
    rows = [r for r in run.rows if finite(r.get("epoch")) and r["epoch"] > 0 and r.get("step")]
    return rows[-1]["step"] / rows[-1]["epoch"] if rows else None


def best_validation(run: Run) -> Optional[Row]:
    """The validation row at summary.json's best_step, else the best by the early-stopping metric."""
    valid = run.valid_rows
    if not valid:
        return None
    best_step = run.summary.get("best_step")
    if best_step:
        hit = [r for r in valid if int(r["step"]) == int(best_step)]
        if hit:
            return hit[-1]
    column, higher = METRICS[run.cfg.train.early_stopping.metric] if run.cfg else ("valid_loss", False)
    if not any(finite(r.get(column)) for r in valid):
        column, higher = "valid_loss", False
    scored = [r for r in valid if finite(r.get(column))]
    if not scored:
        return None
    return (max if higher else min)(scored, key=lambda r: r[column])


def diagnose(run: Run, th: Thresholds = Thresholds()) -> Diagnosis:
    cfg, train, valid = run.cfg, run.train_rows, run.valid_rows
    if not train and not valid:
        raise LRToolError(f"{run.path / 'metrics.csv'} has no training or validation rows yet: nothing to diagnose")
    per_epoch = updates_per_epoch(run)
    warmup = warmup_end(cfg.optim) if cfg else 0
    peak = peak_lr(cfg.optim, cfg.model.d_model) if cfg else run.summary.get("peak_lr")
    d = Diagnosis(run, [])
    lines, facts = d.lines, d.facts
    last_step = int(run.rows[-1]["step"]) if run.rows else 0
    facts.update(steps=last_step, stop_reason=run.summary.get("stop_reason"), peak_lr=peak, warmup_steps=warmup,
                 updates_per_epoch=per_epoch)
    lines.append(f"{last_step} updates logged; stop reason: {run.summary.get('stop_reason', 'unknown (no summary.json)')}")
    init = run.summary.get("init_from")
    if init:
        facts["init_from"] = init
        kept = ", ".join(init.get("keep") or []) or "nothing (fresh optimizer and schedule)"
        lines.append(f"fine-tuned: started from {init['path']} (step {init['step']}, trained on {init['data']}); "
                     f"kept from it: {kept}")
    if cfg is None:
        lines.append(f"config: {run.cfg_note}; the LR formula, warmup and advice need it")
    else:
        lines.append(describe_schedule(cfg.optim, cfg.model.d_model, total_steps(cfg, per_epoch, run.summary)))
        d.lr_check = check_logged_lr(run.rows, run.lr_text, cfg, per_epoch, run.summary)
        c = d.lr_check
        facts.update(lr_checked=c.checked, lr_mismatches=len(c.mismatches), lr_max_rel_err=c.max_rel_err)
        if c.checked and not c.mismatches:
            lines.append(f"logged LR matches the configured schedule at all {c.checked} logged steps "
                         f"(max relative difference {c.max_rel_err:.1e}, within 1e-9 or the CSV's written precision)")
        lines.extend(c.notes)
    if per_epoch:
        facts["warmup_epochs"] = warmup / per_epoch
        lines.append(f"warmup {warmup} steps = {warmup / per_epoch:.2f} epochs ({per_epoch:,.1f} updates per epoch)")
    best = best_validation(run)
    if best is not None:
        b_step, b_lr = int(best["step"]), best.get("lr")
        past = last_step - b_step
        facts.update(best_step=b_step, best_epoch=best.get("epoch"), steps_past_best=past,
                     best_lr_pct_of_peak=100 * b_lr / peak if b_lr and peak else None)
        pct = f" = {pct_text(100 * b_lr / peak)} of peak" if b_lr and peak else ""
        ep = f" (epoch {best['epoch']:.2f})" if finite(best.get("epoch")) else ""
        after = f" ({past / per_epoch:.2f} epochs)" if per_epoch else ""
        lines.append(f"best validation at step {b_step}{ep}: valid loss {best['valid_loss']:.3f}, BLEU "
                     f"{_num(best.get('valid_bleu'))}; LR there {fmt_lr(b_lr)}{pct}; training ran {past} more "
                     f"updates{after} past it")
    lines.append(source_use_line(valid, warmup, th))
    grad_findings, grad_facts = checks.gradients(train, run.summary, cfg, th)
    facts.update(grad_facts)
    if grad_facts["grad_norm_median"] is not None:
        lines.append(f"grad norm median {grad_facts['grad_norm_median']:.3g}; {grad_facts['grad_spikes']} spike(s) "
                     f"over {th.spike:g}x the running median; {grad_facts['skipped_steps']} skipped update(s)")
    still = None
    if best is not None and valid and int(best["step"]) == int(valid[-1]["step"]) and len(valid) > 1 \
            and not run.summary.get("diverged"):
        timed = "max_minutes" in str(run.summary.get("stop_reason", ""))
        still = Finding("still_improving", "note", "the best validation is the last one: training stopped while "
                        "still improving", recommendations=["train longer (raise train.max_minutes)" if timed else
                                                            "train longer (raise train.max_steps / train.max_epochs)"])
    d.findings = checks.collect([
        checks.source_ignored(valid, warmup, cfg, peak, th),
        checks.divergence(train, valid, run.summary, cfg),
        checks.lr_mismatch(d.lr_check) if d.lr_check else None,
        checks.overfitting(train, valid, cfg, th),
        checks.plateau(valid, cfg, peak, th),
        checks.warmup_vs_epoch(warmup, per_epoch, cfg, last_step),
        still, *grad_findings])
    return d


def pct_text(p: float) -> str:
    """``82%``, but ``0.35%`` for small values (a rounded ``0%`` would hide them)."""
    return f"{p:.0f}%" if p >= 10 else f"{p:.2g}%"


def source_use_line(valid: list[Row], warmup: int, th: Thresholds) -> str:
    after = [r for r in valid if r["step"] > warmup]
    if not after:
        return (f"source use not assessed: no validation after warmup (step {warmup}); during warmup a low "
                "src_gain is expected")
    r = after[-1]
    return (f"source use at the last validation (step {int(r['step'])}): valid_src_gain "
            f"{_g(r.get('valid_src_gain'))} nats/token (threshold {th.src_gain:g}), distinct dev translations "
            f"{_g(r.get('valid_distinct'))} (threshold {th.distinct:g})")


def _g(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{x:.3g}"


def _num(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def to_markdown(d: Diagnosis) -> str:
    out = [f"# LR diagnosis: `{d.run.name}`", "", f"**Findings:** {', '.join(f'`{c}`' for c in d.codes)}", ""]
    for i, f in enumerate(d.findings, start=1):
        out.append(f"## {i}. {f.title} (`{f.code}`, {f.severity})")
        out.extend(f"- {x}" for x in f.details)
        if f.recommendations:
            out.append("")
            out.append("**Try:**")
            out.extend(f"- {x}" for x in f.recommendations)
        out.append("")
    out.append("## Facts")
    out.extend(f"- {x}" for x in d.lines)
    out += ["", "## Plots", "", "![train and valid loss](loss_curves.png)", "",
            "![LR and gradient norm](lr_gradnorm.png)", ""]
    return "\n".join(out)


def to_json(d: Diagnosis) -> dict:
    return json_safe({"run": d.run.name, "findings": d.codes, "details": [asdict(f) for f in d.findings],
                      "facts": d.facts})


def _ylim_top(values: list[float]) -> Optional[float]:
    v = sorted(x for x in values if finite(x))
    if not v:
        return None
    typical = v[len(v) // 2]
    return min(v[-1], 4 * typical) * 1.05 if v[-1] > 4 * typical else None


def plot_losses(d: Diagnosis, path: Path) -> Path:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    train, valid = d.run.train_rows, d.run.valid_rows
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], color="tab:blue", lw=1.2, label="train loss",
            marker="." if len(train) < 30 else None)
    ax.plot([r["step"] for r in valid], [r["valid_loss"] for r in valid], "o-", color="tab:orange", ms=3,
            label="valid loss")
    if d.facts.get("best_step") is not None:
        ax.axvline(d.facts["best_step"], color="tab:green", ls="--", label=f"best step {d.facts['best_step']}")
    for f in d.findings:
        if f.code == "overfitting":
            ax.axvline(f.data["onset_step"], color="tab:red", ls=":", label="overfitting onset")
        if f.code == "source_ignored":
            ax.axvline(f.data["since_step"], color="tab:purple", ls=":", label="source ignored from here")
    top = _ylim_top([r["loss"] for r in train] + [r["valid_loss"] for r in valid])
    if top:
        ax.set_ylim(top=top)
    ax.set_xlabel("update step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(f"{d.run.name}: {', '.join(d.codes)}", fontsize=9)
    ax.legend(fontsize=8)
    return save(fig, path)


def plot_lr_gradnorm(d: Diagnosis, path: Path) -> Path:
    plt = pyplot()
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(8, 5.5), sharex=True)
    rows = [r for r in d.run.rows if r.get("lr") is not None and r.get("step")]
    a1.plot([r["step"] for r in rows], [r["lr"] for r in rows], ".", ms=3, color="tab:blue", label="logged LR")
    cfg = d.run.cfg
    if cfg is not None and rows:
        total = total_steps(cfg, d.facts.get("updates_per_epoch"), d.run.summary)
        last = int(rows[-1]["step"])
        xs = sorted({max(1, round(last * i / 400)) for i in range(401)})
        try:
            a1.plot(xs, [lr_at(s, cfg.optim, cfg.model.d_model, total) for s in xs], color="0.4", lw=1,
                    label="configured schedule" + (" (before plateau cuts)" if cfg.optim.name == "plateau" else ""))
        except Exception:  # e.g. cosine without a known length: the logged points still show
            pass
    if d.facts.get("warmup_steps") and rows and d.facts["warmup_steps"] <= rows[-1]["step"]:
        a1.axvline(d.facts["warmup_steps"], color="tab:red", ls="--", lw=1, label="warmup end")
    a1.set_ylabel("learning rate")
    a1.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    a1.legend(fontsize=8)
    g = [(r["step"], r["grad_norm"]) for r in d.run.train_rows if finite(r.get("grad_norm")) and r["grad_norm"] > 0]
    a2.plot([s for s, _ in g], [x for _, x in g], color="tab:gray", lw=1, label="grad norm (before clipping)",
            marker="." if len(g) < 30 else None)
    spikes = next((f.data["steps"] for f in d.findings if f.code == "grad_spikes"), [])
    pts = [(s, x) for s, x in g if int(s) in set(spikes)]
    if pts:
        a2.plot([s for s, _ in pts], [x for _, x in pts], "rv", ms=6, label="spike")
    if g:
        a2.set_yscale("log")
    a2.set_ylabel("gradient norm")
    a2.set_xlabel("update step")
    a2.legend(fontsize=8)
    return save(fig, path)


def write(d: Diagnosis, out_dir: Path) -> list[Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    md, js = out_dir / "diagnosis.md", out_dir / "diagnosis.json"
    md.write_text(to_markdown(d), encoding="utf-8")
    js.write_text(json.dumps(to_json(d), indent=2) + "\n", encoding="utf-8")
    return [md, js, plot_losses(d, out_dir / "loss_curves.png"), plot_lr_gradnorm(d, out_dir / "lr_gradnorm.png")]
