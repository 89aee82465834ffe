"""Benchmarks, one argparse subcommand each; prints one JSON object.

decode: batched beam search of nmt.search on a random-init model of a given
shape (or a checkpoint), optionally side by side with Hugging Face
transformers' MarianMTModel.generate() of the same shape and settings. Both run
in one process, alternately (ours, HF, ours, HF, ...), so machine noise hits
both; medians are reported.

    python scripts/bench.py decode --beam 5 --batch 32 --steps 64 \
        --no-repeat-ngram 3 --repetition-penalty 1.2 --repeats 3 --threads 1 --compare-hf

--floor adds a third runner that does only the matmuls, decoder attention,
log_softmax and top-k of the same workload with the same torch kernels: a lower
bound for an exact implementation on this build, so HF's time over it bounds
the speedup that is possible without changing the numbers.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import statistics
import sys
import time
from typing import Callable

import torch

from nmt.benchmarks import data as bench_data
from nmt.benchmarks import train as bench_train
from nmt.benchmarks.common import device_name, hf_marian, sync

BOS, EOS, PAD = 2, 3, 0


def _fail(msg: str) -> None:
    print(f"bench.py: error: {msg}", file=sys.stderr)
    raise SystemExit(2)


def _timed(fn: Callable[[], int], device: torch.device) -> tuple[float, float, int]:
    """Run fn (returns generated tokens) -> (wall seconds, process CPU seconds, tokens)."""
    sync(device)
    start, cpu = time.perf_counter(), time.process_time()
    tokens = fn()
    sync(device)
    return time.perf_counter() - start, time.process_time() - cpu, tokens


def _summary(times: list[float], cpu: list[float], tokens: int, batch: int) -> dict:
    """Throughput from the median wall time; CPU seconds (all threads) show the work
    done independently of how busy a shared machine is."""
    med = statistics.median(times)
    return {"sentences_per_s": round(batch / med, 3), "tokens_per_s": round(tokens / med, 1),
            "median_s": round(med, 4), "times_s": [round(t, 4) for t in times],
            "median_cpu_s": round(statistics.median(cpu), 4), "cpu_s": [round(t, 4) for t in cpu],
            "generated_tokens": tokens}


# ----------------------------------------------------------------------------- decode
def _our_model(args: argparse.Namespace, device: torch.device):
    from nmt.config import ModelConfig
    from nmt.model import Transformer

    if args.checkpoint:
        try:
            from nmt.checkpoint import load_for_inference
        except ImportError as e:
            _fail(f"--checkpoint needs nmt.checkpoint.load_for_inference, which is unavailable ({e})")
        model = load_for_inference(args.checkpoint)[0]
        return model.to(device).eval()
    cfg = ModelConfig(d_model=args.d_model, layers=args.layers, heads=args.heads, ffn=args.ffn,
                      dropout=0.0, attention_dropout=0.0, activation_dropout=0.0)
    return Transformer(cfg, args.vocab, args.vocab, pad_id=PAD).to(device).eval()


def _source_batch(batch: int, src_len: int, vocab: int, seed: int, device: torch.device):
    """Random source ids [batch, src_len], lengths in [src_len/2, src_len], right-padded."""
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(4, vocab, (batch, src_len), generator=g)
    lengths = torch.randint(max(1, src_len // 2), src_len + 1, (batch,), generator=g)
    mask = torch.arange(src_len)[None, :] < lengths[:, None]
    return src.masked_fill(~mask, PAD).to(device), mask.to(device)


def cmd_decode(args: argparse.Namespace) -> dict:
    from nmt.config import DecodeConfig
    from nmt.search import search

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    model = _our_model(args, device)
    src, mask = _source_batch(args.batch, args.src_len, model.src_vocab_size, args.seed, device)
    # exactly args.steps decoding steps: EOS banned before the max length
    dcfg = DecodeConfig(beam_size=args.beam, nbest=1, length_penalty=1.0, min_len=args.steps,
                        max_len_a=0.0, max_len_b=args.steps, no_repeat_ngram_size=args.no_repeat_ngram,
                        repetition_penalty=args.repetition_penalty)

    def ours(steps: int = args.steps) -> int:
        cfg = dcfg if steps == args.steps else DecodeConfig(**{**dcfg.__dict__, "min_len": steps, "max_len_b": steps})
        hyps = search(model, src, mask, cfg, bos_id=BOS, eos_id=EOS, pad_id=PAD)
        return sum(len(h[0].tokens) for h in hyps)

    runners = {"ours": ours}
    if args.floor:
        runners["floor"] = _arithmetic_floor(model, args, device)
    if args.compare_hf:
        hf = hf_marian(model, device)

        def theirs(steps: int = args.steps) -> int:
            with torch.inference_mode():
                out = hf.generate(input_ids=src, attention_mask=mask.long(), num_beams=args.beam,
                                  num_return_sequences=1, do_sample=False, early_stopping=True,
                                  min_new_tokens=steps, max_new_tokens=steps,
                                  no_repeat_ngram_size=args.no_repeat_ngram,
                                  repetition_penalty=args.repetition_penalty)
            return int((out[:, 1:] != PAD).sum())

        runners["hf"] = theirs

    for fn in runners.values():      # warm-up: allocator, thread pool, lazy init
        fn(min(4, args.steps))
    times: dict[str, list[float]] = {name: [] for name in runners}
    cpu: dict[str, list[float]] = {name: [] for name in runners}
    tokens: dict[str, int] = {}
    for _ in range(args.repeats):
        for name, fn in runners.items():
            seconds, cpu_seconds, tokens[name] = _timed(fn, device)
            times[name].append(seconds)
            cpu[name].append(cpu_seconds)

    result = {
        "benchmark": "decode",
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "device": device_name(device), "torch": torch.__version__, "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "model": {"d_model": model.cfg.d_model, "encoder_layers": model.cfg.n_encoder_layers,
                  "decoder_layers": model.cfg.n_decoder_layers, "heads": model.cfg.heads, "ffn": model.cfg.ffn,
                  "vocab": model.tgt_vocab_size, "checkpoint": bool(args.checkpoint)},
        "settings": {"beam": args.beam, "batch": args.batch, "src_len": args.src_len, "steps": args.steps,
                     "no_repeat_ngram": args.no_repeat_ngram, "repetition_penalty": args.repetition_penalty,
                     "repeats": args.repeats},
        "ours": _summary(times["ours"], cpu["ours"], tokens["ours"], args.batch),
    }
    if args.compare_hf:
        import transformers

        result["hf"] = {**_summary(times["hf"], cpu["hf"], tokens["hf"], args.batch),
                        "transformers": transformers.__version__}
        result["speedup_vs_hf"] = round(result["ours"]["sentences_per_s"] / result["hf"]["sentences_per_s"], 3)
        result["cpu_speedup_vs_hf"] = round(result["hf"]["median_cpu_s"] / result["ours"]["median_cpu_s"], 3)
    if args.floor:
        floor = _summary(times["floor"], cpu["floor"], 0, args.batch)
        result["floor"] = {key: floor[key] for key in ("median_s", "times_s", "median_cpu_s", "cpu_s")}
        if args.compare_hf:  # with these kernels, no exact implementation can beat HF by more than this
            result["max_speedup_vs_hf"] = round(result["hf"]["median_s"] / result["floor"]["median_s"], 3)
    return result


def _arithmetic_floor(model, args: argparse.Namespace, device: torch.device) -> Callable[[int], int]:
    """A runner doing only the arithmetic any exact fp32 beam search of this model must do.

    Every Linear of the encoder (B*S tokens) and of the decoder (B rows at step
    0, B*K after; the output projection included), decoder attention (each
    hypothesis over its own step+1 cached keys/values, each sentence's beams
    over its source), log_softmax over the [B*K, V] logits and the top-2K over
    each sentence's K*V candidates. Encoder attention, norms, activations,
    cache upkeep and logit processors are left out, and the random inputs are
    drawn once, so the time is a lower bound for ours: HF's time divided by it
    bounds the speedup we can reach.
    """
    import torch.nn.functional as F

    from nmt.model.layers import one_query_attention

    # the faster of the two kernels the model may use for a one-query step on this device
    self_attention = one_query_attention if device.type == "cpu" else F.scaled_dot_product_attention
    b, k, tokens = args.batch, args.beam, args.batch * args.src_len
    h = model.cfg.heads
    dh = model.cfg.d_model // h

    def linears(stack: torch.nn.Module) -> list[torch.nn.Linear]:
        return [m for m in stack.modules() if isinstance(m, torch.nn.Linear)]

    kv = [layer.cross_attn.kv_proj for layer in model.decoder_layers]   # once per source, not per step
    per_step = [m for m in linears(model.decoder_layers) if all(m is not p for p in kv)] + [model.output_proj]
    inputs: dict[tuple, torch.Tensor] = {}

    def x(*shape: int, layer: int = 0) -> torch.Tensor:  # drawn once: random numbers are not the work measured
        if (shape, layer) not in inputs:
            inputs[shape, layer] = torch.randn(shape, device=device)
        return inputs[shape, layer]

    def run(steps: int = args.steps) -> int:
        with torch.inference_mode():
            for m in linears(model.encoder_layers) + kv:
                m(x(tokens, m.in_features))
            lprobs = torch.empty(b * k, model.tgt_vocab_size, device=device)
            for step in range(steps):
                rows = b if step == 0 else b * k
                for m in per_step:
                    logits = m(x(rows, m.in_features))
                for layer in range(len(model.decoder_layers)):
                    # each hypothesis' own keys/values, and its sentence's source keys/values
                    cache = x(2, b * k, h, args.steps, dh, layer=layer)
                    source = x(2, b, h, args.src_len, dh, layer=layer)
                    q = x(rows, h, 1, dh)
                    self_attention(q, cache[0, :rows, :, :step + 1], cache[1, :rows, :, :step + 1])
                    q = q.view(b, rows // b, h, dh).transpose(1, 2)
                    F.scaled_dot_product_attention(q, source[0], source[1])
                torch.log_softmax(logits, dim=-1, out=lprobs[:rows]).view(b, -1).topk(2 * k, dim=1)
        return 0

    return run


# ----------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    bench_train.add_parser(sub)
    bench_data.add_parser(sub)
    d = sub.add_parser("decode", help="beam-search throughput (optionally against HF MarianMT)")
    d.add_argument("--checkpoint", help="a trained checkpoint instead of a random model of the shape below")
    d.add_argument("--d-model", type=int, default=256)
    d.add_argument("--layers", type=int, default=4)
    d.add_argument("--heads", type=int, default=4)
    d.add_argument("--ffn", type=int, default=1024)
    d.add_argument("--vocab", type=int, default=8000)
    d.add_argument("--beam", type=int, default=5)
    d.add_argument("--batch", type=int, default=32, help="sentences per search call")
    d.add_argument("--src-len", type=int, default=32, help="longest source sentence (tokens)")
    d.add_argument("--steps", type=int, default=64, help="decoding steps (forced: min = max length)")
    d.add_argument("--no-repeat-ngram", type=int, default=3)
    d.add_argument("--repetition-penalty", type=float, default=1.2)
    d.add_argument("--repeats", type=int, default=3)
    d.add_argument("--threads", type=int, default=torch.get_num_threads())
    d.add_argument("--seed", type=int, default=1)
    d.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    d.add_argument("--compare-hf", action="store_true", help="also time transformers' MarianMTModel.generate()")
    d.add_argument("--floor", action="store_true",
                   help="also time only the unavoidable arithmetic (matmuls, decoder attention, log_softmax, "
                        "top-k): a lower bound for an exact implementation")
    d.set_defaults(func=cmd_decode)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if getattr(args, "device", "cpu") == "cuda" and not torch.cuda.is_available():
        _fail("--device cuda but torch sees no CUDA device")
    print(json.dumps(args.func(args), indent=2))


if __name__ == "__main__":
    main()
