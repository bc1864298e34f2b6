"""Continuation cues: does the transcript of the caller's words so far end where a sentence cannot?

The end-of-turn model hears *how* the caller stopped (intonation, the last
~100 ms of voice); the preemptive transcript says *what* they stopped on. "I
would like to book a table for", "My name is", "five five five, two three",
"um" end with a falling voice as often as a finished question does, but no
finished sentence ends there. `continuation_cue(text, cues)` names the first
cue it finds (for the recording and the metrics), or None:

- `ellipsis`: the ASR wrote a trailing "..." (Whisper does for a voice that
  trails off) or a trailing comma, colon, semicolon or dash (`comma`);
- `filler:W`: the last word is a hesitation (um, uh, er), or every word is a
  hesitation or an opener ("So.", "Um, so");
- `word:W`: the last word wants more after it: a conjunction, a preposition,
  an article or a possessive ("and", "for", "the", "my");
- `phrase:W W`: the last words do ("and then", "such as", "rather than"),
  and "then" after an "if" or "when" in the same sentence;
- `copula:W`: a linking verb after a noun ("My name is", "The reason I'm
  calling is"), but not after a pronoun ("Yes, it is.");
- `digits`: a number being read out in groups or digit by digit: the last two
  tokens are numerals or digit words ("5 5 5", "4111, 2222", "seven three";
  not "six thirty").

A transcript ending in "?" or "!" has no cue, nor one whose end loops ("Car,
Car, Car, Car,": Whisper hallucinating on audio it cannot read): English questions strand
prepositions ("Who is it for?"). With `unpunctuated`, a transcript that ends
on a word, with no . ? ! at all, is a cue too (`unpunctuated`): Whisper
punctuates what it heard as a finished sentence and leaves a sentence it
heard break off open ("Because the last time I called"); an ASR that never
punctuates must leave this off. Word lists are per language (`LANGUAGES`;
English is the default); a pools file adds its own words or phrases with
`[bridge] eot_extra_cues`. Pure functions, no I/O: the turn machine calls this
on every preemptive transcript.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

__all__ = ["LANGUAGES", "Cues", "continuation_cue", "cues_for"]


@dataclass(frozen=True, slots=True)
class Cues:
    words: frozenset[str]  # a last word that wants more
    fillers: frozenset[str]  # hesitations
    openers: frozenset[str]  # words that only open a sentence when nothing else was said ("so", "well")
    phrases: frozenset[tuple[str, ...]]  # last words that want more
    copulas: frozenset[str]  # want a complement after a noun ("is"), not after a pronoun
    pronouns: frozenset[str]
    digits: frozenset[str]  # words for one digit, as a number is read out ("five five five")
    then: str = ""  # "then" that wants more after a condition ("if ... then")
    conditions: frozenset[str] = frozenset()


def _set(words: str) -> frozenset[str]:
    return frozenset(words.split())


def _phrases(*phrases: str) -> frozenset[tuple[str, ...]]:
    return frozenset(tuple(p.split()) for p in phrases)


LANGUAGES: dict[str, Cues] = {
    "en": Cues(
        words=_set("and or but nor because if unless whether although than to for of at with from about into onto "
                   "toward towards between among during via per including a an the my your our their its whose"),
        fillers=_set("um umm uh uhh uhm er erm hmm"),
        openers=_set("so well and but or also"),
        phrases=_phrases("and then", "but then", "such as", "as well as", "rather than", "more than", "less than",
                         "other than", "in order to", "as soon as", "as long as", "i mean"),
        copulas=_set("is are was were am"),
        pronouns=_set("it that this there here he she they we i you who what which where how that's it's"),
        digits=_set("zero oh one two three four five six seven eight nine double triple"),
        then="then", conditions=_set("if when once")),
    "de": Cues(
        words=_set("und oder aber denn weil wenn ob dass als zu für von mit aus bei nach an auf in über unter "
                   "zwischen der die das den dem des ein eine einen einem einer mein meine meinen dein deine unser "
                   "unsere ihr ihre"),
        fillers=_set("äh ähm öh hm hmm"),
        openers=_set("also na und aber"),
        phrases=_phrases("und dann", "sowie", "als auch"),
        copulas=_set("ist sind war waren bin"),
        pronouns=_set("es das dies er sie wir ich du ihr wer was wo wie"),
        digits=_set("null eins zwei drei vier fünf sechs sieben acht neun"),
        then="dann", conditions=_set("wenn falls")),
    "es": Cues(
        words=_set("y e o u pero porque si que a de del para por con en sin sobre entre el la los las un una "
                   "unos unas mi mis tu tus su sus nuestro nuestra"),
        fillers=_set("eh em este mmm"),
        openers=_set("bueno pues entonces y o pero"),
        phrases=_phrases("y luego", "y después", "así como"),
        copulas=_set("es son era eran soy está están"),
        pronouns=_set("eso esto ello él ella ellos nosotros yo tú usted qué quién dónde cómo"),
        digits=_set("cero uno una dos tres cuatro cinco seis siete ocho nueve"),
        then="entonces", conditions=_set("si cuando")),
    "fr": Cues(
        words=_set("et ou mais car parce si que à de du des pour par avec en sans sur sous entre le la les un une "
                   "mon ma mes ton ta tes son sa ses notre votre leur leurs"),
        fillers=_set("euh heu hum bah"),
        openers=_set("alors bon donc et ou mais"),
        phrases=_phrases("et puis", "et ensuite", "ainsi que", "parce que"),
        copulas=_set("est sont était étaient suis"),
        pronouns=_set("c'est ce ça cela il elle ils elles nous je tu vous qui quoi où comment"),
        digits=_set("zéro un une deux trois quatre cinq six sept huit neuf"),
        then="alors", conditions=_set("si quand")),
}

_WORD = re.compile(r"[^\W_]+(?:['’][^\W_]+)*")
_NUMBER = re.compile(r"^[$€£]?\d[\d.,:]*%?$")
_SENTENCE_END = re.compile(r"[.?!]\s")
_TRAILING = " \t\n\"'”’)]»"


@lru_cache(maxsize=64)
def cues_for(language: str, extra: tuple[str, ...] = ()) -> Cues:
    """The cues of `language` (a key of LANGUAGES), with `extra` words or phrases added."""
    base = LANGUAGES[language]
    words = {e.lower() for e in extra if " " not in e.strip()}
    phrases = {tuple(e.lower().split()) for e in extra if " " in e.strip()}
    if not words and not phrases:
        return base
    return Cues(base.words | words, base.fillers, base.openers, base.phrases | phrases, base.copulas, base.pronouns,
                base.digits, base.then, base.conditions)


def _is_digits(token: str, cues: Cues) -> bool:
    """Numerals (the ASR writes a number read out in groups as "555 234") or a single digit's word."""
    return bool(_NUMBER.match(token)) or token in cues.digits


def _looping(text: str, cues: Cues) -> bool:
    """The ASR's text ends in a loop ("Car, Car, Car, Car", "and some basil and some basil and some
    basil"): Whisper hallucinates so on audio it cannot read, and such an end says nothing."""
    words = [w.lower() for w in _WORD.findall(text)[-48:]]
    for n in range(1, 9):
        need = 4 if n == 1 else 3  # repeats of an n-word group ("two two two" is a number, not a loop)
        gram = words[-n:]
        if len(words) < need * n or all(_is_digits(w, cues) for w in gram):
            continue
        repeats = 1
        while words[-(repeats + 1) * n : len(words) - repeats * n] == gram:
            repeats += 1
        if repeats >= need:
            return True
    return False


def continuation_cue(text: str, cues: Cues, unpunctuated: bool = False) -> str | None:
    """The first continuation cue at the end of `text`, or None (see the module docstring)."""
    stripped = text.rstrip(_TRAILING)
    if not stripped or _looping(stripped, cues):
        return None
    if stripped.endswith(("...", "…")):
        return "ellipsis"
    last_char = stripped[-1]
    if last_char in "?!":
        return None
    if last_char in ",;:-–—":
        return "comma"
    words = [w.lower().replace("’", "'") for w in _WORD.findall(stripped)]
    cue = _word_cue(words, stripped, cues) if words else None
    if cue is None and words and unpunctuated and last_char not in ".":
        return "unpunctuated"
    return cue


def _word_cue(words: list[str], text: str, cues: Cues) -> str | None:
    last = words[-1]
    if last in cues.fillers or all(w in cues.fillers or w in cues.openers for w in words):
        return f"filler:{last}"
    for n in (3, 2):
        if len(words) >= n and tuple(words[-n:]) in cues.phrases:
            return "phrase:" + " ".join(words[-n:])
    if last in cues.words:
        return f"word:{last}"
    if last in cues.copulas and len(words) >= 2 and words[-2] not in cues.pronouns:
        return f"copula:{last}"
    if cues.then and last == cues.then:
        sentence = [w.lower() for w in _WORD.findall(_SENTENCE_END.split(text)[-1])][:-1]
        condition = next((w for w in sentence if w in cues.conditions), None)
        if condition:
            return f"phrase:{condition} ... {last}"
    # A number read out in groups or digit by digit: the last two tokens are numerals or digit words
    # ("5 5 5", "4111, 2222", "seven three"; not "six thirty" or "forty two", which are one number).
    tokens = [t.lower() for t in re.split(r"[\s,;\-–—/]+", text.rstrip(".")) if t]
    if len(tokens) >= 2 and _is_digits(tokens[-1], cues) and _is_digits(tokens[-2], cues):
        return "digits"
    return None
