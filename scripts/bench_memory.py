#!/usr/bin/env python
"""Peak memory of the translator against input size; prints one JSON object.

Translates files of N lines (Korean verses of the embedded bible corpus,
repeated) with ``scripts/translate.py``, one fresh process per size, and reads
each process's peak resident set size from ``os.wait4`` (this script does not
import torch, so the copy of it that each child starts as is far smaller than
the translator and does not mask its peak). The translator
streams its input in chunks, so the peak must not grow with N: compare
``peak_rss_mb`` across sizes (``growth_mb`` is largest minus smallest beyond
the first size, which only shows the cost of loading the model).

    python scripts/bench_memory.py --checkpoint outputs/DATE/TIME/checkpoints/best.pt
    python scripts/bench_memory.py --checkpoint best.pt --lines 1,20000,200000 --threads 2

Decoding is kept short (greedy, at most --max-len-b tokens per line) so the
benchmark measures reading, batching and writing at scale, not search.
A tiny checkpoint trains in a minute on a CPU:
``python scripts/train.py model=tiny data=tatoeba_ko_en train.max_steps=20``.
"""
from __future__ import annotations

import argparse
import datetime as dt
import itertools
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def make_input(path: Path, n: int) -> None:
    from nmt.corpus import read_lines

    verses = read_lines(REPO / "data" / "bible-ko-en" / "train.ko.gz")
    with open(path, "w", encoding="utf-8") as f:
        for line in itertools.islice(itertools.cycle(verses), n):
            f.write(line + "\n")


def measure(checkpoint: str, n: int, folder: Path, args: argparse.Namespace) -> dict:
    """Translate n lines in a fresh process; its peak RSS, time and output line count."""
    src, out = folder / f"in-{n}.ko", folder / f"out-{n}.en"
    make_input(src, n)
    cmd = [sys.executable, str(REPO / "scripts" / "translate.py"), "--checkpoint", checkpoint, "--input", str(src),
           "--output", str(out), "--beam-size", "1", "--max-len-a", "0", "--max-len-b", str(args.max_len_b),
           "--threads", str(args.threads), "--device", "cpu", "--quiet"]
    start = time.perf_counter()
    with open(folder / f"log-{n}.txt", "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    rc = os.waitstatus_to_exitcode(status)
    if rc != 0:
        tail = (folder / f"log-{n}.txt").read_text(errors="replace")[-2000:]
        raise SystemExit(f"bench_memory.py: translate.py failed on {n} lines (exit {rc}):\n{tail}")
    with open(out, "rb") as f:
        out_lines = sum(1 for _ in f)
    rss_kb = usage.ru_maxrss if sys.platform != "darwin" else usage.ru_maxrss // 1024  # bytes on macOS
    return {"lines": n, "peak_rss_mb": round(rss_kb / 1024, 1), "seconds": round(seconds, 1),
            "lines_per_sec": round(n / seconds, 1), "output_lines_match": out_lines == n}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="a .pt file or a run directory")
    p.add_argument("--lines", default="1,20000,200000", help="comma-separated input sizes (default: 1,20000,200000)")
    p.add_argument("--max-len-b", type=int, default=5, help="tokens generated per line at most (default: 5)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads of the translator (default: 1)")
    args = p.parse_args()
    sizes = [int(x) for x in args.lines.split(",")]
    with tempfile.TemporaryDirectory(prefix="nmt-bench-memory-") as tmp:
        runs = [measure(args.checkpoint, n, Path(tmp), args) for n in sizes]
    beyond = [r["peak_rss_mb"] for r in runs[1:]] or [runs[0]["peak_rss_mb"]]
    print(json.dumps({
        "benchmark": "translate peak RSS vs input lines",
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
        "threads": args.threads, "max_len_b": args.max_len_b,
        "runs": runs,
        "growth_mb": round(max(beyond) - min(beyond), 1),
    }, indent=2))


if __name__ == "__main__":
    main()
