"""Cuts a streamed LLM reply into pieces a TTS engine can speak as they complete.

Time to first audio is what the caller hears, so the first piece is released
at the first clause boundary (, ; : . ! ? a dash or a newline) as soon as it
holds a few words; later pieces wait for a sentence end (better prosody) or
for `max_chars`. A boundary is only taken once the next character shows it is
one: "3.14", "1,000", "e.g." and "Mr." never split. Markdown marks the TTS
would read aloud (* # `) are dropped as they stream in.
"""

from __future__ import annotations

import re
from typing import Literal

_NOISE = str.maketrans("", "", "*#`~|\u2022")  # emphasis, headings, code, strike-through, table bars, bullets
_LINK = re.compile(r"\[([^\]]*)\]\([^)]*\)")  # [text](url) -> text
_URL = re.compile(r"\bhttps?://\S+")
_UNDERSCORE = re.compile(r"(?<![A-Za-z0-9])_+|_+(?![A-Za-z0-9])")  # _emphasis_ and __bold__, not snake_case
_NUMBERED = re.compile(r"^\d{1,2}[.)]\s+")  # "1. " / "2) " list markers at a piece's start
_CLAUSE_MARKS = ",;:"
_SENTENCE_MARKS = ".!?"
_DASHES = "\u2014\u2013"  # em and en dash
_CLOSERS = "\"')]}\u201d\u2019\u00bb"
_OPENERS = "\"'([{\u201c\u2018\u00ab"
_BULLETS = "-\u2013\u2014\u2022\u00b7> "
ABBREVIATIONS = frozenset(
    "mr mrs ms dr prof sr jr st vs etc approx dept est fig inc ltd co corp jan feb mar apr jun jul aug sep sept "
    "oct nov dec mt ft no al cf".split()
)

Kind = Literal["clause", "sentence", "pending"]


def tidy(text: str) -> str:
    """What a TTS should say of a piece: markdown links become their text, URLs, emphasis marks and
    list markers go, whitespace is collapsed, trailing dashes dropped; "" when nothing speakable is left."""
    text = _URL.sub("", _LINK.sub(r"\1", text))
    text = _UNDERSCORE.sub("", text)
    text = " ".join(text.split()).lstrip(_BULLETS)
    text = _NUMBERED.sub("", text).rstrip(" -" + _DASHES)
    return text if any(c.isalnum() for c in text) else ""


class ClauseBuffer:
    def __init__(self, min_chars: int = 12, max_chars: int = 240, first_at_clause: bool = True) -> None:
        """`min_chars`: the first piece holds at least this many characters; `max_chars`: a piece
        with no boundary is cut (at a comma or a space) once this long; `first_at_clause`: False
        cuts at sentence ends only (whole-text synthesis)."""
        if max_chars <= min_chars:
            raise ValueError("max_chars must exceed min_chars")
        self.min_chars = min_chars
        self.max_chars = max_chars
        self.first_at_clause = first_at_clause
        self._buf = ""
        self._released = 0

    def push(self, delta: str) -> list[str]:
        """Add streamed text; returns the pieces that are now ready to speak, in order."""
        self._buf += delta.translate(_NOISE)
        ready: list[str] = []
        while (cut := self._find_cut()) is not None:
            piece, self._buf = tidy(self._buf[:cut]), self._buf[cut:]
            if piece:
                ready.append(piece)
                self._released += 1
        return ready

    def flush(self) -> str | None:
        """The rest of the reply, at its end; the buffer is then ready for a new reply."""
        rest = tidy(self._buf)
        self._buf, self._released = "", 0
        return rest or None

    def _find_cut(self) -> int | None:
        buf = self._buf
        first = self._released == 0
        any_boundary = first and self.first_at_clause
        soft_cut = 0  # last clause boundary, for a piece grown to max_chars
        i = 0
        while i < len(buf):
            kind, end = boundary_at(buf, i)
            if kind == "pending":
                break
            if kind is None:
                i += 1
                continue
            if kind == "sentence" or any_boundary:
                size = len(tidy(buf[:end]))
                if size >= (self.min_chars if first else 1) or not size:
                    return end
            if end <= self.max_chars:
                soft_cut = end
            i = end
        if len(buf) < self.max_chars:
            return None
        if soft_cut:
            return soft_cut
        space = buf.rfind(" ", 0, self.max_chars)
        return space if space > 0 else self.max_chars


def boundary_at(buf: str, i: int) -> tuple[Kind | None, int]:
    """Whether buf[i] ends a piece, and where the piece ends (after closing quotes)."""
    ch = buf[i]
    if ch == "\n":
        return "sentence", i + 1
    if ch in _DASHES:
        return "clause", i + 1
    if ch == "-":  # only a spaced hyphen is a dash; "well-known" is a word
        if i == 0 or buf[i - 1] != " ":
            return None, 0
        if i + 1 >= len(buf):
            return "pending", 0
        return ("clause", i + 1) if buf[i + 1].isspace() else (None, 0)
    if ch not in _CLAUSE_MARKS and ch not in _SENTENCE_MARKS:
        return None, 0
    j = i + 1
    while j < len(buf) and buf[j] in _CLOSERS:
        j += 1
    if j >= len(buf):
        return "pending", 0  # "3." may still become "3.14"
    if not buf[j].isspace():
        return None, 0
    if ch in _CLAUSE_MARKS:
        return "clause", j
    if ch == ".":
        if i > 0 and buf[i - 1] == ".":
            return "clause", j  # an ellipsis is a pause, not an end
        if _period_is_not_an_end(buf, i):
            return None, 0
    return "sentence", j


def _period_is_not_an_end(buf: str, i: int) -> bool:
    """True when the period at buf[i] closes an abbreviation, an initial or a list number."""
    start = i
    while start > 0 and not buf[start - 1].isspace():
        start -= 1
    word = buf[start:i].lstrip(_OPENERS)
    if not word:
        return False
    if word.lower() in ABBREVIATIONS or "." in word:  # "Mr.", "e.g.", "U.S.", "a.m."
        return True
    if len(word) == 1 and word.isupper():  # "J. R. R. Tolkien"
        return True
    line_start = buf.rfind("\n", 0, start) + 1
    return word.isdigit() and not buf[line_start:start].strip()  # "1. Preheat the oven"


def split_sentences(text: str, max_chars: int = 300) -> list[str]:
    """Whole text to sentence-sized pieces (for engines that synthesize a piece per call)."""
    buf = ClauseBuffer(min_chars=1, max_chars=max_chars, first_at_clause=False)
    pieces = buf.push(text)
    rest = buf.flush()
    return pieces + ([rest] if rest else [])
