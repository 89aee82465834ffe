"""Load: the translator's memory does not grow with the size of its input file.

The 20k / 200k-line figures come from ``scripts/bench_memory.py``; here a
cheaper check: 2,000 and 20,000 short lines (the same 1,000 sentences
repeated, so batch shapes are alike) through ``scripts/translate.py``, each in
a fresh process that reports its peak RSS (VmHWM) as it exits. A translator that held
the whole file (lines, ids, outputs) grows by ~17 MB between the two on the
tiny model; the streaming one by ~4 MB.
"""
from __future__ import annotations

import itertools
import subprocess
import sys

import pytest

from conftest import QUICK
from nmt.corpus import read_lines
from trainproc import TRANSLATE, child_env, trained_run

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")]

MAX_GROWTH_MB = 10


# ru_maxrss from os.wait4 would include the forked copy of this (large) pytest process before exec,
# so the child reports its own high-water mark (VmHWM counts only the program after exec)
REPORT_PEAK = """
import atexit, runpy, sys

def report():
    with open("/proc/self/status") as f:
        kib = next(line.split()[1] for line in f if line.startswith("VmHWM:"))
    sys.stderr.write(f"peak-rss-kib {kib}\\n")

atexit.register(report)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def peak_rss_mb(args: list) -> float:
    proc = subprocess.run([sys.executable, "-c", REPORT_PEAK, *map(str, args)], env=child_env(),
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return int(proc.stderr.rsplit("peak-rss-kib ", 1)[1].split()[0]) / 1024


def test_translation_memory_does_not_grow_with_the_input(tmp_path_factory, data_root, tok_cache, tmp_path):
    ckpt = trained_run(tmp_path_factory.getbasetemp(), data_root, tok_cache) / "checkpoints" / "best.pt"
    sentences = read_lines(data_root / QUICK / "train.ko")[:1000]
    peaks = {}
    for n in (2000, 20000):
        src, out = tmp_path / f"in{n}.ko", tmp_path / f"out{n}.en"
        src.write_text("".join(s + "\n" for s in itertools.islice(itertools.cycle(sentences), n)), encoding="utf-8")
        peaks[n] = peak_rss_mb([TRANSLATE, "--checkpoint", ckpt, "--input", src, "--output", out, "--beam-size", "1",
                                "--max-len-a", "0", "--max-len-b", "4", "--quiet"])
        with open(out, "rb") as f:
            assert sum(1 for _ in f) == n
    print(f"peak RSS: {peaks[2000]:.1f} MB for 2,000 lines, {peaks[20000]:.1f} MB for 20,000 lines")
    assert peaks[20000] - peaks[2000] < MAX_GROWTH_MB, peaks
