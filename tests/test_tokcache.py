"""The token cache of the training split: equal to encoding in memory, mapped on the next start,
rebuilt (with a message) when incomplete, truncated, stale or made with another tokenizer."""
from __future__ import annotations

import json
import logging
import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import QUICK
from nmt.config import DataConfig, TokenizerConfig
from nmt.corpus import CorpusError, filter_pairs, iter_lines, iter_parallel, read_lines, read_parallel
from nmt.data import sample_pairs
from nmt.tokcache import cached_split
from nmt.tokenizer import train_or_load


@pytest.fixture(scope="module")
def corpus(data_root, tmp_path_factory):
    """A copy of the quick corpus's first 400 pairs (the tests change its files)."""
    folder = tmp_path_factory.mktemp("corpora") / "c"
    folder.mkdir()
    for lang in ("ko", "en"):
        lines = read_lines(data_root / QUICK / f"train.{lang}")[:400]
        lines[7] = "x " * 300                       # too long: filtered
        (folder / f"train.{lang}").write_text("".join(x + "\n" for x in lines), encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def tok(corpus, tmp_path_factory):
    pairs = read_parallel(corpus / "train.ko", corpus / "train.en")
    cfg = TokenizerConfig(vocab_size=700, cache_dir=str(tmp_path_factory.mktemp("tok")))
    return train_or_load(cfg, [a for a, _ in pairs], [b for _, b in pairs])


def build(corpus, tok, cache, **kw):
    data = DataConfig(name="c", root=str(corpus.parent), max_len=100, **kw)
    return cached_split((corpus / "train.ko", corpus / "train.en"), tok, data, 64, str(cache), progress=False), data


def test_equals_encoding_in_memory_and_is_mapped_next_time(corpus, tok, tmp_path, caplog):
    split, data = build(corpus, tok, tmp_path)
    pairs = read_parallel(corpus / "train.ko", corpus / "train.en")
    src, tgt = tok.encode_src([a for a, _ in pairs]), tok.encode_tgt([b for _, b in pairs])
    kept, counts = filter_pairs([len(s) - 1 for s in src], [len(t) for t in tgt], data)
    assert split.counts == counts and counts["too_long"] >= 1 and split.total == 400
    assert len(split.src) == len(split.tgt) == len(kept)
    for j, i in enumerate(kept):
        expect = src[i] if len(src[i]) <= 63 else src[i][:62] + [3]     # truncated to max_positions - 1, EOS kept
        assert split.src[j].tolist() == expect and split.tgt[j].tolist() == tgt[i][:62]
    assert split.src.lengths().tolist() == [len(split.src[j]) for j in range(len(kept))]
    assert isinstance(split.src.data, np.memmap) and split.src.data.dtype == np.uint16
    with caplog.at_level(logging.INFO):
        again, _ = build(corpus, tok, tmp_path)
    assert any("mapped from the token cache" in r.getMessage() for r in caplog.records)
    assert np.array_equal(again.src.data, split.src.data) and again.folder == split.folder


@pytest.mark.parametrize("damage", ["truncate", "meta", "tokenizer", "stale"])
def test_a_bad_cache_is_detected_and_rebuilt(corpus, tok, tmp_path, caplog, damage):
    split, _ = build(corpus, tok, tmp_path)
    expected = np.array(split.tgt.data)
    folder = split.folder
    if damage == "truncate":
        with open(folder / "tgt.bin", "r+b") as f:
            f.truncate(os.path.getsize(folder / "tgt.bin") - 2)
        reason = "tgt.bin is missing or truncated"
    elif damage == "meta":
        (folder / "meta.json").unlink()
        reason = "incomplete"
    elif damage == "tokenizer":
        meta = json.loads((folder / "meta.json").read_text())
        (folder / "meta.json").write_text(json.dumps({**meta, "tokenizer": "0" * 64}))
        reason = "another tokenizer"
    else:
        st_ = os.stat(corpus / "train.en")
        os.utime(corpus / "train.en", ns=(st_.st_atime_ns, st_.st_mtime_ns + 10 ** 9))
        reason = "changed since it was built"
    with caplog.at_level(logging.WARNING):
        again, _ = build(corpus, tok, tmp_path)
    assert any(reason in r.getMessage() and "encoding the corpus again" in r.getMessage() for r in caplog.records)
    assert np.array_equal(again.tgt.data, expected)


def test_settings_get_their_own_cache(corpus, tok, tmp_path):
    a, _ = build(corpus, tok, tmp_path)
    b, _ = build(corpus, tok, tmp_path, train_limit=100)
    assert a.folder != b.folder and len(b.src) <= 100 < len(a.src)


# ----------------------------------------------------------------------------- streaming readers
@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=200).map(lambda b: b.replace(b"\r\r", b"\r")))
def test_iter_lines_reads_what_read_lines_reads(tmp_path_factory, raw):
    path = tmp_path_factory.mktemp("lines") / "f.txt"
    path.write_bytes(raw)
    try:
        expected = read_lines(path)
    except CorpusError as e:
        with pytest.raises(CorpusError) as got:
            list(iter_lines(path))
        assert str(got.value).split(":")[0] == str(e).split(":")[0]      # the same file and line named
        return
    assert list(iter_lines(path)) == expected


def test_iter_parallel_limits_and_checks_line_counts(tmp_path):
    (tmp_path / "a").write_text("1\n2\n3\n", encoding="utf-8")
    (tmp_path / "b").write_text("x\ny\n", encoding="utf-8")
    assert list(iter_parallel(tmp_path / "a", tmp_path / "a", 2)) == [("1", "1"), ("2", "2")]
    with pytest.raises(CorpusError, match="line counts differ"):
        list(iter_parallel(tmp_path / "a", tmp_path / "b"))


def test_sample_pairs_is_seeded_uniform_and_bounded():
    pairs = [(str(i), str(i)) for i in range(1000)]
    assert sample_pairs(iter(pairs), 0) == (pairs, 1000) and sample_pairs(iter(pairs), 5000) == (pairs, 1000)
    a, n = sample_pairs(iter(pairs), 100)
    assert n == 1000 and len(a) == len(set(a)) == 100 and set(a) <= set(pairs)
    assert sample_pairs(iter(pairs), 100) == (a, 1000)                  # seeded
    assert max(int(x) for x, _ in a) > 500                              # not just the first ones
