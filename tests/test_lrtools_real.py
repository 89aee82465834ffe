"""The LR tools on real training: a 2-run Hydra sweep of scripts/train.py on a slice of the embedded corpus,
reported, one run diagnosed, and the schedule plot's epoch length checked against the trainer's."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import QUICK
from nmt.lrtools.cli import main

REPO = Path(__file__).resolve().parents[1]


def tiny_overrides(tmp: Path) -> list[str]:
    return ["model=tiny", "optim=noam", f"data.name={QUICK}", "tokenizer.vocab_size=800", "data.train_limit=300",
            "data.dev_limit=20", "train.max_tokens=500", "train.max_steps=20", "train.valid_every=5",
            "train.valid_every_epoch=false", "train.log_every=2", "train.early_stopping.patience=0",
            "valid.max_sentences=4", "train.progress=false", "optim.warmup_steps=10",
            f"tokenizer.cache_dir={tmp / 'tok'}"]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, data_root) -> Path:
    tmp = tmp_path_factory.mktemp("sweep")
    env = {**os.environ, "NMT_DATA_DIR": str(data_root), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(REPO / "scripts" / "train.py"), "-m", *tiny_overrides(tmp), "optim.factor=1,30",
           f"hydra.sweep.dir={tmp / 'multirun'}"]
    run = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return tmp / "multirun"


@pytest.mark.slow
def test_a_hydra_sweep_writes_one_run_per_setting(sweep):
    for job, factor in (("0", 1), ("1", 30)):
        run = sweep / job
        for name in ("metrics.csv", "summary.json", "config.yaml", ".hydra/overrides.yaml"):
            assert (run / name).is_file(), f"{run / name} missing"
        assert f"optim.factor={factor}" in OmegaConf.load(run / ".hydra" / "overrides.yaml")
        assert OmegaConf.load(run / "config.yaml").optim.factor == factor


@pytest.mark.slow
def test_report_and_diagnose_on_real_runs(sweep, capsys):
    assert main(["report", str(sweep)]) == 0
    info = json.loads((sweep / "insights.json").read_text(encoding="utf-8"))
    assert info["runs"] == 2 and info["distinguishing_overrides"] == ["optim.factor"]
    assert info["correlation_with_log10_peak_lr"]["valid_loss"]["n"] == 2
    assert [d["run"] for d in info["diverged"]] == ["1"]           # factor 30: a peak LR of 1.7 blows up
    assert info["best"]["run"] == "0"
    assert main(["diagnose", str(sweep / "0")]) == 0
    js = json.loads((sweep / "0" / "diagnosis.json").read_text(encoding="utf-8"))
    assert "lr_mismatch" not in js["findings"] and js["facts"]["lr_checked"] >= 10   # trainer LR == lr_at
    assert js["facts"]["best_step"] in (5, 10, 15, 20)
    assert (sweep / "0" / "loss_curves.png").is_file() and (sweep / "0" / "lr_gradnorm.png").is_file()


@pytest.mark.slow
def test_plot_counts_the_same_epoch_as_the_trainer(sweep, data_root, capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("NMT_DATA_DIR", str(data_root))
    assert main(["plot", *tiny_overrides(sweep.parent), "--out", str(tmp_path)]) == 0
    printed = re.search(r"-> ([\d,]+) updates per epoch", capsys.readouterr().out)
    trained = json.loads((sweep / "0" / "summary.json").read_text(encoding="utf-8"))["updates_per_epoch"]
    assert printed and float(printed.group(1).replace(",", "")) == trained
