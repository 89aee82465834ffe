"""Files and settings from someone else are data: a checkpoint cannot run code, an override is not evaluated.

The pickle payload below is live (an ordinary ``pickle.loads`` creates the
marker file, which the first test shows); training resume and the translator
must refuse it without ever creating the marker.
"""
from __future__ import annotations

import ast
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from nmt.checkpoint import FORMAT, CheckpointError, load_checkpoint, load_for_inference
from trainproc import REPO_ROOT, assert_clean_exit, compose_cfg, run_train, run_translate


class Payload:
    """Unpickling this calls ``open(marker, "w")``: creates the marker file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def booby_trapped(path: Path, marker: Path, how: str) -> Path:
    """A file that looks like a checkpoint and runs code when unpickled."""
    if how == "torch.save":
        torch.save({"format": FORMAT, "model": {"w": torch.zeros(2)}, "config": Payload(marker), "tokenizer": {},
                    "step": 1}, path)
    else:
        path.write_bytes(pickle.dumps({"format": FORMAT, "model": Payload(marker)}))
    return path


def test_the_payload_is_live(tmp_path):
    marker = tmp_path / "pwned"
    data = booby_trapped(tmp_path / "x.pkl", marker, "pickle").read_bytes()
    pickle.loads(data)  # what an unsafe loader would do
    assert marker.exists()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("how", ["torch.save", "pickle"])
def test_loading_refuses_pickled_code(tmp_path, how):
    marker = tmp_path / "pwned"
    path = booby_trapped(tmp_path / "last.pt", marker, how)
    with pytest.raises(CheckpointError, match=f"refusing to load {path}: it contains pickled code"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="refusing to load"):
        load_for_inference(path)
    assert not marker.exists()


@pytest.mark.slow
def test_training_resume_refuses_pickled_code(tmp_path, data_root, tok_cache):
    run, marker = tmp_path / "run", tmp_path / "pwned"
    (run / "checkpoints").mkdir(parents=True)
    booby_trapped(run / "checkpoints" / "last.pt", marker, "torch.save")
    shutil.copy(run / "checkpoints" / "last.pt", run / "checkpoints" / "step-2.pt")  # never a silent fallback
    rc, out = run_train(run, data_root, tok_cache, "train.max_steps=4", "train.resume=true")
    assert_clean_exit(rc, out, 2, f"refusing to load {run / 'checkpoints' / 'last.pt'}: it contains pickled code")
    assert not marker.exists()


@pytest.mark.slow
def test_translator_refuses_pickled_code(tmp_path):
    marker = tmp_path / "pwned"
    ckpt = booby_trapped(tmp_path / "model.pt", marker, "torch.save")
    src = tmp_path / "in.ko"
    src.write_text("안녕하세요.\n", encoding="utf-8")
    rc, out = run_translate(ckpt, src, tmp_path / "out.en")
    assert_clean_exit(rc, out, 2, f"refusing to load {ckpt}: it contains pickled code")
    assert not marker.exists()


# ----------------------------------------------------------------------------- overrides are data
def test_interpolation_in_an_override_is_type_checked_not_trusted(data_root, tok_cache):
    with pytest.raises(ValueError, match="could not be converted to Integer"):
        compose_cfg(data_root, tok_cache, "train.seed=${oc.env:HOME}")


def test_python_in_a_quoted_override_stays_a_string(data_root, tok_cache, tmp_path):
    marker = tmp_path / "pwned"
    code = f"__import__('os').system('touch {marker}')"
    cfg = compose_cfg(data_root, tok_cache, f'data.name="{code}"', f'train.resume="{code}"')
    assert cfg.data.name == code and cfg.train.resume == code
    assert not marker.exists()


@pytest.mark.slow
def test_cli_rejects_a_mistyped_override_in_one_line(tmp_path, data_root, tok_cache):
    marker = tmp_path / "pwned"
    rc, out = run_train(tmp_path / "run", data_root, tok_cache, "train.seed=${oc.env:HOME}",
                        f"data.name=\"__import__('os').system('touch {marker}')\"")
    assert_clean_exit(rc, out, 2, "train.seed: ", "could not be converted to Integer")
    assert not marker.exists()


def test_no_resolver_or_builtin_that_evaluates_strings():
    """OmegaConf resolvers are the one place an override string is "run": only harmless ones may exist."""
    import nmt.cli  # noqa: F401 - registers whatever the entry points register
    from nmt.config import register_configs

    register_configs()
    for name in ("eval", "exec", "python", "py", "import", "call", "shell", "system"):
        assert not OmegaConf.has_resolver(name), name
    dangerous = {"eval", "exec", "compile", "__import__"}
    for path in [*(REPO_ROOT / "src" / "nmt").rglob("*.py"), *(REPO_ROOT / "scripts").glob("*.py")]:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        fields = {id(n.target) for n in ast.walk(tree) if isinstance(n, ast.AnnAssign)}  # e.g. TrainConfig.compile
        for node in ast.walk(tree):
            # also catches eval passed as a value, e.g. register_new_resolver("x", eval)
            if isinstance(node, ast.Name) and node.id in dangerous and id(node) not in fields:
                pytest.fail(f"{path.relative_to(REPO_ROOT)}:{node.lineno} uses {node.id}")
