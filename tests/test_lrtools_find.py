"""``lr.py find``: the LR range test on the tiny model and a slice of the embedded corpus, and its pure parts."""
from __future__ import annotations

import csv
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import QUICK
from nmt.lrtools import LRToolError
from nmt.lrtools.cli import compose_config, main
from nmt.lrtools.find import lr_ladder, stop_reason, suggest
from nmt.lrtools.stats import ema_smooth
from nmt.schedules import noam_factor_for_peak


def test_ladder_is_geometric_from_min_to_max():
    lrs = lr_ladder(1e-7, 1.0, 8)
    assert lrs[0] == 1e-7 and lrs[-1] == pytest.approx(1.0)
    assert all(b / a == pytest.approx(10.0) for a, b in zip(lrs, lrs[1:]))
    for lo, hi, n in ((0.0, 1.0, 10), (1.0, 0.1, 10), (1e-7, 1.0, 1), (1e-7, math.inf, 10)):
        with pytest.raises(LRToolError):
            lr_ladder(lo, hi, n)


@settings(max_examples=50, deadline=None)
@given(st.floats(0.1, 100.0), st.floats(0.0, 0.99), st.integers(1, 50))
def test_bias_corrected_ema_of_a_constant_is_that_constant(value, beta, n):
    assert ema_smooth([value] * n, beta) == pytest.approx([value] * n)


def test_ema_matches_its_definition():
    avg1 = 0.5 * 4.0                      # beta 0.5: avg = 0.5 * avg + 0.5 * x, divided by 1 - 0.5^i
    avg2 = 0.5 * avg1 + 0.5 * 2.0
    avg3 = 0.5 * avg2 + 0.5 * 3.0
    assert ema_smooth([4.0, 2.0, 3.0], 0.5) == pytest.approx([avg1 / 0.5, avg2 / 0.75, avg3 / 0.875])


def test_suggestions_on_a_textbook_curve():
    lrs = lr_ladder(1e-6, 1.0, 121)                 # 20 points per decade
    # flat, a fall centred on 1e-3 (steepest there), a minimum near 1e-1, then a blow-up
    loss = [5 - 2 * math.tanh(2 * (math.log10(lr) + 3)) + 40 * max(0.0, math.log10(lr) + 1) ** 2 for lr in lrs]
    s = suggest(lrs, loss)
    assert s.steepest == pytest.approx(1e-3, rel=0.15)
    assert 3e-2 < s.min_loss_lr < 2e-1 and s.min_over_10 == pytest.approx(s.min_loss_lr / 10)
    assert s.recommended == min(s.steepest, s.min_over_10)
    assert suggest([1e-3], [math.nan]).recommended is None


def test_stop_rule():
    assert stop_reason(5.0, 2.0, 4.0) is None
    assert "exploded" in stop_reason(8.5, 2.0, 4.0)
    assert "non-finite" in stop_reason(math.nan, 2.0, 4.0)


@pytest.mark.slow
def test_range_test_on_the_tiny_model_stops_on_explosion_and_saves_no_weights(tmp_path, capsys, data_root,
                                                                              monkeypatch, one_thread):
    monkeypatch.setenv("NMT_DATA_DIR", str(data_root))
    monkeypatch.chdir(tmp_path)
    overrides = ["model=tiny", f"data.name={QUICK}", "tokenizer.vocab_size=800", "data.train_limit=300",
                 "train.max_tokens=500", f"tokenizer.cache_dir={tmp_path / 'tok'}"]
    assert main(["find", *overrides, "--min", "1e-4", "--max", "100", "--steps", "60"]) == 0
    out = capsys.readouterr().out
    with open(tmp_path / "lr_find.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) < 60 and "stopped at step" in out and ("exploded" in out or "non-finite" in out)
    lrs = [float(r["lr"]) for r in rows]
    assert lrs == lr_ladder(1e-4, 100, 60)[:len(rows)]
    losses, smoothed = [float(r["loss"]) for r in rows], [float(r["smoothed_loss"]) for r in rows]
    assert smoothed[:-1] == pytest.approx(ema_smooth(losses, 0.9)[:-1], rel=1e-4)
    assert smoothed[-1] > 4 * min(smoothed) or not math.isfinite(smoothed[-1])
    assert (tmp_path / "lr_find.png").stat().st_size > 5000
    # the advice: a peak LR and the setting of the configured schedule (wsd, the default) that gives it
    s = suggest(lrs, smoothed)
    assert s.recommended is not None and 1e-4 <= s.recommended <= 100
    assert f"wsd: optim.lr={s.recommended:.2g} sets that peak" in out
    # nothing but the curve was written: no checkpoint, no run directory
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lr_find.csv", "lr_find.png", "tok", "tokens"]   # + caches
    assert not list(tmp_path.rglob("*.pt"))


def test_find_rejects_a_bad_range_before_loading_anything(capsys):
    assert main(["find", "model=tiny", "--min", "1", "--max", "0.1"]) == 2
    assert "0 < --min < --max" in capsys.readouterr().err


def test_find_advice_for_other_schedules():
    from nmt.lrtools.find import Suggestion, advice
    lines = advice(compose_config(["optim=inverse_sqrt"]), Suggestion(1e-3, 1e-1, 3.0))
    assert lines[-2] == "inverse_sqrt: optim.lr=0.001 sets that peak"
    assert "sweep: python scripts/train.py -m optim.lr=0.001,0.0032,0.01 " in lines[-1]
    noam = advice(compose_config(["optim=noam", "model=tiny", "optim.warmup_steps=200"]), Suggestion(1e-3, 1e-1, 3.0))
    factors = [noam_factor_for_peak(p, 32, 200) for p in (1e-3, 1e-2)]
    assert f"optim.factor={factors[0]:.2g}," in noam[-1] and f",{factors[1]:.2g} " in noam[-1]
