"""Reading text lines for translation: line-aligned, never fatal on bad bytes.

Only ``\n`` ends a line (``str.splitlines`` would also split on U+2028, form
feeds and other characters that may sit inside a sentence, shifting every
later output line). Bytes that are not UTF-8 are replaced with U+FFFD and
noted; :class:`Notes` turns what was noted into one warning per kind.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Iterator, Optional, TextIO

log = logging.getLogger(__name__)

PROMPT = "ko> "
SHOW_LINES = 5          # line numbers named in a warning


@dataclass
class Notes:
    """Input problems seen so far, reported as one warning per kind by :meth:`report`."""

    what: str = "input"
    bad_utf8: list[int] = field(default_factory=list)
    truncated: list[int] = field(default_factory=list)
    limit: int = 0

    def report(self) -> None:
        if self.bad_utf8:
            more = f" (and {len(self.bad_utf8) - 1} more lines)" if len(self.bad_utf8) > 1 else ""
            log.warning("%s line %d%s is not valid UTF-8; undecodable bytes were replaced with U+FFFD",
                        self.what, self.bad_utf8[0], more)
        if self.truncated:
            shown = ", ".join(map(str, self.truncated[:SHOW_LINES]))
            more = ", ..." if len(self.truncated) > SHOW_LINES else ""
            log.warning("truncated %d %s line(s) longer than the model's limit of %d source tokens: "
                        "line(s) %s%s; split long lines into sentences", len(self.truncated), self.what,
                        self.limit, shown, more)
        self.bad_utf8, self.truncated = [], []


def read_lines(stream: BinaryIO, notes: Notes, prompt: Optional[TextIO] = None) -> Iterator[str]:
    """Decoded lines without their line ending; only ``\\n`` ends a line (not U+2028, \\f, ...)."""
    lineno = 0
    while True:
        if prompt is not None:
            prompt.write(PROMPT)
            prompt.flush()
        raw = stream.readline()
        if not raw:
            return
        lineno += 1
        raw = raw[:-1] if raw.endswith(b"\n") else raw
        raw = raw[:-1] if raw.endswith(b"\r") else raw
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            notes.bad_utf8.append(lineno)
            text = raw.decode("utf-8", errors="replace")
        yield text.lstrip("\ufeff") if lineno == 1 else text


def count_lines(path: Path) -> int:
    """Lines as :func:`read_lines` counts them (a last line without ``\\n`` counts)."""
    n, last = 0, b"\n"
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            n += block.count(b"\n")
            last = block[-1:]
    return n + (last != b"\n")
