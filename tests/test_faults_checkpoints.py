"""Damaged checkpoints, full disks, unwritable folders, diverging weights, mismatched resumes.

Each fault is caused for real (bytes cut or flipped on disk, a process killed
while it writes, a save that runs out of space, an absurd learning rate); the
checks are what a user needs: a one-line message naming the file or setting,
and the earlier checkpoints intact.
"""
from __future__ import annotations

import errno
import io
import json
import os
import random
import shutil
import signal
import time
import zipfile
from pathlib import Path

import pytest
import torch

import nmt.checkpoint as ckpt_mod
from nmt.checkpoint import (FORMAT, TEMP_GLOB, CheckpointError, CheckpointManager, atomic_save,
                            candidate_checkpoints, load_checkpoint)
from nmt.optim import ScheduledOptimizer
from nmt.train import TrainingError, train
from trainproc import (Proc, assert_clean_exit, compose_cfg, run_train, single_thread, trained_run, wait_until)


@pytest.fixture
def run(tmp_path_factory, data_root, tok_cache, tmp_path) -> Path:
    """A private copy of a short finished run (checkpoints at steps 4 and 8)."""
    src = trained_run(tmp_path_factory.getbasetemp(), data_root, tok_cache)
    dst = tmp_path / "run"
    shutil.copytree(src, dst)
    return dst


def small_checkpoint(step: int = 3) -> dict:
    g = torch.Generator().manual_seed(step)
    return {"format": FORMAT, "model": {"w": torch.randn(64, 64, generator=g), "b": torch.zeros(64)},
            "config": {"note": "not a real config"}, "tokenizer": {"src_model": b"\x00\x01" * 50}, "step": step}


def same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return a == b


def all_finite_on_disk(folder: Path) -> list[str]:
    """Names of the .pt files in ``folder`` that hold a NaN or inf anywhere in their float tensors."""
    bad = []
    for p in sorted(folder.glob("*.pt")):
        obj = load_checkpoint(p)
        tensors = [t for t in obj["model"].values() if t.is_floating_point()]
        if not all(torch.isfinite(t).all() for t in tensors):
            bad.append(p.name)
    return bad


def no_space_after(n_ok: int, monkeypatch) -> None:
    """From the (n_ok+1)-th call on, torch.save writes half the file and then fails like a full disk."""
    real = torch.save
    calls = {"n": 0}

    def save(obj, f, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] <= n_ok:
            return real(obj, f, *args, **kwargs)
        buf = io.BytesIO()
        real(obj, buf, *args, **kwargs)
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
        f.flush()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", save)


# ----------------------------------------------------------------------------- damaged files
def test_every_flipped_bit_is_detected_or_harmless(tmp_path):
    path = tmp_path / "c.pt"
    atomic_save(small_checkpoint(), path)
    good, ref = path.read_bytes(), load_checkpoint(path)
    rng = random.Random(7)
    detected = 0
    for _ in range(150):
        data = bytearray(good)
        data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        path.write_bytes(bytes(data))
        try:
            obj = load_checkpoint(path)
        except CheckpointError as e:
            assert str(path) in str(e) and "\n" not in str(e)
            detected += 1
        else:  # padding, timestamps, attributes: bytes that do not change what is loaded
            assert same(obj, ref)
    assert detected > 100
    for cut in sorted(rng.sample(range(len(good)), 20)):
        path.write_bytes(good[:cut])
        with pytest.raises(CheckpointError, match="truncated or corrupt"):
            load_checkpoint(path)


def flip_inside_tensor_data(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as z:
        member = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
        data = z.read(member)
    pos = raw.find(data) + len(data) // 2
    raw[pos] ^= 0x10
    path.write_bytes(bytes(raw))


@pytest.mark.slow
def test_resume_skips_damaged_checkpoints_and_says_which(run, data_root, tok_cache):
    ck = run / "checkpoints"
    last = ck / "last.pt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])      # cut off
    flip_inside_tensor_data(ck / "step-8.pt")                           # one bit of one weight
    rc, out = run_train(run, data_root, tok_cache, "train.max_steps=10", "train.valid_every=4", "train.resume=true")
    assert_clean_exit(rc, out, 0, f"{last} is not a readable checkpoint (truncated or corrupt?)",
                      f"{ck / 'step-8.pt'} is corrupt", "CRC-32", f"resuming from {ck / 'step-4.pt'} (step 4) because a newer checkpoint was unreadable")
    assert load_checkpoint(last)["step"] == 10


@pytest.mark.slow
def test_resume_with_no_readable_checkpoint_fails_in_one_line(run, data_root, tok_cache):
    files = candidate_checkpoints(run / "checkpoints")
    for p in files:
        p.write_bytes(p.read_bytes()[:1000])
    rc, out = run_train(run, data_root, tok_cache, "train.max_steps=10", "train.resume=true")
    assert_clean_exit(rc, out, 2, "no readable checkpoint", *map(str, files))
    assert sum("ERROR" in line for line in out.splitlines()) == 1


# ----------------------------------------------------------------------------- killed while writing
KEEP_SAVING = """
import sys, torch
from pathlib import Path
from nmt.checkpoint import FORMAT, atomic_save
w, step = torch.zeros(16_000_000), 0          # 64 MB: a save takes long enough to be caught in the middle
while True:
    step += 1
    w.fill_(step)
    atomic_save({"format": FORMAT, "model": {"w": w}, "config": {}, "tokenizer": {}, "step": step},
                Path(sys.argv[1]) / "last.pt")
"""


@pytest.mark.slow
def test_kill_during_save_leaves_the_previous_file_and_a_temporary_that_is_cleaned(tmp_path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    rng = random.Random(3)
    caught = 0
    for i in range(3):
        proc = Proc(["-c", KEEP_SAVING, folder], tmp_path / f"saver{i}.out")
        before = set(folder.glob(TEMP_GLOB))
        wait_until(lambda: (folder / "last.pt").exists(), proc, what="the first save")
        wait_until(lambda: any(p.stat().st_size for p in set(folder.glob(TEMP_GLOB)) - before if p.exists()),
                   proc, what="a save in progress")
        time.sleep(rng.uniform(0.0, 0.05))
        proc.send(signal.SIGKILL)
        proc.wait()
        obj = load_checkpoint(folder / "last.pt")          # the previous complete save, never a partial one
        assert torch.equal(obj["model"]["w"], torch.full((16_000_000,), float(obj["step"])))
        caught += len(set(folder.glob(TEMP_GLOB)) - before) > 0
    assert caught >= 1, "no kill landed inside a save"
    assert candidate_checkpoints(folder) == [folder / "last.pt"]     # temporaries are never resume candidates
    CheckpointManager(folder, 0).prepare()                           # what a resumed run does first
    assert sorted(p.name for p in folder.iterdir()) == ["last.pt"]


# ----------------------------------------------------------------------------- no space, unwritable
def test_disk_full_during_save_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    atomic_save(small_checkpoint(1), path)
    before = path.read_bytes()
    no_space_after(0, monkeypatch)
    with pytest.raises(CheckpointError) as e:
        atomic_save(small_checkpoint(2), path)
    assert str(path) in str(e.value) and "No space left on device" in str(e.value)
    assert "previous checkpoint" in str(e.value) and "intact" in str(e.value)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]   # the partial temporary is removed


@pytest.mark.slow
def test_disk_full_mid_training_stops_with_the_last_good_checkpoint(run, data_root, tok_cache, monkeypatch):
    no_space_after(3, monkeypatch)                   # steps 9, 10, 11 save; step 12 runs out of space
    cfg = compose_cfg(data_root, tok_cache, "train.max_steps=14", "train.valid_every=100", "train.save_every=1",
                      "train.resume=true")
    with single_thread(), pytest.raises(CheckpointError, match="No space left on device"):
        train(cfg, run)
    ck = run / "checkpoints"
    assert load_checkpoint(ck / "last.pt")["step"] == 11
    assert not list(ck.glob(TEMP_GLOB))


@pytest.mark.slow
def test_unwritable_checkpoint_folder_fails_at_start(tmp_path, data_root, tok_cache):
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoints").write_text("a file where the checkpoints folder should be")
    rc, out = run_train(run, data_root, tok_cache, "train.max_steps=4")
    assert_clean_exit(rc, out, 2, f"cannot write checkpoints into {run / 'checkpoints'}", "is not a folder")
    assert "step 1" not in out                       # refused before any training


def test_save_writes_last_pt_after_the_other_files(tmp_path, monkeypatch):
    order = []
    monkeypatch.setattr(ckpt_mod, "atomic_save", lambda obj, path: order.append(Path(path).name))
    CheckpointManager(tmp_path, keep_last=2).save(small_checkpoint(5), best=True, periodic=True)
    assert order == ["best.pt", "step-5.pt", "last.pt"]


# ----------------------------------------------------------------------------- non-finite
@pytest.mark.slow
def test_absurd_learning_rate_aborts_with_exit_3_and_no_nonfinite_checkpoint(run, data_root, tok_cache):
    rc, out = run_train(run, data_root, tok_cache, "train.max_steps=30", "train.resume=true", "optim.lr=1e9",
                        "train.save_every=1", "train.max_bad_steps=3")
    assert_clean_exit(rc, out, 3, "non-finite update skipped", "aborting: 3 non-finite updates in a row",
                      "train.max_bad_steps=3")
    assert all_finite_on_disk(run / "checkpoints") == []
    assert json.loads((run / "summary.json").read_text())["diverged"] is True


@pytest.mark.slow
def test_weights_that_turn_nonfinite_are_never_saved(run, data_root, tok_cache, monkeypatch):
    real_step = ScheduledOptimizer.step

    def step(self, closure=None):                    # an update with a finite loss that still breaks the model
        out = real_step(self, closure)
        if self.step_num == 11:
            self.optimizer.param_groups[0]["params"][0].data.view(-1)[0] = float("inf")
        return out

    monkeypatch.setattr(ScheduledOptimizer, "step", step)
    cfg = compose_cfg(data_root, tok_cache, "train.max_steps=14", "train.save_every=1", "train.resume=true")
    with single_thread(), pytest.raises(TrainingError, match=r"weights became non-finite \(NaN/inf\) by step 11"):
        train(cfg, run)
    ck = run / "checkpoints"
    assert load_checkpoint(ck / "last.pt")["step"] == 10 and all_finite_on_disk(ck) == []
    assert json.loads((run / "summary.json").read_text())["stop_reason"] == "diverged: non-finite weights"


@pytest.mark.slow
def test_learning_rate_beyond_float32_is_an_abort_not_a_traceback(run, data_root, tok_cache):
    cfg = compose_cfg(data_root, tok_cache, "train.max_steps=12", "train.resume=true", "optim.lr=1e39")
    with single_thread(), pytest.raises(TrainingError, match="optimizer update failed at step 9"):
        train(cfg, run)
    assert all_finite_on_disk(run / "checkpoints") == []


# ----------------------------------------------------------------------------- mismatched resume
@pytest.mark.slow
def test_resume_with_another_model_shape_or_tokenizer_is_refused(run, data_root, tok_cache):
    rc, out = run_train(run, data_root, tok_cache, "train.max_steps=12", "train.resume=true", "model.d_model=64",
                        "tokenizer.vocab_size=1200")
    assert_clean_exit(rc, out, 2, f"cannot resume from {run / 'checkpoints' / 'last.pt'}",
                      "model.d_model: checkpoint 32, now 64", "tokenizer.vocab_size: checkpoint 1000, now 1200")
