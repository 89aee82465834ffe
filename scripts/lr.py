#!/usr/bin/env python
"""Learning-rate tools: plot a schedule, run an LR range test, report a sweep, diagnose a run.

    python scripts/lr.py plot optim=noam model.d_model=512 optim.warmup_steps=4000 --steps 100000
    python scripts/lr.py find model=tiny data=tatoeba_ko_en --min 1e-7 --max 1 --steps 200
    python scripts/lr.py report multirun/2024-05-01/12-00-00
    python scripts/lr.py diagnose outputs/2024-05-01/12-00-00

See `python scripts/lr.py --help` and the README.
"""
import sys

from nmt.lrtools.cli import main

if __name__ == "__main__":
    sys.exit(main())
