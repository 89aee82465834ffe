"""Sentencepiece subword tokenizer: train once, cache by content, ship inside checkpoints.

Special ids are fixed for every model this module trains, so the rest of the
code can use the module constants instead of asking the tokenizer::

    PAD=0  UNK=1  BOS=2  EOS=3

Source sequences get EOS appended by :meth:`Tokenizer.encode_src`; target
sequences come back bare from :meth:`Tokenizer.encode_tgt`, because the batcher
builds both the decoder input (BOS + y) and the label (y + EOS) from them.

:func:`train_or_load` keys its cache by a sha256 of the training text and the
tokenizer settings, so a run with the same data and settings reuses the model
instead of training a new one, and a Hydra multirun trains it at most once per
setting (a process that loses the race to write the cache loads the winner's).
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Iterable, Sequence

import sentencepiece as spm

from nmt.config import ConfigError, TokenizerConfig

log = logging.getLogger(__name__)

PAD, UNK, BOS, EOS = 0, 1, 2, 3
SPECIAL_IDS = {"pad_id": PAD, "unk_id": UNK, "bos_id": BOS, "eos_id": EOS}

_SURROGATE = re.compile("[\ud800-\udfff]")
STATE_FORMAT = 1          # bump when to_state()'s layout changes
_CACHE_FORMAT = 2         # bump when trained models (or the key) would change for the same settings
_SETTINGS_NOT_IN_KEY = ("cache_dir", "quiet")  # neither changes the trained model
_SP_SEED = 1              # sentencepiece's sampling seed (process-global, so set before each training)


def _processor(proto: bytes, name: str) -> spm.SentencePieceProcessor:
    sp = spm.SentencePieceProcessor(model_proto=proto)
    got = {"pad_id": sp.pad_id(), "unk_id": sp.unk_id(), "bos_id": sp.bos_id(), "eos_id": sp.eos_id()}
    if got != SPECIAL_IDS:
        raise ValueError(f"sentencepiece model {name} has special ids {got}; nmt needs {SPECIAL_IDS}")
    return sp


class Tokenizer:
    """Source and target sentencepiece models (one shared object when ``joint``).

    Build with :func:`train_or_load`, :meth:`from_state` (checkpoints) or :meth:`load`.
    """

    def __init__(self, src_proto: bytes, tgt_proto: bytes | None = None, settings: dict | None = None):
        """``tgt_proto=None`` means joint: the source model serves both sides."""
        self._src_proto = bytes(src_proto)
        self._tgt_proto = None if tgt_proto is None else bytes(tgt_proto)
        self.settings: dict = dict(settings or {})
        self.src_sp = _processor(self._src_proto, "src" if tgt_proto is not None else "joint")
        self.tgt_sp = self.src_sp if tgt_proto is None else _processor(self._tgt_proto, "tgt")

    # ------------------------------------------------------------------ properties
    @property
    def joint(self) -> bool:
        return self._tgt_proto is None

    @property
    def src_vocab_size(self) -> int:
        return self.src_sp.get_piece_size()

    @property
    def tgt_vocab_size(self) -> int:
        return self.tgt_sp.get_piece_size()

    # ------------------------------------------------------------------ encode / decode
    def encode_src(self, lines: Sequence[str]) -> list[list[int]]:
        """Source ids, each sequence ending with EOS (batch-encoded in C++ threads)."""
        return _encode(self.src_sp, lines, add_eos=True)

    def encode_tgt(self, lines: Sequence[str]) -> list[list[int]]:
        """Target ids without BOS/EOS (the batcher adds them)."""
        return _encode(self.tgt_sp, lines, add_eos=False)

    def decode_tgt(self, ids: Iterable[int]) -> str:
        """Text of a target id sequence: stops at the first EOS, drops PAD and BOS.

        Accepts a list of ints or a 1-D tensor (anything with ``tolist``).
        """
        return self.tgt_sp.decode(_strip(ids))

    def decode_tgt_batch(self, batch: Iterable[Iterable[int]]) -> list[str]:
        """:meth:`decode_tgt` for each row (a list of lists or a 2-D tensor)."""
        if hasattr(batch, "tolist"):
            batch = batch.tolist()
        return [self.decode_tgt(row) for row in batch]

    def decode_src(self, ids: Iterable[int]) -> str:
        """Text of a source id sequence (same rules as :meth:`decode_tgt`), for logs."""
        return self.src_sp.decode(_strip(ids))

    # ------------------------------------------------------------------ persistence
    def to_state(self) -> dict:
        """Builtins and bytes only, so it loads with ``torch.load(weights_only=True)``."""
        return {
            "format": STATE_FORMAT,
            "joint": self.joint,
            "src_model": self._src_proto,
            "tgt_model": self._tgt_proto,
            "settings": dict(self.settings),
        }

    @classmethod
    def from_state(cls, state: dict) -> "Tokenizer":
        fmt = state.get("format")
        if fmt != STATE_FORMAT:
            raise ValueError(f"tokenizer state has format {fmt!r}; this version reads format {STATE_FORMAT}")
        tgt = None if state["joint"] else state["tgt_model"]
        return cls(state["src_model"], tgt, state.get("settings"))

    def save(self, directory: Path | str) -> None:
        """Write ``joint.model`` (or ``src.model`` and ``tgt.model``) for humans and other tools."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        for name, data in _model_files(self._src_proto, self._tgt_proto).items():
            (directory / name).write_bytes(data)

    @classmethod
    def load(cls, directory: Path | str, settings: dict | None = None) -> "Tokenizer":
        """Inverse of :meth:`save`."""
        directory = Path(directory)
        if (directory / "joint.model").is_file():
            return cls((directory / "joint.model").read_bytes(), None, settings)
        src, tgt = directory / "src.model", directory / "tgt.model"
        if not (src.is_file() and tgt.is_file()):
            raise FileNotFoundError(f"{directory} holds neither joint.model nor src.model + tgt.model")
        return cls(src.read_bytes(), tgt.read_bytes(), settings)

    def __repr__(self) -> str:
        if self.joint:
            return f"Tokenizer(joint, vocab={self.src_vocab_size})"
        return f"Tokenizer(src_vocab={self.src_vocab_size}, tgt_vocab={self.tgt_vocab_size})"


def _encode(sp: spm.SentencePieceProcessor, lines: Sequence[str], add_eos: bool) -> list[list[int]]:
    """Batch-encode; a line with lone surrogates (text decoded with errors="surrogateescape", as
    Python reads stdin in the C locale) is not UTF-8, so sentencepiece rejects the whole batch
    with a TypeError: those lines are retried with U+FFFD in place of each surrogate."""
    lines = list(lines)
    try:
        return sp.encode(lines, out_type=int, add_eos=add_eos)
    except TypeError:
        clean = [_SURROGATE.sub("\ufffd", line) for line in lines]
        return sp.encode(clean, out_type=int, add_eos=add_eos)


def _strip(ids: Iterable[int]) -> list[int]:
    """Ids up to the first EOS, without PAD and BOS."""
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    kept: list[int] = []
    for i in ids:
        if i == EOS:
            break
        if i != PAD and i != BOS:
            kept.append(int(i))
    return kept


def _model_files(src_proto: bytes, tgt_proto: bytes | None) -> dict[str, bytes]:
    if tgt_proto is None:
        return {"joint.model": src_proto}
    return {"src.model": src_proto, "tgt.model": tgt_proto}


# ---------------------------------------------------------------------- training + cache
def _key_settings(cfg: TokenizerConfig) -> dict:
    return {k: v for k, v in asdict(cfg).items() if k not in _SETTINGS_NOT_IN_KEY}


class _TextDigest:
    """sha256 of one side's lines, fed one line at a time (a corpus of any size streams through)."""

    def __init__(self) -> None:
        self.h, self.lines = hashlib.sha256(), 0

    def add(self, line: str) -> None:
        self.h.update(line.encode("utf-8", "surrogatepass"))
        self.h.update(b"\n")
        self.lines += 1


def _combine(cfg: TokenizerConfig, src: _TextDigest, tgt: _TextDigest) -> str:
    header = {"format": _CACHE_FORMAT, "special": SPECIAL_IDS, "settings": _key_settings(cfg)}
    h = hashlib.sha256(json.dumps(header, sort_keys=True).encode())
    for side, d in (("src", src), ("tgt", tgt)):
        # the line counts delimit the sides, so moving a line across them changes the key
        h.update(f"\0{side}:{d.lines}:{d.h.hexdigest()}\0".encode())
    return h.hexdigest()


def cache_key(cfg: TokenizerConfig, src_lines: Iterable[str], tgt_lines: Iterable[str]) -> str:
    """sha256 of the training text (both sides) and every setting that shapes the model."""
    src, tgt = _TextDigest(), _TextDigest()
    for line in src_lines:
        src.add(line)
    for line in tgt_lines:
        tgt.add(line)
    return _combine(cfg, src, tgt)


def cache_key_of_pairs(cfg: TokenizerConfig, pairs: Iterable[tuple[str, str]]) -> str:
    """:func:`cache_key` of the two sides of ``pairs`` in one pass (e.g. streamed from the corpus files)."""
    src, tgt = _TextDigest(), _TextDigest()
    for a, b in pairs:
        src.add(a)
        tgt.add(b)
    return _combine(cfg, src, tgt)


def _train_model(lines: list[str], cfg: TokenizerConfig, side: str) -> bytes:
    """Train one sentencepiece model in memory; sentencepiece's size errors become ConfigError.

    ``side`` names the text in error messages ("source side", "joint source+target text").
    """
    out = io.BytesIO()
    spm.set_random_generator_seed(_SP_SEED)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines),
            model_writer=out,
            model_type=cfg.model_type,
            vocab_size=cfg.vocab_size,
            character_coverage=cfg.character_coverage,
            byte_fallback=cfg.byte_fallback,
            input_sentence_size=cfg.input_sentence_size,
            shuffle_input_sentence=cfg.shuffle_input_sentence,
            num_threads=cfg.num_threads,
            minloglevel=2 if cfg.quiet else 0,
            **SPECIAL_IDS,
        )
    except RuntimeError as e:
        raise _size_error(str(e), cfg, side, len(lines)) from e
    return out.getvalue()


def _size_error(msg: str, cfg: TokenizerConfig, side: str, n_lines: int) -> Exception:
    what = f"the {side} of this corpus ({n_lines} lines)"
    m = re.search(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)", msg)
    if m:
        return ConfigError(f"tokenizer.vocab_size={cfg.vocab_size} is too large for {what} "
                           f"(sentencepiece allows at most {m.group(2)}); lower it")
    m = re.search(r"Vocabulary size is smaller than required_chars\. (\d+) vs (\d+)", msg)
    if m:
        return ConfigError(f"tokenizer.vocab_size={cfg.vocab_size} is too small for {what}: "
                           f"it needs at least {m.group(2)} pieces for its characters at "
                           f"tokenizer.character_coverage={cfg.character_coverage}; "
                           "raise vocab_size or lower character_coverage")
    return RuntimeError(f"sentencepiece training failed on {what}: {msg}")


def _check(cfg: TokenizerConfig) -> None:
    if cfg.model_type not in ("unigram", "bpe"):
        raise ConfigError(f"tokenizer.model_type={cfg.model_type!r} is not valid; choose one of: unigram, bpe")
    if cfg.num_threads < 1:
        raise ConfigError(f"tokenizer.num_threads must be >= 1, got {cfg.num_threads}")
    if cfg.input_sentence_size < 0:
        raise ConfigError(f"tokenizer.input_sentence_size must be >= 0 (0 = all), got {cfg.input_sentence_size}")


def _store(final: Path, files: dict[str, bytes], meta: dict) -> None:
    """Write ``files`` into ``final`` atomically: a temp dir beside it, then os.replace.

    If another process got there first the directory exists and the rename fails;
    that process wrote the same content (same key), so ours is simply discarded.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        for name, data in files.items():
            (tmp / name).write_bytes(data)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        try:
            os.replace(tmp, final)
        except OSError:
            if not final.is_dir():
                raise
            log.info("tokenizer cache %s was written by another process meanwhile; using it", final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _load_cached(directory: Path, joint: bool) -> tuple[bytes, bytes | None] | None:
    names = ["joint.model"] if joint else ["src.model", "tgt.model"]
    paths = [directory / n for n in names]
    if not all(p.is_file() for p in paths):
        return None
    data = [p.read_bytes() for p in paths]
    return (data[0], None) if joint else (data[0], data[1])


def load_cached(cfg: TokenizerConfig, key: str) -> Tokenizer | None:
    """The tokenizer cached under ``key`` (see :func:`cache_key`), or None."""
    _check(cfg)
    directory = Path(os.path.expanduser(cfg.cache_dir)) / key
    if not directory.is_dir():
        return None
    cached = _load_cached(directory, cfg.joint)
    if cached is None:
        log.warning("tokenizer cache %s is incomplete; training again", directory)
        shutil.rmtree(directory, ignore_errors=True)
        return None
    log.info("tokenizer loaded from cache %s", directory)
    return Tokenizer(cached[0], cached[1], asdict(cfg))


def train_and_cache(cfg: TokenizerConfig, key: str, src_lines: Sequence[str], tgt_lines: Sequence[str]) -> Tokenizer:
    """Train on the lines and store the result under ``key``. Joint models are trained on both sides
    together, separate ones on one side each. Raises ConfigError when vocab_size does not fit the text."""
    _check(cfg)
    directory = Path(os.path.expanduser(cfg.cache_dir)) / key
    if cfg.joint:
        src_proto, tgt_proto = _train_model([*src_lines, *tgt_lines], cfg, "joint source+target text"), None
    else:
        src_proto = _train_model(list(src_lines), cfg, "source side")
        tgt_proto = _train_model(list(tgt_lines), cfg, "target side")
    meta = {"settings": _key_settings(cfg), "src_lines": len(src_lines), "tgt_lines": len(tgt_lines),
            "sentencepiece": spm.__version__}
    _store(directory, _model_files(src_proto, tgt_proto), meta)
    # load back what is in the cache: if another process won the race, use its model
    cached = _load_cached(directory, cfg.joint) or (src_proto, tgt_proto)
    tok = Tokenizer(cached[0], cached[1], asdict(cfg))
    log.info("tokenizer trained (%r) and cached at %s", tok, directory)
    return tok


def train_or_load(cfg: TokenizerConfig, src_lines: Sequence[str], tgt_lines: Sequence[str]) -> Tokenizer:
    """The tokenizer for this training text and these settings: from the cache, or trained now."""
    _check(cfg)
    key = cache_key(cfg, src_lines, tgt_lines)
    return load_cached(cfg, key) or train_and_cache(cfg, key, src_lines, tgt_lines)
