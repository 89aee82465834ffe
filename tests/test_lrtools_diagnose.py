"""``lr.py diagnose`` on synthetic runs, one per finding, and its one-line errors."""
from __future__ import annotations

import json
import re

import pytest

from nmt.lrtools import diagnose as lib
from nmt.lrtools.cli import main
from nmt.lrtools.rundir import load_run
from test_lrtools_synth import make_cfg, write_run


def diagnose(tmp_path, capsys, scenario: str, cli: bool = False, **kw) -> tuple[dict, str, str]:
    """(diagnosis.json, diagnosis.md, stdout) of a synthetic run; ``cli`` goes through
    ``lr.py diagnose`` and its files (plots included), else the library is called directly."""
    run = write_run(tmp_path / scenario, scenario, **kw)
    if not cli:
        d = lib.diagnose(load_run(run))
        return json.loads(json.dumps(lib.to_json(d))), lib.to_markdown(d), ""
    assert main(["diagnose", str(run)]) == 0
    out = capsys.readouterr().out
    md = (run / "diagnosis.md").read_text(encoding="utf-8")
    assert md in out                                  # printed as well as written
    for name in ("loss_curves.png", "lr_gradnorm.png"):
        assert (run / name).stat().st_size > 1000
    return json.loads((run / "diagnosis.json").read_text(encoding="utf-8")), md, out


def test_healthy_run(tmp_path, capsys):
    js, md, _ = diagnose(tmp_path, capsys, "healthy", cli=True)
    assert "healthy" in js["findings"]
    assert not {"source_ignored", "diverged", "overfitting", "lr_mismatch", "plateau"} & set(js["findings"])
    assert "logged LR matches the configured schedule at all" in md
    assert "warmup 100 steps = 0.50 epochs" in md
    assert js["facts"]["best_step"] == 1000 and "still_improving" in js["findings"]


def test_overfitting_run(tmp_path, capsys):
    js, md, _ = diagnose(tmp_path, capsys, "overfitting")
    assert "overfitting" in js["findings"] and "healthy" not in js["findings"]
    f = next(d for d in js["details"] if d["code"] == "overfitting")
    assert 400 <= f["data"]["onset_step"] <= 550
    assert js["facts"]["best_step"] == 450 and js["facts"]["steps_past_best"] == 550
    assert "model.dropout=0.4" in md and "train.early_stopping.patience=" in md


def test_diverging_run(tmp_path, capsys):
    js, md, _ = diagnose(tmp_path, capsys, "diverged",
                         summary={"diverged": True, "stop_reason": "diverged: 10 non-finite updates in a row"})
    assert js["findings"][0] == "diverged" and "grad_explosion" in js["findings"]
    assert "summary.json: diverged" in md
    assert "try optim.factor=" in md and "for a peak of" in md   # advice with numbers


def test_source_ignored_is_reported_first(tmp_path, capsys):
    js, md, _ = diagnose(tmp_path, capsys, "source_ignored", cli=True)
    assert js["findings"][0] == "source_ignored"
    assert "plateau" in js["findings"]                # the flat dev loss is found too, but listed after
    first = md.index("## 1.")
    assert "ignores its source" in md[first:md.index("## 2.")]
    f = js["details"][0]
    assert f["data"]["since_step"] == 200 and f["data"]["distinct"] == pytest.approx(0.2)
    assert "peak LR" in md and "warmup 100 steps" in md
    assert re.search(r"share_embeddings=(all|decoder|none)\b", md)


def test_few_distinct_translations_count_as_source_ignored(tmp_path, capsys):
    js, md, _ = diagnose(tmp_path, capsys, "few_distinct")
    assert js["findings"][0] == "source_ignored" and "few distinct translations" in js["details"][0]["title"]
    assert "blank source" not in md


def test_lr_mismatch_catches_a_10x_factor_typo(tmp_path, capsys):
    js, md, _ = diagnose(tmp_path, capsys, "healthy", lr_scale=10.0)   # trained with factor 10, config says 1
    assert "lr_mismatch" in js["findings"] and "healthy" not in js["findings"]
    f = next(d for d in js["details"] if d["code"] == "lr_mismatch")
    assert f["data"]["ratio"] == pytest.approx(10.0) and f["data"]["mismatches"] == f["data"]["checked"]
    assert "every logged LR is 10x the configured one" in md


def test_tiny_lr_error_beyond_1e9_is_a_mismatch(tmp_path, capsys):
    js, _, _ = diagnose(tmp_path, capsys, "healthy", lr_scale=1 + 1e-6)
    assert "lr_mismatch" in js["findings"]


def test_plateau_schedule_is_checked_until_its_first_reduction(tmp_path, capsys):
    cfg = make_cfg(name="plateau", lr=5e-4, plateau_patience=2, plateau_factor=0.5)
    js, md, _ = diagnose(tmp_path, capsys, "overfitting", cfg=cfg)
    assert "lr_mismatch" not in js["findings"]
    assert "checked only up to step 550" in md                  # best at 450, then 2 validations without improvement


def test_grad_spike(tmp_path, capsys):
    js, md, _ = diagnose(tmp_path, capsys, "grad_spikes")
    f = next(d for d in js["details"] if d["code"] == "grad_spikes")
    assert f["data"]["steps"] == [600]


def test_warmup_longer_than_an_epoch(tmp_path, capsys):
    js, md, _ = diagnose(tmp_path, capsys, "healthy", cfg=make_cfg(warmup_steps=500))
    assert "warmup_longer_than_epoch" in js["findings"]
    assert "warmup 500 steps = 2.50 epochs" in md and "optim.warmup_steps=200" in md


def test_warmup_of_about_one_epoch_is_no_finding():
    from nmt.lrtools.checks import WARMUP_EPOCHS_TOLERANCE, warmup_vs_epoch
    assert warmup_vs_epoch(600, 562, None) is None                   # the default: 1.07 epochs
    assert warmup_vs_epoch(int(WARMUP_EPOCHS_TOLERANCE * 562), 562, None) is None
    f = warmup_vs_epoch(int(WARMUP_EPOCHS_TOLERANCE * 562) + 1, 562, None)
    assert f is not None and f.code == "warmup_longer_than_epoch"
    assert warmup_vs_epoch(4000, None, None) is None                  # epoch length unknown: no claim


def test_out_dir_and_run_without_config(tmp_path, capsys):
    run = write_run(tmp_path / "run")
    (run / "config.yaml").unlink()
    (run / ".hydra" / "overrides.yaml").unlink()
    assert main(["diagnose", str(run), "--out", str(tmp_path / "elsewhere")]) == 0
    assert "no config.yaml" in capsys.readouterr().out
    assert (tmp_path / "elsewhere" / "diagnosis.json").is_file() and not (run / "diagnosis.json").exists()


def header_only(p):
    (p / "metrics.csv").write_text("step,epoch,lr,loss\n", encoding="utf-8")
    return p


@pytest.mark.parametrize("setup,message", [
    (lambda p: p / "missing", "does not exist"),
    (lambda p: p, "has no metrics.csv"),
    (header_only, "has no training or validation rows yet"),
])
def test_one_line_errors(tmp_path, capsys, setup, message):
    assert main(["diagnose", str(setup(tmp_path))]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
