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

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def data_root() -> Path:
    root = Path(os.environ.get("NMT_DATA_DIR", REPO_ROOT.parent / "shared" / "data"))
    root = (REPO_ROOT / root).resolve()  # an absolute root stays as it is
    if not root.is_dir():
        pytest.skip(f"real corpora not found in {root} (set NMT_DATA_DIR)")
    return root
