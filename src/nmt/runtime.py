"""Process-level concerns: device and precision, seeding, RNG state, stop signals."""
from __future__ import annotations

import functools
import logging
import random
import signal
import time
from typing import Optional

import torch

from nmt.config import ConfigError

log = logging.getLogger(__name__)


def select_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without a GPU is a clear error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda was requested but no CUDA GPU is available (use device=cpu or device=auto)")
    if name not in ("cpu", "cuda"):
        raise ConfigError(f"device={name!r} is not valid; choose one of: auto, cpu, cuda")
    return torch.device(name)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU has bfloat16 matmul instructions (AVX512-BF16 or AMX). Having them is not
    enough for bf16 to be faster: see :func:`cpu_bf16_speedup`."""
    cpu = getattr(torch, "cpu", None)
    checks = [getattr(cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    try:
        return any(check() for check in checks if check is not None)
    except RuntimeError:
        return False


# bf16 autocast on the CPU only where its matmuls are at least this much faster than fp32 ones
# (autocast adds casts, and the loss and the optimizer stay in fp32)
BF16_MIN_SPEEDUP = 1.2


@functools.lru_cache(maxsize=None)
def cpu_bf16_speedup() -> float:
    """fp32 time / bf16 time of a matrix product the size of a small model's feed-forward layer,
    timed on this CPU with the current thread count (best of 5; ~0.1 s, once per process); 0.0
    without native bf16 instructions, where bf16 is emulated. Measured because the instructions do
    not tell: bf16 matmuls ran ~3x faster than fp32 on a Zen 4 and on a Xeon with AMX, and at about
    0.55x on a Xeon with AVX512-BF16 but no AMX (docs/results.md)."""
    if not cpu_has_native_bf16():
        return 0.0
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(1024, 256, generator=gen), torch.randn(256, 1024, generator=gen)

    def best(x: torch.Tensor, y: torch.Tensor) -> float:
        for _ in range(2):                      # the first bf16 product builds its kernel
            x @ y
        times = []
        for _ in range(5):
            t = time.perf_counter()
            for _ in range(4):
                x @ y
            times.append(time.perf_counter() - t)
        return min(times)

    return best(a, b) / max(best(a.bfloat16(), b.bfloat16()), 1e-9)


def autocast_dtype(precision: str, device: torch.device, training: bool = False) -> Optional[torch.dtype]:
    """The autocast dtype for ``precision`` on ``device`` (None = plain fp32).

    ``auto``: bf16 on GPUs that support it; on the CPU only for ``training`` and only where bf16
    matmuls measure at least ``BF16_MIN_SPEEDUP`` times faster than fp32 ones (inference on the CPU
    stays fp32, so translations match the KV-cache-exact fp32 search). ``bf16`` forces it (an error
    on a GPU without bf16; allowed but slow on a CPU without it).
    """
    if precision == "fp32":
        return None
    if device.type == "cuda":
        bf16_ok = torch.cuda.is_bf16_supported()
        if precision == "bf16" and not bf16_ok:
            raise ConfigError("precision=bf16 was requested but this GPU does not support bfloat16")
        return torch.bfloat16 if bf16_ok else None
    if precision == "bf16":
        if not cpu_has_native_bf16():
            log.warning("precision=bf16 on a CPU without native bfloat16 matmuls (AVX512-BF16/AMX): "
                        "this is emulated and slower than fp32")
        return torch.bfloat16
    return torch.bfloat16 if training and cpu_bf16_speedup() >= BF16_MIN_SPEEDUP else None


def dtype_name(dtype: Optional[torch.dtype]) -> str:
    """``"bf16"`` or ``"fp32"``: how checkpoints record the precision a run trained in."""
    return "bf16" if dtype == torch.bfloat16 else "fp32"


def configure_backends(device: torch.device) -> None:
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """RNG states as plain data (tensors, ints, tuples) for a weights_only checkpoint."""
    state = {"torch": torch.get_rng_state(), "python": _to_lists(random.getstate())}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_to_tuples(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_lists(x):
    return [_to_lists(v) for v in x] if isinstance(x, (tuple, list)) else x


def _to_tuples(x):
    return tuple(_to_tuples(v) for v in x) if isinstance(x, (tuple, list)) else x


class StopSignal:
    """Turns SIGTERM/SIGINT into a flag the training loop checks between updates.

    A second signal while stopping falls back to the default behaviour, so a
    user can still force-quit a run that hangs.
    """

    def __init__(self) -> None:
        self.received: Optional[str] = None
        self._previous: dict = {}

    def __enter__(self) -> "StopSignal":
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. called from a test thread)
                pass
        return self

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.received is not None:
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)
            return
        self.received = name
        log.warning("%s received: finishing the current update, saving last.pt and exiting", name)

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
