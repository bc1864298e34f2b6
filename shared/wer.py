"""Word error rate: how replay and the tests compare transcripts."""

from __future__ import annotations

import re


def normalize_words(text: str) -> list[str]:
    """Lowercase words without punctuation ("Don't stop." -> ["dont", "stop"])."""
    text = text.lower().replace("'", "").replace("\u2019", "")
    return re.sub(r"[^a-z0-9]+", " ", text).split()


def word_errors(ref: str, hyp: str) -> tuple[int, int]:
    """(substitutions + deletions + insertions, reference word count): word-level edit distance."""
    r, h = normalize_words(ref), normalize_words(hyp)
    row = list(range(len(h) + 1))
    for i, rw in enumerate(r, 1):
        prev_diag, row[0] = row[0], i
        for j, hw in enumerate(h, 1):
            prev_diag, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev_diag + (rw != hw))
    return row[len(h)], len(r)


def wer(ref: str, hyp: str) -> float:
    """Word error rate of `hyp` against `ref` (case and punctuation ignored)."""
    errors, words = word_errors(ref, hyp)
    if words == 0:
        return 0.0 if errors == 0 else 1.0
    return errors / words


def corpus_wer(pairs: list[tuple[str, str]]) -> float:
    """Total errors over total reference words, for (ref, hyp) pairs."""
    errors = words = 0
    for ref, hyp in pairs:
        e, w = word_errors(ref, hyp)
        errors, words = errors + e, words + w
    return errors / max(words, 1)
