"""Fine-tuning (train.init_from): a new run that starts from exactly a checkpoint's weights and tokenizer,
with a fresh optimizer and schedule unless asked otherwise; refused for another model shape."""
from __future__ import annotations

import json
import logging

import pytest
import torch

from conftest import QUICK, tiny_config
from nmt.checkpoint import CheckpointError, load_checkpoint, load_for_inference
from nmt.train import Trainer, train

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module")
def parent(tmp_path_factory, data_root, tok_cache):
    """A tiny model trained 6 steps on the quick corpus."""
    cfg = tiny_config(data_root, tok_cache, "train.max_steps=6", "train.valid_every=6")
    out = tmp_path_factory.mktemp("parent")
    train(cfg, out)
    return out


# the new data: another corpus (the embedded one, from its first pairs), other tokenizer settings in the config
NEW = ("data.name=bible-ko-en", "data.train_limit=300", "data.dev_limit=20", "tokenizer.vocab_size=2000")


def test_starts_from_exactly_the_checkpoint_and_uses_its_tokenizer(parent, make_cfg, tmp_path):
    cfg = make_cfg(*NEW, f"train.init_from={parent}", "train.max_steps=4", "train.valid_every=4",
                   "model.dropout=0.3")
    trainer = Trainer(cfg, tmp_path)
    old, old_tok, _, _ = load_for_inference(parent / "checkpoints" / "best.pt")
    assert trainer.tok.to_state() == old_tok.to_state() and cfg.tokenizer.vocab_size == old_tok.src_vocab_size
    src = torch.tensor([trainer.data.dev_src[0]])
    tgt = torch.tensor([[2] + trainer.data.dev_tgt[0]])
    mask = torch.ones_like(src, dtype=torch.bool)
    with torch.no_grad():
        torch.testing.assert_close(trainer.model.eval()(src, mask, tgt), old(src, mask, tgt), rtol=0, atol=0)
    assert trainer.step == 0 and trainer.opt.step_num == 0 and trainer.sampler.epoch == 0
    summary = trainer.run()
    assert summary["step"] == 4
    ckpt = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert ckpt["init_from"]["path"].endswith("best.pt") and ckpt["init_from"]["data"] == QUICK
    assert ckpt["config"]["data"]["name"] == "bible-ko-en"
    assert json.loads((tmp_path / "summary.json").read_text())["init_from"]["step"] == 6
    model, tok, _, _ = load_for_inference(tmp_path)          # the translator loads it
    assert tok.to_state() == old_tok.to_state()
    from nmt.lrtools.diagnose import diagnose
    from nmt.lrtools.rundir import load_run
    assert any("fine-tuned: started from" in line for line in diagnose(load_run(tmp_path)).lines)


def test_keeping_optimizer_and_schedule_continues_them(parent, make_cfg, tmp_path):
    cfg = make_cfg(*NEW, f"train.init_from={parent / 'checkpoints' / 'last.pt'}", "train.init_keep=[optimizer,schedule]",
                   "train.max_steps=8", "train.valid_every=8")
    trainer = Trainer(cfg, tmp_path)
    saved = load_checkpoint(parent / "checkpoints" / "last.pt")["optimizer"]
    assert trainer.step == trainer.opt.step_num == 6
    exp_avg = [s["exp_avg"] for s in trainer.opt.optimizer.state_dict()["state"].values()]
    assert all(torch.equal(a, s["exp_avg"]) for a, s in zip(exp_avg, saved["optimizer"]["state"].values()))
    assert trainer.run()["step"] == 8


def test_another_model_shape_is_refused_naming_the_settings(parent, make_cfg, tmp_path):
    cfg = make_cfg(*NEW, f"train.init_from={parent}", "model.d_model=64", "model.ffn=128", "train.max_steps=2")
    with pytest.raises(CheckpointError, match=r"model.d_model: checkpoint 32, now 64; model.ffn: checkpoint 64, now 128"):
        Trainer(cfg, tmp_path)


def test_unknown_characters_of_the_new_data_are_reported(parent, make_cfg, tmp_path, caplog):
    corpus = tmp_path / "corpora" / "emoji"
    corpus.mkdir(parents=True)
    for split in ("train", "dev"):
        (corpus / f"{split}.ko").write_text("🦀🦀 뷁뷁 🐙\n" * 20, encoding="utf-8")
        (corpus / f"{split}.en").write_text("crab octopus\n" * 20, encoding="utf-8")
    cfg = make_cfg(f"data.root={tmp_path / 'corpora'}", "data.name=emoji", f"train.init_from={parent}",
                   "train.max_steps=1")
    with caplog.at_level(logging.INFO):
        Trainer(cfg, tmp_path / "run")
    assert any("byte_fallback" in r.getMessage() and r.levelname == "WARNING" for r in caplog.records)


def test_data_mix_adds_a_fixed_sample_of_the_old_corpus(parent, make_cfg, tmp_path, caplog):
    """data.mix: ratio * n pairs of the other corpus follow the n new ones, the same sample on every start;
    the <unk> report is about the new data only."""
    from nmt.data import prepare_data
    from nmt.tokenizer import Tokenizer

    tok = Tokenizer.from_state(load_checkpoint(parent / "checkpoints" / "best.pt")["tokenizer"])
    plain = prepare_data(make_cfg(*NEW), tok)
    mixes = [prepare_data(make_cfg(*NEW, f"data.mix.name={QUICK}", "data.mix.ratio=0.5"), tok) for _ in range(2)]
    n = len(plain.train_src)
    old = prepare_data(make_cfg(f"data.name={QUICK}", "data.train_limit=0"), tok)
    for mixed in mixes:
        assert len(mixed.train_src) == len(mixed.train_tgt) == n + round(0.5 * n)
        assert all((mixed.train_src[i] == plain.train_src[i]).all() for i in range(n))
        assert list(mixed.train_src_lens[:n]) == list(plain.train_src_lens)
        assert len(mixed.train_src_lens) == len(mixed.train_src)
        olds = {tuple(old.train_src[i]) for i in range(len(old.train_src))}
        assert all(tuple(mixed.train_src[i]) in olds for i in range(n, len(mixed.train_src)))
    assert [tuple(t) for t in mixes[0].train_tgt[n:]] == [tuple(t) for t in mixes[1].train_tgt[n:]]
    cfg = make_cfg(*NEW, f"train.init_from={parent}", "train.max_steps=2", "train.valid_every=2",
                   f"data.mix.name={QUICK}", "data.mix.ratio=0.5")
    with caplog.at_level(logging.INFO):
        assert Trainer(cfg, tmp_path).run()["step"] == 2
    assert any("data.mix:" in r.getMessage() for r in caplog.records)


def test_data_mix_in_tokens_gives_the_other_corpus_its_share_of_the_tokens(parent, make_cfg):
    """data.mix.unit=tokens: the sample holds about ratio tokens of the other corpus per token of the new
    data, whatever the two corpora's sentence lengths (counted in pairs, long verses would dominate)."""
    from nmt.data import prepare_data
    from nmt.tokenizer import Tokenizer

    tok = Tokenizer.from_state(load_checkpoint(parent / "checkpoints" / "best.pt")["tokenizer"])
    plain = prepare_data(make_cfg(*NEW), tok)
    n = len(plain.train_src)
    own = int(plain.train_src_lens.sum() + plain.train_tgt_lens.sum())
    by_pairs, by_tokens = (prepare_data(make_cfg(*NEW, f"data.mix.name={QUICK}", "data.mix.ratio=0.5",
                                                 f"data.mix.unit={unit}"), tok) for unit in ("pairs", "tokens"))
    assert len(by_pairs.train_src) == n + round(0.5 * n)
    mixed = int(by_tokens.train_src_lens[n:].sum() + by_tokens.train_tgt_lens[n:].sum())
    assert 0.4 < mixed / own < 0.6
    other = int(by_pairs.train_src_lens[n:].sum() + by_pairs.train_tgt_lens[n:].sum())
    assert (len(by_tokens.train_src) > len(by_pairs.train_src)) == (other < 0.5 * own)   # shorter pairs: more of them


@pytest.mark.parametrize("overrides, message", [
    (("data.mix.ratio=0.2",), "data.mix.ratio needs data.mix.name"),
    ((f"data.mix.name={QUICK}", "data.mix.ratio=0.2", "data.mix.unit=words"), "data.mix.unit='words' is not valid"),
    ((f"data.mix.name={QUICK}", "data.mix.ratio=-1"), "data.mix.ratio must be >= 0"),
    ((f"data.mix.name={QUICK}", "data.mix.ratio=0.2", f"data.name={QUICK}"), "data.mix.name is data.name"),
])
def test_bad_mix_settings_are_refused(make_cfg, overrides, message):
    from nmt.config import ConfigError

    with pytest.raises(ConfigError, match=message):
        make_cfg(*overrides)
