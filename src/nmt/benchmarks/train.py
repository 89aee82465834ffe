"""``bench.py train``: optimizer updates per second on real batches, ours against Hugging Face MarianMT.

Both models get the same token-budget batches of a real corpus, the same Adam
(fused where torch supports it), the same label-smoothed loss and gradient
clipping. Timed blocks alternate (ours, theirs, ours, ...) in one process so
that machine noise hits both; medians are reported.

``--stream N`` times N consecutive batches of the epoch order instead, each once, as a
training run meets them: on the CPU, oneDNN compiles and caches a matmul kernel per shape
(bf16), so a stream of ever new batch shapes runs slower than the same few batches repeated,
and resident memory grows with the shapes it has seen. It reports the update rate of the first
and the last quarter, the number of distinct batch shapes and the resident memory at both ends;
compare ``train.length_multiple=1 train.batch_multiple=1`` (no rounding of batch shapes) with
the default in two runs.

Model FLOPs of one update (the "model FLOPs" of MFU: real tokens only, so
padding counts as waste) are 3x the forward FLOPs (backward = 2x forward),
with, per sentence of S source and T target tokens, d = d_model, f = ffn,
V = target vocabulary, 2 FLOPs per multiply-add:

- each encoder layer: S * (8 d^2 + 4 d f) + 4 d S^2
- each decoder layer: T * (8 d^2 + 4 d^2 + 4 d f) + S * 4 d^2 + 4 d T^2 + 4 d T S
  (self-attention projections, cross-attention query/output, FFN; cross-attention
  keys/values of the source; attention scores and weighted sums, the causal
  T^2 counted in full as is customary)
- output projection: 2 d V T
"""
from __future__ import annotations

import argparse
import datetime as dt
import platform
import statistics
import time
from typing import Callable, Sequence

import torch

from nmt.benchmarks.common import PeakMemory, device_name, device_peak, hf_marian, rss_bytes, sync


def forward_flops(d: int, f: int, vocab: int, enc_layers: int, dec_layers: int,
                  src_lens: Sequence[int], tgt_lens: Sequence[int]) -> int:
    """Forward FLOPs of one batch (see the module docstring for the formula)."""
    total = 0
    for s, t in zip(src_lens, tgt_lens):
        enc = s * (8 * d * d + 4 * d * f) + 4 * d * s * s
        dec = t * (12 * d * d + 4 * d * f) + s * 4 * d * d + 4 * d * t * t + 4 * d * t * s
        total += enc_layers * enc + dec_layers * dec + 2 * d * vocab * t
    return total


def _config(args: argparse.Namespace):
    from hydra import compose, initialize_config_dir

    from nmt.config import conf_dir, register_configs, to_config

    register_configs()
    overrides = [f"model={args.preset}", f"train.max_tokens={args.max_tokens}", f"device={args.device}",
                 *args.overrides]
    with initialize_config_dir(str(conf_dir()), version_base="1.3"):
        return to_config(compose("config", overrides=overrides))


def _batches(cfg, n: int):
    from nmt.batching import collate, training_sampler
    from nmt.data import prepare_data

    data = prepare_data(cfg)
    sampler = training_sampler(data.train_src_lens, data.train_tgt_lens, cfg.train)
    batches = []
    while len(batches) < n:
        for idx in sampler:
            batches.append(collate([data.train_src[i] for i in idx], [data.train_tgt[i] for i in idx], idx,
                                   sampler.length_multiple))
            if len(batches) == n:
                break
        sampler.next_epoch()
    return data.tokenizer, batches


def _ours(cfg, tok, device: torch.device, amp, compile_model: bool) -> tuple[Callable, torch.nn.Module]:
    from nmt.model import Transformer
    from nmt.optim import build_optimizer
    from nmt.step import train_step
    from nmt.tokenizer import PAD

    model = Transformer(cfg.model, tok.src_vocab_size, tok.tgt_vocab_size, PAD).to(device).train()
    opt = build_optimizer(model.parameters(), cfg.optim, cfg.model.d_model, 10 ** 9)
    forward = torch.compile(model, dynamic=True) if compile_model else model
    t = cfg.train

    def update(batch) -> None:               # the trainer's update, without its bookkeeping
        train_step(model, forward, opt, [batch], device, amp, t.label_smoothing, t.clip_norm,
                   sync=device.type != "cuda")
    return update, model


def _theirs(cfg, model, device: torch.device, amp, args: argparse.Namespace) -> Callable:
    from nmt.loss import label_smoothed_nll
    from nmt.optim import _adam
    from nmt.tokenizer import PAD

    hf = hf_marian(model, device, args.hf_dropout, args.hf_attention_dropout, args.hf_activation_dropout).train()
    o, t = cfg.optim, cfg.train
    opt = _adam(hf.parameters(), decoupled=False, lr=1e-4, betas=tuple(o.betas), eps=o.eps, weight_decay=0.0)

    def update(batch) -> None:
        b = batch.to(device)
        opt.zero_grad()
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            logits = hf(input_ids=b.src, attention_mask=b.src_mask.long(), decoder_input_ids=b.tgt_in,
                        decoder_attention_mask=(b.tgt_in != PAD).long()).logits
        loss, _, _ = label_smoothed_nll(logits, b.tgt_out, PAD, t.label_smoothing)
        (loss / b.n_tgt_tokens).backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), t.clip_norm)
        opt.step()
    return update


def _summary(seconds: list[float], cpu: list[float], batches, flops: int, peak: float, memory: list) -> dict:
    med = statistics.median(seconds)
    tgt = sum(b.n_tgt_tokens for b in batches)
    both = tgt + sum(b.n_src_tokens for b in batches)
    return {"target_tokens_per_s": round(tgt / med, 1), "tokens_per_s": round(both / med, 1),
            "ms_per_update": round(1000 * med / len(batches), 2), "seconds": [round(x, 3) for x in seconds],
            "cpu_seconds": [round(x, 3) for x in cpu], "model_tflops_per_s": round(flops / med / 1e12, 4),
            "mfu": round(flops / med / peak, 4),
            "peak_memory_mb": round(max(m for m in memory if m) / 2 ** 20, 1) if any(memory) else None}


def _stream(args: argparse.Namespace, cfg, device: torch.device, amp) -> dict:
    """Each of ``args.stream`` consecutive batches once, after ``args.warmup`` untimed ones."""
    tok, batches = _batches(cfg, args.warmup + args.stream)
    update, _ = _ours(cfg, tok, device, amp, args.compile)
    for b in batches[:args.warmup]:
        update(b)
    timed = batches[args.warmup:]
    rss0, seconds, rss = rss_bytes(), [], []
    for b in timed:
        sync(device)
        start = time.perf_counter()
        update(b)
        sync(device)
        seconds.append(time.perf_counter() - start)
        rss.append(rss_bytes())
    q = max(1, len(timed) // 4)

    def rate(part: slice) -> float:
        return round(sum(b.n_tgt_tokens for b in timed[part]) / sum(seconds[part]), 1)
    mb = lambda x: round(x / 2 ** 20, 1) if x else None         # noqa: E731
    return {"updates": len(timed), "distinct_shapes": len({(*b.src.shape, b.tgt_in.shape[1]) for b in timed}),
            "target_tokens_per_s": {"all": rate(slice(None)), "first_quarter": rate(slice(0, q)),
                                    "last_quarter": rate(slice(-q, None))},
            "padding_efficiency": round(sum(b.n_src_tokens + b.n_tgt_tokens for b in timed)
                                        / sum(b.src.numel() + b.tgt_in.numel() for b in timed), 3),
            "rss_mb": {"start": mb(rss0), "after_first_quarter": mb(rss[q - 1]), "end": mb(rss[-1]),
                       "peak": mb(max(rss))}}


def cmd_train(args: argparse.Namespace) -> dict:
    from nmt.runtime import autocast_dtype, select_device

    if args.stream and args.compare_hf:
        raise SystemExit("bench.py: error: --stream times our trainer only; leave out --compare-hf")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    cfg = _config(args)
    device = select_device(cfg.device)
    amp = autocast_dtype(cfg.precision, device, training=True)
    if args.stream:
        from nmt.batching import shape_multiples

        lm, bm = shape_multiples(cfg.train.length_multiple, cfg.train.batch_multiple)
        return {"benchmark": "train --stream", "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
                "device": device_name(device), "torch": torch.__version__, "preset": args.preset,
                "settings": {"max_tokens": cfg.train.max_tokens, "warmup": args.warmup,
                             "precision": str(amp or torch.float32).replace("torch.", ""),
                             "length_multiple": lm, "batch_multiple": bm, "overrides": args.overrides},
                "ours": _stream(args, cfg, device, amp)}
    tok, batches = _batches(cfg, args.warmup + args.steps)
    warm, timed = batches[:args.warmup], batches[args.warmup:]
    m = cfg.model
    flops = 3 * sum(forward_flops(m.d_model, m.ffn, tok.tgt_vocab_size, m.n_encoder_layers, m.n_decoder_layers,
                                  [int(x) for x in b.src_mask.sum(1)], [int(x) for x in (b.tgt_out != 0).sum(1)])
                    for b in timed)
    ours, model = _ours(cfg, tok, device, amp, args.compile)
    runners: dict[str, Callable] = {"ours": ours}
    hf_amp = None
    if args.compare_hf:
        hf_amp = torch.bfloat16 if args.hf_precision == "bf16" else None
        runners["hf"] = _theirs(cfg, model, device, hf_amp, args)
    compile_s = None
    for name, update in runners.items():
        start = time.perf_counter()
        for b in warm:
            update(b)
        sync(device)
        if name == "ours" and args.compile:
            compile_s = round(time.perf_counter() - start, 1)
    seconds = {name: [] for name in runners}
    cpu = {name: [] for name in runners}
    memory = {name: [] for name in runners}
    for _ in range(args.repeats):
        for name, update in runners.items():
            with PeakMemory(device) as mem:
                sync(device)
                start, cpu0 = time.perf_counter(), time.process_time()
                for b in timed:
                    update(b)
                sync(device)
                seconds[name].append(time.perf_counter() - start)
                cpu[name].append(time.process_time() - cpu0)
            memory[name].append(mem.peak)
    peaks = {name: device_peak(device, dtype or torch.float32, args.peak_tflops)
             for name, dtype in (("ours", amp), ("hf", hf_amp)) if name in runners}
    result = {
        "benchmark": "train", "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "device": device_name(device), "torch": torch.__version__, "python": platform.python_version(),
        "model": {"preset": args.preset, "d_model": m.d_model, "encoder_layers": m.n_encoder_layers,
                  "decoder_layers": m.n_decoder_layers, "heads": m.heads, "ffn": m.ffn,
                  "dropout": [m.dropout, m.attention_dropout, m.activation_dropout],
                  "vocab": tok.tgt_vocab_size, "parameters": sum(p.numel() for p in model.parameters())},
        "settings": {"max_tokens": cfg.train.max_tokens, "steps": args.steps, "warmup": args.warmup,
                     "repeats": args.repeats, "precision": str(amp or torch.float32).replace("torch.", ""),
                     "compile": args.compile, "compile_and_warmup_s": compile_s, "overrides": args.overrides,
                     "flops_per_update": flops // len(timed), "peak_flops": {k: f"{v[0]:.3g} ({v[1]})"
                                                                            for k, v in peaks.items()}},
    }
    for name in runners:
        result[name] = _summary(seconds[name], cpu[name], timed, flops, peaks[name][0], memory[name])
    if args.compare_hf:
        import transformers

        result["hf"].update(transformers=transformers.__version__, precision=args.hf_precision,
                            dropout=[args.hf_dropout, args.hf_attention_dropout, args.hf_activation_dropout])
        result["speedup_vs_hf"] = round(result["ours"]["target_tokens_per_s"] / result["hf"]["target_tokens_per_s"], 3)
    return result


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="training updates per second on real batches (optionally against HF MarianMT)")
    p.add_argument("--preset", default="small", help="model preset (conf/model/*.yaml)")
    p.add_argument("--max-tokens", type=int, default=2048, help="train.max_tokens of the batches")
    p.add_argument("--steps", type=int, default=20, help="timed updates per repeat")
    p.add_argument("--warmup", type=int, default=3, help="untimed updates first (with --compile: compilation)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--stream", type=int, default=0, metavar="N",
                   help="instead: N consecutive batches of the epoch order, each once (a training run's shapes)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--compile", action="store_true", help="torch.compile our model (train.compile=true)")
    p.add_argument("--compare-hf", action="store_true", help="also time transformers' MarianMTModel")
    p.add_argument("--hf-precision", default="fp32", choices=("fp32", "bf16"),
                   help="MarianMT's precision (fp32: what a Hugging Face script trains in unless told otherwise)")
    p.add_argument("--hf-dropout", type=float, default=0.1)
    p.add_argument("--hf-attention-dropout", type=float, default=0.0)
    p.add_argument("--hf-activation-dropout", type=float, default=0.0)
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="device peak for MFU (default: data sheet for H100/H200/A100, else a measured matmul)")
    p.add_argument("overrides", nargs="*", help="training config overrides, e.g. model.dropout=0.1 precision=fp32")
    p.set_defaults(func=cmd_train)
