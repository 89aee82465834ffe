"""Repetition and length statistics of translations, as pure functions.

``nmt-translate --report-repetition`` prints them so that a user can see what
the repetition penalty, n-gram blocking and length settings change: the share
of sentences that repeat a word trigram ("the the the", "I think I think")
and how long the outputs are relative to their inputs.

Words are whitespace-separated and lower-cased; characters exclude whitespace
(Korean and English space words differently, so characters compare better
across the two). Empty lines are not sentences: they are left out of every
count.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Hashable, Iterable, Optional, Sequence


def words(text: str) -> list[str]:
    """Lower-cased whitespace-separated words ("The the" is a repetition)."""
    return text.lower().split()


def has_repeated_ngram(tokens: Sequence[Hashable], n: int = 3) -> bool:
    """True when some n-gram occurs at least twice in ``tokens`` (overlaps count: a a a a, n=3)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    seen = set()
    for i in range(len(tokens) - n + 1):
        gram = tuple(tokens[i:i + n])
        if gram in seen:
            return True
        seen.add(gram)
    return False


@dataclass(frozen=True)
class SideStats:
    """Counts over the non-empty sentences of one side (input, output or reference).

    Sum the stats of consecutive chunks with ``+`` to get those of the whole file.
    """

    sentences: int = 0      # non-empty lines
    repeated: int = 0       # ... that contain a repeated word n-gram
    words: int = 0
    chars: int = 0          # non-whitespace characters

    def __add__(self, other: "SideStats") -> "SideStats":
        return SideStats(self.sentences + other.sentences, self.repeated + other.repeated,
                         self.words + other.words, self.chars + other.chars)

    @property
    def repeated_share(self) -> float:
        """Share of sentences with a repeated n-gram (0.0 when there are none)."""
        return self.repeated / self.sentences if self.sentences else 0.0


def side_stats(texts: Iterable[str], n: int = 3) -> SideStats:
    """Statistics of ``texts``; empty and whitespace-only lines are skipped."""
    sentences = repeated = n_words = chars = 0
    for text in texts:
        ws = words(text)
        if not ws:
            continue
        sentences += 1
        repeated += has_repeated_ngram(ws, n)
        n_words += len(ws)
        chars += sum(len(w) for w in ws)
    return SideStats(sentences, repeated, n_words, chars)


def length_ratio(num: SideStats, den: SideStats) -> tuple[float, float]:
    """(words, characters) ratio of two sides' totals, e.g. output / input; nan when ``den`` is empty.

    A ratio of totals weighs every word alike, so a few one-word inputs cannot dominate it
    the way they would a mean of per-sentence ratios.
    """
    return (num.words / den.words if den.words else math.nan,
            num.chars / den.chars if den.chars else math.nan)


def format_report(output: SideStats, source: SideStats, reference: Optional[SideStats] = None,
                  n: int = 3) -> list[str]:
    """Human-readable lines for stderr."""
    def share(s: SideStats) -> str:
        return f"{100 * s.repeated_share:.1f}% ({s.repeated}/{s.sentences})"

    sides = f"output {share(output)}, input {share(source)}"
    if reference is not None:
        sides += f", reference {share(reference)}"
    w, c = length_ratio(output, source)
    ratios = f"length output/input: {w:.2f} in words, {c:.2f} in characters"
    if reference is not None:
        w, c = length_ratio(output, reference)
        ratios += f"; output/reference: {w:.2f} in words, {c:.2f} in characters"
    return [f"sentences with a repeated word {n}-gram: {sides}", ratios]
