"""Parallel corpora: find, read and check the files; filter training pairs; download.

A corpus is a folder ``{data.root}/{data.name}`` holding one file per split and
language, ``{stem}.{lang}`` or ``{stem}.{lang}.gz`` (stem = ``data.train`` /
``data.dev`` / ``data.test``). Line i of the source file and line i of the
target file form a pair.

Reading is strict, because a silent shift of one line misaligns every pair after
it: files must be UTF-8 (an error names the file and line), lines are split on
``"\\n"`` only (never ``str.splitlines``, which also breaks at ``\\x0b``,
``\\x1c`` or ``\\u2028`` and would change the line count), and both sides must
have the same number of lines.

Only the training split is ever filtered (:func:`filter_pairs`, on subword
lengths supplied by the caller). Dev and test are read as they are: dropping
hard sentences there would flatter the scores, and BLEU on a test set must be
comparable with other systems that use the same files.

The embedded default corpus (``data/bible-ko-en`` in the repository, gzipped)
is found even when ``data.root`` points elsewhere, so a fresh clone trains
offline. Corpora with ``data.download.urls`` are fetched on first use.
"""
from __future__ import annotations

import gzip
import hashlib
import itertools
import logging
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
import zlib
from http.client import HTTPException
from pathlib import Path, PurePosixPath
from typing import Iterator, Sequence

import numpy as np
from tqdm import tqdm

from nmt.config import DataConfig, repo_data_dir

log = logging.getLogger(__name__)

SPLITS = ("train", "dev", "test")
FILTER_RULES = ("empty", "too_short", "too_long", "ratio")
USER_AGENT = "nmt-corpus-download/0.1 (+python-urllib)"


class CorpusError(Exception):
    """A corpus file is missing, unreadable or inconsistent; the message says what to do."""


# ----------------------------------------------------------------------------- reading
def read_lines(path: Path) -> list[str]:
    """Lines of a UTF-8 text file (``.gz`` is decompressed), without line endings.

    Splits on ``"\\n"`` only; removes one trailing ``"\\r"`` per line (CRLF
    files) and a UTF-8 BOM at the start. A missing final newline is fine; an
    empty file gives ``[]``.
    """
    path = Path(path)
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                raw = f.read()
        else:
            raw = path.read_bytes()
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
        raise CorpusError(f"cannot read {path}: {e}") from e
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        column = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        raise CorpusError(
            f"{path}, line {line}: invalid UTF-8 (byte 0x{raw[e.start]:02x} at byte column {column}); "
            f"convert the file to UTF-8, e.g. iconv -f <encoding> -t UTF-8"
        ) from e
    if text.startswith("\ufeff"):
        text = text[1:]
    if not text:
        return []
    lines = text.split("\n")
    if lines[-1] == "":  # the final newline ends the last line, it does not start a new one
        lines.pop()
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def iter_lines(path: Path) -> Iterator[str]:
    """The lines of :func:`read_lines`, one at a time, so that a corpus of any size streams in
    bounded memory (the same splitting and the same one-line errors, with the line number)."""
    path = Path(path)
    try:
        f = gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")
    except OSError as e:
        raise CorpusError(f"cannot read {path}: {e}") from e
    with f:
        number = 0
        try:
            for raw in f:                      # binary files split on b"\n" only
                number += 1
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise CorpusError(
                        f"{path}, line {number}: invalid UTF-8 (byte 0x{raw[e.start]:02x} at byte column "
                        f"{e.start + 1}); convert the file to UTF-8, e.g. iconv -f <encoding> -t UTF-8") from e
                if number == 1 and line.startswith("\ufeff"):
                    line = line[1:]
                if line.endswith("\n"):
                    line = line[:-1]
                yield line[:-1] if line.endswith("\r") else line
        except (OSError, EOFError) as e:       # a truncated or corrupt .gz
            raise CorpusError(f"cannot read {path}: {e}") from e


def iter_parallel(src: Path, tgt: Path, limit: int = 0) -> Iterator[tuple[str, str]]:
    """Pairs of :func:`read_parallel`, one at a time; raises CorpusError when the line counts differ
    (found when the shorter file ends)."""
    n = 0
    for n, (a, b) in enumerate(itertools.zip_longest(iter_lines(src), iter_lines(tgt)), start=1):
        if a is None or b is None:
            longer, shorter = (src, tgt) if b is None else (tgt, src)
            raise CorpusError(f"line counts differ: {shorter} has {n - 1:,} lines, {longer} has more; line i of "
                              f"one file must translate line i of the other (check for a lost or extra line)")
        if limit and n > limit:
            return
        yield a, b


def read_parallel(src: Path, tgt: Path, limit: int = 0) -> list[tuple[str, str]]:
    """Pairs ``(src line, tgt line)``; the first ``limit`` only when ``limit > 0``.

    Never filters anything. Raises CorpusError when the line counts differ.
    """
    src_lines, tgt_lines = read_lines(src), read_lines(tgt)
    if len(src_lines) != len(tgt_lines):
        raise CorpusError(
            f"line counts differ: {src} has {len(src_lines):,} lines, {tgt} has {len(tgt_lines):,}; "
            f"line i of one file must translate line i of the other (check for a lost or extra line)"
        )
    pairs = list(zip(src_lines, tgt_lines))
    return pairs[:limit] if limit > 0 else pairs


# ----------------------------------------------------------------------------- locating
def _split_stem(data: DataConfig, split: str) -> str:
    if split not in SPLITS:
        raise CorpusError(f"unknown split {split!r}; choose one of: {', '.join(SPLITS)}")
    return getattr(data, split)


def _existing(folder: Path, name: str) -> Path | None:
    """``folder/name`` or ``folder/name.gz``, whichever exists (the plain file first)."""
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _find_in(folder: Path, stem: str, data: DataConfig) -> tuple[Path, Path] | None:
    src = _existing(folder, f"{stem}.{data.src_lang}")
    tgt = _existing(folder, f"{stem}.{data.tgt_lang}")
    return (src, tgt) if src and tgt else None


def find_split(data: DataConfig, split: str) -> tuple[Path, Path]:
    """Source and target files of ``split`` ("train", "dev" or "test").

    Looks in ``{data.root}/{data.name}`` (a relative root is relative to the
    current directory), then in the repository's ``data/{data.name}`` (the
    embedded corpus). When neither has the files and ``data.download.urls``
    has the split, downloads it into ``{data.root}/{data.name}``.
    """
    stem = _split_stem(data, split)
    folder = Path(data.root).expanduser() / data.name
    for candidate in (folder, repo_data_dir() / data.name):
        found = _find_in(candidate, stem, data)
        if found:
            log.debug("%s split of %s: %s, %s", split, data.name, *found)
            return found
    if split in data.download.urls:
        download_corpus(data, folder, [split])
        found = _find_in(folder, stem, data)
        if found:
            return found
    names = f"{stem}.{data.src_lang} and {stem}.{data.tgt_lang}"
    raise CorpusError(
        f"corpus {data.name!r}: {names} (or .gz) not found in {folder.resolve()}; "
        f"put them there, or set data.root (env NMT_DATA_DIR) to the folder that holds {data.name}/"
    )


def load_split(data: DataConfig, split: str) -> list[tuple[str, str]]:
    """Pairs of ``split`` with ``data.train_limit`` / ``data.dev_limit`` applied; never filtered."""
    limit = {"train": data.train_limit, "dev": data.dev_limit}.get(split, 0)
    src, tgt = find_split(data, split)
    pairs = read_parallel(src, tgt, limit)
    log.info("%s: %s pairs from %s, %s", split, f"{len(pairs):,}", src, tgt)
    return pairs


# ----------------------------------------------------------------------------- filtering
def filter_pairs(src_lens: Sequence[int], tgt_lens: Sequence[int], data: DataConfig) -> tuple[list[int], dict[str, int]]:
    """Indices of training pairs to keep, and how many were dropped by each rule.

    ``src_lens`` / ``tgt_lens`` are subword-token counts per pair. Rules, in
    order (a dropped pair counts under the first rule it fails): "empty" (a
    side has 0 tokens, always dropped), "too_short" (< data.min_len),
    "too_long" (> data.max_len), "ratio" (longer / shorter side >
    data.max_ratio, when max_ratio > 0). For the training split only.
    """
    if len(src_lens) != len(tgt_lens):
        raise ValueError(f"filter_pairs: {len(src_lens)} source lengths but {len(tgt_lens)} target lengths")
    a, b = np.asarray(src_lens, dtype=np.int64), np.asarray(tgt_lens, dtype=np.int64)
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    empty = lo == 0
    too_short = ~empty & (lo < data.min_len)
    too_long = ~empty & ~too_short & (hi > data.max_len)
    ratio = ~empty & ~too_short & ~too_long & (data.max_ratio > 0) & (hi > data.max_ratio * np.maximum(lo, 1))
    counts = {rule: int(m.sum()) for rule, m in zip(FILTER_RULES, (empty, too_short, too_long, ratio))}
    return np.flatnonzero(~(empty | too_short | too_long | ratio)).tolist(), counts


def log_filter_counts(counts: dict[str, int], total: int, split_name: str) -> str:
    """Log (and return) one line: "train: kept 28,500 of 28,839 pairs (empty 0, ...)"."""
    kept = total - sum(counts.values())
    rules = ", ".join(f"{rule} {n:,}" for rule, n in counts.items())
    line = f"{split_name}: kept {kept:,} of {total:,} pairs ({rules})"
    log.info(line)
    return line


# ----------------------------------------------------------------------------- download
def _fetch(url: str, out: Path, timeout: float) -> str:
    """Stream ``url`` into ``out`` with a progress bar; returns the sha256 of the bytes."""
    digest = hashlib.sha256()
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    with urllib.request.urlopen(request, timeout=timeout) as response, open(out, "wb") as f:
        total = response.headers.get("Content-Length")
        with tqdm(total=int(total) if total else None, unit="B", unit_scale=True, unit_divisor=1024,
                  desc=f"download {url.rsplit('/', 1)[-1]}", leave=False) as bar:
            while chunk := response.read(1 << 16):
                f.write(chunk)
                digest.update(chunk)
                bar.update(len(chunk))
    return digest.hexdigest()


def _safe_name(name: str) -> bool:
    """False for members that would land outside the extraction folder."""
    p = PurePosixPath(name.replace("\\", "/"))
    return not p.is_absolute() and ".." not in p.parts and not (p.parts and p.parts[0].endswith(":"))


def _pick_member(members: list[tarfile.TarInfo], split: str, lang: str, pattern: str, archive: str) -> tarfile.TarInfo:
    """The one member holding ``split``'s ``lang`` side: exact basename from ``pattern``, else tolerant."""
    files = [m for m in members if m.isfile() and _safe_name(m.name)]

    def base(m: tarfile.TarInfo) -> str:
        return PurePosixPath(m.name).name

    matches = []
    if pattern:
        try:
            wanted = pattern.format(split=split, lang=lang)
        except (KeyError, IndexError, ValueError) as e:
            raise CorpusError(f"data.download.member_pattern={pattern!r} is invalid ({e!r}); "
                              f"it may only use {{split}} (the split name) and {{lang}}") from e
        matches = [m for m in files if base(m) == wanted]
    if not matches:  # pattern unset or the archive names differ: any "*{split}*.{lang}"
        matches = [m for m in files if base(m).endswith(f".{lang}") and split in base(m)]
    if len(matches) != 1:
        shown = ", ".join(m.name for m in files[:10]) or "none"
        what = "no member" if not matches else f"{len(matches)} members ({', '.join(m.name for m in matches)})"
        raise CorpusError(
            f"{archive}: {what} for split {split!r}, language {lang!r}; files in the archive: {shown}; "
            f"set data.download.member_pattern, e.g. 'korean-english-park.{{split}}.{{lang}}'"
        )
    return matches[0]


def _extract_split(archive: Path, url: str, split: str, stem: str, data: DataConfig, out_dir: Path) -> list[Path]:
    """Write the split's two sides from ``archive`` as ``out_dir/{stem}.{lang}``; returns the paths."""
    written = []
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = tar.getmembers()
            for m in members:
                if m.isfile() and not _safe_name(m.name):
                    log.warning("%s: ignoring member %r (its path leads outside the archive)", url, m.name)
            for lang in (data.src_lang, data.tgt_lang):
                member = _pick_member(members, split, lang, data.download.member_pattern, url)
                source = tar.extractfile(member)  # bytes only: nothing is created from member names
                assert source is not None
                target = out_dir / f"{stem}.{lang}"
                with source, open(target, "wb") as f:
                    shutil.copyfileobj(source, f)
                written.append(target)
    except (tarfile.TarError, EOFError, gzip.BadGzipFile, zlib.error) as e:  # truncated or not an archive
        raise CorpusError(f"{url} is not a readable .tar.gz ({e}); retry (the download may be cut short) "
                          f"or check data.download.urls.{split}") from e
    return written


def download_corpus(data: DataConfig, dest: Path, splits: list[str]) -> None:
    """Download each split's archive from ``data.download.urls`` and put its files into ``dest``.

    The archive goes to a temporary file next to ``dest``; the two sides are
    written to a temporary folder there and moved into ``dest`` with
    ``os.replace`` only after both are complete, so an interrupted download
    leaves nothing half-written (a killed process may leave hidden ``.{dest}.*``
    temporaries next to ``dest``, never inside it). ``file://`` URLs work too.
    Archive members are chosen by ``data.download.member_pattern`` ({split} is
    the split name, e.g. "train"; {lang} the language); their bytes are copied,
    never extracted by name, so a member path like ``../x`` cannot escape.
    """
    dest = Path(dest).expanduser().resolve()  # messages show the full folder a user must fill
    cfg = data.download
    for split in splits:
        stem = _split_stem(data, split)
        url = cfg.urls.get(split)
        names = f"{stem}.{data.src_lang} and {stem}.{data.tgt_lang}"
        if not url:
            raise CorpusError(f"no download URL for split {split!r} of {data.name!r} (data.download.urls); "
                              f"put {names} into {dest}")
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.{split}.", suffix=".tar.gz", dir=dest.parent)
            os.close(fd)
            tmp_dir = Path(tempfile.mkdtemp(prefix=f".{dest.name}.{split}.", dir=dest.parent))
        except OSError as e:
            raise CorpusError(f"cannot write next to {dest} ({e}); set data.root to a writable folder") from e
        archive = Path(tmp_name)
        try:
            log.info("downloading %s split of %s from %s", split, data.name, url)
            try:
                sha = _fetch(url, archive, cfg.timeout)
            except urllib.error.HTTPError as e:
                raise CorpusError(f"could not download {url} (HTTP {e.code} {e.reason}); "
                                  f"without network, put {names} into {dest}") from e
            except (urllib.error.URLError, TimeoutError, ConnectionError, HTTPException, ValueError) as e:
                reason = getattr(e, "reason", None) or e
                raise CorpusError(f"could not download {url} ({reason}); "
                                  f"without network, put {names} into {dest}") from e
            expected = cfg.sha256.get(split, "")
            if expected and sha != expected.lower():
                raise CorpusError(f"{url}: sha256 {sha} differs from the expected {expected} "
                                  f"(data.download.sha256.{split}); retry, or check that the archive is the right one")
            files = _extract_split(archive, url, split, stem, data, tmp_dir)
            dest.mkdir(parents=True, exist_ok=True)
            for f in files:
                os.replace(f, dest / f.name)
            log.info("%s split of %s saved in %s", split, data.name, dest)
        finally:
            archive.unlink(missing_ok=True)
            shutil.rmtree(tmp_dir, ignore_errors=True)
