"""Bad input, property-tested: corpus reading, data preparation, tokenization, translation.

Whatever the bytes (control characters, NUL, CR, a BOM, invalid UTF-8, lines
of any length, no final newline, empty files), the outcome is either a
CorpusError naming the file and line, or exactly one result per input line,
with what was filtered counted. Never a crash, never a changed line count.
"""
from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from conftest import QUICK
from nmt.checkpoint import load_for_inference
from nmt.config import DecodeConfig
from nmt.corpus import CorpusError, read_lines, read_parallel
from nmt.data import prepare_data
from nmt.tokenizer import EOS, train_or_load
from nmt.translate import Translator
from trainproc import compose_cfg, run_translate, trained_run

FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# any character but the line break; CR, NUL, controls, U+2028, BOMs and astral characters included
CHAR = st.characters(blacklist_categories=("Cs",), blacklist_characters="\n")
LINE = st.text(CHAR, max_size=40) | st.text(st.sampled_from("\r\x00\x0b\x0c\x1c\x85\u2028\ufeff\t 가a"), max_size=8)
LINES = st.lists(LINE, max_size=12)
BAD_UTF8 = st.sampled_from([b"\xff", b"\x80", b"\xc3", b"\xed\xa0\x80", b"\xed\xbf\xbf", b"\xf4\x90\x80\x80",
                            b"\xe2\x82"])  # stray bytes, truncated sequences, UTF-8-encoded lone surrogates


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def write(path: Path, data: bytes, gz: bool) -> Path:
    path = path.with_suffix(".gz") if gz else path
    path.write_bytes(gzip.compress(data, mtime=0) if gz else data)
    return path


def expected_lines(lines: list[str], final_newline: bool) -> list[str]:
    """What a file of these lines holds: a last empty line without a newline is no line at all."""
    if lines and not final_newline and lines[-1] == "":
        return lines[:-1]
    return lines


# ----------------------------------------------------------------------------- corpus reading
@FUZZ
@given(lines=LINES, crlf=st.booleans(), final_newline=st.booleans(), bom=st.booleans(), gz=st.booleans())
def test_read_lines_returns_exactly_the_lines_written(scratch, lines, crlf, final_newline, bom, gz):
    lines = [line.rstrip("\r") for line in lines]               # a CR before the newline is the line ending
    assume(not lines or not lines[0].startswith("\ufeff"))      # ... and a leading U+FEFF is a BOM
    sep = "\r\n" if crlf else "\n"
    text = sep.join(lines) + (sep if final_newline and lines else "")
    raw = (b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8")
    got = read_lines(write(scratch / "f.txt", raw, gz))
    assert got == expected_lines(lines, final_newline)
    body = raw[3:] if bom else raw
    assert len(got) == body.count(b"\n") + (not body.endswith(b"\n") and len(body) > 0)


@FUZZ
@given(lines=st.lists(LINE, min_size=1, max_size=8), where=st.data(), bad=BAD_UTF8, gz=st.booleans())
def test_invalid_utf8_is_a_corpus_error_naming_file_and_line(scratch, lines, where, bad, gz):
    k = where.draw(st.integers(0, len(lines) - 1), label="bad line")
    encoded = [line.encode("utf-8") for line in lines]
    cut = where.draw(st.integers(0, len(encoded[k])), label="byte offset")
    encoded[k] = encoded[k][:cut] + bad + encoded[k][cut:]
    path = write(scratch / "bad.ko", b"\n".join(encoded) + b"\n", gz)
    with pytest.raises(CorpusError) as e:
        read_lines(path)
    first_bad = next(i for i, b in enumerate(encoded) if not _valid(b))  # an earlier line may end in a bad cut
    assert f"{path}, line {first_bad + 1}: invalid UTF-8" in str(e.value)


def _valid(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def test_damaged_gzip_is_a_corpus_error(scratch):
    data = gzip.compress("안녕\n".encode() * 1000, mtime=0)
    path = scratch / "cut.ko.gz"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorpusError, match=f"cannot read {path}"):
        read_lines(path)


@FUZZ
@given(src=LINES, tgt=LINES)
def test_read_parallel_pairs_every_line_or_says_the_counts_differ(scratch, src, tgt):
    src, tgt = [x.rstrip("\r") for x in src], [x.rstrip("\r") for x in tgt]
    a = write(scratch / "p.ko", "".join(x + "\n" for x in src).encode(), False)
    b = write(scratch / "p.en", "".join(x + "\n" for x in tgt).encode(), False)
    assume(not (src and src[0].startswith("\ufeff")) and not (tgt and tgt[0].startswith("\ufeff")))
    if len(src) == len(tgt):
        assert read_parallel(a, b) == list(zip(src, tgt))
    else:
        with pytest.raises(CorpusError, match=f"{a} has {len(src)} lines, {b} has {len(tgt)}"):
            read_parallel(a, b)


# ----------------------------------------------------------------------------- data preparation
@pytest.fixture(scope="module")
def fuzz_cfg(data_root, tok_cache, scratch):
    cfg = compose_cfg(data_root, tok_cache, "data.name=fuzz", f"data.root={scratch}", "data.train_limit=0",
                      "data.dev_limit=0")
    return cfg


@pytest.fixture(scope="module")
def tokenizer(data_root, tok_cache):
    """The TINY tokenizer (vocab 1000 on the first 600 quick pairs), from the session cache when it is there."""
    cfg = compose_cfg(data_root, tok_cache)
    pairs = read_parallel(data_root / QUICK / "train.ko", data_root / QUICK / "train.en", 600)
    return train_or_load(cfg.tokenizer, [s for s, _ in pairs], [t for _, t in pairs])


LONG = st.sampled_from(["가나다 " * 400, "x" * 3000, "word " * 700])  # 500 to 3000 subword tokens


@FUZZ
@given(pairs=st.lists(st.tuples(LINE | LONG, LINE | LONG), min_size=1, max_size=10),
       dev=st.lists(st.tuples(LINE | LONG, LINE | LONG), min_size=1, max_size=4))
def test_prepare_data_keeps_or_counts_every_pair(fuzz_cfg, tokenizer, scratch, pairs, dev):
    folder = scratch / "fuzz"
    folder.mkdir(exist_ok=True)
    for stem, rows in (("train", pairs), ("dev", dev)):
        for side, lang in ((0, "ko"), (1, "en")):
            (folder / f"{stem}.{lang}").write_text("".join(r[side].rstrip("\r") + "\n" for r in rows),
                                                   encoding="utf-8")
    n_train, n_dev = len(pairs), len(dev)
    try:
        data = prepare_data(fuzz_cfg, tokenizer)
    except ValueError as e:  # a clear message, never another exception
        assert "every training pair of fuzz was filtered out" in str(e)
        return
    assert len(data.train_src) + sum(data.filter_counts.values()) == n_train
    assert len(data.train_src) == len(data.train_tgt)
    assert len(data.dev_src) == len(data.dev_tgt) == len(data.dev_src_text) == n_dev     # dev: never filtered
    limit = fuzz_cfg.model.max_positions - 1
    assert all(len(s) <= limit and s[-1] == EOS for s in data.dev_src)
    assert all(len(t) <= limit - 1 for t in data.dev_tgt)


# ----------------------------------------------------------------------------- tokenization
ANY_TEXT = st.text(st.characters(), max_size=60) | LONG        # lone surrogates included


@FUZZ
@given(lines=st.lists(ANY_TEXT, max_size=8))
def test_encode_gives_one_valid_sequence_per_line(tokenizer, lines):
    src, tgt = tokenizer.encode_src(lines), tokenizer.encode_tgt(lines)
    assert len(src) == len(tgt) == len(lines)
    v = tokenizer.src_vocab_size
    for s, t in zip(src, tgt):
        assert s[-1] == EOS and EOS not in s[:-1] and EOS not in t
        assert all(0 <= i < v for i in s + t)
        assert isinstance(tokenizer.decode_tgt(t), str)


@FUZZ
@given(ids=st.lists(st.integers(0, 499), max_size=80))
def test_decode_accepts_any_id_sequence(tokenizer, ids):
    text = tokenizer.decode_tgt(ids)
    assert isinstance(text, str) and text == tokenizer.decode_tgt(ids[: ids.index(EOS)] if EOS in ids else ids)


def test_lone_surrogates_become_replacement_characters(tokenizer):
    """Text read with errors="surrogateescape" (stdin in the C locale) must not crash the batch."""
    lines = ["안녕 \udcff 하세요", "fine", "\ud800"]
    assert tokenizer.encode_src(lines) == tokenizer.encode_src(["안녕 \ufffd 하세요", "fine", "\ufffd"])


# ----------------------------------------------------------------------------- translation
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, data_root, tok_cache) -> Path:
    return trained_run(tmp_path_factory.getbasetemp(), data_root, tok_cache) / "checkpoints" / "best.pt"


@pytest.fixture(scope="module")
def translator(checkpoint):
    model, tok, _, _ = load_for_inference(checkpoint)
    return Translator(model, tok, DecodeConfig(beam_size=1, max_len_a=0.0, max_len_b=4), torch.device("cpu"),
                      max_sentences=16)


@pytest.mark.slow
@FUZZ
@given(texts=st.lists(ANY_TEXT | st.sampled_from(["", " ", "\t", "\r"]), max_size=10))
def test_translator_gives_one_result_per_line(translator, texts):
    hyps = translator.translate(texts)
    assert len(hyps) == len(texts)
    for text, h in zip(texts, hyps):
        if not text.strip():
            assert h == []
        for out in translator.texts(h):
            assert "\n" not in out and "\r" not in out


@pytest.mark.slow
def test_translate_cli_keeps_line_count_on_hostile_bytes(checkpoint, tmp_path):
    lines = [b"", "안녕하세요.".encode(), b"\xff\xfe bad \xed\xa0\x80 bytes", b"nul\x00byte", b"  ", b"\r",
             b"tab\tand\x0bvt\x0cff\x1cfs", "u2028\u2028inside".encode(), b"", "긴 문장 ".encode() * 2000,
             b"x" * 10000, "\ufeffbom-like".encode(), b"", b"last line without newline"]
    src = tmp_path / "in.ko"
    src.write_bytes(b"\n".join(lines))
    out = tmp_path / "out.en"
    rc, log = run_translate(checkpoint, src, out, "--beam-size", "1", "--max-len-b", "4")
    assert rc == 0, log
    got = out.read_bytes().split(b"\n")
    assert got[-1] == b"" and len(got) - 1 == len(lines)                 # one line out per line in
    for i, line in enumerate(lines):
        if not line.strip():
            assert got[i] == b"", i
    assert "line 3 is not valid UTF-8" in log and "truncated 2 input line(s)" in log


# ----------------------------------------------------------------------------- long dev lines
@pytest.mark.slow
def test_validation_with_very_long_dev_lines(data_root, tok_cache, tmp_path, caplog):
    """A 10,000-character and a 5,000-token dev sentence are truncated with a warning; training validates."""
    corpus = tmp_path / "long"
    corpus.mkdir()
    for lang in ("ko", "en"):
        shutil.copy(data_root / QUICK / f"train.{lang}", corpus / f"train.{lang}")
        dev = read_lines(data_root / QUICK / f"dev.{lang}")[:6]
        dev += ["가나다라마바사아자차 " * 1000, "word " * 5000] if lang == "ko" else ["long " * 2000, "x " * 5000]
        (corpus / f"dev.{lang}").write_text("".join(x + "\n" for x in dev), encoding="utf-8")
    from nmt.train import train
    from trainproc import single_thread

    cfg = compose_cfg(data_root, tok_cache, f"data.root={tmp_path}", "data.name=long", "train.max_steps=2",
                      "train.valid_every=2", "valid.max_sentences=0")
    with single_thread():
        summary = train(cfg, tmp_path / "run")
    assert summary["step"] == 2 and summary["last_valid"]["step"] == 2
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("dev source: 2 sentence(s) longer than 511 tokens were truncated" in w for w in warnings), warnings
