"""Benchmarks behind ``scripts/bench.py``: each prints figures as one JSON object."""
