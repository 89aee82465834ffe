"""Tokenizer: special ids, round trips on real text, joint vs separate, state, cache, errors."""
from __future__ import annotations

import io
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import nmt.tokenizer as tk
from nmt.config import ConfigError, TokenizerConfig
from conftest import QUICK
from nmt.tokenizer import BOS, EOS, PAD, UNK, Tokenizer, cache_key, train_or_load

N = 1500  # training pairs: enough for a 1000-piece vocabulary, fast to train


@pytest.fixture(scope="module")
def pairs(data_root: Path) -> tuple[list[str], list[str]]:
    """The first N pairs of the quick slice of the embedded corpus, as (Korean lines, English lines)."""
    d = data_root / QUICK
    ko = (d / "train.ko").read_text(encoding="utf-8").splitlines()[:N]
    en = (d / "train.en").read_text(encoding="utf-8").splitlines()[:N]
    return ko, en


@pytest.fixture(scope="module")
def cfg(tmp_path_factory) -> TokenizerConfig:
    # character_coverage=1: every character gets a piece, so round trips are exact
    return TokenizerConfig(vocab_size=1000, character_coverage=1.0, num_threads=2,
                           cache_dir=str(tmp_path_factory.mktemp("tok-cache")))


@pytest.fixture(scope="module")
def joint(cfg, pairs) -> Tokenizer:
    return train_or_load(cfg, *pairs)


@pytest.fixture(scope="module")
def separate(cfg, pairs) -> Tokenizer:
    return train_or_load(replace(cfg, joint=False, vocab_size=900), *pairs)


def test_special_ids(joint, separate):
    assert (PAD, UNK, BOS, EOS) == (0, 1, 2, 3)
    for sp in (joint.src_sp, separate.src_sp, separate.tgt_sp):
        assert (sp.pad_id(), sp.unk_id(), sp.bos_id(), sp.eos_id()) == (PAD, UNK, BOS, EOS)


def test_encode_adds_eos_to_source_only(joint, pairs):
    ko, en = pairs
    src = joint.encode_src(ko[:50])
    tgt = joint.encode_tgt(en[:50])
    assert all(s[-1] == EOS and EOS not in s[:-1] and BOS not in s for s in src)
    assert all(EOS not in t and BOS not in t and PAD not in t for t in tgt)


@pytest.mark.parametrize("which", ["joint", "separate"])
def test_round_trip_on_real_text(which, request, pairs):
    tok: Tokenizer = request.getfixturevalue(which)
    ko, en = pairs
    assert tok.decode_tgt_batch(tok.encode_tgt(en)) == en
    assert [tok.decode_src(s) for s in tok.encode_src(ko)] == ko


def test_decode_stops_at_eos_and_drops_pad_bos(joint):
    y = joint.encode_tgt(["Tom is happy."])[0]
    text = joint.decode_tgt(y)
    assert text == "Tom is happy."
    assert joint.decode_tgt([BOS, *y, EOS, *y, PAD]) == text
    assert joint.decode_tgt([BOS, *y[:2], PAD, *y[2:], EOS, PAD, PAD]) == text
    assert joint.decode_tgt_batch(torch.tensor([[BOS, *y, EOS], [BOS, *y, PAD]])) == [text, text]
    assert joint.decode_tgt([EOS, *y]) == ""


def test_joint_vs_separate(joint, separate):
    assert joint.joint and joint.src_sp is joint.tgt_sp
    assert joint.src_vocab_size == joint.tgt_vocab_size == 1000
    assert not separate.joint and separate.src_sp is not separate.tgt_sp
    assert separate.src_vocab_size == separate.tgt_vocab_size == 900
    # a separate English model never produces Hangul pieces
    pieces = [separate.tgt_sp.id_to_piece(i) for i in range(separate.tgt_vocab_size)]
    assert not any("\uac00" <= ch <= "\ud7a3" for p in pieces for ch in p)


@pytest.mark.parametrize("which", ["joint", "separate"])
def test_state_round_trip_through_torch_weights_only(which, request, pairs, tmp_path):
    tok: Tokenizer = request.getfixturevalue(which)
    buf = io.BytesIO()
    torch.save({"tokenizer": tok.to_state()}, buf)
    buf.seek(0)
    back = Tokenizer.from_state(torch.load(buf, weights_only=True)["tokenizer"])
    ko, en = pairs
    assert back.joint == tok.joint and back.settings == tok.settings
    assert back.encode_src(ko) == tok.encode_src(ko)
    assert back.encode_tgt(en) == tok.encode_tgt(en)
    tok.save(tmp_path)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == (["joint.model"] if tok.joint else ["src.model", "tgt.model"])
    assert Tokenizer.load(tmp_path).to_state()["src_model"] == tok.to_state()["src_model"]


def test_cache_hit_does_not_retrain(cfg, pairs, joint, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("trained although the cache holds this model")

    monkeypatch.setattr(tk, "_train_model", fail)
    start = time.perf_counter()
    again = train_or_load(cfg, *pairs)
    assert time.perf_counter() - start < 1.0
    assert again.to_state()["src_model"] == joint.to_state()["src_model"]
    # logging verbosity does not change the model, so it shares the cache entry
    train_or_load(replace(cfg, quiet=False), *pairs)


def test_cache_key_depends_on_text_and_settings(cfg, pairs):
    ko, en = pairs
    base = cache_key(cfg, ko, en)
    assert base == cache_key(replace(cfg, cache_dir="elsewhere"), ko, en)
    assert base != cache_key(replace(cfg, vocab_size=999), ko, en)
    assert base != cache_key(replace(cfg, model_type="bpe"), ko, en)
    assert base != cache_key(replace(cfg, joint=False), ko, en)
    assert base != cache_key(cfg, ko[:-1], en[:-1])
    assert base != cache_key(cfg, ko[:-1], [ko[-1], *en])  # a line moved across the sides


def test_training_is_deterministic(cfg, pairs):
    lines = [*pairs[0][:500], *pairs[1][:500]]
    small = replace(cfg, vocab_size=600, input_sentence_size=600)  # also exercises sampling
    assert tk._train_model(lines, small, "joint") == tk._train_model(lines, small, "joint")


def test_lost_cache_race_keeps_the_winner(tmp_path):
    final = tmp_path / "key"
    tk._store(final, {"joint.model": b"winner"}, {})
    tk._store(final, {"joint.model": b"loser"}, {})
    assert (final / "joint.model").read_bytes() == b"winner"
    assert [p.name for p in tmp_path.iterdir()] == ["key"]  # no temp dirs left behind


def test_bpe_model_type(cfg, pairs):
    tok = train_or_load(replace(cfg, model_type="bpe"), *pairs)
    assert tok.decode_tgt_batch(tok.encode_tgt(pairs[1][:100])) == pairs[1][:100]


def test_too_large_vocab_is_a_config_error(cfg, pairs):
    ko, en = pairs
    with pytest.raises(ConfigError, match=r"tokenizer.vocab_size=8000 is too large .*at most \d+\); lower it"):
        train_or_load(replace(cfg, vocab_size=8000), ko[:300], en[:300])


def test_too_small_vocab_is_a_config_error(cfg, pairs):
    with pytest.raises(ConfigError, match=r"tokenizer.vocab_size=100 is too small .*character_coverage"):
        train_or_load(replace(cfg, vocab_size=100, joint=False), *pairs)


def test_invalid_settings(cfg, pairs):
    with pytest.raises(ConfigError, match="unigram, bpe"):
        train_or_load(replace(cfg, model_type="word"), *pairs)


def test_foreign_special_ids_are_rejected():
    import sentencepiece as spm

    out = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(["a b c d e f g"] * 20), model_writer=out,
                                   vocab_size=12, minloglevel=2)  # default ids: unk=0, bos=1, eos=2
    with pytest.raises(ValueError, match="special ids"):
        Tokenizer(out.getvalue())


def test_byte_fallback_spells_unseen_characters_instead_of_unk(cfg, pairs):
    line = "고양이 🦀 뷁"                      # neither the emoji nor the syllable is in the training text
    assert not any(c in "".join(pairs[0] + pairs[1]) for c in "🦀뷁")
    plain = train_or_load(cfg, *pairs)
    assert UNK in plain.encode_src([line])[0]
    tok = train_or_load(replace(cfg, byte_fallback=True, vocab_size=1200), *pairs)   # + 256 byte pieces
    ids = tok.encode_src([line])[0]
    assert UNK not in ids and tok.decode_src(ids) == line
    assert tok.decode_tgt_batch(tok.encode_tgt(pairs[1][:100])) == pairs[1][:100]
    assert cache_key(cfg, *pairs) != cache_key(replace(cfg, byte_fallback=True), *pairs)
