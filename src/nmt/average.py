"""Checkpoint averaging: the mean of several checkpoints' parameters, as a checkpoint the translator loads.

Averaging the last few checkpoints of a run (Vaswani et al., 2017; fairseq's
``average_checkpoints.py``) smooths out the noise of the last updates. The
result keeps the config, tokenizer and decode settings of the newest input,
holds no optimizer or sampler state (it cannot resume a run: start a new one
from it instead), and records what it was made from. Parameters are summed in
float64 and cast back to their own dtype.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional, Sequence

import torch

from nmt.checkpoint import FORMAT, CheckpointError, CheckpointManager, atomic_save, load_checkpoint

log = logging.getLogger(__name__)

# settings that change the parameters' shapes or meaning; dropouts may differ between checkpoints
_SHAPE_KEYS = ("d_model", "layers", "encoder_layers", "decoder_layers", "heads", "ffn", "activation", "norm",
               "share_embeddings", "max_positions")


def average_state_dicts(states: Sequence[dict]) -> dict:
    """The element-wise mean of ``states`` (same keys and shapes), summed in float64.

    Floating-point tensors are averaged; any other entry must be equal in all of
    them and is kept. Raises CheckpointError naming the first mismatch.
    """
    if not states:
        raise CheckpointError("nothing to average: no checkpoints given")
    first = states[0]
    for i, s in enumerate(states[1:], start=2):
        if s.keys() != first.keys():
            extra = sorted(set(s) ^ set(first))[:3]
            raise CheckpointError(f"checkpoint {i} has other parameters than checkpoint 1 (e.g. {', '.join(extra)})")
    out = {}
    for key, ref in first.items():
        if not (isinstance(ref, torch.Tensor) and ref.is_floating_point()):
            if any(not _equal(s[key], ref) for s in states):
                raise CheckpointError(f"cannot average {key!r}: it is not a float tensor and differs between checkpoints")
            out[key] = ref
            continue
        total = torch.zeros(ref.shape, dtype=torch.float64)
        for i, s in enumerate(states, start=1):
            if s[key].shape != ref.shape:
                raise CheckpointError(f"cannot average {key!r}: shape {tuple(s[key].shape)} in checkpoint {i}, "
                                      f"{tuple(ref.shape)} in checkpoint 1")
            total += s[key].to(torch.float64)
        out[key] = (total / len(states)).to(ref.dtype)
    return out


def _equal(a, b) -> bool:
    return torch.equal(a, b) if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) else a == b


def check_same_model(objs: Sequence[dict], paths: Sequence[Path]) -> None:
    """Refuse checkpoints of different model shapes or tokenizers, naming the setting and the files."""
    base, base_path = objs[0], paths[0]
    for obj, path in zip(objs[1:], paths[1:]):
        for key in _SHAPE_KEYS:
            a, b = base["config"]["model"].get(key), obj["config"]["model"].get(key)
            if a != b:
                raise CheckpointError(f"cannot average {base_path} and {path}: model.{key} is {a!r} and {b!r}")
        if obj["tokenizer"] != base["tokenizer"]:
            raise CheckpointError(f"cannot average {base_path} and {path}: they use different tokenizers")


def select(folder: Path, last: int = 0, best: int = 0, metric: Optional[str] = None) -> list[Path]:
    """``step-N.pt`` files of a checkpoints folder: the ``last`` newest, or the ``best`` by the
    validation metric each holds (the run's early-stopping metric unless ``metric`` is given)."""
    files = CheckpointManager(folder, 0).periodic_files()
    if not files:
        raise CheckpointError(f"no step-N.pt checkpoints in {folder} (train with train.keep_last >= N, or "
                              "train.average_last=N, to keep them)")
    if last:
        return files[-last:]
    scored = []
    for path in files:
        obj = load_checkpoint(path)
        column = metric or _metric_column(obj)
        value = obj.get("metrics", {}).get(column)
        if value is None:
            raise CheckpointError(f"{path} holds no validation {column!r} to rank it by")
        higher = column != "valid_loss"
        scored.append((-value if higher else value, obj["step"], path))
    return [p for _, _, p in sorted(scored)[:best]]


def _metric_column(obj: dict) -> str:
    metric = obj["config"]["train"]["early_stopping"]["metric"]
    return metric if metric == "valid_loss" else f"valid_{metric}"


def average_checkpoints(paths: Sequence[Path], output: Path) -> dict:
    """Average the checkpoints at ``paths`` into ``output`` (written atomically); returns what was written."""
    paths = [Path(p) for p in paths]
    objs = [load_checkpoint(p) for p in paths]
    check_same_model(objs, paths)
    newest = max(range(len(objs)), key=lambda i: objs[i]["step"])
    base = objs[newest]
    averaged = {
        "format": FORMAT, "model": average_state_dicts([o["model"] for o in objs]), "config": base["config"],
        "tokenizer": base["tokenizer"], "decode": base.get("decode"), "step": base["step"],
        "epoch": base.get("epoch"), "metrics": {},
        "averaged_from": [{"path": str(p), "step": int(o["step"])} for p, o in zip(paths, objs)],
    }
    atomic_save(averaged, output)
    log.info("averaged %d checkpoints (steps %s) into %s", len(paths),
             ", ".join(str(o["step"]) for o in objs), output)
    return averaged


# ----------------------------------------------------------------------------- command line
def _inputs(paths: Sequence[str], last: int, best: int, metric: Optional[str]) -> tuple[list[Path], Path]:
    """The checkpoints to average and the folder the result goes to by default."""
    given = [Path(p) for p in paths]
    missing = [str(p) for p in given if not p.exists()]
    if missing:
        raise CheckpointError(f"not found: {', '.join(missing)}")
    if len(given) == 1 and given[0].is_dir():
        folder = given[0] / "checkpoints" if (given[0] / "checkpoints").is_dir() else given[0]
        if not (last or best):
            raise CheckpointError("averaging a run folder needs --last N or --best N")
        return select(folder, last, best, metric), folder
    if any(p.is_dir() for p in given):
        raise CheckpointError("give either one run folder or checkpoint files, not both")
    if last or best:
        objs = {p: load_checkpoint(p) for p in given}
        if last:
            given = sorted(given, key=lambda p: objs[p]["step"])[-last:]
        else:
            column = metric or _metric_column(objs[given[0]])
            unscored = [str(p) for p in given if objs[p].get("metrics", {}).get(column) is None]
            if unscored:
                raise CheckpointError(f"no validation {column!r} stored in {', '.join(unscored)}")
            sign = 1 if column == "valid_loss" else -1
            given = sorted(given, key=lambda p: sign * objs[p]["metrics"][column])[:best]
    return given, given[0].parent


def main(argv: Optional[Sequence[str]] = None) -> int:
    import argparse
    import sys

    parser = argparse.ArgumentParser(
        prog="average.py", description="Average the parameters of several checkpoints into one that "
        "scripts/translate.py loads (config, tokenizer and decode settings of the newest).")
    parser.add_argument("paths", nargs="+", metavar="RUN_DIR|CKPT", help="a run folder, or checkpoint files")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--last", type=int, default=0, metavar="N", help="the N newest step-N.pt checkpoints")
    which.add_argument("--best", type=int, default=0, metavar="N", help="the N best by a validation metric")
    parser.add_argument("--metric", choices=("bleu", "chrf", "valid_loss"),
                        help="metric of --best (default: the run's train.early_stopping.metric)")
    parser.add_argument("--output", "-o", type=Path, help="where to write (default: averaged.pt beside the inputs)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.last < 0 or args.best < 0:
        parser.error("--last and --best take a positive number")
    metric = None if args.metric is None else (args.metric if args.metric == "valid_loss" else f"valid_{args.metric}")
    try:
        paths, folder = _inputs(args.paths, args.last, args.best, metric)
        output = args.output or folder / "averaged.pt"
        if any(output.resolve() == p.resolve() for p in paths):
            raise CheckpointError(f"refusing to overwrite {output}, one of the checkpoints being averaged")
        average_checkpoints(paths, output)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(output)
    return 0
