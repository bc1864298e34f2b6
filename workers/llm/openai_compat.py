"""OpenAI-compatible streaming client (vLLM serve, llama.cpp server, TGI, hosted APIs).

POSTs {base_url}/chat/completions with stream=True and yields the content
deltas of the server-sent events as they arrive. A cancel (the watch firing,
or the consumer closing the iterator) closes the HTTP stream at once; servers
such as vLLM abort the request when the client goes away, so the GPU stops
decoding a reply nobody will hear.

The API key is read from the environment variable named by `api_key_env` and
sent only in the Authorization header: it never appears in logs or errors.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
from collections.abc import AsyncGenerator
from typing import Any, Final

import httpx

from shared.cancel import CancelWatch
from shared.protocol import ChatMessage
from workers.llm.prompt import to_chat
from workers.llm.streaming import END, DeltaStream

log = logging.getLogger("voxbus.llm.openai")

_BODY_EXCERPT = 500
DONE: Final = "[DONE]"


class LlmHttpError(RuntimeError):
    """The server answered with an error status or an error event."""


def parse_sse_line(line: str) -> dict[str, Any] | str | None:
    """One line of an OpenAI event stream: its JSON payload, DONE at the end, None for anything else."""
    if not line.startswith("data:"):
        return None  # blank separators, ": keep-alive" comments, event:/id:/retry: fields
    data = line[5:].strip()
    if not data:
        return None
    if data == DONE:
        return DONE
    try:
        payload = json.loads(data)
    except json.JSONDecodeError as exc:
        raise LlmHttpError(f"malformed event from server: {data[:_BODY_EXCERPT]!r}") from exc
    return payload if isinstance(payload, dict) else None


def content_of(payload: dict[str, Any]) -> str:
    if "error" in payload:
        raise LlmHttpError(f"server error event: {str(payload['error'])[:_BODY_EXCERPT]}")
    choices = payload.get("choices") or []
    if not choices:
        return ""
    delta = choices[0].get("delta") or {}
    return delta.get("content") or ""


class OpenAiLlm:
    def __init__(
        self,
        base_url: str,
        model: str,
        api_key_env: str = "OPENAI_API_KEY",
        temperature: float = 0.0,
        frequency_penalty: float = 0.3,
        timeout_s: float = 30,
        system_prompt: str | None = None,
        extra_body: dict[str, Any] | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.api_key_env = api_key_env
        self.temperature = temperature
        # OpenAI's repetition control (-2..2): > 0 discourages tokens by how often they already appeared.
        self.frequency_penalty = frequency_penalty
        self.timeout_s = timeout_s
        self.system_prompt = system_prompt
        self.extra_body = dict(extra_body or {})
        self._where = re.sub(r"//[^/@]*@", "//", self.base_url) + "/chat/completions"  # for messages: no userinfo
        self._client: httpx.AsyncClient | None = None

    def __repr__(self) -> str:
        return f"OpenAiLlm(url={self._where!r}, model={self.model!r}, api_key_env={self.api_key_env!r})"

    async def load(self) -> None:
        if self._client is not None:
            return
        headers = {"Accept": "text/event-stream"}
        key = os.environ.get(self.api_key_env) if self.api_key_env else None
        if key:
            headers["Authorization"] = f"Bearer {key}"
        self._client = httpx.AsyncClient(
            base_url=self.base_url, headers=headers, timeout=httpx.Timeout(self.timeout_s, connect=min(self.timeout_s, 10))
        )
        log.info("OpenAI-compatible LLM at %s, model %s (key %s)", self._where, self.model,
                 "from $" + self.api_key_env if key else "none")

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def stream(
        self, messages: list[ChatMessage], *, request_id: str, max_tokens: int, watch: CancelWatch | None
    ) -> AsyncGenerator[str, None]:
        body: dict[str, Any] = {
            "model": self.model,
            "messages": to_chat(messages, self.system_prompt),
            "stream": True,
            "temperature": self.temperature,
            "frequency_penalty": self.frequency_penalty,
            "max_tokens": max_tokens,
            **self.extra_body,
        }
        return self._stream(body, request_id, watch)

    async def _stream(self, body: dict[str, Any], request_id: str, watch: CancelWatch | None) -> AsyncGenerator[str, None]:
        if self._client is None:
            raise RuntimeError("OpenAiLlm.load() was not awaited")
        stream = DeltaStream(watch)
        # The HTTP stream is read by its own task so that a watch firing while the
        # server is silent (prefill, queueing) is acted on at once, not at the next chunk.
        reader = asyncio.ensure_future(self._read(body, request_id, stream))
        try:
            async with contextlib.aclosing(stream.items()) as items:
                async for item in items:
                    yield item
        finally:
            reader.cancel()  # leaves the `async with` in _read: the connection is closed
            await asyncio.gather(reader, return_exceptions=True)

    async def _read(self, body: dict[str, Any], request_id: str, stream: DeltaStream) -> None:
        assert self._client is not None
        log.debug("request %s to %s", request_id, self._where)
        try:
            # No X-Request-Id header: some servers (llama.cpp's) refuse ids that are not UUIDs.
            async with self._client.stream("POST", "/chat/completions", json=body) as resp:
                if resp.status_code >= 400:
                    raw = b""
                    async for part in resp.aiter_bytes():
                        raw += part
                        if len(raw) >= _BODY_EXCERPT:
                            break
                    excerpt = raw[:_BODY_EXCERPT].decode("utf-8", "replace").strip() or "(empty body)"
                    raise LlmHttpError(
                        f"POST {self._where} -> HTTP {resp.status_code}: {excerpt}"
                    )
                async for line in resp.aiter_lines():
                    payload = parse_sse_line(line)
                    if payload == DONE:
                        break
                    if isinstance(payload, dict):
                        text = content_of(payload)
                        if text:
                            stream.put(text)
        except asyncio.CancelledError:
            raise
        except httpx.HTTPError as exc:
            stream.put(LlmHttpError(f"POST {self._where} failed: {type(exc).__name__}: {exc}"))
        except Exception as exc:
            stream.put(exc)
        finally:
            stream.put(END)
