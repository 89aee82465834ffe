"""Checkpoint averaging: the mean of the inputs, refused when they do not match, loadable by the
translator, and written by the trainer with train.average_last."""
from __future__ import annotations

import copy

import pytest
import torch

from conftest import tiny_config
from nmt.average import average_checkpoints, average_state_dicts, main
from nmt.checkpoint import CheckpointError, atomic_save, load_checkpoint, load_for_inference
from nmt.train import train

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module")
def run(tmp_path_factory, data_root, tok_cache):
    """A tiny run with validations (and step-N.pt) at steps 2, 4 and 6 and averaged.pt of the three."""
    cfg = tiny_config(data_root, tok_cache, "train.max_steps=6", "train.valid_every=2", "train.keep_last=1",
                      "train.average_last=3")
    out = tmp_path_factory.mktemp("run")
    summary = train(cfg, out)
    return out, summary


def test_trainer_writes_the_mean_of_the_last_checkpoints_and_validates_it(run):
    out, summary = run
    folder = out / "checkpoints"
    steps = [load_checkpoint(p) for p in sorted(folder.glob("step-*.pt"))]
    assert sorted(c["step"] for c in steps) == [2, 4, 6]              # keep_last raised to average_last
    averaged = load_checkpoint(folder / "averaged.pt")
    assert [a["step"] for a in averaged["averaged_from"]] == [2, 4, 6]
    for key, value in averaged["model"].items():
        mean = sum(c["model"][key].double() for c in steps) / 3
        torch.testing.assert_close(value, mean.float(), rtol=0, atol=1e-6)
    assert "optimizer" not in averaged and averaged["tokenizer"] == steps[0]["tokenizer"]
    assert summary["last_valid"]["step"] == 6
    import json
    recorded = json.loads((out / "summary.json").read_text())["averaged"]
    assert recorded["from_steps"] == [2, 4, 6] and recorded["valid_bleu"] >= 0


def test_averaging_copies_gives_the_same_weights_and_two_models_their_mean(run, tmp_path):
    out, _ = run
    last = load_checkpoint(out / "checkpoints" / "last.pt")
    assert all(torch.equal(a, b) for a, b in
               zip(average_state_dicts([last["model"]] * 3).values(), last["model"].values()))
    ones, threes = copy.deepcopy(last), copy.deepcopy(last)
    for k in last["model"]:
        ones["model"][k] = torch.ones_like(last["model"][k])
        threes["model"][k] = torch.full_like(last["model"][k], 3.0)
    atomic_save(ones, tmp_path / "a.pt")
    atomic_save(threes, tmp_path / "b.pt")
    assert main([str(tmp_path / "a.pt"), str(tmp_path / "b.pt"), "--output", str(tmp_path / "ab.pt")]) == 0
    ab = load_checkpoint(tmp_path / "ab.pt")
    assert all(torch.equal(v, torch.full_like(v, 2.0)) for v in ab["model"].values())


def test_the_averaged_checkpoint_translates(run, tmp_path):
    from nmt import translate as tr

    out, _ = run
    model, tok, decode, cfg = load_for_inference(out / "checkpoints" / "averaged.pt")
    assert decode.beam_size == cfg.decode.beam_size
    src = tmp_path / "in.ko"
    src.write_text("안녕하세요.\n\n고마워요.\n", encoding="utf-8")
    assert tr.main(["--checkpoint", str(out / "checkpoints" / "averaged.pt"), "--input", str(src), "--output",
                    str(tmp_path / "out.en"), "--beam-size", "2", "--max-len-b", "5", "--quiet", "--threads", "1"]) == 0
    assert len((tmp_path / "out.en").read_text(encoding="utf-8").split("\n")) == 4   # 3 lines + final newline


def test_cli_selects_from_a_run_folder_and_refuses_mismatches(run, tmp_path, capsys):
    out, _ = run
    assert main([str(out), "--last", "2", "--output", str(tmp_path / "last2.pt")]) == 0
    assert [a["step"] for a in load_checkpoint(tmp_path / "last2.pt")["averaged_from"]] == [4, 6]
    assert main([str(out), "--best", "1", "--metric", "valid_loss", "--output", str(tmp_path / "b.pt")]) == 0
    assert main([str(out)]) == 2 and "needs --last N or --best N" in capsys.readouterr().err
    step6 = out / "checkpoints" / "step-6.pt"
    assert main([str(step6), str(out / "checkpoints" / "step-4.pt"), "--output", str(step6)]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    other = load_checkpoint(step6)
    other["config"]["model"]["d_model"] = 64
    atomic_save(other, tmp_path / "wide.pt")
    assert main([str(step6), str(tmp_path / "wide.pt"), "-o", str(tmp_path / "x.pt")]) == 2
    assert "model.d_model is 32 and 64" in capsys.readouterr().err
    other = load_checkpoint(step6)
    other["tokenizer"] = {**other["tokenizer"], "settings": {"vocab_size": 1}}
    atomic_save(other, tmp_path / "tok.pt")
    with pytest.raises(CheckpointError, match="different tokenizers"):
        average_checkpoints([step6, tmp_path / "tok.pt"], tmp_path / "y.pt")
    assert main([str(tmp_path / "missing.pt"), str(step6)]) == 2 and "not found" in capsys.readouterr().err


def test_an_averaged_checkpoint_cannot_resume_training(run, make_cfg, tmp_path):
    out, _ = run
    cfg = make_cfg("train.max_steps=8", f"train.resume={out / 'checkpoints' / 'averaged.pt'}")
    with pytest.raises(CheckpointError, match="holds weights only"):
        train(cfg, tmp_path)
