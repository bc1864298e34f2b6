"""A spoken reply's budget: what of the streamed text to pass on, and when to stop generating.

A voice agent's answer is heard, not read: a small model with greedy decoding
will happily talk for thirty seconds (or loop). `SpokenReply` follows the
deltas as they decode and ends the reply at the first sentence end past
`soft_tokens`, at the `max_sentences`-th sentence end, or at `max_tokens`
(the engine's own cap). A sentence end is only known once the next character
arrives ("3." may become "3.14", "Mr." is not an end), so text that might
end a sentence is held back until that is decided; a stopped reply never
shows the start of a sentence it will not finish. Sentence ends are those the
TTS clause splitter uses (workers/tts/clauses.py), so the two agree.
"""

from __future__ import annotations

from shared.config import ReplyBudget
from workers.tts.clauses import boundary_at


class SpokenReply:
    def __init__(self, budget: ReplyBudget) -> None:
        self.budget = budget
        self.text = ""  # everything decoded so far
        self.tokens = 0
        self.sentences = 0
        self.stopped = ""  # why the reply was cut: "soft_tokens" or "max_sentences" ("" while going on)
        self._published = 0  # text[:_published] was passed on
        self._scan = 0  # text[:_scan] holds no undecided boundary

    def push(self, delta: str) -> tuple[str, bool]:
        """A decoded delta -> (the text to pass on now, whether to stop generating here)."""
        self.tokens += 1
        self.text += delta
        text = self.text
        i = self._scan
        hold = len(text)
        while i < len(text):
            kind, end = boundary_at(text, i)
            if kind == "pending":
                hold = i  # might end a sentence: wait for the next character
                break
            if kind == "sentence":
                self.sentences += 1
                if self.sentences >= self.budget.max_sentences:
                    self.stopped = "max_sentences"
                elif self.tokens >= self.budget.soft_tokens:
                    self.stopped = "soft_tokens"
                if self.stopped:
                    return self._take(end), True
                i = end
                continue
            i += 1
        self._scan = hold
        return self._take(hold), False

    def resume(self, spoken: str, tokens: int) -> bool:
        """Pick up after `spoken`, which an earlier run of the job already passed on (in `tokens`
        deltas); True when that reply had already used its budget (nothing more to say)."""
        _, stop = self.push(spoken)
        self.tokens = max(tokens, 1)
        self._published = len(self.text)
        return stop

    def finish(self) -> str:
        """The end of the stream: whatever was held back."""
        return self._take(len(self.text))

    def _take(self, upto: int) -> str:
        out = self.text[self._published : upto]
        self._published = max(self._published, upto)
        if self.stopped:
            out = out.rstrip()
        return out
