"""OpenAI-compatible client against a REAL llama.cpp server (`python -m workers.llm.llama_server`: llama_cpp.server)
on the bundled SmolLM2.

The server is started once per module on a free port, with an API key, and
killed at the end. Its log shows when it noticed a client going away.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
import pytest_asyncio

import workers.llm
from shared.cancel import CancelWatch
from shared.models import resolve
from shared.protocol import ChatMessage
from workers.llm.openai_compat import DONE, LlmHttpError, OpenAiLlm, parse_sse_line

API_KEY = "sk-test-7d1f9c0e5b2a"
KEY_ENV = "VOXBUS_TEST_LLM_KEY"
QUESTION = "Tell me about the moon and why it has phases."
DISCONNECT_LINE = "Disconnected from client"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, base_url: str, log: Path) -> None:
        self.base_url, self.log = base_url, log

    def disconnects(self) -> int:
        return self.log.read_text(errors="replace").count(DISCONNECT_LINE)

    async def wait_for_disconnects(self, at_least: int, timeout_s: float = 20.0) -> int:
        deadline = time.monotonic() + timeout_s
        while self.disconnects() < at_least and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return self.disconnects()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    port = free_port()
    log = tmp_path_factory.mktemp("llama-server") / "server.log"
    cmd = [
        sys.executable, "-m", "workers.llm.llama_server", "--model", resolve("bundled:smollm2-135m-instruct"),
        "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "1024", "--api_key", API_KEY,
        "--verbose", "False",
    ]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                pytest.fail(f"llama_cpp.server exited with {proc.returncode}:\n{log.read_text()[-2000:]}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=1).status_code < 500:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"llama_cpp.server did not listen on {port} within 90 s:\n{log.read_text()[-2000:]}")
            time.sleep(0.2)
        yield Server(f"http://127.0.0.1:{port}/v1", log)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest_asyncio.fixture
async def llm(server: Server, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[OpenAiLlm]:
    monkeypatch.setenv(KEY_ENV, API_KEY)
    engine = OpenAiLlm(server.base_url, model="smollm2", api_key_env=KEY_ENV, system_prompt="Answer briefly.")
    await engine.load()
    yield engine
    await engine.aclose()


def user(text: str = QUESTION) -> list[ChatMessage]:
    return [ChatMessage(session="t", role="user", text=text)]


async def collect(engine: OpenAiLlm, max_tokens: int = 40) -> list[str]:
    return [d async for d in engine.stream(user(), request_id="r", max_tokens=max_tokens, watch=None)]


async def test_streams_many_deltas_and_is_deterministic(llm: OpenAiLlm) -> None:
    first = await collect(llm)
    assert len(first) >= 10
    assert max(len(d) for d in first) < len("".join(first)) / 4
    assert "".join(await collect(llm)) == "".join(first)


async def test_cancel_closes_the_stream_and_the_server_sees_it(llm: OpenAiLlm, server: Server) -> None:
    k = 2
    before = server.disconnects()
    watch = CancelWatch("t", 1)
    received: list[str] = []
    async for delta in llm.stream(user(), request_id="r", max_tokens=200, watch=watch):
        received.append(delta)
        if len(received) == k:
            watch.fire("barge-in")
    assert k <= len(received) <= k + 1
    assert await server.wait_for_disconnects(before + 1) > before
    assert len(await collect(llm, max_tokens=8)) > 1  # the server serves the next request


async def test_closing_the_iterator_closes_the_stream(llm: OpenAiLlm, server: Server) -> None:
    before = server.disconnects()
    stream = llm.stream(user(), request_id="r", max_tokens=200, watch=None)
    await anext(stream)
    await stream.aclose()
    assert await server.wait_for_disconnects(before + 1) > before


async def test_a_wrong_key_is_a_clear_error_that_does_not_show_the_key(
    server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    wrong = "sk-wrong-0f3e8a"
    monkeypatch.setenv(KEY_ENV, wrong)
    engine = OpenAiLlm(server.base_url, model="smollm2", api_key_env=KEY_ENV)
    await engine.load()
    try:
        with pytest.raises(LlmHttpError, match="HTTP 401") as err:
            await collect(engine)
        assert "/chat/completions" in str(err.value)
        assert wrong not in str(err.value) and wrong not in repr(engine)
    finally:
        await engine.aclose()


async def test_http_errors_carry_status_and_body(server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, API_KEY)
    engine = OpenAiLlm(server.base_url + "/nowhere", model="smollm2", api_key_env=KEY_ENV)
    await engine.load()
    try:
        with pytest.raises(LlmHttpError, match=r"HTTP 404: .*Not Found"):
            await collect(engine)
    finally:
        await engine.aclose()


async def test_an_unreachable_server_is_a_clear_error() -> None:
    engine = OpenAiLlm(f"http://127.0.0.1:{free_port()}/v1", model="m", timeout_s=5)
    await engine.load()
    try:
        with pytest.raises(LlmHttpError, match="ConnectError"):
            await collect(engine)
    finally:
        await engine.aclose()


def test_sse_lines() -> None:
    assert parse_sse_line(": keep-alive") is None
    assert parse_sse_line("") is None
    assert parse_sse_line("event: ping") is None
    assert parse_sse_line("data: [DONE]") == DONE
    assert parse_sse_line('data: {"choices": [{"delta": {"content": "Hi"}}]}') == {"choices": [{"delta": {"content": "Hi"}}]}
    with pytest.raises(LlmHttpError, match="malformed"):
        parse_sse_line("data: {not json")


def test_registry_builds_the_engine() -> None:
    engine = workers.llm.create("openai", {"base_url": "http://x/v1", "model": "m", "extra_body": {"top_p": 0.9}})
    assert isinstance(engine, OpenAiLlm) and engine.extra_body == {"top_p": 0.9}
