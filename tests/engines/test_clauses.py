"""ClauseBuffer: what a streamed reply is cut into before TTS speaks it."""

from __future__ import annotations

import pytest

from workers.tts.clauses import ClauseBuffer, count_words, pause_after, split_sentences, tidy

OLD = {"first_words": 0, "min_words": 0}  # the first piece at a clause boundary, later ones at sentence ends


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


# ---------------------------------------------------------------- the first piece: the first words


def test_the_first_piece_goes_out_after_four_words_then_clause_by_clause() -> None:
    text = "Paris is the capital of France, and it is lovely in spring. It has many museums, parks and cafes."
    out = feed(text)
    assert out[0][1] == "Paris is the capital"
    assert out[0][0] <= len("Paris is the capital ") + 2  # released as soon as the space after the 4th word came
    assert [p for _, p in out[1:]] == ["of France, and it is lovely in spring.", "It has many museums,", "parks and cafes."]


def test_the_first_punctuation_ends_the_first_piece_when_it_comes_sooner() -> None:
    assert pieces("Sure, I can help with that. Here it is.") == ["Sure,", "I can help with that.", "Here it is."]
    assert pieces("Yes! Paris is the capital.") == ["Yes!", "Paris is the capital."]
    assert pieces("Hello there, friend. How are you?")[0] == "Hello there,"


@pytest.mark.parametrize("first_words", [1, 2, 3, 4, 6])
def test_first_words_sets_the_cut(first_words: int) -> None:
    text = "Berlin has about three million people living there today."
    out = pieces(text, first_words=first_words)
    assert count_words(out[0]) >= first_words
    assert count_words(out[0]) <= first_words + 2
    assert " ".join(out).split() == text.split()


def test_a_word_cut_needs_the_space_after_the_word() -> None:
    buf = ClauseBuffer()
    assert buf.push("Paris is the capit") == []
    assert buf.push("al") == []  # "capital" may still grow
    assert buf.push(" of") == ["Paris is the capital"]


@pytest.mark.parametrize(
    ("text", "first"),
    [
        ("I think that the answer is about right.", "I think that the answer"),  # not on "the"
        ("Go to the end of the road and turn left.", "Go to the end"),
        ("Take it to the city of Berlin by train.", "Take it to the city"),  # two words past: cut anyway
        ("It costs $5 million to build the bridge.", "It costs $5 million"),  # never between "$5" and "million"
        ("I met with Mr. Smith and Dr. Jones yesterday.", "I met with Mr. Smith"),  # never after "Mr."
        ("J. R. R. Tolkien wrote it in England.", "J. R. R. Tolkien"),
        ("We open at 9:30 a.m. sharp.", "We open at 9:30 a.m. sharp."),
    ],
)
def test_a_word_cut_avoids_ending_on_function_words_numbers_and_abbreviations(text: str, first: str) -> None:
    for step in (1, 3, 7):
        out = pieces(text, step=step)
        assert out[0] == first, (step, out)
        assert " ".join(out).split() == text.split()


def test_no_word_cut_with_first_words_zero_or_for_whole_texts() -> None:
    assert pieces("Paris is the capital of France, and it is lovely.", **OLD)[0] == "Paris is the capital of France,"
    assert split_sentences("Paris is the capital of France, and it is lovely.") == [
        "Paris is the capital of France, and it is lovely."]


# ---------------------------------------------------------------- later pieces: clause by clause


def test_later_pieces_end_at_a_clause_once_they_hold_min_words() -> None:
    text = "The capital of France is Paris. It has museums, lovely old parks, cafes, and bridges. Enjoy it!"
    assert pieces(text) == ["The capital of France", "is Paris.", "It has museums,", "lovely old parks,",
                            "cafes, and bridges.", "Enjoy it!"]
    assert pieces(text, min_words=5) == ["The capital of France", "is Paris.", "It has museums, lovely old parks,",
                                         "cafes, and bridges.", "Enjoy it!"]


def test_min_words_zero_waits_for_a_sentence_end() -> None:
    text = "The capital of France is Paris. It has museums, parks, cafes, and old bridges. Enjoy it!"
    assert pieces(text, **OLD) == ["The capital of France is Paris.", "It has museums, parks, cafes, and old bridges.",
                                   "Enjoy it!"]


@pytest.mark.parametrize("mark", [";", ":", " \u2014", " -"])
def test_every_clause_mark_ends_a_later_piece(mark: str) -> None:
    out = pieces(f"Sure. The weather today is mild{mark} take a light jacket with you.")
    assert out == ["Sure.", "The weather today is mild" + mark.strip(" -\u2014"), "take a light jacket with you."]


# ---------------------------------------------------------------- boundaries and text (unchanged rules)


def test_a_too_short_first_clause_waits_for_the_next_boundary_without_the_word_rule() -> None:
    assert pieces("Sure, I can help with that. Here it is.", **OLD) == ["Sure, I can help with that.", "Here it is."]
    assert pieces("Sure, I can help with that. Here it is.", **OLD, min_chars=4) == [
        "Sure,", "I can help with that.", "Here it is."
    ]


@pytest.mark.parametrize("mark", [";", ":", "!", "?", " \u2014", " -"])
def test_every_clause_mark_can_end_the_first_clause(mark: str) -> None:
    out = pieces(f"The weather today is mild{mark} take a light jacket with you.", **OLD)
    assert out[0].startswith("The weather today is mild")
    assert len(out) == 2


def test_a_newline_ends_a_clause_at_once() -> None:
    assert ClauseBuffer(**OLD).push("Here are the steps to follow\n") == ["Here are the steps to follow"]
    assert ClauseBuffer().push("Here are the steps to follow\n") == ["Here are the steps", "to follow"]


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
        assert pieces(sentence, step=step, min_chars=60, **OLD) == [sentence]
        for piece in pieces(sentence, step=step):  # the word and clause rules cut elsewhere, never inside one
            assert piece in sentence and not piece.endswith(("Mr.", "Dr.", "St.", "e.g.", "i.e.", "U.S.", " J.", " R."))
            assert not piece.endswith(("3", "3.", "2.", "1,", "9:", "$1"))


def test_a_boundary_waits_for_the_next_character() -> None:
    buf = ClauseBuffer(**OLD)
    assert buf.push("The value of pi is about 3.") == []  # could still become 3.14
    assert buf.push("14, which") == ["The value of pi is about 3.14,"]
    buf = ClauseBuffer()
    assert buf.push("Well. The value is about 3.") == ["Well."]
    assert buf.push("14, which") == ["The value is about 3.14,"]


def test_markdown_noise_is_dropped() -> None:
    text = "## Summary\nThis is **very** important: use `pip` now.\n* first item\n* second item"
    out = pieces(text)
    assert out == ["Summary", "This is very important:", "use pip now.", "first item", "second item"]
    assert not any(ch in "".join(out) for ch in "*#`")


def test_a_long_run_without_boundaries_is_cut_at_max_chars_on_a_word() -> None:
    text = "word " * 100
    out = pieces(text, max_chars=60)
    assert len(out) > 5
    assert all(len(p) <= 60 for p in out)
    assert all(set(p.split()) == {"word"} for p in out)
    assert " ".join(out).split() == text.split()


def test_a_long_sentence_is_cut_at_its_last_comma_before_max_chars() -> None:
    buf = ClauseBuffer(max_chars=50, **OLD)
    buf.push("Hello there, friend. ")
    assert buf.push("This sentence goes on, and on without a full stop for quite a while yes") == [
        "This sentence goes on,"
    ]


def test_flush_returns_the_rest_and_resets() -> None:
    buf = ClauseBuffer()
    assert buf.push("Goodbye for now") == []
    assert buf.flush() == "Goodbye for now"
    assert buf.flush() is None
    assert buf.push("Hello, my dear friend, how are you") == ["Hello,", "my dear friend,"]  # first-piece rule again


def test_nothing_speakable_gives_nothing() -> None:
    assert pieces("**\n\n#\n- \n") == []
    assert tidy(" - ... ") == ""


def test_split_sentences_for_whole_texts() -> None:
    assert split_sentences("Hello there, my friend. How are you? I am fine... thanks. Dr. No.") == [
        "Hello there, my friend.", "How are you?", "I am fine... thanks.", "Dr. No."
    ]


@pytest.mark.parametrize("options", [{}, OLD, {"first_words": 1, "min_words": 1}])
def test_the_pieces_keep_every_word_of_the_reply(options: dict[str, int]) -> None:
    text = ("Well, that depends. On a clear day, e.g. in June, you can see 3.5 km: about 2.2 miles! "
            "Mr. Lee says so \u2014 and he knows.\nThat's all.")
    for step in (1, 4, 7):
        out = pieces(text, step=step, **options)
        assert " ".join(out).replace("\u2014", "").split() == text.replace("\u2014", "").split()


@pytest.mark.parametrize(
    ("piece", "pause"),
    [("Paris is the capital", None), ("of France,", "clause"), ("we have: ", "clause"), ("It is lovely.", "sentence"),
     ("Really?", "sentence"), ('He said "stop!"', "sentence"), ("I am fine...", "sentence"), ("mild", None), ("", None)],
)
def test_pause_after_follows_the_last_mark(piece: str, pause: str | None) -> None:
    assert pause_after(piece) == pause


def test_bad_word_counts_are_refused() -> None:
    with pytest.raises(ValueError):
        ClauseBuffer(first_words=-1)
