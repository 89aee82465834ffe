#!/usr/bin/env python
"""Average checkpoints into one the translator loads (same as ``nmt-average``).

    python scripts/average.py outputs/DATE/TIME --last 5            # -> outputs/DATE/TIME/checkpoints/averaged.pt
    python scripts/average.py outputs/DATE/TIME --best 3 --metric bleu --output best3.pt
    python scripts/average.py a.pt b.pt c.pt --output abc.pt

Run with --help for every option; see the README.
"""
import sys

from nmt.average import main

if __name__ == "__main__":
    sys.exit(main())
