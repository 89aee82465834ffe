"""The binary token cache of a training split: encode a corpus once, memory-map it at every later start.

A cache folder ``{cache_dir}/{key}/`` holds, for the filtered and truncated
training pairs of one corpus under one tokenizer::

    src.bin, tgt.bin    token ids of all pairs, one flat array per side (uint16
                        when the vocabulary fits, else int32); source rows end with EOS
    src.idx, tgt.idx    int64 offsets, one more than pairs: pair i is bin[idx[i]:idx[i+1]]
    meta.json           what it was built from (files with size and mtime, tokenizer
                        sha256, settings), the counts per filter rule; written last

The key hashes the corpus file paths, the tokenizer and every setting that
changes the arrays, so runs and sweep jobs that share them share one cache, and
every rank of a multi-GPU run maps the same files (the OS keeps one copy in
memory). A cache is rebuilt, with a message, when it is incomplete or
truncated, when a corpus file changed since (size or modification time), or
when it was built with another tokenizer; never read when wrong.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np

from nmt.config import DataConfig
from nmt.corpus import FILTER_RULES, filter_pairs, iter_parallel, log_filter_counts
from nmt.tokenizer import EOS, Tokenizer

log = logging.getLogger(__name__)

FORMAT = 1                 # bump when the layout or the meaning of the arrays changes
CHUNK = 20_000             # pairs encoded per batch (sentencepiece spreads a batch over its C++ threads)


class TokenArrays(Sequence):
    """One side of a cached split: ``arrays[i]`` is pair i's ids (a numpy view of the mapped file)."""

    def __init__(self, data: np.ndarray, offsets: np.ndarray) -> None:
        self.data, self.offsets = data, offsets

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return self.data[self.offsets[i]:self.offsets[i + 1]]

    def lengths(self) -> np.ndarray:
        """Tokens per pair (int64), computed from the offsets: the only per-pair array held in memory."""
        return np.diff(self.offsets)


@dataclass
class CachedSplit:
    src: TokenArrays
    tgt: TokenArrays
    counts: dict                 # pairs dropped per filter rule
    total: int                   # pairs read before filtering
    folder: Path


def _fingerprint(path: Path) -> dict:
    st = os.stat(path)
    return {"path": str(Path(path).resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def tokenizer_digest(tok: Tokenizer) -> str:
    h = hashlib.sha256()
    state = tok.to_state()
    for part in (state["src_model"], state["tgt_model"] or b""):
        h.update(len(part).to_bytes(8, "little") + part)
    return h.hexdigest()


def cache_key(files: Sequence[Path], tok_digest: str, settings: dict) -> str:
    """sha256 of the corpus paths, the tokenizer and the settings (not of file contents: a changed
    file keeps its key and is detected as stale by its size and modification time)."""
    h = hashlib.sha256(json.dumps({"format": FORMAT, "files": [str(Path(f).resolve()) for f in files],
                                   "tokenizer": tok_digest, "settings": settings}, sort_keys=True).encode())
    return h.hexdigest()[:32]


def split_settings(data: DataConfig, max_positions: int) -> dict:
    """Everything besides the files and the tokenizer that changes the cached arrays."""
    return {"train_limit": data.train_limit, "min_len": data.min_len, "max_len": data.max_len,
            "max_ratio": data.max_ratio, "max_positions": max_positions}


def _dtype(tok: Tokenizer) -> np.dtype:
    return np.dtype(np.uint16) if max(tok.src_vocab_size, tok.tgt_vocab_size) <= 65535 else np.dtype(np.int32)


def _why_invalid(folder: Path, files: Sequence[Path], tok_digest: str) -> Optional[str]:
    """None if the cache in ``folder`` can be used, else what is wrong with it."""
    try:
        meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "it is incomplete (no readable meta.json)"
    if meta.get("format") != FORMAT:
        return f"it has format {meta.get('format')}, this version writes {FORMAT}"
    if meta.get("tokenizer") != tok_digest:
        return "it was built with another tokenizer"
    for old, path in zip(meta.get("files", []), files):
        if old != _fingerprint(path):
            return f"{path} changed since it was built (size or modification time)"
    itemsize = np.dtype(meta["dtype"]).itemsize
    for side in ("src", "tgt"):
        n_tokens, n_pairs = meta["tokens"][side], meta["pairs"]
        sizes = {f"{side}.bin": n_tokens * itemsize, f"{side}.idx": (n_pairs + 1) * 8}
        for name, size in sizes.items():
            if not (folder / name).is_file() or (folder / name).stat().st_size != size:
                return f"{name} is missing or truncated (expected {size:,} bytes)"
    return None


def _open(folder: Path) -> tuple[TokenArrays, TokenArrays, dict]:
    meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
    dtype = np.dtype(meta["dtype"])

    def side(name: str) -> TokenArrays:
        offsets = np.memmap(folder / f"{name}.idx", dtype=np.int64, mode="r")
        data = np.memmap(folder / f"{name}.bin", dtype=dtype, mode="r") if meta["tokens"][name] else \
            np.zeros(0, dtype=dtype)
        if offsets[-1] != len(data):
            raise ValueError(f"{name}.idx ends at {offsets[-1]}, {name}.bin holds {len(data)} tokens")
        return TokenArrays(data, offsets)
    return side("src"), side("tgt"), meta


def _chunks(files: Sequence[Path], limit: int) -> Iterator[tuple[list[str], list[str]]]:
    src, tgt = [], []
    for a, b in iter_parallel(files[0], files[1], limit):
        src.append(a)
        tgt.append(b)
        if len(src) == CHUNK:
            yield src, tgt
            src, tgt = [], []
    if src:
        yield src, tgt


def _build(folder: Path, files: Sequence[Path], tok: Tokenizer, data: DataConfig, max_positions: int,
           tok_digest: str, progress: bool) -> None:
    """Encode, filter and truncate the split into a temporary folder, then rename it into place."""
    from tqdm import tqdm

    dtype = _dtype(tok)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    counts, total = dict.fromkeys(FILTER_RULES, 0), 0
    ends = {"src": [np.zeros(1, dtype=np.int64)], "tgt": [np.zeros(1, dtype=np.int64)]}
    written = {"src": 0, "tgt": 0}
    truncated = {"src": 0, "tgt": 0}
    start = time.time()
    try:
        with open(tmp / "src.bin", "wb") as fs, open(tmp / "tgt.bin", "wb") as ft, \
                tqdm(desc=f"encoding {data.name} train", unit=" pairs", disable=not progress, mininterval=1.0) as bar:
            for src_lines, tgt_lines in _chunks(files, data.train_limit):
                src_ids, tgt_ids = tok.encode_src(src_lines), tok.encode_tgt(tgt_lines)
                src_lens = np.fromiter((len(s) - 1 for s in src_ids), dtype=np.int64, count=len(src_ids))
                tgt_lens = np.fromiter((len(t) for t in tgt_ids), dtype=np.int64, count=len(tgt_ids))
                kept, dropped = filter_pairs(src_lens, tgt_lens, data)
                total += len(src_ids)
                for rule, n in dropped.items():
                    counts[rule] += n
                for name, ids, out, limit in (("src", src_ids, fs, max_positions - 1),
                                              ("tgt", tgt_ids, ft, max_positions - 2)):
                    rows = [ids[i] for i in kept]
                    truncated[name] += sum(len(r) > limit for r in rows)
                    rows = [_truncate(r, limit, name == "src") for r in rows]
                    lens = np.fromiter(map(len, rows), dtype=np.int64, count=len(rows))
                    flat = np.fromiter(itertools.chain.from_iterable(rows), dtype=dtype, count=int(lens.sum()))
                    out.write(flat.tobytes())
                    ends[name].append(written[name] + np.cumsum(lens))
                    written[name] += int(lens.sum())
                bar.update(len(src_ids))
        for name in ("src", "tgt"):
            np.concatenate(ends[name]).astype(np.int64).tofile(tmp / f"{name}.idx")
        meta = {"format": FORMAT, "dtype": dtype.name, "files": [_fingerprint(f) for f in files],
                "tokenizer": tok_digest, "settings": split_settings(data, max_positions), "corpus": data.name,
                "pairs": sum(len(e) for e in ends["src"]) - 1, "read": total, "dropped": counts,
                "tokens": written, "truncated": truncated, "seconds": round(time.time() - start, 1)}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        shutil.rmtree(folder, ignore_errors=True)         # a stale or broken cache of the same key
        try:
            os.replace(tmp, folder)
        except OSError:
            if not (folder / "meta.json").is_file():
                raise
            log.info("token cache %s was written by another process meanwhile; using it", folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _truncate(ids: list[int], limit: int, keep_eos: bool) -> list[int]:
    if len(ids) <= limit:
        return ids
    return ids[:limit - 1] + [EOS] if keep_eos else ids[:limit]


def cached_split(files: Sequence[Path], tok: Tokenizer, data: DataConfig, max_positions: int, cache_dir: str,
                 progress: bool = True) -> CachedSplit:
    """The training split of ``files`` under ``tok``, from the cache or encoded into it now.

    Pairs are filtered by ``data``'s rules and truncated to ``max_positions``
    (source ``max_positions - 1`` tokens with EOS kept, target ``max_positions - 2``).
    """
    digest = tokenizer_digest(tok)
    folder = Path(os.path.expanduser(cache_dir)) / cache_key(files, digest, split_settings(data, max_positions))
    problem = _why_invalid(folder, files, digest) if folder.exists() else "missing"
    if problem is None:
        try:
            src, tgt, meta = _open(folder)
        except (OSError, ValueError) as e:
            problem = f"it cannot be read ({e})"
    if problem is not None:
        if problem != "missing":
            log.warning("token cache %s is unusable: %s; encoding the corpus again", folder, problem)
        _build(folder, files, tok, data, max_positions, digest, progress)
        src, tgt, meta = _open(folder)
        log.info("training split encoded in %.1f s into %s", meta["seconds"], folder)
    else:
        log.info("training split mapped from the token cache %s", folder)
    log_filter_counts(meta["dropped"], meta["read"], "train")
    for side, name, limit in (("src", "source", max_positions - 1), ("tgt", "target", max_positions - 2)):
        n = meta["truncated"][side]
        if n:
            log.warning("train %s: %d sentence(s) longer than %d tokens were truncated", name, n, limit)
    return CachedSplit(src, tgt, meta["dropped"], meta["read"], folder)
