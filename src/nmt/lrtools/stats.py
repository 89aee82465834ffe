"""Small numeric helpers shared by the LR tools: pure functions of plain lists."""
from __future__ import annotations

import math
from typing import Optional, Sequence


def finite(x: Optional[float]) -> bool:
    """True for a real, finite number (None and NaN/inf are not)."""
    return x is not None and math.isfinite(x)


def ema_smooth(values: Sequence[float], beta: float = 0.9) -> list[float]:
    """Exponential moving average with bias correction (the first values are not
    pulled towards 0): ``avg_i = beta*avg_{i-1} + (1-beta)*x_i``, ``out_i = avg_i / (1 - beta^(i+1))``."""
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"smoothing beta must be in [0, 1), got {beta}")
    out, avg = [], 0.0
    for i, x in enumerate(values):
        avg = beta * avg + (1.0 - beta) * x
        out.append(avg / (1.0 - beta ** (i + 1)))
    return out


def median(values: Sequence[float]) -> float:
    s = sorted(values)
    n = len(s)
    if n == 0:
        raise ValueError("median of no values")
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


def pearson(x: Sequence[float], y: Sequence[float]) -> Optional[float]:
    """Pearson's r, or None with fewer than 3 points or a constant side."""
    if len(x) != len(y):
        raise ValueError(f"{len(x)} x values but {len(y)} y values")
    n = len(x)
    if n < 3:
        return None
    mx, my = sum(x) / n, sum(y) / n
    sxx = sum((a - mx) ** 2 for a in x)
    syy = sum((b - my) ** 2 for b in y)
    if sxx <= 0 or syy <= 0:
        return None
    return sum((a - mx) * (b - my) for a, b in zip(x, y)) / math.sqrt(sxx * syy)


def ranks(values: Sequence[float]) -> list[float]:
    """1-based ranks, ties get the mean of their positions."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    out = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return out


def spearman(x: Sequence[float], y: Sequence[float]) -> Optional[float]:
    """Spearman's rho (Pearson's r of the ranks), or None as for :func:`pearson`."""
    return pearson(ranks(x), ranks(y))


def nice_below(x: float) -> float:
    """The largest of 1, 2, 3, 5 times a power of ten that is <= ``x`` (for suggested LRs)."""
    if x <= 0 or not math.isfinite(x):
        raise ValueError(f"nice_below needs a positive number, got {x}")
    exp = math.floor(math.log10(x))
    for m in (5, 3, 2, 1):
        v = m * 10.0 ** exp
        if v <= x * (1 + 1e-12):
            return float(f"{v:.0e}")
    return float(f"{10.0 ** exp:.0e}")


def diverged_tail(losses: Sequence[Optional[float]], ratio: float = 1.5, margin: float = 1.0) -> Optional[str]:
    """Why a training-loss curve counts as diverged, or None.

    Non-finite values, or a final loss far above the curve's minimum: more than
    ``ratio`` times it AND more than ``margin`` nats above it (both, so that a noisy
    curve near zero or a small bump at a high loss do not count).
    """
    seen = [v for v in losses if v is not None]
    if not seen:
        return None
    bad = [v for v in seen if not math.isfinite(v)]
    if bad:
        return f"{len(bad)} non-finite loss value(s)"
    lo, last = min(seen), seen[-1]
    if last > ratio * lo and last > lo + margin:
        return f"final loss {last:.3g} is far above its minimum {lo:.3g}"
    return None


def fmt_lr(x: Optional[float]) -> str:
    """An LR for humans: ``9.88e-04`` (``n/a`` when unknown)."""
    return "n/a" if x is None else f"{x:.2e}"


def json_safe(x):
    """``x`` with non-finite floats as strings ("nan", "inf"), so the JSON is standard."""
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    return x
