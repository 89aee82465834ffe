"""Learning-rate tools: look at a schedule before training, find a peak LR, compare a
sweep, and diagnose a finished run.

    python scripts/lr.py plot     [training overrides] --steps N [--batches-per-epoch B]
    python scripts/lr.py find     [training overrides] --min 1e-7 --max 1 --steps 200
    python scripts/lr.py report   MULTIRUN_DIR
    python scripts/lr.py diagnose RUN_DIR

Modules: :mod:`~nmt.lrtools.plot` (schedule table and plot), :mod:`~nmt.lrtools.find`
(LR range test), :mod:`~nmt.lrtools.report` (sweep summary), :mod:`~nmt.lrtools.checks`
and :mod:`~nmt.lrtools.diagnose` (run diagnosis), :mod:`~nmt.lrtools.rundir` (reading run
directories), :mod:`~nmt.lrtools.cli` (argument parsing and printing). The package
import stays light: torch and matplotlib are imported by the modules that need them.
"""
from __future__ import annotations


class LRToolError(Exception):
    """A problem the user can fix (missing directory, no runs, bad schedule name);
    the CLI prints it as one line and exits with code 2."""
