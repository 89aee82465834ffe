#!/usr/bin/env python
"""Translate Korean lines into English with a trained checkpoint (same as ``nmt-translate``).

    python scripts/translate.py --checkpoint outputs/DATE/TIME --input test.ko --output test.en
    python scripts/translate.py --checkpoint best.pt --input test.ko --reference test.en --report-repetition
    python scripts/translate.py --checkpoint best.pt          # interactive: one line in, one line out

Run with --help for every option; see the README.
"""
import sys

from nmt.translate import main

if __name__ == "__main__":
    sys.exit(main())
