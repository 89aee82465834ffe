"""Several processes: torchrun with the gloo backend on the CPU, 2 ranks of the tiny model.

Only rank 0 writes files; its checkpoint translates; an update of 2 ranks equals one process
accumulating the same 2 batches (the losses agree within 1e-4 nats/token over the run: the
sums are reduced in another order); SIGTERM to one rank stops both with a loadable last.pt,
and a resume finishes the run.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from conftest import REPO_ROOT, TINY
from nmt.checkpoint import load_checkpoint, load_for_inference
from nmt.metrics import read_metrics
from nmt.train import train
from trainproc import Proc, child_env, compose_cfg, single_thread, wait_until

pytestmark = pytest.mark.slow

# no dropout: the one-process reference then draws no random numbers that the two ranks would draw differently
COMMON = ("train.max_steps=8", "train.valid_every=4", "train.log_every=1", "model.dropout=0.0",
          "train.max_tokens=512")


def torchrun(run_dir, data_root, tok_cache, *overrides, log_name="torchrun.out") -> Proc:
    args = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            str(REPO_ROOT / "scripts" / "train.py"), *TINY, f"data.root={data_root}",
            f"tokenizer.cache_dir={tok_cache}", f"hydra.run.dir={run_dir}", *overrides]
    return Proc(args, run_dir.parent / log_name)


def test_two_ranks_train_like_one_process_accumulating_their_batches(tmp_path, data_root, tok_cache):
    run = tmp_path / "ddp"
    rc, out = torchrun(run, data_root, tok_cache, *COMMON).wait(300)
    assert rc == 0, out[-3000:]
    log = (run / "train.log").read_text(encoding="utf-8")
    assert "2 processes (gloo), this is rank 0" in log and "this is rank 1" not in log
    assert sorted(p.name for p in run.iterdir() if not p.name.startswith(".")) == \
        ["checkpoints", "config.yaml", "metrics.csv", "summary.json", "tb", "tokenizer", "train.log"]
    rows = read_metrics(run / "metrics.csv")
    steps = [int(r["step"]) for r in rows if r["loss"] is not None]
    assert steps == list(range(1, 9))                                   # one writer: no duplicated rows
    ckpt = load_checkpoint(run / "checkpoints" / "last.pt")
    assert ckpt["step"] == 8 and len(ckpt["rng_ranks"]) == 2
    load_for_inference(run)                                             # the translator loads it

    single = tmp_path / "single"
    with single_thread():
        train(compose_cfg(data_root, tok_cache, *COMMON, "train.accumulate=2"), single)
    ref = [r["loss"] for r in read_metrics(single / "metrics.csv") if r["loss"] is not None]
    got = [r["loss"] for r in rows if r["loss"] is not None]
    assert len(ref) == len(got) == 8
    assert max(abs(a - b) for a, b in zip(got, ref)) < 1e-4, (got, ref)


def test_sigterm_to_one_rank_stops_both_and_resume_finishes(tmp_path, data_root, tok_cache):
    run = tmp_path / "ddp"
    long = ("train.max_steps=400", "train.valid_every=1000", "train.log_every=1", "train.max_tokens=512")
    proc = torchrun(run, data_root, tok_cache, *long)
    metrics = run / "metrics.csv"
    wait_until(lambda: metrics.exists() and len(read_metrics(metrics)) >= 3, proc, what="3 logged steps")
    workers = subprocess.run(["pgrep", "-P", str(proc.p.pid)], capture_output=True, text=True).stdout.split()
    assert len(workers) == 2, workers
    os.kill(int(sorted(workers, key=int)[-1]), signal.SIGTERM)       # the rank started last
    rc, out = proc.wait(120)
    assert rc != 0                                                     # torchrun reports the interrupted workers
    last = load_checkpoint(run / "checkpoints" / "last.pt")
    assert 3 <= last["step"] < 400
    log = (run / "train.log").read_text(encoding="utf-8")
    assert "interrupted by SIGTERM" in log
    rc, out = torchrun(run, data_root, tok_cache, *long[1:], "train.max_steps=" + str(last["step"] + 5),
                       "train.resume=true", log_name="resume.out").wait(300)
    assert rc == 0, out[-3000:]
    assert load_checkpoint(run / "checkpoints" / "last.pt")["step"] == last["step"] + 5


def test_a_different_world_size_resumes_with_a_warning(tmp_path, data_root, tok_cache):
    run = tmp_path / "one"
    with single_thread():
        train(compose_cfg(data_root, tok_cache, *COMMON), run)
    rc, out = torchrun(run, data_root, tok_cache, *COMMON[1:], "train.max_steps=10", "train.resume=true").wait(300)
    assert rc == 0, out[-3000:]
    assert "resuming a run of 1 process(es) with 2" in (run / "train.log").read_text(encoding="utf-8")
    assert load_checkpoint(run / "checkpoints" / "last.pt")["step"] == 10
