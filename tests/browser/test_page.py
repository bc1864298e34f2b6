"""The caller page in headless Chromium: fake-mic speech in, one full turn, agent audio out.

Debian's /usr/bin/chromium driven by PyPI playwright (never `playwright install`);
the bridge and the worker processes are the ones tests/bridge uses.
"""

from __future__ import annotations

import asyncio
import os
import wave
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import pytest_asyncio

import tests.support.bridge as helpers  # the worker processes and bridge tests/bridge uses
from tests.engines.speech import pad_silence, synthesize_16k, wer

CHROMIUM = Path("/usr/bin/chromium")
QUESTION = "What is the capital of France?"

pytestmark = [
    pytest.mark.browser,
    pytest.mark.asyncio(loop_scope="module"),
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's /usr/bin/chromium (apt-get install chromium)"),
]



def write_wav(path: Path, pcm16k: np.ndarray) -> None:
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(16_000)
        out.writeframes(pcm16k.astype("<i2").tobytes())


def chromium_flags(wav: Path) -> list[str]:
    return [
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream",
        f"--use-file-for-fake-audio-capture={wav}%noloop",
        "--allow-loopback-in-peer-connection", "--disable-features=WebRtcHideLocalIpsWithMdns",
        "--autoplay-policy=no-user-gesture-required",
    ]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(request: pytest.FixtureRequest, redis_url: str) -> AsyncIterator[Any]:
    workers = helpers.shared_workers(request, redis_url)
    async with helpers.running_bridge(redis_url, workers.config()) as pair:
        yield pair


async def test_page_completes_a_turn(stack: Any, tmp_path: Path) -> None:
    from playwright.async_api import async_playwright

    bridge, transport = stack
    wav = tmp_path / "question.wav"
    # 1.5 s of silence while the page connects, the question, then silence (the file is not looped)
    write_wav(wav, pad_silence(synthesize_16k(QUESTION), 1.5, 20.0))
    console: list[str] = []
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=chromium_flags(wav))
        try:
            page = await browser.new_page(bypass_csp=True)  # playwright evaluates its waits with eval; the page forbids it
            page.on("console", lambda msg: console.append(f"{msg.type}: {msg.text}"))
            page.on("pageerror", lambda err: console.append(f"pageerror: {err}"))
            await page.goto(f"{transport.url}?token={helpers.TOKEN}")
            await page.click("#call")
            try:
                await page.wait_for_function("window.voxbus.userTranscripts.length > 0", timeout=90_000)
                await page.wait_for_function("window.voxbus.agentAudioTicks >= 10", timeout=90_000)
                await page.wait_for_function("window.voxbus.metrics.some(m => m.response_ms != null)", timeout=60_000)
                # a few seconds of the agent's audio through the jitter buffer (the stream runs on, silent, after)
                await page.wait_for_function("window.voxbus.playoutDelaySamples.length >= 8", timeout=30_000)
            except Exception:
                vb = await page.evaluate("JSON.stringify(window.voxbus)")
                pytest.fail(f"the page did not complete a turn; window.voxbus={vb}\nconsole:\n" + "\n".join(console[-30:]))
            vb = await page.evaluate("window.voxbus")
            if os.environ.get("VOXBUS_TEST_SCREENSHOT"):
                await page.screenshot(path=os.environ["VOXBUS_TEST_SCREENSHOT"], full_page=True)
            shown = await page.inner_text("#conversation")
            bars = await page.locator("#waterfall .row .seg").count()
        finally:
            await browser.close()

    heard = vb["userTranscripts"][0]
    print(f"\npage: transcript {heard!r} (WER {wer(QUESTION, heard):.2f}); agent audible for "
          f"{vb['agentAudioTicks'] * 20} ms (peak RMS {vb['agentPeak']:.3f}); {vb['tokenMessages']} token messages; "
          f"state {vb['state']}")
    assert wer(QUESTION, heard) <= 0.2, heard
    assert heard in shown, shown
    assert vb["agentAudioTicks"] >= 10 and vb["agentPeak"] > 0.01
    assert vb["tokenMessages"] > 0 and bars >= 5
    assert not [e for e in vb["errors"]], vb["errors"]
    assert not [line for line in console if line.startswith("pageerror")], console
    # The jitter buffer: the bridge's target is taken, and the browser plays out at it.
    target = bridge.config.bridge.jitter_target_ms
    delays = vb["playoutDelaySamples"][2:]  # the first samples include the buffer filling up
    achieved = float(np.median(delays))
    print(f"page: jitter buffer target {target} ms, achieved playout delay median {achieved:.1f} ms "
          f"(samples {[round(d) for d in delays]})")
    assert vb["jitterTargetMs"] == target and vb["jitterTargetApplied"], vb
    assert abs(achieved - target) <= 20, (achieved, target, delays)
    assert any(m.get("playout_delay_ms") is not None for m in vb["metrics"])


async def test_page_sets_apart_what_a_barge_in_cut(stack: Any, tmp_path: Path) -> None:
    """Stop pressed while the agent speaks: the page shows what was heard, the unheard rest set apart,
    and what was heard is exactly the assistant turn the agent's context now holds."""
    from playwright.async_api import async_playwright

    from shared.protocol import ChatMessage, decode_as

    bridge, transport = stack
    wav = tmp_path / "question.wav"
    write_wav(wav, pad_silence(synthesize_16k("Tell me about the history of Paris."), 1.5, 20.0))
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=chromium_flags(wav))
        try:
            page = await browser.new_page(bypass_csp=True)  # playwright evaluates its waits with eval; the page forbids it
            await page.goto(f"{transport.url}?token={helpers.TOKEN}")
            await page.click("#call")
            await page.wait_for_function("window.voxbus.agentAudioTicks >= 30", timeout=90_000)
            await page.click("#stop")
            await page.wait_for_function("Object.keys(window.voxbus.heardText).length > 0", timeout=20_000)
            vb = await page.evaluate("window.voxbus")
            unheard_shown = await page.locator("#conversation .agent .unheard").first.inner_text()
            await asyncio.sleep(0.5)  # the context write follows the flush
            said = [decode_as(e, ChatMessage) for e in bridge.sessions[vb["sessionId"]].context.entries]
        finally:
            await browser.close()
    turn, heard = next(iter(vb["heardText"].items()))
    cut = [m for m in said if m.role == "assistant" and m.turn == int(turn)]
    assert heard.strip(), vb
    assert cut and cut[-1].interrupted and cut[-1].text == heard.strip(), (said, heard)
    assert vb["unheardText"][turn] and vb["unheardText"][turn] in unheard_shown, vb
