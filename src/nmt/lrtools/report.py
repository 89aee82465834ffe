"""``lr.py report``: one table for a sweep (e.g. a Hydra multirun over optim.factor).

For every run: its LR settings (schedule, factor, warmup, peak LR), the overrides
that tell it apart from the other runs, the validation metrics at its best
validation (the one best.pt holds) and at its last, and whether it diverged.
Then the best configuration and how each metric correlates with log10(peak LR).
"""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Optional

from nmt.lrtools import checks
from nmt.lrtools.diagnose import best_validation
from nmt.lrtools.figures import pyplot, save
from nmt.lrtools.rundir import Run, find_runs, load_run
from nmt.lrtools.stats import finite, fmt_lr, json_safe, pearson, spearman
from nmt.schedules import noam_factor, peak_lr

# short name -> (metrics.csv column, higher is better)
METRICS = {"valid_loss": ("valid_loss", False), "ppl": ("valid_ppl", False), "bleu": ("valid_bleu", True),
           "chrf": ("valid_chrf", True), "acc": ("valid_acc", True), "src_gain": ("valid_src_gain", True),
           "distinct": ("valid_distinct", True)}
RANKABLE = ("bleu", "chrf", "valid_loss", "ppl", "acc")


def override_map(overrides: list[str]) -> dict[str, str]:
    out = {}
    for o in overrides:
        key, _, value = o.partition("=")
        out[key.lstrip("+~")] = value
    return out


def distinguishing_keys(runs: list[Run]) -> list[str]:
    """Override keys whose value is not the same in every run (their order of first use)."""
    maps = [override_map(r.overrides) for r in runs]
    keys = list(dict.fromkeys(k for m in maps for k in m))
    return [k for k in keys if len({m.get(k) for m in maps}) > 1]


def summarize(run: Run, keys: list[str], root: Path) -> dict:
    """One table row for ``run``."""
    cfg, valid = run.cfg, run.valid_rows
    row: dict = {"run": str(run.path.relative_to(root)) if run.path != root else run.name}
    ov = override_map(run.overrides)
    row.update({k: ov.get(k, "") for k in keys})
    lrs = [r["lr"] for r in run.rows if finite(r.get("lr"))]
    if cfg is not None:
        o = cfg.optim
        row.update(schedule=o.name, factor=noam_factor(o, cfg.model.d_model) if o.name == "noam" else None,
                   lr=None if o.name == "noam" else o.lr, warmup_steps=o.warmup_steps,
                   peak_lr=peak_lr(o, cfg.model.d_model))
    else:
        row.update(schedule=None, factor=None, lr=None, warmup_steps=None,
                   peak_lr=run.summary.get("peak_lr") or (max(lrs) if lrs else None))
    best = best_validation(run)
    row.update(steps=int(run.rows[-1]["step"]) if run.rows else run.summary.get("step"),
               best_step=int(best["step"]) if best else None, best_epoch=best.get("epoch") if best else None)
    for short, (column, _) in METRICS.items():
        row[f"best_{short}"] = best.get(column) if best else None
        row[f"final_{short}"] = valid[-1].get(column) if valid else None
    div = checks.divergence(run.train_rows, valid, run.summary, None)
    nonfinite = [k for k, v in row.items() if isinstance(v, float) and not math.isfinite(v)]
    reasons = (div.details if div else []) + ([f"non-finite {', '.join(nonfinite)}"] if nonfinite else [])
    ignored = checks.source_ignored(valid, cfg.optim.warmup_steps if cfg else 0, cfg, row["peak_lr"],
                                    checks.Thresholds(src_gain=cfg.train.src_gain_warn if cfg else 0.1))
    row.update(source_ignored=ignored is not None, diverged=bool(reasons), diverged_reason="; ".join(reasons),
               stop_reason=run.summary.get("stop_reason", ""), overrides=" ".join(run.overrides))
    return row


def gather(root: Path) -> tuple[list[dict], list[str], list[Run]]:
    """Table rows for every run under ``root``, the distinguishing override keys, and the runs."""
    runs = [load_run(p, need_metrics=False) for p in find_runs(root)]
    keys = distinguishing_keys(runs)
    return [summarize(r, keys, Path(root)) for r in runs], keys, runs


def rank_metric(rows: list[dict], wanted: Optional[str]) -> str:
    """``wanted``, else BLEU when the runs computed it, else the validation loss."""
    if wanted:
        return wanted
    return "bleu" if any(finite(r.get("best_bleu")) for r in rows) else "valid_loss"


def best_row(rows: list[dict], metric: str) -> Optional[dict]:
    """The best run by ``metric`` at its best validation, among those that did not diverge."""
    higher = METRICS[metric][1]
    ok = [r for r in rows if not r["diverged"] and finite(r.get(f"best_{metric}"))]
    if not ok:
        return None
    return (max if higher else min)(ok, key=lambda r: r[f"best_{metric}"])


def correlations(rows: list[dict]) -> dict:
    """Pearson and Spearman of log10(peak LR) with each best_* metric, over runs where both are finite."""
    out = {}
    for short in METRICS:
        pts = [(math.log10(r["peak_lr"]), r[f"best_{short}"]) for r in rows
               if finite(r.get("peak_lr")) and r["peak_lr"] > 0 and finite(r.get(f"best_{short}"))]
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        out[short] = {"pearson": pearson(xs, ys), "spearman": spearman(xs, ys), "n": len(pts)}
    return out


def edge_advice(rows: list[dict], best: Optional[dict]) -> list[str]:
    """A best run at the lowest or highest peak LR tried means the optimum may lie beyond the sweep."""
    peaks = sorted({r["peak_lr"] for r in rows if finite(r.get("peak_lr"))})
    if best is None or len(peaks) < 3 or not finite(best.get("peak_lr")):
        return []
    if best["peak_lr"] == peaks[0]:
        return [f"the best run has the lowest peak LR tried ({fmt_lr(peaks[0])}): extend the sweep downwards"]
    if best["peak_lr"] == peaks[-1]:
        return [f"the best run has the highest peak LR tried ({fmt_lr(peaks[-1])}): extend the sweep upwards"]
    return [f"the best peak LR ({fmt_lr(best['peak_lr'])}) lies inside the range tried "
            f"({fmt_lr(peaks[0])} to {fmt_lr(peaks[-1])})"]


def insights(rows: list[dict], keys: list[str], metric: str) -> dict:
    best = best_row(rows, metric)
    return {
        "advice": edge_advice(rows, best),
        "runs": len(rows), "metric": metric, "distinguishing_overrides": keys,
        "best": None if best is None else {
            "run": best["run"], "value": best[f"best_{metric}"], "best_step": best["best_step"],
            "peak_lr": best["peak_lr"], "schedule": best["schedule"], "factor": best["factor"],
            "warmup_steps": best["warmup_steps"], "overrides": best["overrides"].split()},
        "correlation_with_log10_peak_lr": correlations(rows),
        "diverged": [{"run": r["run"], "reason": r["diverged_reason"]} for r in rows if r["diverged"]],
        "source_ignored": [r["run"] for r in rows if r["source_ignored"]],
    }


def write_csv(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows({k: ("" if v is None else v) for k, v in r.items()} for r in rows)
    return path


def _cell(v) -> str:
    if v is None or v == "":
        return "-"
    if isinstance(v, bool):
        return "**yes**" if v else "no"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v).replace("|", "\\|")


def to_markdown(rows: list[dict], keys: list[str], info: dict) -> str:
    metric = info["metric"]
    cols = (["run"] + keys + ["schedule", "peak_lr", "best_step", "best_bleu", "best_chrf", "best_valid_loss",
            "best_ppl", "best_acc", "best_src_gain", "best_distinct", "final_bleu", "final_valid_loss",
            "source_ignored", "diverged", "stop_reason"])
    out = [f"# Sweep report ({len(rows)} runs)", ""]
    b = info["best"]
    if b:
        own = [o for o in b["overrides"] if o.partition("=")[0].lstrip("+~") in keys]
        out.append(f"**Best by {metric}:** `{b['run']}` with {metric} {b['value']:.4g} at step {b['best_step']} "
                   f"(peak LR {fmt_lr(b['peak_lr'])}{'; ' + ' '.join(own) if own else ''})")
    else:
        out.append(f"**Best by {metric}:** none (every run diverged or has no {metric})")
    out.append("")
    out.append("| " + " | ".join(c.replace("_", " ") for c in cols) + " |")
    out.append("|" + "---|" * len(cols))
    for r in rows:
        out.append("| " + " | ".join(_cell(fmt_lr(r[c]) if c == "peak_lr" else r.get(c)) for c in cols) + " |")
    out += ["", "Metrics at each run's best validation (the checkpoint in best.pt) and at its last one."]
    out += [""] + [f"- {a}" for a in info["advice"]] if info["advice"] else []
    out += ["", "## Correlation with log10(peak LR)", "",
            "Linear (Pearson) and rank (Spearman) correlation over the runs; an optimum inside the range "
            "tried (the usual case) weakens both, so read them with the plot.", "",
            "| metric | Pearson | Spearman | n |", "|---|---|---|---|"]
    for short, c in info["correlation_with_log10_peak_lr"].items():
        out.append(f"| {short} | {_cell(c['pearson'])} | {_cell(c['spearman'])} | {c['n']} |")
    if info["diverged"]:
        out += ["", "## Diverged runs", ""] + [f"- `{d['run']}`: {d['reason']}" for d in info["diverged"]]
    if info["source_ignored"]:
        out += ["", f"Runs whose last validation after warmup shows the source ignored (src_gain below the "
                f"threshold or under half the dev translations distinct): {', '.join(info['source_ignored'])}; "
                "`lr.py diagnose RUN_DIR` explains each."]
    out += ["", "![metrics vs peak LR](metric_vs_lr.png)", "", "![validation curves](curves.png)", ""]
    return "\n".join(out)


def _tag(row: dict, info: dict) -> str:
    """The row's distinguishing overrides, short: "factor=0.5 warmup_steps=400"."""
    return " ".join(f"{k.split('.')[-1]}={row[k]}" for k in info["distinguishing_overrides"])


def plot(path: Path, rows: list[dict], info: dict) -> Path:
    plt = pyplot()
    panels = [("best_bleu", "BLEU"), ("best_chrf", "chrF"), ("best_valid_loss", "valid loss"),
              ("best_src_gain", "src gain (nats/token)")]
    fig, axes = plt.subplots(2, 2, figsize=(9, 6.5))
    best = info["best"]["run"] if info["best"] else None
    for ax, (key, label) in zip(axes.flat, panels):
        for r in rows:
            x, y = r.get("peak_lr"), r.get(key)
            if not (finite(x) and finite(y)):
                continue
            style = "x" if r["diverged"] else ("*" if r["run"] == best else "o")
            color = "tab:red" if r["diverged"] else ("tab:green" if r["run"] == best else "tab:blue")
            ax.plot([x], [y], style, color=color, ms=11 if style == "*" else 7)
            ax.annotate(f"{r['run']} {_tag(r, info)}".strip(), (x, y), xytext=(4, 3), textcoords="offset points", fontsize=7, color="0.35")
        ax.set_xscale("log")
        ax.set_xlabel("peak LR")
        ax.set_ylabel(f"{label} at best step")
    fig.suptitle(f"{len(rows)} runs: red x = diverged, green star = best by {info['metric']}", fontsize=9)
    return save(fig, path)


def plot_curves(path: Path, rows: list[dict], runs: list[Run], info: dict) -> Path:
    """Each run's validation metrics against its step, one line per run (the runs overlaid)."""
    plt = pyplot()
    panels = [("valid_loss", "valid loss"), ("valid_bleu", "BLEU"), ("valid_chrf", "chrF"),
              ("valid_src_gain", "src gain (nats/token)")]
    fig, axes = plt.subplots(2, 2, figsize=(9, 6.5))
    for ax, (column, label) in zip(axes.flat, panels):
        for r, run in zip(rows, runs):
            pts = [(v["step"], v[column]) for v in run.valid_rows if finite(v.get(column))]
            if not pts:
                continue
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3,
                    ls="--" if r["diverged"] else "-", label=_tag(r, info) or r["run"])
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    if handles:
        axes.flat[0].legend(handles, labels, fontsize=7)
    fig.suptitle(f"validation curves of {len(rows)} runs (dashed = diverged)", fontsize=9)
    return save(fig, path)


def write(root: Path, out_dir: Path, metric: Optional[str] = None) -> tuple[list[Path], dict, str]:
    """Gather, then write summary.csv, summary.md, insights.json, metric_vs_lr.png and curves.png."""
    rows, keys, runs = gather(root)
    info = insights(rows, keys, rank_metric(rows, metric))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    md = to_markdown(rows, keys, info)
    (out_dir / "summary.md").write_text(md, encoding="utf-8")
    (out_dir / "insights.json").write_text(json.dumps(json_safe(info), indent=2) + "\n", encoding="utf-8")
    paths = [write_csv(out_dir / "summary.csv", rows), out_dir / "summary.md", out_dir / "insights.json",
             plot(out_dir / "metric_vs_lr.png", rows, info), plot_curves(out_dir / "curves.png", rows, runs, info)]
    return paths, info, md
