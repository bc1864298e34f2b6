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


class TtsChunking(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """How a TTS pool cuts a streamed reply into pieces and joins their audio (TTS pools;
    workers/tts/clauses.py, workers/tts/seams.py). The first piece is spoken after `first_words`
    words, or at its first punctuation if that comes sooner (0: at the first clause boundary once it
    holds a dozen characters); later pieces end at a clause boundary once they hold `min_words`
    words, or at any sentence end (0: at sentence ends only). Each piece keeps `edge_ms` of silence
    at both ends, faded in and out over `fade_ms`, and is followed by `clause_pause_ms` of silence
    after , ; : or a dash and `sentence_pause_ms` after a sentence (edge_ms = -1: the engine's own
    silences, no fades, no pauses)."""

    first_words: int = 4
    min_words: int = 3
    edge_ms: int = 5
    fade_ms: float = 2.0
    clause_pause_ms: int = 100
    sentence_pause_ms: int = 250


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
    chunks: TtsChunking = msgspec.field(default_factory=TtsChunking)  # TTS pools only
    # TTS pools: how the agent's speech is written to audio.out (the recording): "opus" (about 10x
    # smaller than PCM) or "pcm" (as before it).
    audio_codec: Literal["opus", "pcm"] = "opus"
    # LLM pools: the system prompt the bridges send, run once at load so the engine's prompt cache
    # holds it before the first caller's turn (a cold one costs that turn ~100 ms of prefill on a
    # CPU). Default: this file's [bridge] system_prompt; "" turns the warm-up off.
    warm_prompt: str | None = None
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
    # How the caller's audio is kept in audio.in (the recording): "opus" (about 6x smaller, no ASR
    # difference: README "Recording and replay") or "pcm" (raw PCM16, as recordings made before it).
    audio_codec: Literal["opus", "pcm"] = "opus"
    # Where each call's recording goes when it ends (README "Recording and replay"): "" (none), a directory
    # ("file:///var/lib/voxbus/archive" or a path) or S3-compatible storage ("s3://bucket/prefix").
    # $VOXBUS_ARCHIVE_URL, when set, takes precedence (`archive_url_of`).
    archive_url: str = ""
    # With an archive, a call's keys stay in Redis this long after it was archived, then are deleted.
    # Without one Redis holds the only copy, so they stay SESSION_TTL_S (24 h, bridge/core.py).
    retention_s: float = 600.0
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
    # utterance at each preemptive pause to the default "eot" pool (an end-of-turn model). A
    # probability >= eot_fast_threshold that the caller has finished ends the turn at once, one >=
    # eot_threshold after min_endpoint_ms of silence; either waits at least min_endpoint_per_s ms
    # per second the turn has lasted (a caller who has held the floor a while, in a story, a list
    # or a reading, gets longer to go on); otherwise the turn ends after max_endpoint_ms of silence.
    # With eot_language, a "complete" also needs the pause's preemptive transcript, and a transcript
    # that ends on a continuation cue ("a table for", "my name is", "um", "5 5 5"; bridge/turn_text.py)
    # leaves the end to max_endpoint_ms. Defaults chosen with ops/bench/turns.py: README "Turn-taking".
    eot: Literal["none", "model"] = "none"
    eot_threshold: float = 0.5
    min_endpoint_ms: int = 300
    max_endpoint_ms: int = 2500
    eot_rescore_ms: int = 200  # ask the model again this often while the caller stays silent
    eot_fast_threshold: float = 0.9  # 1.0: no fast path
    min_endpoint_per_s: int = 150
    # The cue words' language (bridge/turn_text.py has these lists), or "none" for the model alone;
    # eot_extra_cues adds words or phrases to its list.
    eot_language: Literal["en", "de", "es", "fr", "none"] = "en"
    eot_extra_cues: list[str] = []
    # A transcript that ends with no . ? ! is a cue too: for an ASR that punctuates (the bundled
    # Whisper does); off by default, as it holds complete turns Whisper left unpunctuated.
    eot_unpunctuated: bool = False
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
        _check_pool(cfg, name, pool, f"{source}: pools.{name}")
        if pool.stage == "llm" and pool.warm_prompt is None:
            pool.warm_prompt = cfg.bridge.system_prompt
    check_bridge(cfg, source)
    for stage, name in cfg.defaults.items():
        default = cfg.pools.get(name)
        if default is None:
            raise ConfigError(f"{source}: defaults.{stage}: no pool named {name!r}")
        if default.stage != stage:
            raise ConfigError(f"{source}: defaults.{stage}: pool {name!r} serves {default.stage!r}")
    return cfg


def _check_pool(cfg: Config, name: str, pool: PoolConfig, where: str) -> None:
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
    _check_chunks(pool.chunks, f"{where}.chunks")
    if pool.max_deliveries < 1:
        raise ConfigError(f"{where}.max_deliveries: expected an integer >= 1, got {pool.max_deliveries}")
    if pool.fallback is not None:
        other = cfg.pools.get(pool.fallback)
        if other is None:
            raise ConfigError(f"{where}.fallback: no pool named {pool.fallback!r}")
        if other.stage != pool.stage:
            raise ConfigError(f"{where}.fallback: pool {pool.fallback!r} serves {other.stage!r}, expected {pool.stage!r}")


def _check_chunks(c: TtsChunking, where: str) -> None:
    for key, value, low, high in (("first_words", c.first_words, 0, 50), ("min_words", c.min_words, 0, 50),
                                  ("edge_ms", c.edge_ms, -1, 500), ("fade_ms", c.fade_ms, 0, 50),
                                  ("clause_pause_ms", c.clause_pause_ms, 0, 2000),
                                  ("sentence_pause_ms", c.sentence_pause_ms, 0, 2000)):
        if not low <= value <= high:
            raise ConfigError(f"{where}.{key}: expected {low} to {high}, got {value}")
    if c.edge_ms >= 0 and c.fade_ms > c.edge_ms:
        raise ConfigError(f"{where}.fade_ms: the fades run over the {c.edge_ms} ms of silence kept at a piece's "
                          f"edges (edge_ms), so fade_ms must not exceed it, got {c.fade_ms}")


def check_bridge(cfg: Config, source: str) -> None:
    b = cfg.bridge
    if problem := archive_url_problem(b.archive_url):
        raise ConfigError(f"{source}: bridge.archive_url: {problem}")
    if not b.retention_s > 0:
        raise ConfigError(f"{source}: bridge.retention_s: expected seconds > 0, got {b.retention_s}")
    if b.eot == "none":
        return
    if not 0.0 < b.eot_threshold < 1.0:
        raise ConfigError(f"{source}: bridge.eot_threshold: expected a probability in (0, 1), got {b.eot_threshold}")
    if not 0 < b.preemptive_pause_ms < b.max_endpoint_ms:
        raise ConfigError(f"{source}: bridge.preemptive_pause_ms: the end-of-turn model scores the caller at this "
                          f"pause, so it must be > 0 and < max_endpoint_ms ({b.max_endpoint_ms}), got {b.preemptive_pause_ms}")
    if not any(p.stage == "eot" for p in cfg.pools.values()):
        raise ConfigError(f'{source}: bridge.eot = "model" needs a pool with stage = "eot" (e.g. engine "smart-turn")')
    if b.min_endpoint_ms > b.max_endpoint_ms:
        raise ConfigError(f"{source}: bridge.min_endpoint_ms ({b.min_endpoint_ms}) exceeds max_endpoint_ms "
                          f"({b.max_endpoint_ms})")
    if b.min_endpoint_per_s < 0 or b.min_endpoint_ms < 0:
        raise ConfigError(f"{source}: bridge.min_endpoint_ms and min_endpoint_per_s: expected >= 0, got "
                          f"{b.min_endpoint_ms} and {b.min_endpoint_per_s}")
    if not b.eot_threshold <= b.eot_fast_threshold <= 1.0:
        raise ConfigError(f"{source}: bridge.eot_fast_threshold: expected a probability from eot_threshold "
                          f"({b.eot_threshold}) to 1.0 (1.0: no fast path), got {b.eot_fast_threshold}")
    if any(not cue.strip() for cue in b.eot_extra_cues):
        raise ConfigError(f"{source}: bridge.eot_extra_cues: expected words or phrases, got an empty one")


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


ARCHIVE_URL_ENV = "VOXBUS_ARCHIVE_URL"


def archive_url_problem(url: str) -> str | None:
    """What is wrong with an archive URL, or None: "" (no archive), "file:///ABS/DIR", a path, "s3://BUCKET[/PREFIX]"."""
    if not url:
        return None
    scheme, sep, rest = url.partition("://")
    if not sep:
        return None  # a plain path (relative ones are taken from the working directory)
    if scheme == "file":
        if not rest.startswith("/"):
            return f"expected file:///absolute/directory, got {url!r}"
        return None
    if scheme == "s3":
        if not rest.split("/", 1)[0]:
            return f"expected s3://bucket[/prefix], got {url!r}"
        return None
    return f"unknown scheme {scheme!r} in {url!r} (expected file:// or s3://)"


def archive_url_of(b: BridgeConfig) -> str:
    """The archive URL in force: $VOXBUS_ARCHIVE_URL when set (the deployment's), else the pools file's."""
    url = os.environ.get(ARCHIVE_URL_ENV) or b.archive_url
    if problem := archive_url_problem(url):
        raise ConfigError(f"${ARCHIVE_URL_ENV}: {problem}")
    return url
