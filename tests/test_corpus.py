"""Tests for nmt.corpus: strict reading, locating splits, filters, downloads."""
from __future__ import annotations

import functools
import gzip
import http.server
import io
import logging
import socket
import tarfile
import tempfile
import threading
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import QUICK, has_corpus
from nmt.config import DataConfig, DownloadConfig, repo_data_dir
from nmt.corpus import (
    CorpusError,
    download_corpus,
    filter_pairs,
    find_split,
    load_split,
    log_filter_counts,
    read_lines,
    read_parallel,
)

KO = ["안녕하세요.", "고맙습니다.", "좋은 아침입니다."]
EN = ["Hello.", "Thank you.", "Good morning."]


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(data, mtime=0) if path.suffix == ".gz" else data)
    return path


def text(lines: list[str]) -> bytes:
    return "".join(line + "\n" for line in lines).encode()


# ----------------------------------------------------------------------------- read_lines
def test_gz_is_read_like_plain_text(tmp_path):
    plain = write(tmp_path / "a.ko", text(KO))
    packed = write(tmp_path / "b.ko.gz", text(KO))
    assert read_lines(plain) == read_lines(packed) == KO


def test_crlf_bom_and_missing_final_newline(tmp_path):
    assert read_lines(write(tmp_path / "crlf.en", b"one\r\ntwo\r\n")) == ["one", "two"]
    assert read_lines(write(tmp_path / "bom.en", b"\xef\xbb\xbfone\ntwo")) == ["one", "two"]
    assert read_lines(write(tmp_path / "cr.en", b"a\r\r\n")) == ["a\r"]  # only one \r is a line ending
    assert read_lines(write(tmp_path / "empty.en", b"")) == []
    assert read_lines(write(tmp_path / "empty.en.gz", b"")) == []
    assert read_lines(write(tmp_path / "blank.en", b"\n\n")) == ["", ""]


def test_only_newline_splits_lines(tmp_path):
    odd = ["a\x0bb", "c\x0cd\x1ce\x1df\x1eg", "h\x85i\u2028j\u2029k", "l\rm"]
    assert read_lines(write(tmp_path / "odd.en", text(odd))) == odd


@pytest.mark.parametrize("name", ["bad.ko", "bad.ko.gz"])
def test_invalid_utf8_names_file_and_line(tmp_path, name):
    path = write(tmp_path / name, "첫째\n둘째\n".encode() + b"caf\xe9\n")
    with pytest.raises(CorpusError, match=r"bad\.ko(\.gz)?, line 3: invalid UTF-8") as e:
        read_lines(path)
    assert str(path) in str(e.value)


def test_unreadable_gzip_is_a_corpus_error(tmp_path):
    with pytest.raises(CorpusError, match="cannot read"):
        read_lines(tmp_path / "missing.ko.gz")
    (tmp_path / "junk.ko.gz").write_bytes(b"not gzip at all")
    with pytest.raises(CorpusError, match="junk.ko.gz"):
        read_lines(tmp_path / "junk.ko.gz")


@settings(max_examples=50, deadline=None)
@given(st.lists(st.text(alphabet=st.characters(blacklist_categories=["Cs"], blacklist_characters="\n\r\ufeff"))))
def test_lines_round_trip(lines):
    with tempfile.TemporaryDirectory() as d:
        assert read_lines(write(Path(d) / "x.en", text(lines))) == lines


# ----------------------------------------------------------------------------- read_parallel
def test_read_parallel_pairs_and_limit(tmp_path):
    src, tgt = write(tmp_path / "t.ko", text(KO)), write(tmp_path / "t.en.gz", text(EN))
    assert read_parallel(src, tgt) == list(zip(KO, EN))
    assert read_parallel(src, tgt, limit=2) == list(zip(KO, EN))[:2]


def test_mismatched_line_counts_name_both_files(tmp_path):
    src, tgt = write(tmp_path / "t.ko", text(KO)), write(tmp_path / "t.en", text(EN[:2]))
    with pytest.raises(CorpusError) as e:
        read_parallel(src, tgt)
    msg = str(e.value)
    assert str(src) in msg and str(tgt) in msg and "3 lines" in msg and "has 2" in msg


# ----------------------------------------------------------------------------- filters
def test_filter_counts_each_pair_under_its_first_rule():
    data = DataConfig(min_len=2, max_len=10, max_ratio=3.0)
    src = [0, 5, 1, 11, 2, 12, 3, 4, 10, 0]
    tgt = [3, 0, 5, 5, 9, 40, 9, 4, 10, 0]
    kept, counts = filter_pairs(src, tgt, data)
    # 0,1,9 empty; 2 too_short; 3 too_long; 5 too_long before ratio; 4 ratio (4.5); 6 ratio = 3 is kept
    assert kept == [6, 7, 8]
    assert counts == {"empty": 3, "too_short": 1, "too_long": 2, "ratio": 1}
    assert sum(counts.values()) + len(kept) == len(src)


def test_ratio_filter_off_and_empty_always_dropped():
    kept, counts = filter_pairs([1, 1, 0], [100, 1, 5], DataConfig(min_len=0, max_len=256, max_ratio=0.0))
    assert kept == [0, 1] and counts["empty"] == 1 and counts["ratio"] == 0
    with pytest.raises(ValueError):
        filter_pairs([1], [1, 2], DataConfig())


def test_log_filter_counts_one_line(caplog):
    counts = {"empty": 0, "too_short": 0, "too_long": 12, "ratio": 327}
    with caplog.at_level(logging.INFO, logger="nmt.corpus"):
        line = log_filter_counts(counts, 28839, "train")
    assert line == "train: kept 28,500 of 28,839 pairs (empty 0, too_short 0, too_long 12, ratio 327)"
    assert caplog.messages == [line]


def test_dev_and_test_are_read_unfiltered(tmp_path):
    ko = ["", "짧다", "긴 " * 500]
    en = ["orphan", "a b c d e f g h i j k l m n o p", "x"]
    for split in ("dev", "test"):
        write(tmp_path / "c" / f"{split}.ko", text(ko))
        write(tmp_path / "c" / f"{split}.en", text(en))
    data = DataConfig(name="c", root=str(tmp_path), max_len=2, max_ratio=1.5, dev_limit=0)
    for split in ("dev", "test"):
        assert read_parallel(*find_split(data, split)) == list(zip(ko, en))
        assert load_split(data, split) == list(zip(ko, en))


# ----------------------------------------------------------------------------- find_split
def test_embedded_bible_corpus_found_from_an_empty_root(tmp_path):
    data = DataConfig(name="bible-ko-en", root=str(tmp_path))
    sizes = {}
    for split in ("train", "dev", "test"):
        src, tgt = find_split(data, split)
        assert src.parent == tgt.parent == repo_data_dir() / "bible-ko-en"
        assert src.name == f"{split}.ko.gz" and tgt.name == f"{split}.en.gz"
        sizes[split] = len(read_parallel(src, tgt))
    assert sizes == {"train": 28839, "dev": 1000, "test": 1000}
    assert not any(tmp_path.iterdir())


def test_plain_file_and_relative_root(tmp_path, monkeypatch):
    write(tmp_path / "corp" / "c" / "dev.ko", text(KO))
    write(tmp_path / "corp" / "c" / "dev.en.gz", text(EN))
    monkeypatch.chdir(tmp_path)
    src, tgt = find_split(DataConfig(name="c", root="corp"), "dev")
    assert (src.name, tgt.name) == ("dev.ko", "dev.en.gz")
    assert read_parallel(src, tgt) == list(zip(KO, EN))


def test_missing_files_and_unknown_split(tmp_path):
    data = DataConfig(name="nowhere", root=str(tmp_path))
    with pytest.raises(CorpusError, match=r"train\.ko and train\.en .*not found in .*nowhere.*put them there"):
        find_split(data, "train")
    with pytest.raises(CorpusError, match="choose one of: train, dev, test"):
        find_split(data, "valid")


# pairs per split of the real corpora (their READMEs); extra corpora get a case only when present
REAL_SIZES = {"bible-ko-en": (28839, 1000, 1000), QUICK: (3359, 108, 118), "tatoeba-ko-en": (2718, 300, 300)}


@pytest.mark.parametrize("name", [n for n in REAL_SIZES if n != "tatoeba-ko-en" or has_corpus(n)])
def test_real_corpus_slices(data_root, name):
    data = DataConfig(name=name, root=str(data_root), train_limit=100)
    train = load_split(data, "train")
    assert len(train) == 100 and all(ko and en for ko, en in train)
    sizes = tuple(len(read_parallel(*find_split(data, split))) for split in ("train", "dev", "test"))
    assert sizes == REAL_SIZES[name]
    assert len(load_split(data, "dev")) == REAL_SIZES[name][1]


# ----------------------------------------------------------------------------- download
def make_tar(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def kpc(urls: dict[str, str], root: Path, **kw) -> DataConfig:
    pattern = kw.pop("member_pattern", "korean-english-park.{split}.{lang}")
    return DataConfig(name="kpc-news", root=str(root),
                      download=DownloadConfig(urls=urls, member_pattern=pattern, timeout=5, **kw))


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep test output clean
        pass


@pytest.fixture
def http_dir(tmp_path):
    """A folder served over HTTP on 127.0.0.1; yields (folder, base URL)."""
    folder = tmp_path / "www"
    folder.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield folder, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_download_over_http(tmp_path, http_dir):
    www, base = http_dir
    make_tar(www / "korean-english-park.train.tar.gz",
             {"korean-english-park.train.ko": text(KO), "korean-english-park.train.en": text(EN)})
    root = tmp_path / "data"
    data = kpc({"train": f"{base}/korean-english-park.train.tar.gz"}, root)
    download_corpus(data, root / "kpc-news", ["train"])
    assert sorted(p.name for p in root.iterdir()) == ["kpc-news"]  # no temporary leftovers
    assert sorted(p.name for p in (root / "kpc-news").iterdir()) == ["train.en", "train.ko"]
    assert read_parallel(*find_split(data, "train")) == list(zip(KO, EN))


def test_find_split_downloads_missing_split_from_file_url(tmp_path):
    archive = make_tar(tmp_path / "dev.tar.gz", {"./korean-english-park.dev.ko": text(KO),
                                                 "./korean-english-park.dev.en": text(EN)})
    data = kpc({"dev": archive.as_uri()}, tmp_path / "data")
    assert read_parallel(*find_split(data, "dev")) == list(zip(KO, EN))
    with pytest.raises(CorpusError, match="train.ko and train.en"):  # no URL for train: no download
        find_split(data, "train")


def test_unreachable_server_leaves_nothing(tmp_path):
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there now
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = tmp_path / "data"
    data = kpc({"train": f"http://127.0.0.1:{port}/korean-english-park.train.tar.gz"}, root)
    with pytest.raises(CorpusError, match=r"could not download http://127\.0\.0\.1.*without network, "
                                          r"put train\.ko and train\.en into .*kpc-news"):
        find_split(data, "train")
    assert list(root.iterdir()) == []


def test_http_404_and_bad_checksum_leave_nothing(tmp_path, http_dir):
    www, base = http_dir
    root = tmp_path / "data"
    with pytest.raises(CorpusError, match="HTTP 404"):
        download_corpus(kpc({"dev": f"{base}/missing.tar.gz"}, root), root / "kpc-news", ["dev"])
    make_tar(www / "dev.tar.gz", {"korean-english-park.dev.ko": text(KO), "korean-english-park.dev.en": text(EN)})
    data = kpc({"dev": f"{base}/dev.tar.gz"}, root, sha256={"dev": "0" * 64})
    with pytest.raises(CorpusError, match="sha256 .* differs from the expected 0000"):
        download_corpus(data, root / "kpc-news", ["dev"])
    assert list(root.iterdir()) == []


def test_path_traversal_members_are_never_written(tmp_path):
    evil = b"evil\n" * 3
    archive = make_tar(tmp_path / "t.tar.gz", {
        "../korean-english-park.train.ko": evil,
        "/abs/korean-english-park.train.en": evil,
        "korean-english-park.train.ko": text(KO),
        "korean-english-park.train.en": text(EN),
    })
    root = tmp_path / "deep" / "data"
    download_corpus(kpc({"train": archive.as_uri()}, root), root / "kpc-news", ["train"])
    assert read_lines(root / "kpc-news" / "train.ko") == KO
    assert read_lines(root / "kpc-news" / "train.en") == EN
    written = {p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()}
    assert written == {"t.tar.gz", "deep/data/kpc-news/train.ko", "deep/data/kpc-news/train.en"}


def test_tolerant_member_matching(tmp_path):
    archive = make_tar(tmp_path / "a.tar.gz", {"corpus/news-train.ko": text(KO), "corpus/news-train.en": text(EN),
                                               "corpus/news-test.ko": b"x\n", "corpus/README": b"hi\n"})
    root = tmp_path / "data"
    download_corpus(kpc({"train": archive.as_uri()}, root, member_pattern=""), root / "kpc-news", ["train"])
    assert read_lines(root / "kpc-news" / "train.en") == EN
    ambiguous = make_tar(tmp_path / "b.tar.gz", {"a.train.ko": b"1\n", "b.train.ko": b"2\n", "a.train.en": b"1\n"})
    with pytest.raises(CorpusError, match=r"2 members \(a\.train\.ko, b\.train\.ko\).*member_pattern"):
        download_corpus(kpc({"train": ambiguous.as_uri()}, root), root / "other", ["train"])
    assert not (root / "other").exists()


def test_bad_pattern_and_bad_url(tmp_path):
    archive = make_tar(tmp_path / "a.tar.gz", {"x.train.ko": b"1\n", "x.train.en": b"1\n"})
    with pytest.raises(CorpusError, match=r"member_pattern='\{name\}\.\{lang\}' is invalid"):
        download_corpus(kpc({"train": archive.as_uri()}, tmp_path, member_pattern="{name}.{lang}"),
                        tmp_path / "c", ["train"])
    with pytest.raises(CorpusError, match="could not download no-scheme.tar.gz"):
        download_corpus(kpc({"train": "no-scheme.tar.gz"}, tmp_path), tmp_path / "c", ["train"])
    assert not (tmp_path / "c").exists()


def test_not_an_archive(tmp_path):
    junk = tmp_path / "junk.tar.gz"
    junk.write_bytes(b"<html>rate limited</html>")
    with pytest.raises(CorpusError, match="not a readable .tar.gz"):
        download_corpus(kpc({"test": junk.as_uri()}, tmp_path / "d"), tmp_path / "d" / "kpc-news", ["test"])
    assert list((tmp_path / "d").iterdir()) == []
