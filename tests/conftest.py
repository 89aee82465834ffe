"""Shared pytest fixtures.

``data_root``: a folder of real corpora for the tests, built once per session from
what ships in the repository, so the suite needs nothing outside it:

- ``bible-ko-en``: the embedded default corpus (``data/bible-ko-en``, gzip);
- ``bible-short`` (:data:`QUICK`): the verses of at most 30 Korean characters of
  each of its splits (3,359 train, 108 dev, 118 test pairs), on which the tiny
  model trains in seconds;
- every corpus folder of ``$NMT_DATA_DIR`` (a relative value is taken from the
  repository root), else of ``../shared/data`` when it exists: extra corpora
  such as ``tatoeba-ko-en`` and ``kpc-news`` that some tests add cases for.
"""
from __future__ import annotations

import gzip
import os
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
EMBEDDED = REPO_ROOT / "data" / "bible-ko-en"
QUICK = "bible-short"          # the tests' quick corpus, cut from the embedded one
QUICK_MAX_CHARS = 30


def extra_data_root() -> Path | None:
    """Where optional extra corpora live ($NMT_DATA_DIR, else ../shared/data), if anywhere."""
    env = os.environ.get("NMT_DATA_DIR")
    root = (REPO_ROOT / env).resolve() if env else (REPO_ROOT.parent / "shared" / "data").resolve()
    return root if root.is_dir() else None


def write_quick_corpus(source: Path, dest: Path, max_chars: int = QUICK_MAX_CHARS) -> None:
    """The pairs of ``source`` whose Korean side has at most ``max_chars`` characters, per split."""
    dest.mkdir(parents=True, exist_ok=True)
    for split in ("train", "dev", "test"):
        sides = {}
        for lang in ("ko", "en"):
            with gzip.open(source / f"{split}.{lang}.gz", "rt", encoding="utf-8", newline="\n") as f:
                sides[lang] = f.read().split("\n")[:-1]
        keep = [i for i, ko in enumerate(sides["ko"]) if ko.strip() and len(ko) <= max_chars]
        for lang, lines in sides.items():
            (dest / f"{split}.{lang}").write_text("".join(lines[i] + "\n" for i in keep), encoding="utf-8")


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` run only where torch sees a CUDA device."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpora")
    (root / "bible-ko-en").symlink_to(EMBEDDED, target_is_directory=True)
    write_quick_corpus(EMBEDDED, root / QUICK)
    extra = extra_data_root()
    for folder in sorted(extra.iterdir()) if extra else []:
        if folder.is_dir() and not (root / folder.name).exists():
            (root / folder.name).symlink_to(folder, target_is_directory=True)
    return root


def has_corpus(name: str) -> bool:
    """Whether an extra corpus is available (for test cases that exist only then; nothing skips)."""
    extra = extra_data_root()
    return extra is not None and (extra / name).is_dir()


@pytest.fixture(scope="session")
def tok_cache(tmp_path_factory) -> Path:
    """One sentencepiece cache for the whole test session (tokenizers train once)."""
    return tmp_path_factory.mktemp("tokenizers")


# small, fast settings on the quick slice of the embedded corpus: the tiny model trains in seconds
TINY = ("model=tiny", f"data.name={QUICK}", "data.train_limit=600", "data.dev_limit=40",
        "tokenizer.vocab_size=1000", "train.max_tokens=1024", "train.log_every=2", "valid.max_sentences=8",
        "valid.batch_size=8", "optim.warmup_steps=10", "train.progress=false", "device=cpu",
        "train.valid_every_epoch=false")


def tiny_config(data_root: Path, tok_cache: Path, *overrides: str):
    """The real Hydra config composed with the TINY settings plus ``overrides``, validated (for
    module-scoped fixtures, which cannot use ``make_cfg``)."""
    from hydra import compose, initialize_config_dir

    from nmt.config import conf_dir, register_configs, to_config

    register_configs()
    with initialize_config_dir(str(conf_dir()), version_base="1.3"):
        dcfg = compose("config", overrides=[*TINY, f"data.root={data_root}", f"tokenizer.cache_dir={tok_cache}",
                                            *overrides])
    return to_config(dcfg)


@pytest.fixture
def make_cfg(data_root, tok_cache):
    """Compose the real Hydra config with the TINY settings plus ``overrides``; returns a validated Config."""
    return lambda *overrides: tiny_config(data_root, tok_cache, *overrides)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one intra-op thread (and CI's 2 cores may be shared); restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
