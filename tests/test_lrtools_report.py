"""``lr.py report`` on a synthetic multirun (one run diverged), its statistics, and its errors."""
from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest

from nmt.lrtools.cli import main
from nmt.lrtools.report import correlations, distinguishing_keys, edge_advice, override_map
from nmt.lrtools.rundir import Run
from nmt.lrtools.stats import pearson, ranks, spearman
from test_lrtools_synth import make_cfg, write_run

# factor -> scenario; the runs differ in optim.factor only (warmup is the same in all)
SWEEP = {0.5: "healthy", 1.0: "healthy", 2.0: "overfitting", 8.0: "diverged"}


@pytest.fixture
def multirun(tmp_path):
    root = tmp_path / "multirun" / "2024-01-01" / "12-00-00"
    for job, (factor, scenario) in enumerate(SWEEP.items()):
        summary = {"diverged": True, "stop_reason": "diverged: 10 non-finite updates in a row"} \
            if scenario == "diverged" else None
        write_run(root / str(job), scenario, cfg=make_cfg(factor=factor), summary=summary,
                  overrides=[f"optim.factor={factor}", "optim.warmup_steps=100"],
                  steps=1000 if factor != 0.5 else 600)   # the smallest LR: a shorter run, lower BLEU
    (root / "multirun.yaml").write_text("hydra: {}\n", encoding="utf-8")
    return root


def test_report_finds_the_best_run_and_flags_the_diverged_one(multirun, capsys):
    assert main(["report", str(multirun)]) == 0
    out = capsys.readouterr().out
    info = json.loads((multirun / "insights.json").read_text(encoding="utf-8"))
    assert info["runs"] == 4 and info["metric"] == "bleu"
    assert info["distinguishing_overrides"] == ["optim.factor"]
    assert info["best"]["run"] == "1" and info["best"]["overrides"] == ["optim.factor=1.0", "optim.warmup_steps=100"]
    assert info["best"]["factor"] == 1.0 and info["best"]["peak_lr"] == pytest.approx((64 * 100) ** -0.5)
    assert [d["run"] for d in info["diverged"]] == ["3"] and "summary.json: diverged" in info["diverged"][0]["reason"]
    assert info["source_ignored"] == [] and "lies inside the range tried" in info["advice"][0]
    c = info["correlation_with_log10_peak_lr"]["bleu"]
    assert c["n"] == 4 and -1 <= c["pearson"] <= 1 and -1 <= c["spearman"] <= 1
    with open(multirun / "summary.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [r["run"] for r in rows] == ["0", "1", "2", "3"]
    assert [r["diverged"] for r in rows] == ["False", "False", "False", "True"]
    assert [float(r["optim.factor"]) for r in rows] == [0.5, 1.0, 2.0, 8.0]
    for col in ("best_valid_loss", "best_ppl", "best_bleu", "best_chrf", "best_acc", "best_step", "stop_reason",
                "best_src_gain", "best_distinct", "final_bleu", "final_valid_loss", "schedule", "warmup_steps"):
        assert col in rows[0]
    assert rows[2]["best_step"] == "450" and rows[2]["final_valid_loss"] > rows[2]["best_valid_loss"]
    md = (multirun / "summary.md").read_text(encoding="utf-8")
    assert md in out and "**Best by bleu:** `1`" in md and "## Diverged runs" in md
    assert (multirun / "metric_vs_lr.png").stat().st_size > 1000
    assert (multirun / "curves.png").stat().st_size > 1000 and "(curves.png)" in md


def test_report_metric_and_out(multirun, tmp_path, capsys):
    out = tmp_path / "rep"
    assert main(["report", str(multirun), "--metric", "valid_loss", "--out", str(out)]) == 0
    info = json.loads((out / "insights.json").read_text(encoding="utf-8"))
    assert info["metric"] == "valid_loss" and info["best"]["run"] == "1"
    assert not (multirun / "insights.json").exists()


def test_report_on_a_parent_folder_and_run_names(multirun, capsys):
    assert main(["report", str(multirun.parent.parent)]) == 0     # multirun/: runs are found below
    info = json.loads((multirun.parent.parent / "insights.json").read_text(encoding="utf-8"))
    assert info["best"]["run"] == "2024-01-01/12-00-00/1"


@pytest.mark.parametrize("make,message", [
    (lambda p: p / "nope", "does not exist"),
    (lambda p: p, "holds no training runs"),
])
def test_report_errors(tmp_path, capsys, make, message):
    (tmp_path / "empty").mkdir()
    assert main(["report", str(make(tmp_path / "empty"))]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_override_helpers(tmp_path):
    runs = [Run(tmp_path, [], [], overrides=o) for o in
            (["optim.factor=1", "model=tiny"], ["optim.factor=2", "model=tiny"], ["optim.factor=2", "+x=1"])]
    assert distinguishing_keys(runs) == ["optim.factor", "model", "x"]
    assert override_map(["~a", "+b=2"]) == {"a": "", "b": "2"}


def test_statistics_against_hand_computed_values():
    x, y = [1.0, 2.0, 3.0, 4.0], [2.0, 4.0, 5.0, 4.5]
    assert pearson(x, y) == pytest.approx(np.corrcoef(x, y)[0, 1])
    assert spearman(x, y) == pytest.approx(0.8)
    assert ranks([3.0, 1.0, 3.0]) == [2.5, 1.0, 2.5]
    assert pearson([1, 2], [3, 4]) is None and pearson([1, 1, 1], [1, 2, 3]) is None
    rows = [{"peak_lr": lr, "best_bleu": b} for lr, b in ((1e-4, 10.0), (1e-3, 20.0), (1e-2, 30.0), (1e-1, math.nan))]
    c = correlations(rows)["bleu"]
    assert c == {"pearson": pytest.approx(1.0), "spearman": pytest.approx(1.0), "n": 3}


def test_a_best_run_at_the_edge_of_the_sweep_asks_for_a_wider_sweep():
    rows = [{"peak_lr": p} for p in (1e-4, 1e-3, 1e-2)]
    assert "extend the sweep downwards" in edge_advice(rows, rows[0])[0]
    assert "extend the sweep upwards" in edge_advice(rows, rows[2])[0]
    assert edge_advice(rows[:2], rows[0]) == []          # two runs say nothing about an optimum
