"""A training process that is stopped loses at most the work since its last checkpoint.

Real ``scripts/train.py`` processes on the tiny model are interrupted with
SIGINT / SIGTERM (Ctrl-C, preemption) and killed with SIGKILL at seeded random
moments; every time the run directory holds a loadable ``last.pt``, and the run
resumed to the end has exactly the parameters of a run that was never stopped.
"""
from __future__ import annotations

import random
import shutil
import signal
import time

import pytest

from nmt.checkpoint import TEMP_GLOB, load_checkpoint
from nmt.metrics import read_metrics
from nmt.train import train

from trainproc import (assert_clean_exit, assert_same_params, checkpoint_step, compose_cfg, single_thread, train_proc,
                       wait_until)

pytestmark = pytest.mark.slow

STEPS = 30
# one validation inside the run (best.pt, early-stopping state) and a last.pt after every update
RUN = (f"train.max_steps={STEPS}", "train.valid_every=15", "train.save_every=1", "train.keep_last=2",
       "model.dropout=0.2")


@pytest.fixture(scope="module")
def reference(data_root, tok_cache, tmp_path_factory):
    """last.pt of the same run, never interrupted (trained in-process: no second interpreter to start)."""
    run_dir = tmp_path_factory.mktemp("reference")
    with single_thread():
        assert train(compose_cfg(data_root, tok_cache, *RUN), run_dir)["step"] == STEPS
    return run_dir / "checkpoints" / "last.pt"


def test_sigint_then_sigterm_save_last_and_resume_exactly(reference, data_root, tok_cache, tmp_path):
    run = tmp_path / "run"
    last = run / "checkpoints" / "last.pt"
    resumed_from = 0
    for sig, code, resume in (("SIGINT", 130, ()), ("SIGTERM", 143, ("train.resume=true",))):
        proc = train_proc(run, data_root, tok_cache, *RUN, *resume, tag=sig)
        wait_until(lambda: checkpoint_step(last) >= resumed_from + 3, proc, what="three more updates")
        proc.send(getattr(signal, sig))
        rc, out = proc.wait()
        assert_clean_exit(rc, out, code, f"{sig} received", f"interrupted by {sig}: last.pt written",
                          "train.resume=true")
        step = load_checkpoint(last)["step"]
        assert resumed_from + 3 <= step < STEPS, (resumed_from, step)
        resumed_from = step
    rc, out = train_proc(run, data_root, tok_cache, *RUN, "train.resume=true", tag="end").wait()
    assert_clean_exit(rc, out, 0, f"resuming from {last} (step {resumed_from})", f"reached train.max_steps={STEPS}")
    assert_same_params(reference, last)


def test_repeated_sigkill_never_loses_a_checkpoint(reference, data_root, tok_cache, tmp_path):
    rng = random.Random(20240601)
    run = tmp_path / "run"
    ckpts = run / "checkpoints"
    last = ckpts / "last.pt"
    step, kills, left_temporaries = 0, 0, 0
    for i in range(5):
        proc = train_proc(run, data_root, tok_cache, *RUN, *(("train.resume=true",) if i else ()), tag=f"kill{i}")
        # a seeded moment: a few updates after this process's first checkpoint, anywhere inside an update or save
        # (an update and its save take a few ms on the tiny model: the pause stays short, or a fast
        # machine ends the run before three kills)
        target = min(step + rng.randint(1, 3), STEPS)
        wait_until(lambda: checkpoint_step(last) >= target, proc, what=f"the checkpoint of step {target}")
        time.sleep(rng.uniform(0.0, 0.05))
        if not proc.running():              # a fast machine finished the run meanwhile: nothing left to kill
            break
        proc.send(signal.SIGKILL)
        assert proc.wait()[0] == -signal.SIGKILL
        kills += 1
        ck = load_checkpoint(last)                      # never truncated, never half-written
        assert ck["step"] >= target
        step = ck["step"]
        left_temporaries += bool(list(ckpts.glob(TEMP_GLOB)))
    assert kills >= 3
    rc, out = train_proc(run, data_root, tok_cache, *RUN, "train.resume=true", tag="end").wait()
    assert_clean_exit(rc, out, 0, f"resuming from {last} (step {step})")
    assert_same_params(reference, last)
    assert not list(ckpts.glob(TEMP_GLOB)), "temporaries of killed saves were not cleaned up"
    # the files tell one consistent story: best.pt is the best step last.pt knows of, one metrics row per step
    final = load_checkpoint(last)
    assert final["step"] == STEPS
    assert load_checkpoint(ckpts / "best.pt")["step"] == final["early_stopping"]["best_step"]
    train_steps = [int(r["step"]) for r in read_metrics(run / "metrics.csv") if r["loss"] is not None]
    assert train_steps == list(range(2, STEPS + 1, 2))
    print(f"{kills} kills, {left_temporaries} of them during a save (a temporary file was left behind)")


def test_resuming_a_finished_run_trains_no_further(reference, data_root, tok_cache, tmp_path):
    """A run killed after its last update but before it exited must not train past max_steps on resume."""
    (tmp_path / "checkpoints").mkdir()
    shutil.copy(reference, tmp_path / "checkpoints" / "last.pt")
    with single_thread():
        summary = train(compose_cfg(data_root, tok_cache, *RUN, "train.resume=true"), tmp_path)
    assert summary["step"] == STEPS and summary["stop_reason"] == f"reached train.max_steps={STEPS}"
    assert_same_params(reference, tmp_path / "checkpoints" / "last.pt")
