"""The translator CLI on a tiny checkpoint: line alignment, batch == one-by-one, n-best,
n-gram blocking, truncation, one-line errors; and the repetition statistics."""
from __future__ import annotations

import math
import os
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import pytest
import torch

from nmt.checkpoint import atomic_save, load_checkpoint, load_for_inference
from nmt.config import ConfigError, DecodeConfig
from nmt import translate as tr
from nmt.repetition import SideStats, format_report, has_repeated_ngram, length_ratio, side_stats, words
from nmt.textio import Notes, read_lines

REPO = Path(__file__).resolve().parents[1]
KO = ["톰은 학교에 갔다.", "안녕하세요.", "나는 어제 친구와 함께 도서관에서 책을 읽었다.", "고마워요.",
      "이것은 무엇입니까?", "그는 매일 아침 일찍 일어나서 공원을 달린다.", "네.", "비가 와요."]
# short outputs and one thread (two threads on two busy cores are many times slower): fast tests
FAST = ["--beam-size", "1", "--max-len-a", "0", "--max-len-b", "6", "--quiet", "--threads", "1"]


# ----------------------------------------------------------------------------- fixtures
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run_dir(data_root, tok_cache, tmp_path_factory, one_thread) -> Path:
    """A run directory from a real (two-step) training run of the tiny model.

    Two steps leave the model saying the same thing for every input, which would hide
    order mix-ups; its weights are redrawn at a larger scale (a random but 'lively'
    model) so that outputs differ between inputs and repeat themselves, and saved back.
    """
    from conftest import tiny_config
    from nmt.train import train

    out = tmp_path_factory.mktemp("run")
    train(tiny_config(data_root, tok_cache, "train.max_steps=2", "train.valid_every=2", "valid.max_sentences=2"), out)
    best = out / "checkpoints" / "best.pt"
    obj = load_checkpoint(best)
    g = torch.Generator().manual_seed(0)
    for w in obj["model"].values():
        if w.dim() == 2:
            w.copy_(torch.randn(w.shape, generator=g) * 3.0 / w.shape[1] ** 0.5)
    atomic_save(obj, best)
    return out


@pytest.fixture(scope="module")
def ckpt(run_dir) -> Path:
    return run_dir / "checkpoints" / "best.pt"


def write(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(x + "\n" for x in lines), encoding="utf-8")
    return path


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    """``main(argv)`` in-process -> (exit status, stdout, stderr)."""
    rc = tr.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def subprocess_cli(*argv: str, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    return subprocess.run([sys.executable, str(REPO / "scripts" / "translate.py"), *map(str, argv)],
                          input=stdin, capture_output=True, env=env, timeout=120)


# ----------------------------------------------------------------------------- end to end (subprocess)
def test_end_to_end_keeps_lines_aligned_and_warns(run_dir, tmp_path):
    """Run directory as --checkpoint; empty, invalid-UTF-8 and over-long lines each keep their output line."""
    long_line = " ".join(["가나다라마바사"] * 1400)   # ~10,000 characters, thousands of tokens
    data = ("\n".join([KO[0], "", KO[1]]) + "\n").encode() + b"\xff\xfe bad \xc3(\n" + \
           (KO[2] + "\n" + long_line + "\n\n" + KO[3]).encode()       # no final newline
    src = tmp_path / "in.ko"
    src.write_bytes(data)
    res = subprocess_cli("--checkpoint", run_dir, "--input", src, *FAST)
    err = res.stderr.decode()
    assert res.returncode == 0, err
    out = res.stdout.decode().split("\n")
    assert out[-1] == "" and len(out) - 1 == 8
    assert [bool(x) for x in out[:-1]] == [True, False, True, True, True, True, False, True]
    assert "Traceback" not in err
    assert "input line 4 is not valid UTF-8" in err
    assert "truncated 1 input line(s)" in err and "line(s) 6;" in err


def test_stdin_and_broken_pipe_exit_quietly(ckpt, tmp_path):
    src = write(tmp_path / "in.ko", [KO[0]] + [""] * 20000)    # more than one chunk of output
    with open(src, "rb") as stdin:
        proc = subprocess.Popen([sys.executable, str(REPO / "scripts" / "translate.py"), "--checkpoint", str(ckpt),
                                 *FAST], stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    assert proc.stdout.readline()
    proc.stdout.close()                                        # like `| head -1`
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141 and err == ""


def test_missing_checkpoint_subprocess(tmp_path):
    res = subprocess_cli("--checkpoint", tmp_path / "nope.pt", stdin=b"x\n")
    err = res.stderr.decode()
    assert res.returncode == 2 and err.count("\n") == 1 and err.startswith("error: checkpoint not found")


# ----------------------------------------------------------------------------- in-process
def test_batch_equals_one_by_one(ckpt, tmp_path, capsys, monkeypatch):
    src = write(tmp_path / "in.ko", KO + [""] + KO[::-1])
    rc, batched, _ = cli(capsys, "--checkpoint", ckpt, "--input", src, *FAST)
    assert rc == 0
    monkeypatch.setattr(tr, "CHUNK_LINES", 3)                  # chunk boundaries must not matter either
    rc, chunked, _ = cli(capsys, "--checkpoint", ckpt, "--input", src, *FAST, "--batch-size", "2")
    alone = []
    for line in KO:
        rc, out, _ = cli(capsys, "--checkpoint", ckpt, "--input", write(tmp_path / "one.ko", [line]), *FAST)
        alone.append(out)
    expected = "".join(alone) + "\n" + "".join(alone[::-1])
    assert batched == chunked == expected
    assert len(set(alone)) > 3                                 # the fixture's model tells inputs apart


def test_nbest_prints_n_sorted_tsv_lines(ckpt, tmp_path, capsys):
    src = write(tmp_path / "in.ko", KO[:3] + [""])
    rc, out, _ = cli(capsys, "--checkpoint", ckpt, "--input", src, "--nbest", "3", "--beam-size", "4",
                     "--max-len-b", "6", "--max-len-a", "0", "--quiet", "--threads", "1")
    rows = [r.split("\t") for r in out.splitlines()]
    assert rc == 0 and len(rows) == 12 and all(len(r) == 3 for r in rows)
    assert [int(r[0]) for r in rows] == [1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4]
    for i in range(3):
        scores = [float(r[1]) for r in rows[3 * i:3 * i + 3]]
        assert scores == sorted(scores, reverse=True) and all(math.isfinite(s) for s in scores)
    assert rows[9:] == [["4", "-inf", ""]] * 3                 # an empty line: N empty hypotheses


def test_no_repeat_ngram_size(ckpt, tmp_path, capsys):
    model, tok, base, _ = load_for_inference(ckpt)
    args = Namespace(**{f: None for f in DecodeConfig.__dataclass_fields__})
    plain = tr.decode_settings(base, Namespace(**{**vars(args), "beam_size": 1, "max_len_a": 0.0, "max_len_b": 12}))
    blocked = tr.decode_settings(plain, Namespace(**{**vars(args), "no_repeat_ngram_size": 2}))
    t = tr.Translator(model, tok, plain, torch.device("cpu"))
    before = [h[0].tokens for h in t.translate(KO)]
    assert any(has_repeated_ngram(x, 2) for x in before)      # so that blocking has work to do
    t.decode = blocked
    after = [h[0].tokens for h in t.translate(KO)]
    assert after != before and not any(has_repeated_ngram(x, 2) for x in after)
    rc, out, _ = cli(capsys, "--checkpoint", ckpt, "--input", write(tmp_path / "in.ko", KO), *FAST,
                     "--max-len-b", "12", "--no-repeat-ngram-size", "2")
    assert rc == 0 and out.splitlines() == [tok.decode_tgt(x) for x in after]


def test_reference_scores_and_repetition_report(ckpt, tmp_path, capsys):
    src = write(tmp_path / "in.ko", KO[:4] + [""])
    ref = write(tmp_path / "ref.en", ["Tom went to school.", "Hello.", "I read a book.", "Thanks thanks thanks thanks thanks.", ""])
    rc, out, err = cli(capsys, "--checkpoint", ckpt, "--input", src, "--reference", ref, "--report-repetition", *FAST)
    assert rc == 0 and len(out.splitlines()) == 5
    for sig in ("BLEU|nrefs:1|", "chrF2|nrefs:1|", "TER|nrefs:1|"):
        assert sig in err
    assert "reference 25.0% (1/4)" in err and "input 0.0% (0/4)" in err
    assert "length output/input:" in err and "output/reference:" in err


@pytest.mark.parametrize("flags, message", [
    (["--repetition-penalty", "0"], "--repetition-penalty must be > 0"),
    (["--beam-size", "0"], "--beam-size must be >= 1"),
    (["--top-p", "1.5"], "--top-p must be in (0, 1]"),
    (["--sampling", "--beam-size", "3"], "--sampling needs --beam-size 1"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
])
def test_bad_settings_are_one_line_errors(ckpt, tmp_path, capsys, flags, message):
    rc, out, err = cli(capsys, "--checkpoint", ckpt, "--input", write(tmp_path / "in.ko", KO[:1]), *flags)
    assert rc == 2 and out == "" and err.count("\n") == 1 and err.startswith("error: ") and message in err


def test_file_errors_are_one_line(ckpt, tmp_path, capsys):
    src = write(tmp_path / "in.ko", KO[:3])
    cases = [
        (["--checkpoint", ckpt, "--input", tmp_path / "missing.ko"], "input file not found"),
        (["--checkpoint", ckpt, "--input", src, "--reference", tmp_path / "missing.en"], "reference file not found"),
        (["--checkpoint", ckpt, "--input", src, "--reference", write(tmp_path / "r.en", ["a", "b"])],
         "has 2 lines but the input"),
    ]
    data = ckpt.read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    flipped = bytearray(data)
    for i in range(0, len(flipped), 97):
        flipped[i] ^= 0xFF
    (tmp_path / "flip.pt").write_bytes(bytes(flipped))
    for name in ("cut.pt", "flip.pt"):
        cases.append((["--checkpoint", tmp_path / name, "--input", src], name))
    if not torch.cuda.is_available():
        cases.append((["--checkpoint", ckpt, "--input", src, "--device", "cuda"], "no CUDA GPU"))
    for argv, message in cases:
        rc, out, err = cli(capsys, *argv)
        assert rc == 2 and err.count("\n") == 1 and err.startswith("error: ") and message in err, (argv, err)
        assert "Traceback" not in err


def test_decode_settings_override_the_checkpoint():
    base = DecodeConfig(beam_size=5, length_penalty=1.0, nbest=1)
    none = {f: None for f in DecodeConfig.__dataclass_fields__}
    d = tr.decode_settings(base, Namespace(**{**none, "length_penalty": 0.6, "repetition_penalty": 1.2}))
    assert (d.beam_size, d.length_penalty, d.repetition_penalty) == (5, 0.6, 1.2)
    assert tr.decode_settings(base, Namespace(**{**none, "sampling": True})).beam_size == 1
    assert tr.decode_settings(base, Namespace(**{**none, "nbest": 8})).beam_size == 8
    with pytest.raises(ConfigError, match="--nbest must be"):
        tr.decode_settings(base, Namespace(**{**none, "nbest": 8, "beam_size": 4}))


def test_read_lines_splits_on_newline_only():
    import io

    notes = Notes()
    data = "\ufeffa\r\nb\u2028c\x0cd\n\n".encode() + b"\xc3(\ne"
    assert list(read_lines(io.BytesIO(data), notes)) == ["a", "b\u2028c\x0cd", "", "\ufffd(", "e"]
    assert notes.bad_utf8 == [4]


# ----------------------------------------------------------------------------- repetition statistics
def test_has_repeated_ngram():
    assert has_repeated_ngram("a b c a b c".split(), 3)
    assert has_repeated_ngram("a a a a".split(), 3)            # overlapping occurrences count
    assert not has_repeated_ngram("a a a".split(), 3)
    assert not has_repeated_ngram("a b c d a b".split(), 3)
    assert has_repeated_ngram([5, 6, 5, 6], 2) and not has_repeated_ngram([], 1)
    with pytest.raises(ValueError):
        has_repeated_ngram([1], 0)


def test_side_stats_and_ratios():
    s = side_stats(["I think I think I think so", "The the the the cat", "", "   ", "A cat sat."])
    assert s == SideStats(sentences=3, repeated=2, words=15, chars=43)
    assert words("The THE") == ["the", "the"] and s.repeated_share == pytest.approx(2 / 3)
    total = side_stats(["a b"]) + side_stats(["a a a a", ""])
    assert total == SideStats(2, 1, 6, 6)
    assert length_ratio(SideStats(1, 0, 6, 30), SideStats(1, 0, 4, 10)) == (1.5, 3.0)
    assert all(math.isnan(x) for x in length_ratio(SideStats(), SideStats()))
    assert SideStats().repeated_share == 0.0
    lines = format_report(SideStats(4, 1, 20, 80), SideStats(4, 0, 10, 40), SideStats(4, 0, 20, 100))
    assert lines[0] == "sentences with a repeated word 3-gram: output 25.0% (1/4), input 0.0% (0/4), reference 0.0% (0/4)"
    assert "2.00 in words, 2.00 in characters" in lines[1] and "output/reference: 1.00 in words, 0.80" in lines[1]
