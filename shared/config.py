"""Configuration: a TOML pools file plus environment variables, validated by msgspec.

Secrets (the Redis URL with its password, API keys) come from the environment
only. Every validation error names the file, the key and what was expected.
"""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path
from typing import Any, Literal

import msgspec

from .protocol import ProtocolError, Stage, validate_pool_name

STAGES: tuple[Stage, ...] = ("asr", "llm", "tts")  # every call needs these
ALL_STAGES: tuple[Stage, ...] = (*STAGES, "eot")  # "eot": the end-of-turn model, when the bridge uses one
EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "ops" / "pools"
DEFAULT_POOLS_FILE = EXAMPLES_DIR / "cpu.toml"


class ConfigError(ValueError):
    """A configuration file or variable that is missing or invalid."""


class ReplyBudget(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """How long a spoken reply may get (LLM pools). Spoken answers are short: past `soft_tokens`
    the reply ends at the next sentence end, and never runs past `max_sentences` sentences or
    `max_tokens` tokens (a job may ask for fewer)."""

    soft_tokens: int = 48
    max_sentences: int = 3
    max_tokens: int = 160


class PoolConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    stage: Stage
    engine: str
    gpu_type: str = "cpu"
    slots: int = 1
    options: dict[str, Any] = {}
    max_deliveries: int = 3
    claim_idle_ms: int = 5_000
    # Overflow routing: new jobs go to `fallback` when this pool's lag or p95 queue wait exceeds a bound.
    fallback: str | None = None
    overflow_lag: int | None = None
    overflow_wait_ms: float | None = None
    labels: dict[str, str] = {}
    reply: ReplyBudget = msgspec.field(default_factory=ReplyBudget)  # LLM pools only
    name: str = ""  # filled from the table key


class BridgeConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    host: str = "127.0.0.1"
    port: int = 8080
    max_sessions: int = 200
    max_datachannel_bytes: int = 4096
    # HTTP signaling (README "Hardening"): a request head must arrive within header_timeout_s of
    # connecting, its body within body_timeout_s; past http_max_connections new connections get a 503.
    http_header_timeout_s: float = 5.0
    http_body_timeout_s: float = 5.0
    http_max_connections: int = 256
    # Offers per client address: offer_burst at once, then offer_rate_per_s (429 past that).
    offer_rate_per_s: float = 1.0
    offer_burst: int = 10
    # Calls whose peer has not connected yet: at most max_pending_calls, each for connect_timeout_s.
    max_pending_calls: int = 16
    connect_timeout_s: float = 10.0
    # Overload (README "Overload"): a job claimed later than this many seconds after it was queued is
    # dropped by its worker and the caller hears busy_message ("" for none) and gets a `busy` message;
    # new calls get 503 + Retry-After while a default pool's oldest queued job waits over
    # admission_max_wait_ms.
    job_deadline_s: dict[str, float] = msgspec.field(
        default_factory=lambda: {"asr": 5.0, "llm": 6.0, "tts": 8.0, "eot": 1.5})
    busy_message: str = "Sorry, I'm a little busy right now. Could you say that again in a moment?"
    admission_max_wait_ms: float = 3000.0
    reply_timeout_ms: float = 15_000.0  # no agent audio this long after a turn ended: busy, as above
    # Every call ends after max_call_s, and after idle_timeout_s without any caller audio.
    max_call_s: float = 4 * 3600.0
    idle_timeout_s: float = 120.0
    jitter_target_ms: int = 40
    ice_servers: list[str] = []
    vad_threshold: float = 0.5
    min_speech_ms: int = 100
    # Silence after the last voiced sound that ends a turn. The VAD scores 32 ms windows, so the
    # decision comes up to one window later: 270 keeps the effective wait at or under 300 ms.
    min_silence_ms: int = 270
    # Start ASR, LLM and TTS after this much silence, before min_silence_ms confirms the end of
    # the turn; the reply is held until then and dropped if the caller goes on speaking. 0: off.
    preemptive_pause_ms: int = 100
    speech_pad_ms: int = 60
    # An utterance this long without a pause ends the turn anyway (a monologue of up to this stays one turn).
    max_utterance_ms: int = 120_000
    barge_in_min_speech_ms: int = 200
    false_interrupt_timeout_ms: int = 1500
    # End of turn: "none" ends a turn after min_silence_ms of silence (VAD only); "model" sends the
    # utterance at each preemptive pause to the default "eot" pool (an end-of-turn model) and ends
    # the turn when the probability that the caller has finished is >= eot_threshold (after at
    # least min_endpoint_ms of silence), else after max_endpoint_ms of silence. README "End of turn".
    eot: Literal["none", "model"] = "none"
    eot_threshold: float = 0.5
    min_endpoint_ms: int = 0
    max_endpoint_ms: int = 2500
    eot_rescore_ms: int = 200  # ask the model again this often while the caller stays silent
    # The conversation an LLM sees, after the system prompt: past either bound the oldest messages
    # go in one chunk, down to half (the prompt prefix, and the LLM's cache of it, stays put meanwhile).
    context_max_messages: int = 24
    context_max_chars: int = 6000
    system_prompt: str = ("You are a helpful voice assistant on a phone call. Answer in one or two short spoken "
                          "sentences. No lists, no markdown, no emojis.")


class Config(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pools: dict[str, PoolConfig]
    defaults: dict[Stage, str] = {}
    bridge: BridgeConfig = msgspec.field(default_factory=BridgeConfig)
    source: str = ""

    def pool(self, name: str) -> PoolConfig:
        try:
            return self.pools[name]
        except KeyError:
            raise ConfigError(f"{self.source}: no pool named {name!r} (have: {', '.join(sorted(self.pools))})") from None

    @property
    def stages(self) -> tuple[Stage, ...]:
        """The stages this file has pools for, in pipeline order."""
        have = {p.stage for p in self.pools.values()}
        return tuple(s for s in ALL_STAGES if s in have)

    def default_pool(self, stage: Stage) -> PoolConfig:
        if stage in self.defaults:
            return self.pool(self.defaults[stage])
        for pool in self.pools.values():
            if pool.stage == stage:
                return pool
        raise ConfigError(f"{self.source}: no pool serves stage {stage!r}")


_AT_PATH = re.compile(r" - at `(?:key` in `)?\$([^`]*)`$")


def _validation_error(source: str, prefix: str, exc: msgspec.ValidationError) -> ConfigError:
    """msgspec's "<what> - at `$.a.b`" as "<file>: <prefix>.a.b: <what>" (TOML key order)."""
    text = str(exc)
    match = _AT_PATH.search(text)
    what = text[: match.start()] if match else text
    path = match.group(1).lstrip(".") if match else ""
    key = ".".join(part for part in (prefix, path) if part)
    if "Invalid enum value" in what and (key.endswith(".stage") or key == "defaults"):
        what += f" (expected one of {', '.join(ALL_STAGES)})"
    return ConfigError(f"{source}: {key}: {what}" if key else f"{source}: {what}")


def parse_config(data: dict[str, Any], source: str = "<config>") -> Config:
    pools = data.get("pools") if isinstance(data, dict) else None
    if isinstance(pools, dict):
        # One pool at a time: msgspec reports a dict value's path as `pools[...]`,
        # which would not say which pool is wrong.
        for name, table in pools.items():
            try:
                msgspec.convert(table, PoolConfig)
            except msgspec.ValidationError as exc:
                raise _validation_error(source, f"pools.{name}", exc) from None
    try:
        cfg = msgspec.convert(data, Config)
    except msgspec.ValidationError as exc:
        raise _validation_error(source, "", exc) from None
    cfg.source = source
    for name, pool in cfg.pools.items():
        where = f"{source}: pools.{name}"
        try:
            validate_pool_name(name)
        except ProtocolError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        pool.name = name
        if pool.slots < 1:
            raise ConfigError(f"{where}.slots: expected an integer >= 1, got {pool.slots}")
        r = pool.reply
        if not 1 <= r.soft_tokens <= r.max_tokens or r.max_sentences < 1:
            raise ConfigError(f"{where}.reply: expected 1 <= soft_tokens <= max_tokens and max_sentences >= 1, "
                              f"got {r.soft_tokens}, {r.max_tokens}, {r.max_sentences}")
        if pool.max_deliveries < 1:
            raise ConfigError(f"{where}.max_deliveries: expected an integer >= 1, got {pool.max_deliveries}")
        if pool.fallback is not None:
            other = cfg.pools.get(pool.fallback)
            if other is None:
                raise ConfigError(f"{where}.fallback: no pool named {pool.fallback!r}")
            if other.stage != pool.stage:
                raise ConfigError(f"{where}.fallback: pool {pool.fallback!r} serves {other.stage!r}, expected {pool.stage!r}")
    b = cfg.bridge
    if b.eot != "none":
        if not 0.0 < b.eot_threshold < 1.0:
            raise ConfigError(f"{source}: bridge.eot_threshold: expected a probability in (0, 1), got {b.eot_threshold}")
        if not 0 < b.preemptive_pause_ms < b.max_endpoint_ms:
            raise ConfigError(f"{source}: bridge.preemptive_pause_ms: the end-of-turn model scores the caller at this "
                              f"pause, so it must be > 0 and < max_endpoint_ms ({b.max_endpoint_ms}), got {b.preemptive_pause_ms}")
        if not any(p.stage == "eot" for p in cfg.pools.values()):
            raise ConfigError(f'{source}: bridge.eot = "model" needs a pool with stage = "eot" (e.g. engine "smart-turn")')
        if b.min_endpoint_ms > b.max_endpoint_ms:
            raise ConfigError(f"{source}: bridge.min_endpoint_ms ({b.min_endpoint_ms}) exceeds max_endpoint_ms ({b.max_endpoint_ms})")
    for stage, name in cfg.defaults.items():
        pool = cfg.pools.get(name)
        if pool is None:
            raise ConfigError(f"{source}: defaults.{stage}: no pool named {name!r}")
        if pool.stage != stage:
            raise ConfigError(f"{source}: defaults.{stage}: pool {name!r} serves {pool.stage!r}")
    return cfg


def load_config(path: str | os.PathLike[str] | None = None) -> Config:
    """Load the pools file: `path`, else $VOXBUS_POOLS, else the bundled CPU example."""
    file = Path(path or os.environ.get("VOXBUS_POOLS") or DEFAULT_POOLS_FILE)
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{file}: cannot read pools file: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:  # TOML is UTF-8 by definition
        raise ConfigError(f"{file}: invalid TOML: not UTF-8 text (byte {exc.start})") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{file}: invalid TOML: {exc}") from None
    return parse_config(data, str(file))
