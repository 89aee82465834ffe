"""Helpers for the fault tests: real ``scripts/train.py`` / ``scripts/translate.py`` processes.

Not a test module (pytest collects ``test_*.py`` only); the test files import it
by name, since pytest puts ``tests/`` on ``sys.path``.
"""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from conftest import REPO_ROOT, TINY
from nmt.checkpoint import CheckpointError, load_checkpoint

TRAIN = REPO_ROOT / "scripts" / "train.py"
TRANSLATE = REPO_ROOT / "scripts" / "translate.py"


def child_env() -> dict:
    env = dict(os.environ)
    env.pop("HYDRA_FULL_ERROR", None)   # the one-line error messages are what we check
    env["PYTHONUNBUFFERED"] = "1"
    # the tiny model runs twice as fast on one thread, and the children share 2 cores with pytest;
    # in-process reference runs use one thread too (single_thread), so results are bitwise comparable
    env["OMP_NUM_THREADS"] = "1"
    return env


@contextlib.contextmanager
def single_thread():
    """Run in-process training on one thread, like the child processes."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class Proc:
    """A child process whose stdout+stderr go to a file (no pipe to fill up and block it)."""

    def __init__(self, args: list[str], log: Path):
        self.log = log
        with open(log, "wb") as out:
            self.p = subprocess.Popen([sys.executable, *map(str, args)], cwd=REPO_ROOT, env=child_env(),
                                      stdout=out, stderr=subprocess.STDOUT)

    def running(self) -> bool:
        return self.p.poll() is None

    def send(self, sig: int) -> None:
        self.p.send_signal(sig)

    def wait(self, timeout: float = 240) -> tuple[int, str]:
        try:
            rc = self.p.wait(timeout)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait()
            raise AssertionError(f"{self.p.args} did not finish in {timeout} s:\n{self.output()[-3000:]}")
        return rc, self.output()

    def output(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")

    def stop(self) -> None:
        if self.running():
            self.p.kill()
            self.p.wait()


def compose_cfg(data_root: Path, tok_cache: Path, *overrides: str):
    """The validated Config that ``train_proc`` with the same overrides would train with."""
    from hydra import compose, initialize_config_dir

    from nmt.config import conf_dir, register_configs, to_config

    register_configs()
    # later settings of a key replace earlier ones (Hydra refuses a key given twice)
    by_key = {o.split("=", 1)[0]: o for o in (*TINY, f"data.root={data_root}", f"tokenizer.cache_dir={tok_cache}",
                                              *overrides)}
    with initialize_config_dir(str(conf_dir()), version_base="1.3"):
        dcfg = compose("config", overrides=list(by_key.values()))
    return to_config(dcfg)


# a short finished run: checkpoints/{last,best,step-4,step-8}.pt at step 8
TRAINED = ("train.max_steps=8", "train.valid_every=4", "train.save_every=1", "train.keep_last=3")
_trained: dict[Path, Path] = {}


def trained_run(base: Path, data_root: Path, tok_cache: Path) -> Path:
    """Train the TRAINED run once per test session (in-process, one thread) under ``base``; returns its
    run directory. Tests copy it before changing anything."""
    if base not in _trained:
        from nmt.train import train

        run_dir = base / "trained-run"
        with single_thread():
            train(compose_cfg(data_root, tok_cache, *TRAINED), run_dir)
        _trained[base] = run_dir
    return _trained[base]


def train_proc(run_dir: Path, data_root: Path, tok_cache: Path, *overrides: str, tag: str = "") -> Proc:
    """Start ``scripts/train.py`` with the TINY settings in ``run_dir`` (Hydra's run directory)."""
    args = [TRAIN, *TINY, f"data.root={data_root}", f"tokenizer.cache_dir={tok_cache}", f"hydra.run.dir={run_dir}",
            *overrides]
    return Proc(args, run_dir.parent / f"{run_dir.name}{tag}.out")


def run_train(run_dir: Path, data_root: Path, tok_cache: Path, *overrides: str, timeout: float = 240,
              tag: str = "") -> tuple[int, str]:
    return train_proc(run_dir, data_root, tok_cache, *overrides, tag=tag).wait(timeout)


def run_translate(checkpoint: Path, src: Path, out: Path, *flags: str, timeout: float = 240,
                  log: Optional[Path] = None) -> tuple[int, str]:
    proc = Proc([TRANSLATE, "--checkpoint", checkpoint, "--input", src, "--output", out, *flags],
                log or out.with_name(out.name + ".log"))
    return proc.wait(timeout)


def wait_until(cond: Callable[[], bool], proc: Proc, timeout: float = 180, what: str = "") -> None:
    """Poll ``cond`` until it holds; fail early (with the child's output) if the child exits first."""
    end = time.monotonic() + timeout
    while not cond():
        if not proc.running():
            if cond():                          # it held when the child exited
                return
            raise AssertionError(f"the process exited (rc {proc.p.returncode}) before {what}:\n{proc.output()[-3000:]}")
        if time.monotonic() > end:
            proc.stop()
            raise AssertionError(f"timed out waiting for {what}:\n{proc.output()[-3000:]}")
        time.sleep(0.05)


def checkpoint_step(path: Path) -> int:
    """Step of a checkpoint, -1 while it does not exist (it is replaced atomically, so a read is safe)."""
    try:
        return load_checkpoint(path)["step"]
    except CheckpointError:
        if path.exists():
            raise
        return -1


def params(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["model"]


def assert_same_params(a: Path, b: Path) -> None:
    pa, pb = params(a), params(b)
    assert pa.keys() == pb.keys()
    for k in pa:
        assert torch.equal(pa[k], pb[k]), f"{k} differs between {a} and {b}"


def assert_clean_exit(rc: int, out: str, expected_rc: int, *phrases: str) -> None:
    """Exit code as expected, the phrases in the output, no Python traceback."""
    assert rc == expected_rc, f"exit code {rc}, expected {expected_rc}:\n{out[-3000:]}"
    assert "Traceback" not in out, out[-3000:]
    for phrase in phrases:
        assert phrase in out, f"{phrase!r} not in the output:\n{out[-3000:]}"
