"""Shared pieces of the benchmarks: timing, memory sampling, device description, peak FLOP/s."""
from __future__ import annotations

import os
import platform
import threading
import time
from typing import Optional

import torch

# Dense bf16 tensor-core peaks (no sparsity), FLOP/s, from NVIDIA's data sheets (SXM parts).
GPU_PEAKS_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def rss_bytes() -> int:
    """Resident set size of this process from /proc/self/statm; 0 where there is none (not Linux)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except FileNotFoundError:
        return 0


class PeakMemory:
    """Peak memory while the block runs: GPU bytes allocated on CUDA, resident set size on the CPU
    (sampled every few milliseconds from /proc/self/statm; Linux only, else None)."""

    def __init__(self, device: torch.device, interval: float = 0.002) -> None:
        self.device, self.interval = device, interval
        self.peak: Optional[int] = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        elif rss := rss_bytes():  # 0 where /proc/self/statm is missing: no sampling, peak stays None
            self.peak = rss
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak or 0, rss_bytes())

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device)
        elif self._thread is not None:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak or 0, rss_bytes())


def measured_matmul_peak(device: torch.device, dtype: torch.dtype, n: int = 2048, repeats: int = 10) -> float:
    """FLOP/s of a square [n x n] @ [n x n] matmul in ``dtype``: the practical peak of this
    device, thread count and torch build (on a CPU there is no data-sheet figure to use)."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    for _ in range(2):
        a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync(device)
    return 2 * n ** 3 * repeats / (time.perf_counter() - start)


def device_peak(device: torch.device, dtype: torch.dtype, given_tflops: Optional[float]) -> tuple[float, str]:
    """(peak FLOP/s, where the figure comes from) for MFU."""
    if given_tflops:
        return given_tflops * 1e12, "given (--peak-tflops)"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peak in GPU_PEAKS_BF16.items():
            if key in name:
                scale = 1.0 if dtype == torch.bfloat16 else 0.5     # TF32 tensor cores: half the bf16 rate
                return peak * scale, f"data sheet ({key}, {'bf16' if scale == 1 else 'tf32'} dense)"
    return measured_matmul_peak(device, dtype), f"measured ({dtype} 2048^3 matmul on this device)"


def hf_marian(model, device: torch.device, dropout: float = 0.0, attention_dropout: float = 0.0,
              activation_dropout: float = 0.0):
    """MarianMTModel with our model's shape, random init, eval mode (Marian: post-norm, one
    embedding matrix for encoder input, decoder input and output)."""
    try:
        from transformers import MarianConfig, MarianMTModel
    except ImportError:
        raise SystemExit("bench.py: error: --compare-hf needs Hugging Face transformers: "
                         "pip install transformers (or pip install -e .[bench])")
    c = model.cfg
    cfg = MarianConfig(
        vocab_size=model.tgt_vocab_size, d_model=c.d_model,
        encoder_layers=c.n_encoder_layers, decoder_layers=c.n_decoder_layers,
        encoder_attention_heads=c.heads, decoder_attention_heads=c.heads,
        encoder_ffn_dim=c.ffn, decoder_ffn_dim=c.ffn, activation_function=c.activation,
        max_position_embeddings=c.max_positions, dropout=dropout, attention_dropout=attention_dropout,
        activation_dropout=activation_dropout,
        pad_token_id=0, eos_token_id=3, bos_token_id=2, decoder_start_token_id=2,  # nmt's special ids
        forced_eos_token_id=None, scale_embedding=True)
    return MarianMTModel(cfg).to(device).eval()
