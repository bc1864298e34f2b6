"""ClauseBuffer: what a streamed reply is cut into before TTS speaks it."""

from __future__ import annotations

import pytest

from workers.tts.clauses import ClauseBuffer, split_sentences, tidy


def feed(text: str, step: int = 3, **options: int) -> list[tuple[int, str]]:
    """Push `text` in `step`-character deltas (as tokens stream); (chars pushed when released, piece)."""
    buf = ClauseBuffer(**options)
    out: list[tuple[int, str]] = []
    for i in range(0, len(text), step):
        out += [(i + step, piece) for piece in buf.push(text[i : i + step])]
    rest = buf.flush()
    if rest:
        out.append((len(text), rest))
    return out


def pieces(text: str, step: int = 3, **options: int) -> list[str]:
    return [piece for _, piece in feed(text, step, **options)]


def test_first_clause_is_released_at_the_first_comma_once_it_has_a_few_words() -> None:
    text = "Paris is the capital of France, and it is lovely in spring. It has many museums."
    out = feed(text)
    assert out[0][1] == "Paris is the capital of France,"
    assert out[0][0] < len("Paris is the capital of France, and")  # released while the reply still streams
    assert [p for _, p in out[1:]] == ["and it is lovely in spring.", "It has many museums."]


def test_a_too_short_first_clause_waits_for_the_next_boundary() -> None:
    assert pieces("Sure, I can help with that. Here it is.") == ["Sure, I can help with that.", "Here it is."]
    assert pieces("Sure, I can help with that. Here it is.", min_chars=4) == [
        "Sure,", "I can help with that.", "Here it is."
    ]


@pytest.mark.parametrize("mark", [";", ":", "!", "?", " \u2014", " -"])
def test_every_clause_mark_can_end_the_first_clause(mark: str) -> None:
    out = pieces(f"The weather today is mild{mark} take a light jacket with you.")
    assert out[0].startswith("The weather today is mild")
    assert len(out) == 2


def test_a_newline_ends_a_clause_at_once() -> None:
    buf = ClauseBuffer()
    assert buf.push("Here are the steps to follow\n") == ["Here are the steps to follow"]


def test_later_clauses_wait_for_a_sentence_end() -> None:
    out = pieces("The capital of France is Paris. It has museums, parks, cafes, and old bridges. Enjoy it!")
    assert out == ["The capital of France is Paris.", "It has museums, parks, cafes, and old bridges.", "Enjoy it!"]


@pytest.mark.parametrize(
    "sentence",
    [
        "Pi is roughly 3.14159 and e is roughly 2.71828.",
        "It costs $1,250 and opens at 9:30 every day.",
        "Bring fruit, e.g. apples or pears, and i.e. nothing else.",
        "Mr. Smith and Dr. Jones met Mrs. Brown at St. Mary's.",
        "J. R. R. Tolkien wrote it in the U.S. at 5 p.m. sharp.",
        "Version 2.0.1 of the app is out.",
    ],
)
def test_numbers_and_abbreviations_are_never_split(sentence: str) -> None:
    for step in (1, 2, 5):
        assert pieces(sentence, step=step, min_chars=60) == [sentence]


def test_a_boundary_waits_for_the_next_character() -> None:
    buf = ClauseBuffer()
    assert buf.push("The value of pi is about 3.") == []  # could still become 3.14
    assert buf.push("14, which") == ["The value of pi is about 3.14,"]


def test_markdown_noise_is_dropped() -> None:
    text = "## Summary\nThis is **very** important: use `pip` now.\n* first item\n* second item"
    out = pieces(text)
    assert out == ["Summary This is very important:", "use pip now.", "first item", "second item"]
    assert not any(ch in "".join(out) for ch in "*#`")


def test_a_long_run_without_boundaries_is_cut_at_max_chars_on_a_word() -> None:
    text = "word " * 100
    out = pieces(text, max_chars=60)
    assert len(out) > 5
    assert all(len(p) <= 60 for p in out)
    assert all(set(p.split()) == {"word"} for p in out)
    assert " ".join(out).split() == text.split()


def test_a_long_sentence_is_cut_at_its_last_comma_before_max_chars() -> None:
    buf = ClauseBuffer(max_chars=50)
    buf.push("Hello there, friend. ")
    assert buf.push("This sentence goes on, and on without a full stop for quite a while yes") == [
        "This sentence goes on,"
    ]


def test_flush_returns_the_rest_and_resets() -> None:
    buf = ClauseBuffer()
    assert buf.push("Goodbye for now") == []
    assert buf.flush() == "Goodbye for now"
    assert buf.flush() is None
    assert buf.push("Hello, my dear friend, how are you") == ["Hello, my dear friend,"]  # first-clause rule again


def test_nothing_speakable_gives_nothing() -> None:
    assert pieces("**\n\n#\n- \n") == []
    assert tidy(" - ... ") == ""


def test_split_sentences_for_whole_texts() -> None:
    assert split_sentences("Hello there, my friend. How are you? I am fine... thanks. Dr. No.") == [
        "Hello there, my friend.", "How are you?", "I am fine... thanks.", "Dr. No."
    ]


def test_the_pieces_keep_every_word_of_the_reply() -> None:
    text = ("Well, that depends. On a clear day, e.g. in June, you can see 3.5 km: about 2.2 miles! "
            "Mr. Lee says so \u2014 and he knows.\nThat's all.")
    for step in (1, 4, 7):
        assert " ".join(pieces(text, step=step)).replace("\u2014", "").split() == text.replace("\u2014", "").split()
