"""The stage batcher (workers/stages/batching.py): jobs of one tick share one engine call, inputs
of different keys (ASR: languages) never do, and a failing call fails only its own batch."""

from __future__ import annotations

import asyncio

import pytest

from workers.stages.batching import Batcher


async def test_one_tick_is_one_call_per_key_and_results_go_back_to_their_jobs() -> None:
    calls: list[list[tuple[str, str]]] = []

    def run(items: list[tuple[str, str]]) -> list[str]:
        calls.append(items)
        if any(text == "boom" for text, _ in items):
            raise RuntimeError("engine failed")
        return [f"{text}/{lang}" for text, lang in items]

    batcher: Batcher[tuple[str, str], str] = Batcher(run, key=lambda item: item[1], max_size=3)
    items = [("a", "en"), ("b", "de"), ("c", "en"), ("d", "en"), ("e", "en"), ("boom", "fr"), ("f", "de")]
    results = await asyncio.gather(*(batcher.submit(i) for i in items), return_exceptions=True)
    await batcher.aclose()
    assert results[:5] == ["a/en", "b/de", "c/en", "d/en", "e/en"] and results[6] == "f/de"
    assert isinstance(results[5], RuntimeError)
    assert [sorted({lang for _, lang in c}) for c in calls] == [["en"], ["de"], ["en"], ["fr"]]
    assert max(len(c) for c in calls) == 3  # max_size holds


async def test_a_wrong_number_of_results_is_an_error_not_a_mixup() -> None:
    batcher: Batcher[int, int] = Batcher(lambda items: items[:-1])
    with pytest.raises(RuntimeError, match="returned 1 results for a batch of 2"):
        await asyncio.gather(batcher.submit(1), batcher.submit(2))
