"""``lr.py plot``: the CSV is lr_at for every step, the facts are right, errors are one line."""
from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import QUICK
from nmt.lrtools.cli import compose_config, main
from nmt.lrtools.plot import schedule, schedule_facts, updates_per_epoch
from nmt.schedules import SCHEDULES, lr_at, peak_lr

REPO = Path(__file__).resolve().parents[1]


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_noam_warmup_4000_ends_after_1_23_epochs_of_3262_batches(tmp_path, capsys):
    overrides = ["optim=noam", "model.d_model=512", "optim.warmup_steps=4000"]
    assert main(["plot", *overrides, "--steps", "20000", "--batches-per-epoch", "3262", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "warmup ends at step 4,000 = epoch 1.23" in out
    cfg = compose_config(overrides)
    peak = peak_lr(cfg.optim, 512)
    assert f"peak LR: {peak:.2e} at step 4,000" in out
    five = lr_at(16310, cfg.optim, 512)                 # end of epoch 5 = step 5 * 3262
    assert f"end of epoch 5 (step 16,310): LR {five:.2e} = {100 * five / peak:.1f}% of peak" in out
    assert "warmup (4,000 steps) is longer than one epoch" in out
    assert "warmup takes" not in out          # 4,000 of 30 epochs' 97,860 updates
    rows = read_csv(tmp_path / "lr_schedule.csv")
    assert len(rows) == 20000 and rows[0]["step"] == "1"
    for r in rows[::97]:
        s = int(r["step"])
        assert float(r["lr"]) == lr_at(s, cfg.optim, 512)          # written with repr: exact
        assert float(r["epoch"]) == pytest.approx(s / 3262, abs=1e-6)
    assert (tmp_path / "lr_schedule.png").stat().st_size > 5000


@pytest.mark.parametrize("name", SCHEDULES)
def test_every_schedule_tabulates_lr_at(name):
    cfg = compose_config([f"optim={name}", "train.max_steps=3000", "optim.warmup_steps=300"])
    per_epoch = updates_per_epoch(1000, cfg.train.accumulate)
    lrs = schedule(cfg, 3000, 3000)
    assert lrs == [lr_at(s, cfg.optim, cfg.model.d_model, 3000) for s in range(1, 3001)]
    facts = schedule_facts(cfg, lrs, per_epoch, [1, 2, 5])
    assert [e.step for e in facts.at_epochs] == [1000, 2000] and "epoch 5 (step 5,000) is past" in facts.notes[0]
    assert facts.at_epochs[0].pct_of_peak == pytest.approx(100 * lrs[999] / facts.peak_lr)
    assert facts.warmup_end_epoch == pytest.approx(0.3)
    assert any("plateau" in n for n in facts.notes) == (name == "plateau")


def test_accumulation_divides_batches_into_updates():
    assert updates_per_epoch(3262, 1) == 3262 and updates_per_epoch(3262, 4) == 816


def test_batches_per_epoch_from_real_data(tmp_path, capsys, data_root, monkeypatch):
    monkeypatch.setenv("NMT_DATA_DIR", str(data_root))
    overrides = ["model=tiny", f"data.name={QUICK}", "tokenizer.vocab_size=800", "data.train_limit=300",
                 "train.max_tokens=500", "train.max_steps=100", f"tokenizer.cache_dir={tmp_path / 'tok'}"]
    assert main(["plot", *overrides, "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "the tokenizer is trained on first use and cached" in out
    assert "computed from 300 training pairs" in out
    assert "training stops at step 100, before warmup ends" in out
    assert len(read_csv(tmp_path / "lr_schedule.csv")) == 100          # default --steps: the training length


@pytest.mark.parametrize("args,message", [
    (["optim=nosuch"], "choose one of: constant, cosine, cosine_restarts, inverse_sqrt, noam, plateau"),
    (["optim.name=nosuch"], "choose one of: noam, inverse_sqrt, cosine, cosine_restarts, constant, plateau"),
    (["optim.nme=1"], "Could not override 'optim.nme'"),
    (["optim.factor=abc"], "could not be converted to Float"),
    (["--batches-per-epoch", "0"], "--batches-per-epoch must be > 0"),
])
def test_one_line_errors(tmp_path, capsys, args, message):
    assert main(["plot", "--batches-per-epoch", "100", *args, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_script_entry_point_gives_one_line_errors_without_traceback(tmp_path):
    run = subprocess.run([sys.executable, str(REPO / "scripts" / "lr.py"), "plot", "optim=nosuch", "--steps", "10",
                          "--batches-per-epoch", "10"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2, run.stderr
    assert run.stderr.startswith("lr.py plot: error:") and run.stderr.count("\n") == 1
    assert "Traceback" not in run.stderr and not list(tmp_path.iterdir())


def test_usage_and_unknown_command(capsys):
    assert main([]) == 2 and "commands:" in capsys.readouterr().out
    assert main(["plto"]) == 2 and "unknown command 'plto'" in capsys.readouterr().err
