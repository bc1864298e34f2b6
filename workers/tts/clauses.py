"""Cuts a streamed LLM reply into pieces a TTS engine can speak as they complete.

Time to first audio is what the caller hears, so the first piece goes out
after `first_words` complete words, or at the first clause boundary
(, ; : . ! ? a dash or a newline) if that comes sooner. Later pieces end at a
clause boundary once they hold `min_words` words, or at any sentence end:
short enough that synthesis keeps ahead of playback, long enough for natural
prosody. A boundary is only taken once the next character shows it is one:
"3.14", "1,000", "e.g." and "Mr." never split. A first piece cut between
words never ends on an abbreviation ("Mr. | Smith"), a number ("$5 | million"
reads differently) or, within two words more, an article, preposition or
conjunction ("the capital of | France"). `pause_after` says which pause a
piece's text calls for after it (workers/tts/seams.py puts it in the audio).
Markdown marks the TTS would read aloud (* # `) are dropped as they stream in.
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
Pause = Literal["clause", "sentence"]
# Words a first piece cut between words should not end on: spoken last, they get a phrase-final stress.
_FUNCTION_WORDS = frozenset(
    "a an the of to in on at by for from with as into about and or but nor so than that this these those "
    "my your our their its his her is are was were".split()
)
_FUNCTION_SLACK = 2  # words past first_words a cut may wait to avoid ending on one of them


def tidy(text: str) -> str:
    """What a TTS should say of a piece: markdown links become their text, URLs, emphasis marks and
    list markers go, whitespace is collapsed, trailing dashes dropped; "" when nothing speakable is left."""
    text = _URL.sub("", _LINK.sub(r"\1", text))
    text = _UNDERSCORE.sub("", text)
    text = " ".join(text.split()).lstrip(_BULLETS)
    text = _NUMBERED.sub("", text).rstrip(" -" + _DASHES)
    return text if any(c.isalnum() for c in text) else ""


def count_words(text: str) -> int:
    return sum(1 for token in text.split() if any(c.isalnum() for c in token))


def pause_after(piece: str) -> Pause | None:
    """The pause a piece's last mark calls for: "clause" after , ; : "sentence" after . ! ? (an ellipsis
    too); None after a word (a cut between words, a dash or a line end, which `tidy` leaves unmarked)."""
    text = piece.rstrip().rstrip(_CLOSERS)
    if not text:
        return None
    if text[-1] in _CLAUSE_MARKS:
        return "clause"
    return "sentence" if text[-1] in _SENTENCE_MARKS else None


class ClauseBuffer:
    def __init__(self, first_words: int = 4, min_words: int = 3, *, min_chars: int = 12, max_chars: int = 240,
                 first_at_clause: bool = True) -> None:
        """`first_words`: the first piece ends after this many words, or at its first clause boundary
        (0: at the first boundary once it holds `min_chars` characters); `min_words`: a later piece ends
        at a clause boundary once it holds this many words, else at a sentence end (0: at sentence ends
        only); `max_chars`: a piece with no boundary is cut (at a comma or a space) once this long;
        `first_at_clause`: False cuts at sentence ends only (whole-text synthesis)."""
        if max_chars <= min_chars:
            raise ValueError("max_chars must exceed min_chars")
        if first_words < 0 or min_words < 0:
            raise ValueError("first_words and min_words must be >= 0")
        self.first_words = first_words
        self.min_words = min_words
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
        by_words = first and self.first_at_clause and self.first_words > 0
        words = 0
        soft_cut = 0  # last clause boundary, for a piece grown to max_chars
        i = 0
        while i < len(buf):
            kind, end = boundary_at(buf, i)
            if kind == "pending":
                break
            if kind is not None:
                if self._ends_piece(kind, buf[:end], first):
                    return end
                if end <= self.max_chars:
                    soft_cut = end
                i = end  # buf[end] is the whitespace after the mark: the word count below still sees it
                continue
            if by_words and buf[i].isspace() and i > 0 and not buf[i - 1].isspace():
                start = i
                while start > 0 and not buf[start - 1].isspace():
                    start -= 1
                token = buf[start:i]
                if count_words(token):
                    words += 1
                    if words >= self.first_words and _can_cut_after(token, words - self.first_words):
                        return i
            i += 1
        if len(buf) < self.max_chars:
            return None
        if soft_cut:
            return soft_cut
        space = buf.rfind(" ", 0, self.max_chars)
        return space if space > 0 else self.max_chars

    def _ends_piece(self, kind: Kind, text: str, first: bool) -> bool:
        spoken = tidy(text)
        if not spoken:
            return True  # nothing speakable: dropped
        if first:
            if not self.first_at_clause:
                return kind == "sentence" and len(spoken) >= self.min_chars
            return self.first_words > 0 or len(spoken) >= self.min_chars
        if kind == "sentence":
            return True
        return self.first_at_clause and self.min_words > 0 and count_words(spoken) >= self.min_words


def _can_cut_after(token: str, extra_words: int) -> bool:
    """Whether a first piece may end after `token`, `extra_words` words past `first_words`."""
    word = token.strip(_CLOSERS + _OPENERS)
    if word.endswith("."):
        return False  # "Mr.", "e.g.", "J.": a real sentence end was taken as a boundary already
    if extra_words >= _FUNCTION_SLACK:
        return True
    return not any(c.isdigit() for c in word) and word.lower() not in _FUNCTION_WORDS


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
    buf = ClauseBuffer(0, 0, min_chars=1, max_chars=max_chars, first_at_clause=False)
    pieces = buf.push(text)
    rest = buf.flush()
    return pieces + ([rest] if rest else [])
