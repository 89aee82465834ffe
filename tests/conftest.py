"""Shared pytest fixtures.

``data_root``: the folder with the real corpora (bible-ko-en, tatoeba-ko-en,
kpc-news). It is ``$NMT_DATA_DIR`` when set (a relative value is taken from the
repository root), else ``../shared/data`` next to the repository; tests that
use it are skipped when it is missing.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def data_root() -> Path:
    root = Path(os.environ.get("NMT_DATA_DIR", REPO_ROOT.parent / "shared" / "data"))
    root = (REPO_ROOT / root).resolve()  # an absolute root stays as it is
    if not root.is_dir():
        pytest.skip(f"real corpora not found in {root} (set NMT_DATA_DIR)")
    return root


@pytest.fixture(scope="session")
def tok_cache(tmp_path_factory) -> Path:
    """One sentencepiece cache for the whole test session (tokenizers train once)."""
    return tmp_path_factory.mktemp("tokenizers")


# small, fast settings on the real tatoeba corpus: the tiny model trains in seconds
TINY = ("model=tiny", "data=tatoeba_ko_en", "data.train_limit=600", "data.dev_limit=40",
        "tokenizer.vocab_size=500", "train.max_tokens=1024", "train.log_every=2", "valid.max_sentences=8",
        "valid.batch_size=8", "optim.warmup_steps=10", "train.progress=false", "device=cpu",
        "train.valid_every_epoch=false")


@pytest.fixture
def make_cfg(data_root, tok_cache):
    """Compose the real Hydra config with the TINY settings plus ``overrides``; returns a validated Config."""
    from hydra import compose, initialize_config_dir

    from nmt.config import conf_dir, register_configs, to_config

    register_configs()

    def make(*overrides: str):
        with initialize_config_dir(str(conf_dir()), version_base="1.3"):
            dcfg = compose("config", overrides=[*TINY, f"data.root={data_root}",
                                                f"tokenizer.cache_dir={tok_cache}", *overrides])
        return to_config(dcfg)
    return make


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one intra-op thread (and CI's 2 cores may be shared); restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
