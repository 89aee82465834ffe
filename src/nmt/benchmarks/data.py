"""``bench.py data``: preparing a corpus of N pairs, and training on it, in time and resident memory.

For each size N, a synthetic corpus (the embedded bible training split
repeated to N pairs) is written to a work folder, and three fresh processes
run in turn, each reporting its wall time and peak resident set size:

- ``first``: a first start: the tokenizer is trained (on a sample of at most
  tokenizer.input_sentence_size sentences) and the training split is encoded
  into the token cache;
- ``second``: a later start: tokenizer and token cache come from their caches
  (the time a run waits before it can train);
- ``train``: a later start that then trains the tiny model for 100 updates.

Fresh processes, so that each peak is that of the step alone.
"""
from __future__ import annotations

import argparse
import datetime as dt
import gzip
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from nmt.config import repo_data_dir

CHILD = r"""
import json, resource, sys, time
start = time.time()
from hydra import compose, initialize_config_dir
from nmt.config import conf_dir, register_configs, to_config
register_configs()
mode, overrides = sys.argv[1], sys.argv[2:]
with initialize_config_dir(str(conf_dir()), version_base="1.3"):
    cfg = to_config(compose("config", overrides=overrides))
if mode == "train":
    import tempfile
    from nmt.train import train
    with tempfile.TemporaryDirectory() as run:
        train(cfg, run)
else:
    from nmt.data import prepare_data
    data = prepare_data(cfg)
    assert len(data.train_src) > 0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print("RESULT " + json.dumps({"seconds": round(time.time() - start, 1), "peak_rss_mb": round(peak / 2**20, 1)}))
"""


def write_corpus(folder: Path, pairs: int) -> None:
    """The embedded bible training split repeated to ``pairs`` pairs, plus its dev split."""
    folder.mkdir(parents=True, exist_ok=True)
    source = repo_data_dir() / "bible-ko-en"
    for lang in ("ko", "en"):
        with gzip.open(source / f"train.{lang}.gz", "rt", encoding="utf-8") as f:
            lines = f.read().splitlines(keepends=True)
        with open(folder / f"train.{lang}", "w", encoding="utf-8") as out:
            full, rest = divmod(pairs, len(lines))
            for _ in range(full):
                out.writelines(lines)
            out.writelines(lines[:rest])
        with gzip.open(source / f"dev.{lang}.gz", "rt", encoding="utf-8") as f:
            (folder / f"dev.{lang}").write_text(f.read(), encoding="utf-8")


def _run(mode: str, overrides: list[str], threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-c", CHILD, mode, *overrides], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"bench.py data: the {mode} step failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.rsplit("RESULT ", 1)[1])


def _du(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def cmd_data(args: argparse.Namespace) -> dict:
    work = Path(args.workdir or tempfile.mkdtemp(prefix="nmt-bench-data-"))
    results = []
    for n in args.pairs:
        name = f"bible-x{n}"
        corpus, cache = work / "corpora" / name, work / "cache" / name
        shutil.rmtree(cache, ignore_errors=True)          # so that "first" is a first start
        if not (corpus / "train.ko").is_file():
            write_corpus(corpus, n)
        overrides = [f"model={args.preset}", f"data.root={work / 'corpora'}", f"data.name={name}",
                     f"tokenizer.cache_dir={cache / 'tokenizers'}", f"data.cache_dir={cache / 'tokens'}",
                     "train.progress=false", f"train.threads={args.threads}", "device=cpu",
                     "train.max_steps=100", "train.valid_every=100000", "train.valid_every_epoch=false",
                     "valid.max_sentences=1", *args.overrides]
        row = {"pairs": n, "corpus_mb": round(_du(corpus) / 2**20, 1)}
        for mode in ("first", "second", "train"):
            row[mode] = _run("train" if mode == "train" else "prepare", overrides, args.threads)
        row["first"]["pairs_per_s"] = round(n / max(row["first"]["seconds"], 1e-9))
        row["cache_mb"] = round(_du(cache / "tokens") / 2**20, 1)
        results.append(row)
        print(json.dumps(row), file=sys.stderr)
    return {"benchmark": "data", "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
            "threads": args.threads, "preset": args.preset, "workdir": str(work), "results": results}


def add_parser(sub) -> None:
    p = sub.add_parser("data", help="corpus preparation and training memory at N pairs")
    p.add_argument("--pairs", type=lambda s: [int(float(x)) for x in s.split(",")], default=[100_000, 1_000_000],
                   help="comma-separated corpus sizes in pairs (e.g. 1e5,1e6,5e6)")
    p.add_argument("--preset", default="tiny", help="model preset of the training step")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--workdir", help="where corpora and caches go (default: a new temporary folder)")
    p.add_argument("overrides", nargs="*", help="more training config overrides")
    p.set_defaults(func=cmd_data)
