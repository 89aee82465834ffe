"""Self-describing checkpoints: config + tokenizer + weights (+ training state).

Checkpoints are written atomically (temporary file in the same folder, fsync,
``os.replace``), so a crash or a kill at any moment leaves either the old file
or the new one, never a half-written one; ``last.pt`` is written after the
other files of the same step, so it is the commit point of a save. They are
read with ``torch.load(..., weights_only=True)``: a file that carries pickled
code is refused instead of executed. Before that, the CRC-32 of every member of
the zip container is checked, because torch itself does not: a flipped byte in
the tensor data would otherwise load silently as a different model.
"""
from __future__ import annotations

import logging
import os
import re
import tempfile
import zipfile
import zlib
from pathlib import Path
from typing import Any, Optional

import torch

from nmt.config import DROPOUT_KEYS, Config, DecodeConfig, from_dict

log = logging.getLogger(__name__)

FORMAT = "nmt-checkpoint-1"
_UMASK = os.umask(0)
os.umask(_UMASK)
STEP_RE = re.compile(r"^step-(\d+)\.pt$")
TEMP_GLOB = ".*.pt.*.tmp"       # atomic_save's temporaries, left behind by a killed process


class CheckpointError(Exception):
    """A checkpoint is missing, unreadable, unsafe or does not match the run."""


# ----------------------------------------------------------------------------- writing
def all_finite(state_dict: dict) -> bool:
    """True when every floating-point tensor of ``state_dict`` is free of NaN and inf."""
    return all(torch.isfinite(t).all().item() for t in state_dict.values()
               if isinstance(t, torch.Tensor) and t.is_floating_point())


def atomic_save(obj: dict, path: Path) -> None:
    """``torch.save`` to a temporary file next to ``path``, fsync, then rename over it.

    On any error (disk full, permission denied) the temporary file is removed,
    the previous file at ``path`` is left intact, and CheckpointError says why.
    """
    path = Path(path)
    if "model" in obj and not all_finite(obj["model"]):
        raise CheckpointError(f"refusing to write {path}: the model has non-finite (NaN/inf) weights")
    tmp: Optional[str] = None
    try:
        if path.parent.exists() and not path.parent.is_dir():
            raise CheckpointError(f"could not write checkpoint {path}: {path.parent} exists and is not a folder")
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file a normal file's mode
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
        _fsync_dir(path.parent)
    except OSError as e:
        raise CheckpointError(f"could not write checkpoint {path}: {e.strerror or e}; "
                              "the previous checkpoint, if any, is intact") from e
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class CheckpointManager:
    """Keeps ``last.pt``, ``best.pt`` and the newest ``keep_last`` ``step-N.pt`` files."""

    def __init__(self, folder: Path, keep_last: int):
        self.folder = Path(folder)
        self.keep_last = keep_last

    def save(self, obj: dict, *, best: bool = False, periodic: bool = False) -> None:
        """Write the files of one step; ``last.pt`` goes last.

        A kill between two of these writes then leaves ``last.pt`` at the
        previous step, and resuming from it redoes this step and rewrites
        ``best.pt``; never a ``last.pt`` whose early-stopping state names a
        best step that ``best.pt`` does not hold.
        """
        if best:
            atomic_save(obj, self.folder / "best.pt")
        if periodic and self.keep_last > 0:
            atomic_save(obj, self.folder / f"step-{obj['step']}.pt")
            self._prune()
        atomic_save(obj, self.folder / "last.pt")

    def prepare(self) -> None:
        """Before training: fail now if the folder cannot be written, not hours later at the
        first save; remove temporaries that a killed process left behind."""
        probe = self.folder / ".write-test.tmp"
        try:
            if self.folder.exists() and not self.folder.is_dir():
                raise CheckpointError(f"cannot write checkpoints into {self.folder}: it exists and is not a folder")
            self.folder.mkdir(parents=True, exist_ok=True)
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            raise CheckpointError(f"cannot write checkpoints into {self.folder}: {e.strerror or e}") from e
        stale = sorted(self.folder.glob(TEMP_GLOB))
        for p in stale:
            p.unlink(missing_ok=True)
        if stale:
            log.info("removed %d unfinished checkpoint temporary file(s) from %s (left by a killed run)",
                     len(stale), self.folder)

    def periodic_files(self) -> list[Path]:
        """``step-N.pt`` files, oldest first."""
        files = [(int(m.group(1)), p) for p in self.folder.glob("step-*.pt") if (m := STEP_RE.match(p.name))]
        return [p for _, p in sorted(files)]

    def _prune(self) -> None:
        for p in self.periodic_files()[: -self.keep_last]:
            p.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- reading
def load_checkpoint(path: Path, map_location: Any = "cpu") -> dict:
    """Read a checkpoint safely; every failure becomes a one-line CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    _check_crc(path)
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for bad files
        # torch's first sentence says what failed; the rest is advice about its own internals
        reason = re.split(r"(?<=\.)\s", str(e).strip())[0].rstrip(".") if str(e).strip() else type(e).__name__
        if "weights_only" in str(e) or "Unsupported global" in str(e) or "GLOBAL" in str(e):
            raise CheckpointError(f"refusing to load {path}: it contains pickled code or objects that are not "
                                  f"plain data (a checkpoint from an untrusted source?)") from e
        raise CheckpointError(f"{path} is not a readable checkpoint (truncated or corrupt?): {reason}") from e
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an nmt checkpoint (no '{FORMAT}' format marker)")
    for key in ("model", "config", "tokenizer", "step"):
        if key not in obj:
            raise CheckpointError(f"{path} is incomplete: missing '{key}'")
    return obj


def _check_crc(path: Path) -> None:
    """Verify the CRC-32 of every member of a zip-format checkpoint (torch's own reader skips it).

    Files that are not zip archives (cut short, or torch's legacy format) are
    left to ``torch.load``, which reports them.
    """
    if not zipfile.is_zipfile(path):
        return
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, zlib.error, ValueError, NotImplementedError) as e:
        raise CheckpointError(f"{path} is not a readable checkpoint (truncated or corrupt?): {e}") from e
    if bad is not None:
        raise CheckpointError(f"{path} is corrupt: member {bad!r} fails its CRC-32 check "
                              "(bytes changed on disk or in transfer)")


def candidate_checkpoints(folder: Path) -> list[Path]:
    """Checkpoints of a run folder, newest first: last.pt, then step-N.pt by step, then best.pt."""
    folder = Path(folder)
    periodic = CheckpointManager(folder, 0).periodic_files()
    ordered = [folder / "last.pt"] + periodic[::-1] + [folder / "best.pt"]
    return [p for p in ordered if p.is_file()]


def load_resume_checkpoint(path: Path) -> tuple[dict, Path]:
    """Load ``path`` (a file, or a checkpoints folder); fall back to older valid ones.

    When the newest file is truncated or corrupt, the newest readable one is
    used and a warning names the file that was skipped. A file that carries
    code is never skipped silently: it raises.
    """
    path = Path(path)
    candidates = [path] if path.is_file() else candidate_checkpoints(path)
    if not candidates:
        raise CheckpointError(f"no checkpoint to resume from in {path}")
    errors = []
    for cand in candidates:
        try:
            obj = load_checkpoint(cand)
        except CheckpointError as e:
            if "refusing to load" in str(e):
                raise
            errors.append(str(e))
            log.warning("%s; trying an older checkpoint", e)
            continue
        if errors:
            log.warning("resuming from %s (step %d) because a newer checkpoint was unreadable", cand, obj["step"])
        return obj, cand
    raise CheckpointError("no readable checkpoint: " + "; ".join(errors))


def setting_diffs(saved: Config, current: Config, group: str) -> list[str]:
    """``group.key: checkpoint A, now B`` for each setting of ``group`` that differs, leaving out what may
    change between runs of one model (dropouts, cache folders)."""
    a, b = getattr(saved, group), getattr(current, group)
    return [f"{group}.{key}: checkpoint {getattr(a, key)!r}, now {getattr(b, key)!r}" for key in vars(a)
            if key != "cache_dir" and key not in DROPOUT_KEYS and getattr(a, key) != getattr(b, key)]


def check_compatible(saved: Config, current: Config, path: Path) -> None:
    """Refuse to resume when the model shape or tokenizer settings differ."""
    diffs = setting_diffs(saved, current, "model") + setting_diffs(saved, current, "tokenizer")
    for key in ("name", "src_lang", "tgt_lang"):
        if getattr(saved.data, key) != getattr(current.data, key):
            diffs.append(f"data.{key}: checkpoint {getattr(saved.data, key)!r}, now {getattr(current.data, key)!r}")
    if diffs:
        raise CheckpointError(f"cannot resume from {path}: settings differ ({'; '.join(diffs)})")


def resolve_checkpoint_path(path: Path) -> Path:
    """A ``.pt`` file as is; a run folder -> its checkpoints/best.pt (or last.pt)."""
    path = Path(path)
    if path.is_dir():
        for folder in (path / "checkpoints", path):
            for name in ("best.pt", "last.pt"):
                if (folder / name).is_file():
                    return folder / name
        raise CheckpointError(f"no best.pt or last.pt in {path} or {path / 'checkpoints'}")
    return path


def load_for_inference(path: Path, device: str | torch.device = "cpu"):
    """Everything translation needs from one checkpoint file (or run folder).

    Returns ``(model, tokenizer, decode_cfg, cfg)``; the model is in eval mode on ``device``.
    """
    from nmt.model import Transformer
    from nmt.tokenizer import Tokenizer

    path = resolve_checkpoint_path(path)
    obj = load_checkpoint(path)
    try:
        cfg = from_dict(obj["config"])
        tokenizer = Tokenizer.from_state(obj["tokenizer"])
        model = Transformer(cfg.model, tokenizer.src_vocab_size, tokenizer.tgt_vocab_size)
        model.load_state_dict(obj["model"])
    except Exception as e:  # noqa: BLE001 - a mismatched or tampered file
        raise CheckpointError(f"{path} could not be restored: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
    decode = DecodeConfig(**obj["decode"]) if isinstance(obj.get("decode"), dict) else cfg.decode
    return model.to(device).eval(), tokenizer, decode, cfg
