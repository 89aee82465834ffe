"""The translator CLI: Korean lines in, English lines out (``nmt-translate``, scripts/translate.py).

Input is read as bytes, one line at a time, and translated in chunks of
``CHUNK_LINES`` lines, so memory stays bounded on files of any size; each
chunk's output is written and flushed as soon as it is done. Within a chunk,
``translate_hypotheses`` sorts sentences by length for batching and gives the
results back in input order. Output line i always belongs to input line i:
empty lines stay empty (the model never sees them), undecodable bytes are
replaced, and lines longer than the model's source limit are truncated, each
with one summary warning.

Search settings default to those stored in the checkpoint; flags override them.
Problems a user can fix end with a one-line ``error: ...`` and exit status 2.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import sys
from dataclasses import dataclass, field, fields, replace
from itertools import islice
from pathlib import Path
from typing import BinaryIO, Iterator, Optional, Sequence

import torch

from nmt.checkpoint import CheckpointError, load_for_inference
from nmt.config import ConfigError, DecodeConfig, validate_decode
from nmt.evaluate import translate_hypotheses
from nmt.repetition import SideStats, format_report, side_stats
from nmt.runtime import autocast_dtype, configure_backends, select_device
from nmt.search import Hypothesis
from nmt.textio import Notes, count_lines, read_lines
from nmt.tokenizer import EOS, Tokenizer

log = logging.getLogger(__name__)

CHUNK_LINES = 4000      # lines read, translated and written at a time


class InputError(Exception):
    """A file the user named is missing, unreadable or does not match the input."""


# ----------------------------------------------------------------------------- translation
@dataclass
class Translator:
    """A loaded model with its search and batching settings."""

    model: torch.nn.Module
    tokenizer: Tokenizer
    decode: DecodeConfig
    device: torch.device
    max_sentences: int = 64
    max_tokens: int = 0
    autocast: Optional[torch.dtype] = None

    @property
    def max_src_tokens(self) -> int:
        """Longest source (EOS included) sent to the model."""
        return self.model.max_positions - 1

    def translate(self, texts: Sequence[str], first_lineno: int = 1,
                  notes: Optional[Notes] = None) -> list[list[Hypothesis]]:
        """n-best hypotheses per text, in input order; an empty (or blank) text gets []."""
        todo = [i for i, t in enumerate(texts) if t.strip()]
        ids = self.tokenizer.encode_src([texts[i] for i in todo])
        limit = self.max_src_tokens
        for k, seq in enumerate(ids):
            if len(seq) > limit:
                ids[k] = seq[:limit - 1] + [EOS]
                if notes is not None:
                    notes.truncated.append(first_lineno + todo[k])
                    notes.limit = limit
        results: list[list[Hypothesis]] = [[] for _ in texts]
        if todo:
            hyps = translate_hypotheses(self.model, ids, self.decode, self.device, self.max_sentences,
                                        self.max_tokens, self.autocast)
            for i, h in zip(todo, hyps):
                results[i] = h
        return results

    def texts(self, hyps: Sequence[Hypothesis]) -> list[str]:
        # a line break in an output would shift every later line
        return [re.sub(r"[\r\n]+", " ", self.tokenizer.decode_tgt(h.tokens)) for h in hyps]


def format_lines(lineno: int, texts: Sequence[str], hyps: Sequence[Hypothesis], nbest: int) -> str:
    """One line (nbest=1) or exactly ``nbest`` TSV lines ``LINE\\tSCORE\\tTEXT``; missing ones: -inf, empty."""
    if nbest == 1:
        return (texts[0] if texts else "") + "\n"
    rows = [f"{lineno}\t{h.score:.4f}\t{t}\n" for h, t in zip(hyps[:nbest], texts)]
    return "".join(rows) + f"{lineno}\t-inf\t\n" * (nbest - len(rows))


# ----------------------------------------------------------------------------- settings
def decode_settings(base: DecodeConfig, args: argparse.Namespace) -> DecodeConfig:
    """The checkpoint's search settings with the flags given on the command line applied, validated."""
    given = {f.name: getattr(args, f.name) for f in fields(DecodeConfig) if getattr(args, f.name, None) is not None}
    if given.get("sampling") and "beam_size" not in given:
        given["beam_size"] = 1              # sampling draws one sample per sentence
        given.setdefault("nbest", 1)
    if "nbest" in given and "beam_size" not in given and given["nbest"] > base.beam_size:
        given["beam_size"] = given["nbest"]  # n-best needs at least n beams
    d = replace(base, **given)
    try:
        validate_decode(d, "decode")
        if d.sampling and d.beam_size != 1:
            raise ConfigError(f"--sampling needs --beam-size 1, got {d.beam_size}")
    except ConfigError as e:  # name the flag, not the config key
        raise ConfigError(re.sub(r"decode\.(\w+)", lambda m: "--" + m.group(1).replace("_", "-"), str(e))) from e
    return d


def describe(d: DecodeConfig) -> str:
    what = (f"sampling (temperature {d.temperature}, top-k {d.top_k}, top-p {d.top_p})" if d.sampling
            else "greedy" if d.beam_size == 1 else f"beam {d.beam_size}, nbest {d.nbest}")
    return (f"{what}, length penalty {d.length_penalty} ({d.length_penalty_mode}), repetition penalty "
            f"{d.repetition_penalty}, no-repeat n-gram {d.no_repeat_ngram_size}, min length {d.min_len}, "
            f"max length {d.max_len_a} * source + {d.max_len_b}")


# ----------------------------------------------------------------------------- scoring
@dataclass
class Tally:
    """What --reference and --report-repetition need, gathered chunk by chunk."""

    keep_text: bool = False
    hyps: list[str] = field(default_factory=list)
    refs: list[str] = field(default_factory=list)
    out: SideStats = SideStats()
    src: SideStats = SideStats()
    ref: Optional[SideStats] = None

    def add(self, sources: Sequence[str], outputs: Sequence[str], refs: Optional[Sequence[str]]) -> None:
        self.out, self.src = self.out + side_stats(outputs), self.src + side_stats(sources)
        if refs is not None:
            self.ref = (self.ref or SideStats()) + side_stats(refs)
        if self.keep_text:
            self.hyps.extend(outputs)
            self.refs.extend(refs or [])

    def scores(self) -> list[str]:
        from sacrebleu.metrics import BLEU, CHRF, TER

        lines = []
        for metric in (BLEU(), CHRF(), TER()):
            score = metric.corpus_score(self.hyps, [self.refs])
            lines.append(score.format(signature=str(metric.get_signature())))
        return lines


# ----------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nmt-translate", description=(
        "Translate Korean lines into English with an nmt checkpoint. Output line i is the translation "
        "of input line i. Search settings default to those stored in the checkpoint."))
    p.add_argument("--checkpoint", required=True, metavar="PATH",
                   help="a .pt file, or a run directory (its checkpoints/best.pt)")
    p.add_argument("--input", metavar="FILE", help="input file (default: stdin; interactive on a terminal)")
    p.add_argument("--output", metavar="FILE", help="output file (default: stdout)")
    s = p.add_argument_group("search (default: the checkpoint's settings)")
    s.add_argument("--beam-size", type=int, metavar="N", help="1 = greedy")
    s.add_argument("--length-penalty", type=float, metavar="X", help="> 1 favours longer outputs (beam search)")
    s.add_argument("--length-penalty-mode", choices=("power", "gnmt"))
    s.add_argument("--repetition-penalty", type=float, metavar="X", help="> 1 discourages tokens already generated")
    s.add_argument("--no-repeat-ngram-size", type=int, metavar="N", help="never repeat a token n-gram (0 = off)")
    s.add_argument("--min-len", type=int, metavar="N", help="tokens generated before EOS is allowed")
    s.add_argument("--max-len-a", type=float, metavar="A", help="at most A * source tokens + B tokens")
    s.add_argument("--max-len-b", type=int, metavar="B")
    s.add_argument("--nbest", type=int, metavar="N", help="N hypotheses per line as LINE<TAB>SCORE<TAB>TEXT")
    s.add_argument("--sampling", action=argparse.BooleanOptionalAction, default=None,
                   help="sample instead of searching (implies --beam-size 1)")
    s.add_argument("--temperature", type=float, metavar="X")
    s.add_argument("--top-k", type=int, metavar="K", help="sample from the K likeliest tokens (0 = all)")
    s.add_argument("--top-p", type=float, metavar="P", help="... from the smallest set with probability >= P")
    s.add_argument("--seed", type=int, default=1, help="random seed for --sampling (default: 1)")
    r = p.add_argument_group("running")
    r.add_argument("--batch-size", type=int, metavar="N",
                   help="sentences per batch (default: 64, or no limit with --max-tokens)")
    r.add_argument("--max-tokens", type=int, metavar="N", help="padded source tokens per batch")
    r.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    r.add_argument("--threads", type=int, metavar="N", help="CPU threads for torch")
    r.add_argument("--quiet", action="store_true", help="no progress bar or information messages")
    e = p.add_argument_group("evaluation (printed to stderr)")
    e.add_argument("--reference", metavar="FILE", help="reference translations: print sacrebleu BLEU, chrF and TER")
    e.add_argument("--report-repetition", action="store_true",
                   help="print the share of sentences with a repeated word trigram and the length ratios")
    return p


def _positive(name: str, value: Optional[int]) -> None:
    if value is not None and value < 1:
        raise ConfigError(f"{name} must be >= 1, got {value}")


@contextlib.contextmanager
def _open(path: Optional[str], mode: str, default: BinaryIO, what: str) -> Iterator[BinaryIO]:
    if path is None:
        yield default
        return
    try:
        f = open(path, mode)
    except OSError as e:
        raise InputError(f"cannot open {what} file {path}: {e.strerror or e}") from e
    with f:
        yield f


def check_args(args: argparse.Namespace) -> None:
    """Cheap checks first, so that a typo fails before a large checkpoint is loaded."""
    for name in ("batch_size", "max_tokens", "threads"):
        _positive("--" + name.replace("_", "-"), getattr(args, name))
    for what, path in (("input", args.input), ("reference", args.reference)):
        if path is not None and (not Path(path).exists() or Path(path).is_dir()):
            raise InputError(f"{what} file not found: {path}")
    # fail before translating, not after (not on pipes such as <(zcat x.gz): counting would use them up)
    if args.input and args.reference and Path(args.input).is_file() and Path(args.reference).is_file():
        n_in, n_ref = count_lines(Path(args.input)), count_lines(Path(args.reference))
        if n_in != n_ref:
            raise InputError(f"the reference {args.reference} has {n_ref} lines but the input {args.input} has {n_in}")


def load_translator(args: argparse.Namespace) -> Translator:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = select_device(args.device)
    configure_backends(device)
    model, tokenizer, base, cfg = load_for_inference(Path(args.checkpoint), device)
    decode = decode_settings(base, args)
    if decode.sampling:
        torch.manual_seed(args.seed)
    log.info("%s on %s; %s", args.checkpoint, device, describe(decode))
    return Translator(model, tokenizer, decode, device,
                      max_sentences=args.batch_size or (0 if args.max_tokens else 64), max_tokens=args.max_tokens or 0,
                      autocast=autocast_dtype("fp32" if cfg.precision == "fp32" else "auto", device))


def run(args: argparse.Namespace) -> None:
    """Translate as the parsed command line says."""
    check_args(args)
    t = load_translator(args)
    interactive = args.input is None and sys.stdin.isatty()
    notes, ref_notes, refs = Notes("input"), Notes("reference"), None
    with contextlib.ExitStack() as stack:
        src = stack.enter_context(_open(args.input, "rb", sys.stdin.buffer, "input"))
        out = stack.enter_context(_open(args.output, "wb", sys.stdout.buffer, "output"))
        if args.reference:
            refs = read_lines(stack.enter_context(_open(args.reference, "rb", sys.stdin.buffer, "reference")), ref_notes)
        tally = Tally(keep_text=refs is not None)
        bar = stack.enter_context(_progress(args, interactive))
        lines = read_lines(src, notes, prompt=sys.stderr if interactive else None)
        lineno = 1
        while chunk := list(islice(lines, 1 if interactive else CHUNK_LINES)):
            hyps = t.translate(chunk, lineno, notes)
            texts = [t.texts(h) for h in hyps]
            out.write("".join(format_lines(lineno + i, x, h, t.decode.nbest) for i, (x, h) in
                              enumerate(zip(texts, hyps))).encode("utf-8", errors="replace"))
            out.flush()  # each chunk is visible at once (interactive use, `tail -f`)
            tally.add(chunk, [x[0] if x else "" for x in texts], None if refs is None else list(islice(refs, len(chunk))))
            lineno += len(chunk)
            bar.update(len(chunk))
            if interactive:
                notes.report()
        bar.close()  # before the warnings, so that they do not land inside the bar's line
        if interactive:
            sys.stderr.write("\n")
        notes.report()
        if refs is not None:
            ref_notes.report()
            n_refs = len(tally.refs) + sum(1 for _ in refs)
            if n_refs != lineno - 1:  # stdin input: only known now
                raise InputError(f"the reference {args.reference} has {n_refs} lines but the input has "
                                 f"{lineno - 1}; no scores computed")
    for line in (tally.scores() if refs is not None else []) + \
            (format_report(tally.out, tally.src, tally.ref) if args.report_repetition else []):
        sys.stderr.write(line + "\n")


def _progress(args: argparse.Namespace, interactive: bool):
    from tqdm import tqdm

    off = args.quiet or interactive or not sys.stderr.isatty()
    total = count_lines(Path(args.input)) if args.input and not off and Path(args.input).is_file() else None
    return tqdm(total=total, unit=" lines", disable=off, file=sys.stderr, dynamic_ncols=True)


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"{record.levelname.lower()}: {record.getMessage()}"


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``nmt-translate``; returns the exit status (0, 2 on a user error, 130, 141)."""
    args = build_parser().parse_args(argv)
    logger = logging.getLogger("nmt")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter())
    saved = logger.level, logger.propagate, torch.get_num_threads()
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING if args.quiet else logging.INFO)
    logger.propagate = False
    try:
        run(args)
        return 0
    except BrokenPipeError:  # e.g. `| head`: the reader is gone, so stop quietly
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 141
    except torch.cuda.OutOfMemoryError:
        sys.stderr.write("error: out of GPU memory; lower --batch-size or set --max-tokens\n")
        return 2
    except (CheckpointError, ConfigError, InputError, OSError, ValueError) as e:
        sys.stderr.write(f"error: {(str(e).strip().splitlines() or [type(e).__name__])[0]}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("\ninterrupted\n")
        return 130
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]
        torch.set_num_threads(saved[2])  # in-process callers (tests) keep their setting
