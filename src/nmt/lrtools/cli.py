"""Command line of the LR tools (``python scripts/lr.py COMMAND ...``): parse, call the
library, print. User errors are one line on stderr with exit code 2."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence

from nmt.config import Config, ConfigError, conf_dir, register_configs, to_config
from nmt.lrtools import LRToolError

PROG = "lr.py"
COMMANDS = ("plot", "find", "report", "diagnose")
USAGE = f"""usage: {PROG} COMMAND [args]

commands:
  plot     [training overrides] [--steps N] [--batches-per-epoch B] [--at-epochs 1,2,5] [--out DIR]
           the LR of every update under a config: lr_schedule.png and lr_schedule.csv
  find     [training overrides] [--min 1e-7] [--max 1] [--steps 200] [--out DIR]
           LR range test from the initial weights: lr_find.png, lr_find.csv, a suggested peak LR
  report   MULTIRUN_DIR [--metric bleu] [--out DIR]
           compare the runs of a sweep: summary.csv, summary.md, insights.json, metric_vs_lr.png,
           curves.png
  diagnose RUN_DIR [--out DIR]
           explain a finished run: diagnosis.md, diagnosis.json, loss_curves.png, lr_gradnorm.png

Training overrides are the Hydra overrides of scripts/train.py (e.g. optim=noam
model.d_model=512 optim.warmup_steps=4000); `{PROG} COMMAND --help` for details.
"""


# ----------------------------------------------------------------------------- config
def _one_line(text: str) -> str:
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


def compose_config(overrides: Sequence[str]) -> Config:
    """The validated training config for ``overrides``, composed from conf/ as scripts/train.py does."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException, MissingConfigException
    from omegaconf.errors import OmegaConfBaseException

    register_configs()
    try:
        with initialize_config_dir(str(conf_dir()), version_base="1.3"):
            dcfg = compose("config", overrides=list(overrides))
    except MissingConfigException as e:
        first = str(e).splitlines()[0]
        options = getattr(e, "options", None)
        raise LRToolError(f"{first}; choose one of: {', '.join(options)}" if options else _one_line(e)) from None
    except (HydraException, OmegaConfBaseException) as e:
        cause = f": {str(e.__cause__).splitlines()[0]}" if e.__cause__ else ""
        raise LRToolError(_one_line(str(e).splitlines()[0]) + cause) from None
    return to_config(dcfg)


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


# ----------------------------------------------------------------------------- commands
def cmd_plot(a: argparse.Namespace) -> int:
    from nmt.lrtools import plot

    cfg = compose_config(a.overrides)
    if a.batches_per_epoch is not None:
        if a.batches_per_epoch <= 0:
            raise LRToolError(f"--batches-per-epoch must be > 0, got {a.batches_per_epoch:g}")
        batches, origin = a.batches_per_epoch, "given with --batches-per-epoch"
    else:
        print(f"computing batches per epoch from {cfg.data.name} with train.max_tokens={cfg.train.max_tokens}: this "
              "reads and tokenizes the training set (the tokenizer is trained on first use and cached; the first "
              "time can take ~20 s on a big corpus; pass --batches-per-epoch to skip)", flush=True)
        batches, pairs, secs = plot.batches_per_epoch_from_data(cfg)
        origin = f"computed from {pairs:,} training pairs in {secs:.1f} s"
    per_epoch = plot.updates_per_epoch(batches, cfg.train.accumulate)
    total = plot.training_steps(cfg, per_epoch)
    steps = a.steps or total
    if not steps or steps < 1 or steps > 5_000_000:
        raise LRToolError(f"--steps must be between 1 and 5,000,000, got {steps}")
    lrs = plot.schedule(cfg, steps, total)
    at = a.at_epochs if a.at_epochs is not None else [e for e in plot.DEFAULT_AT_EPOCHS if e * per_epoch <= steps]
    facts = plot.schedule_facts(cfg, lrs, per_epoch, at)
    out = _out_dir(a.out, Path("."))
    png = plot.plot(out / "lr_schedule.png", lrs, facts)
    csv_path = plot.write_csv(out / "lr_schedule.csv", lrs, per_epoch, facts.peak_lr)
    print(f"batches per epoch: {batches:,.0f} ({origin}); train.accumulate={cfg.train.accumulate} "
          f"-> {per_epoch:,.0f} updates per epoch")
    print("\n".join(facts.lines()))
    print(f"wrote {png} and {csv_path} ({steps:,} steps)")
    return 0


def cmd_find(a: argparse.Namespace) -> int:
    from nmt.lrtools import find

    cfg = compose_config(a.overrides)
    find.lr_ladder(a.min, a.max, a.steps)           # check the range before loading anything
    if not 0 <= a.smooth < 1 or a.stop_factor <= 1:
        raise LRToolError("--smooth must be in [0, 1) and --stop-factor > 1")
    print(f"LR range test: {a.steps} updates, LR {a.min:g} -> {a.max:g} (geometric), plain Adam "
          f"betas={list(cfg.optim.betas)} eps={cfg.optim.eps:g}, clip_norm={cfg.train.clip_norm:g}, "
          f"model d_model={cfg.model.d_model}, data {cfg.data.name}; no weights are saved", flush=True)
    rt = find.range_test(cfg, a.min, a.max, a.steps, beta=a.smooth, stop_factor=a.stop_factor,
                         progress=a.progress)
    sug = find.suggest(rt.lrs, rt.smoothed)
    out = _out_dir(a.out, Path("."))
    png = find.plot(out / "lr_find.png", rt, sug, f"LR range test: d_model {cfg.model.d_model}, {cfg.data.name}")
    csv_path = find.write_csv(out / "lr_find.csv", rt)
    print(rt.stop_reason)
    print("\n".join(find.advice(cfg, sug)))
    print(f"wrote {png} and {csv_path}")
    return 0


def cmd_report(a: argparse.Namespace) -> int:
    from nmt.lrtools import report
    from nmt.lrtools.rundir import require_dir

    root = require_dir(Path(a.multirun_dir), "multirun directory")
    paths, info, md = report.write(root, _out_dir(a.out, root), a.metric)
    print(md)
    if info["diverged"]:
        print(f"{len(info['diverged'])} diverged run(s): {', '.join(d['run'] for d in info['diverged'])}")
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def cmd_diagnose(a: argparse.Namespace) -> int:
    from nmt.lrtools import diagnose
    from nmt.lrtools.checks import Thresholds
    from nmt.lrtools.rundir import load_run

    run = load_run(Path(a.run_dir))
    gain = a.src_gain if a.src_gain is not None else (run.cfg.train.src_gain_warn if run.cfg else 0.1)
    th = Thresholds(src_gain=gain, distinct=a.distinct, overfit_k=a.overfit_k, plateau_n=a.plateau_n,
                    plateau_tol=a.plateau_tol)
    d = diagnose.diagnose(run, th)
    paths = diagnose.write(d, _out_dir(a.out, run.path))
    print(diagnose.to_markdown(d))
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def _out_dir(out: Optional[str], default: Path) -> Path:
    path = Path(out) if out else default
    if path.exists() and not path.is_dir():
        raise LRToolError(f"--out {path} is a file, not a directory")
    path.mkdir(parents=True, exist_ok=True)
    return path


# ----------------------------------------------------------------------------- parsing
def parser_for(command: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"{PROG} {command}")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress (INFO) to stderr")
    if command in ("plot", "find"):
        p.add_argument("overrides", nargs="*", help="Hydra overrides, as for scripts/train.py")
        p.add_argument("--out", help="output directory (default: the current directory)")
    if command == "plot":
        p.add_argument("--steps", type=int, help="updates to plot (default: the training length)")
        p.add_argument("--batches-per-epoch", type=float, help="batches in one epoch (default: computed from the data)")
        p.add_argument("--at-epochs", type=_floats, help="report the LR at the end of these epochs (e.g. 1,2,5,10)")
    if command == "find":
        p.add_argument("--min", type=float, default=1e-7, help="first LR (default 1e-7)")
        p.add_argument("--max", type=float, default=1.0, help="last LR (default 1)")
        p.add_argument("--steps", type=int, default=200, help="updates (default 200)")
        p.add_argument("--smooth", type=float, default=0.9,
                       help="EMA factor of the smoothed loss (default 0.9; the average lags about 1/(1-smooth) "
                       "steps behind, which moves the suggestions towards higher LRs)")
        p.add_argument("--stop-factor", type=float, default=4.0,
                       help="stop once the smoothed loss exceeds this times its best (default 4)")
        p.add_argument("--progress", action="store_true", help="show a progress bar")
    if command == "report":
        p.add_argument("multirun_dir", help="a Hydra multirun folder (multirun/<date>/<time>) or any folder of runs")
        p.add_argument("--metric", choices=["bleu", "chrf", "valid_loss", "ppl", "acc"],
                       help="rank runs by this (default: BLEU when computed, else valid_loss)")
        p.add_argument("--out", help="output directory (default: MULTIRUN_DIR)")
    if command == "diagnose":
        p.add_argument("run_dir", help="a training run directory (holding metrics.csv)")
        p.add_argument("--out", help="output directory (default: RUN_DIR)")
        p.add_argument("--src-gain", type=float, help="source ignored below this many nats/token after warmup "
                       "(default: the run's train.src_gain_warn, else 0.1)")
        p.add_argument("--distinct", type=float, default=0.5, help="source ignored below this fraction of "
                       "distinct dev translations (default 0.5)")
        p.add_argument("--overfit-k", type=int, default=3, help="validations of rising valid loss (default 3)")
        p.add_argument("--plateau-n", type=int, default=4, help="validations that make a plateau (default 4)")
        p.add_argument("--plateau-tol", type=float, default=0.005, help="relative valid-loss spread that counts "
                       "as flat (default 0.005)")
    return p


HANDLERS: dict[str, Callable[[argparse.Namespace], int]] = {
    "plot": cmd_plot, "find": cmd_find, "report": cmd_report, "diagnose": cmd_diagnose}


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in HANDLERS:
        print(f"{PROG}: error: unknown command {command!r}; choose one of: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    args = parser_for(command).parse_intermixed_args(rest)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    from nmt.corpus import CorpusError

    try:
        return HANDLERS[command](args)
    except BrokenPipeError:           # e.g. `lr.py diagnose RUN | head`: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (LRToolError, ConfigError, CorpusError, ValueError, OSError) as e:
        print(f"{PROG} {command}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG} {command}: interrupted", file=sys.stderr)
        return 130
