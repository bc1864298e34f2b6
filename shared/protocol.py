"""The wire contract: every Redis key, channel and message type voxbus uses.

Everything that crosses Redis is defined here and nowhere else. A stream entry
holds exactly one field, ``m``, whose value is a msgspec Struct encoded as
msgpack. Each message type carries its schema version inside its tag
(``"audio.frame/1"``), so a consumer that meets a type or version it does not
know gets a :class:`ProtocolError` instead of a half-understood message.

Per-session keys share the Redis Cluster hash tag ``{session_id}`` so that a
session's streams live on one slot; per-pool job streams are single keys.
"""

from __future__ import annotations

import enum
import re
import time
from typing import Any, Literal

import msgspec

# --------------------------------------------------------------------------
# Limits
# --------------------------------------------------------------------------

SAMPLE_RATE = 16_000
FRAME_MS = 20
FRAME_SAMPLES = SAMPLE_RATE * FRAME_MS // 1000
FRAME_BYTES = FRAME_SAMPLES * 2  # PCM16 mono
MAX_FRAME_BYTES = FRAME_BYTES * 5  # 100 ms: anything bigger is not a frame
MAX_OPUS_PACKET_BYTES = 1275  # the largest packet Opus defines (RFC 6716, 3.2.1)
MAX_OUT_PACKETS = 100  # 2 s of 20 ms packets per agent audio chunk, as MAX_OUT_CHUNK_BYTES for PCM
MAX_OUT_CHUNK_BYTES = 48_000 * 2 * 2  # 2 s of 48 kHz PCM16 agent audio
MAX_TEXT_CHARS = 16_384
MAX_ENTRY_BYTES = 256 * 1024  # any stream entry above this is rejected undecoded
ENTRY_FIELD = b"m"

_SESSION_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_POOL_RE = re.compile(r"[a-z0-9][a-z0-9_.-]{0,62}")


class RejectReason(enum.StrEnum):
    """Why an entry was refused: the `reason` label of voxbus_bus_rejected_total, and the dead letter's kind.

    Set where the refusal is decided (never guessed from an error's wording), so
    rewording a message cannot change a metric label.
    """

    UNDECODABLE = "undecodable"  # not msgpack, truncated, not bytes
    OVERSIZED = "oversized"  # above MAX_ENTRY_BYTES
    WRONG_FIELDS = "wrong fields"  # a stream entry without exactly the field `m`
    UNKNOWN_TYPE = "unknown type"  # a type tag (or version) this contract does not know
    INVALID = "invalid"  # a known type whose fields are wrong
    WRONG_TYPE = "wrong type"  # a valid message in a stream, pool or key that does not carry it
    WRONG_SESSION = "wrong session"  # names another session than its stream's
    INVALID_SESSION = "invalid session"  # a session id that cannot be part of a key
    UNKNOWN_SESSION = "unknown session"  # a job of a session with no recording and no context
    WRONG_SEQ = "wrong seq"  # a caller frame whose seq is not its entry id's
    WRONG_CHANNEL = "wrong channel"  # a cancel naming another session than its channel's


class JobOutcome(enum.StrEnum):
    """How one delivery of a job ended (`JobRun.outcome`, the `voxbus_jobs_total` label)."""

    DONE = "done"
    CANCELLED = "cancelled"  # stopped by a barge-in while it ran
    SKIPPED = "skipped"  # its turn was cancelled before it started
    LATE = "late"  # picked up past its deadline and dropped (the pool is overloaded)
    REJECTED = "rejected"  # for an unknown session: dead-lettered without running
    RETRIED = "retried"  # failed; left pending for another try
    DEAD_LETTERED = "dead_lettered"  # failed its last try


class ProtocolError(ValueError):
    """A stream entry, message or name that does not follow this contract; `reason` says which way."""

    def __init__(self, message: str, reason: RejectReason = RejectReason.INVALID) -> None:
        super().__init__(message)
        self.reason = reason


def validate_session_id(sid: str) -> str:
    """Session ids become part of keys: no braces, colons or spaces allowed."""
    if not isinstance(sid, str) or not _SESSION_RE.fullmatch(sid):
        raise ProtocolError(f"invalid session id {sid!r}: expected 1-64 of [A-Za-z0-9_.-]", RejectReason.INVALID_SESSION)
    return sid


def validate_pool_name(pool: str) -> str:
    if not isinstance(pool, str) or not _POOL_RE.fullmatch(pool):
        raise ProtocolError(f"invalid pool name {pool!r}: expected lowercase [a-z0-9_.-], max 63")
    return pool


# --------------------------------------------------------------------------
# Keys and channels
# --------------------------------------------------------------------------

PREFIX = "vb"


class Keys:
    """Names of every Redis key and channel. Stateless; call the static methods."""

    @staticmethod
    def _s(sid: str, leaf: str) -> str:
        return f"{PREFIX}:{{{validate_session_id(sid)}}}:{leaf}"

    # --- per session (one Cluster slot per session) ---
    @staticmethod
    def audio_in(sid: str) -> str:
        """Caller audio, one AudioFrame per entry: also the session's recording."""
        return Keys._s(sid, "audio.in")

    @staticmethod
    def events(sid: str) -> str:
        """Speech start/end, transcripts, turn marks, cancel markers."""
        return Keys._s(sid, "events")

    @staticmethod
    def tokens(sid: str) -> str:
        return Keys._s(sid, "tokens")

    @staticmethod
    def audio_out(sid: str) -> str:
        return Keys._s(sid, "audio.out")

    @staticmethod
    def ctx(sid: str) -> str:
        """Conversation context: a Redis list of encoded ChatMessage."""
        return Keys._s(sid, "ctx")

    @staticmethod
    def meta(sid: str) -> str:
        """Encoded SessionMeta (plain string key)."""
        return Keys._s(sid, "meta")

    @staticmethod
    def claim(sid: str) -> str:
        """Who opened this session id (SET NX): an id names one call, ever, across every bridge."""
        return Keys._s(sid, "claim")

    @staticmethod
    def cancelled_turn(sid: str) -> str:
        """Highest cancelled turn id; queued jobs at or below it are skipped."""
        return Keys._s(sid, "cancelled")

    @staticmethod
    def cancel_channel(sid: str) -> str:
        """Pub/sub channel carrying Cancel messages for one session."""
        return Keys._s(sid, "cancel")

    @staticmethod
    def session_streams(sid: str) -> list[str]:
        return [Keys.audio_in(sid), Keys.events(sid), Keys.tokens(sid), Keys.audio_out(sid)]

    @staticmethod
    def ended(sid: str) -> str:
        """When the call ended (wall-clock seconds): set by the bridge that closed it, or by the archiver
        that found it orphaned (its bridge died)."""
        return Keys._s(sid, "ended")

    @staticmethod
    def archived(sid: str) -> str:
        """Set (JSON: where, when, bytes) once the ended call's recording is in the archive: it is not archived again."""
        return Keys._s(sid, "archived")

    @staticmethod
    def archive_lock(sid: str) -> str:
        """Who is archiving the session now (SET NX EX): one archiver at a time, across processes."""
        return Keys._s(sid, "archiving")

    @staticmethod
    def session_keys(sid: str) -> list[str]:
        """Every key of the session that its retention expires (its claim stays longer: ids are never reused)."""
        return [*Keys.session_streams(sid), Keys.ctx(sid), Keys.meta(sid), Keys.cancelled_turn(sid), Keys.ended(sid),
                Keys.archived(sid)]

    @staticmethod
    def pool_keys(pool: str) -> list[str]:
        """Every key of one pool: its job stream, dead letters, error log and live-worker set."""
        return [Keys.pool_jobs(pool), Keys.pool_dlq(pool), Keys.pool_errors(pool), Keys.pool_workers(pool)]

    @staticmethod
    def bridge(bridge_id: str) -> str:
        """A bridge's heartbeat (a key with a short TTL): a session whose claim names a bridge without one is orphaned."""
        return f"{PREFIX}:bridge:{bridge_id}"

    # --- per pool ---
    @staticmethod
    def pool_jobs(pool: str) -> str:
        return f"{PREFIX}:pool:{validate_pool_name(pool)}:jobs"

    @staticmethod
    def pool_dlq(pool: str) -> str:
        return f"{PREFIX}:pool:{validate_pool_name(pool)}:dlq"

    @staticmethod
    def pool_group(pool: str) -> str:
        """Consumer group name on the pool's job stream."""
        return validate_pool_name(pool)

    @staticmethod
    def pool_errors(pool: str) -> str:
        """Hash: job entry id -> last failure reason (cleared on ack / dead-letter)."""
        return f"{PREFIX}:pool:{validate_pool_name(pool)}:errors"

    @staticmethod
    def pool_workers(pool: str) -> str:
        """Sorted set: worker id -> last heartbeat (wall-clock seconds)."""
        return f"{PREFIX}:pool:{validate_pool_name(pool)}:workers"

    @staticmethod
    def worker(pool: str, worker_id: str) -> str:
        """Worker registry record (hash with a TTL refreshed by heartbeats)."""
        return f"{PREFIX}:worker:{validate_pool_name(pool)}:{worker_id}"

    @staticmethod
    def worker_pattern(pool: str) -> str:
        """SCAN pattern matching every worker record of `pool`."""
        return f"{PREFIX}:worker:{validate_pool_name(pool)}:*"

    @staticmethod
    def session_pattern(prefix: str = "") -> str:
        """SCAN pattern matching every per-session key of sessions whose id starts with `prefix`."""
        return f"{PREFIX}:{{{prefix}*"

    @staticmethod
    def bench(name: str) -> str:
        """A key of a benchmark's own (outside every session and pool), deleted by the benchmark."""
        return f"{PREFIX}:bench:{name}"

    POOLS = f"{PREFIX}:pools"  # set of pool names that ever had a worker
    CANCEL_PATTERN = f"{PREFIX}:{{*}}:cancel"  # PSUBSCRIBE pattern of every session's cancel channel
    RELEASED_CONSUMER = "released"  # where a draining worker parks the jobs it hands back (claimable at once)

    # --- global ---
    DLQ = f"{PREFIX}:dlq"  # rejected entries from non-group readers (bridge, replay)
    SESSIONS = f"{PREFIX}:sessions"  # sorted set: session id -> start time
    ARCHIVE_PENDING = f"{PREFIX}:archive:pending"  # sorted set: session id -> start time, until it is archived
    ARCHIVE_EXPIRING = f"{PREFIX}:archive:expiring"  # sorted set: archived session id -> when its keys are deleted


# Explicit entry ids. audio.in entries are numbered by frame seq, so an ASR job's
# frame range is one XRANGE; tokens and audio.out entries by (turn, seq), so a
# re-run job's repeated outputs are refused by Redis itself ("ID equal or smaller")
# and a turn's outputs are XRANGE key T T. Never XADD "*" to these three streams.


def frame_entry_id(seq: int) -> str:
    return f"{seq + 1}-0"


def frame_seq(entry_id: bytes | str) -> int:
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    return int(text.split("-", 1)[0]) - 1


def output_entry_id(turn: int, seq: int) -> str:
    return f"{turn + 1}-{seq}"


def turn_range(turn: int) -> tuple[str, str]:
    """XRANGE bounds covering every output entry of `turn`."""
    return f"{turn + 1}-0", f"{turn + 1}-18446744073709551615"


def turn_start_exclusive(turn: int) -> str:
    """An XREAD position just before the first output entry of `turn`."""
    return f"{turn}-18446744073709551615"


EXPLICIT_ID_STREAMS = frozenset({"audio.in", "tokens", "audio.out"})


# Default MAXLEN ~ bounds per stream kind (about 10 minutes of 20 ms audio).
STREAM_MAXLEN: dict[str, int] = {
    "audio.in": 30_000,
    "events": 5_000,
    "tokens": 20_000,
    "audio.out": 30_000,
    "jobs": 100_000,
    "dlq": 100_000,
}


def maxlen_for(key: str) -> int:
    """MAXLEN bound for a key made by :class:`Keys` (by its last segment)."""
    leaf = key.rsplit(":", 1)[-1]
    return STREAM_MAXLEN.get(leaf, 10_000)


# --------------------------------------------------------------------------
# Messages
# --------------------------------------------------------------------------


def now() -> float:
    """Wall-clock seconds; the clock every timestamp on the wire uses."""
    return time.time()


class Message(msgspec.Struct, tag_field="type", kw_only=True, omit_defaults=True):
    """Base of every message. Subclasses set ``tag="name/version"``."""

    session: str
    ts: float = msgspec.field(default_factory=now)

    def __post_init__(self) -> None:
        validate_session_id(self.session)


def _check_text(text: str, what: str) -> None:
    if len(text) > MAX_TEXT_CHARS:
        raise ValueError(f"{what} longer than {MAX_TEXT_CHARS} characters")


class AudioFrame(Message, tag="audio.frame/1"):
    """20 ms of caller audio, 16 kHz mono PCM16 little-endian."""

    seq: int
    pcm: bytes
    rate: int = SAMPLE_RATE

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.rate != SAMPLE_RATE:
            raise ValueError(f"audio frames must be {SAMPLE_RATE} Hz, got {self.rate}")
        if not 0 < len(self.pcm) <= MAX_FRAME_BYTES or len(self.pcm) % 2:
            raise ValueError(f"frame of {len(self.pcm)} bytes: expected even, 2..{MAX_FRAME_BYTES}")


class OpusFrame(Message, tag="audio.opus/1"):
    """20 ms of caller audio (16 kHz mono) as one Opus packet: what bridges write since recordings
    were made compact (`shared.opus`). `AudioFrame` (PCM) is still read, from older recordings."""

    seq: int
    opus: bytes

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < len(self.opus) <= MAX_OPUS_PACKET_BYTES:
            raise ValueError(f"Opus packet of {len(self.opus)} bytes: expected 1..{MAX_OPUS_PACKET_BYTES}")


CallerFrame = AudioFrame | OpusFrame  # what audio.in may hold


class SpeechStart(Message, tag="speech.start/1"):
    frame: int  # seq of the first voiced frame
    prob: float = 0.0


class SpeechPause(Message, tag="speech.pause/1"):
    """The caller has been silent `pause_ms` inside an utterance (resumed=False), or spoke
    again after such a pause (resumed=True). Lets the bridge start the turn's work
    before the end of speech is certain."""

    start_frame: int
    end_frame: int  # last voiced frame so far, computed as SpeechEnd would
    resumed: bool = False


class SpeechEnd(Message, tag="speech.end/1"):
    start_frame: int
    end_frame: int  # seq of the last voiced frame (inclusive)
    silence_ms: float = 0.0  # silence the VAD waited before deciding


class EotDecision(Message, tag="eot.decision/1"):
    """The end-of-turn model's verdict on turn `turn` at a pause: the probability that the caller
    has finished the utterance [start_frame, end_frame], and what it cost to compute (the bridge
    compares it with its threshold and records what it decided as a TurnMark)."""

    turn: int
    prob: float
    start_frame: int = 0
    end_frame: int = 0
    cost_ms: float = 0.0
    trace: str = ""


class Interrupt(Message, tag="interrupt/1"):
    """The caller talked over the agent (client control message or bridge VAD)."""

    source: Literal["client", "vad"] = "client"
    turn: int = -1


class Cancel(Message, tag="cancel/1"):
    """Published on the session's cancel channel: stop every job of `turn` (and older)."""

    turn: int
    reason: str = "barge-in"


class AsrJob(Message, tag="job.asr/1"):
    """Transcribe frames [start_seq, end_seq] of the session's audio.in."""

    turn: int
    start_seq: int
    end_seq: int
    final: bool = True
    language: str | None = None
    deadline: float = 0.0  # wall clock: a worker that claims the job later drops it (0: none)
    trace: str = ""  # W3C traceparent of the bridge's span for this job ("": not traced)


class EotJob(Message, tag="job.eot/1"):
    """Score frames [start_seq, end_seq] of audio.in: has the caller finished the turn `turn`?"""

    turn: int
    start_seq: int
    end_seq: int
    deadline: float = 0.0
    trace: str = ""


class Transcript(Message, tag="transcript/1"):
    turn: int
    text: str
    final: bool = True
    start_seq: int = 0
    end_seq: int = 0
    asr_ms: float = 0.0
    trace: str = ""  # the job's span, so a reader can join the result to its trace

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_text(self.text, "transcript")


class LlmJob(Message, tag="job.llm/1"):
    """Generate the reply for `turn` from the session's context list."""

    turn: int
    max_tokens: int = 256
    deadline: float = 0.0
    trace: str = ""


class TokenChunk(Message, tag="token/1"):
    turn: int
    seq: int
    text: str
    final: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_text(self.text, "token chunk")


class TtsJob(Message, tag="job.tts/1"):
    """Speak `turn`: follow its token stream (or speak `text` when given)."""

    turn: int
    text: str | None = None
    voice: str | None = None
    deadline: float = 0.0
    trace: str = ""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.text is not None:
            _check_text(self.text, "tts text")


class AudioOut(Message, tag="audio.out/1"):
    """A chunk of agent speech, PCM16 mono at `rate`."""

    turn: int
    seq: int
    pcm: bytes
    rate: int
    final: bool = False
    text: str = ""  # set on the first chunk of each clause: what this audio says

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_text(self.text, "clause text")
        if not 8_000 <= self.rate <= 48_000:
            raise ValueError(f"agent audio rate {self.rate} Hz outside 8000..48000")
        if len(self.pcm) > MAX_OUT_CHUNK_BYTES or len(self.pcm) % 2:
            raise ValueError(f"agent audio chunk of {len(self.pcm)} bytes is odd or too large")


class OpusOut(Message, tag="audio.out.opus/1"):
    """A chunk of agent speech as 20 ms Opus packets of one stream per turn (`shared.opus`): what
    TTS workers write since recordings were made compact. `AudioOut` (PCM) is still read."""

    turn: int
    seq: int
    packets: list[bytes] = []
    final: bool = False
    text: str = ""  # set on the chunk where a clause starts: what this audio says

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_text(self.text, "clause text")
        if len(self.packets) > MAX_OUT_PACKETS or any(not 0 < len(p) <= MAX_OPUS_PACKET_BYTES for p in self.packets):
            raise ValueError(f"agent audio chunk of {len(self.packets)} packets: at most {MAX_OUT_PACKETS}, "
                             f"each 1..{MAX_OPUS_PACKET_BYTES} bytes")


AgentAudio = AudioOut | OpusOut  # what audio.out may hold


class TurnMark(Message, tag="turn.mark/1"):
    """A latency mark of one turn, e.g. stage="asr", mark="done", value_ms=123."""

    turn: int
    stage: str
    mark: str
    value_ms: float = 0.0


class Cancelled(Message, tag="cancelled/1"):
    """Written into a session stream when a stage stopped a job on cancel."""

    turn: int
    stage: str
    reason: str = "barge-in"


class JobDropped(Message, tag="job.dropped/1"):
    """Written into the session's events when a worker dropped a job claimed after its deadline
    (the pool is overloaded): the bridge tells the caller instead of leaving them in silence."""

    turn: int
    stage: str
    late_ms: float
    pool: str = ""


class JobRun(Message, tag="job.run/1"):
    """Written into the session's events by the worker when it is done with one delivery of a job:
    who ran it (pool, GPU type, worker), when it was queued, picked up and finished, and how it
    ended. `voxbus inspect` builds its jobs table from these."""

    turn: int
    stage: str
    pool: str
    gpu_type: str
    worker: str
    entry_id: str
    queued: float  # the job's own ts: when the bridge enqueued it
    started: float  # when this worker picked it up
    ended: float
    outcome: JobOutcome
    deliveries: int = 1  # >1: a retry, after a failure or a dead worker
    reason: str = ""
    trace: str = ""


class JobFailed(Message, tag="job.failed/1"):
    """Written into the session's events when a job was dead-lettered."""

    turn: int
    stage: str
    reason: str


class SessionMeta(Message, tag="session.meta/1"):
    transport: str = "webrtc"
    pools: dict[str, str] = {}
    attrs: dict[str, str] = {}


class ChatMessage(Message, tag="chat/1"):
    """One entry of the conversation context list."""

    role: Literal["system", "user", "assistant"]
    text: str
    turn: int = -1
    interrupted: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_text(self.text, "chat message")


class DeadLetter(msgspec.Struct, tag="dead.letter/1", tag_field="type", kw_only=True):
    """What a dead-letter stream holds: the raw entry and why it was rejected."""

    source: str
    entry_id: str
    reason: str
    payload: bytes
    deliveries: int = 0
    ts: float = msgspec.field(default_factory=now)


class WorkerRecord(msgspec.Struct, kw_only=True):
    """A worker's registry entry (refreshed with every heartbeat)."""

    worker_id: str
    pool: str
    stage: str
    gpu_type: str
    host: str
    pid: int
    slots_total: int
    slots_busy: int = 0
    model: str = ""
    started: float = msgspec.field(default_factory=now)
    heartbeat: float = msgspec.field(default_factory=now)
    jobs_done: int = 0
    job_p50_ms: float = 0.0  # over the worker's recent jobs
    job_p99_ms: float = 0.0
    wait_p95_ms: float = 0.0  # queue wait (enqueue to start) of recent jobs


AnyMessage = (
    AudioFrame | SpeechStart | SpeechPause | SpeechEnd | EotDecision | Interrupt | Cancel | AsrJob | Transcript | LlmJob
    | TokenChunk | TtsJob | AudioOut | TurnMark | Cancelled | JobFailed | SessionMeta | ChatMessage | EotJob | JobDropped
    | JobRun | OpusFrame | OpusOut
)
Job = AsrJob | LlmJob | TtsJob | EotJob

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(AnyMessage)
_dlq_decoder = msgspec.msgpack.Decoder(DeadLetter)
KNOWN_TAGS: frozenset[str] = frozenset(str(t.__struct_config__.tag) for t in AnyMessage.__args__)


def encode(msg: Message | DeadLetter | WorkerRecord) -> bytes:
    return _encoder.encode(msg)


def decode(data: bytes) -> AnyMessage:
    """Decode one message; any malformed, unknown or oversized input raises ProtocolError."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ProtocolError(f"expected bytes, got {type(data).__name__}", RejectReason.UNDECODABLE)
    if len(data) > MAX_ENTRY_BYTES:
        raise ProtocolError(f"entry of {len(data)} bytes exceeds {MAX_ENTRY_BYTES}", RejectReason.OVERSIZED)
    try:
        return _decoder.decode(data)
    except msgspec.ValidationError as exc:
        raise ProtocolError(str(exc), _invalid_reason(data)) from None
    except msgspec.DecodeError as exc:
        raise ProtocolError(str(exc), RejectReason.UNDECODABLE) from None


def _invalid_reason(data: bytes) -> RejectReason:
    """Valid msgpack that is no valid message: an unknown type tag, an invalid session id, or bad fields.
    Decided on the data itself (the error path only), not on the validator's wording."""
    try:
        raw = msgspec.msgpack.decode(data)
    except msgspec.DecodeError:
        return RejectReason.UNDECODABLE
    if not isinstance(raw, dict) or raw.get("type") not in KNOWN_TAGS:
        return RejectReason.UNKNOWN_TYPE
    sid = raw.get("session")
    if not isinstance(sid, str) or not _SESSION_RE.fullmatch(sid):
        return RejectReason.INVALID_SESSION
    return RejectReason.INVALID


def decode_as(data: bytes, *types: type[Message]) -> Any:
    """Decode and check the message is one of `types` (e.g. a pool only takes its job)."""
    msg = decode(data)
    if not isinstance(msg, types):
        names = ", ".join(str(t.__struct_config__.tag) for t in types)
        raise ProtocolError(f"unexpected message {type(msg).__struct_config__.tag}, expected {names}",
                            RejectReason.WRONG_TYPE)
    return msg


def decode_entry(fields: dict[bytes, bytes]) -> AnyMessage:
    """Decode a stream entry's field map (exactly one field, ``m``)."""
    if len(fields) != 1 or ENTRY_FIELD not in fields:
        raise ProtocolError(f"entry must hold exactly the field 'm', got {sorted(map(repr, fields))[:4]}",
                            RejectReason.WRONG_FIELDS)
    return decode(fields[ENTRY_FIELD])


def entry(msg: Message) -> dict[bytes, bytes]:
    return {ENTRY_FIELD: encode(msg)}


def decode_dead_letter(data: bytes) -> DeadLetter:
    return _dlq_decoder.decode(data)


_worker_decoder = msgspec.msgpack.Decoder(WorkerRecord)


def decode_worker(data: bytes) -> WorkerRecord:
    try:
        return _worker_decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ProtocolError(f"bad worker record: {exc}") from None


# Message types each session stream may carry (readers reject anything else).
STREAM_TYPES: dict[str, tuple[type[Message], ...]] = {
    "audio.in": (AudioFrame, OpusFrame),
    "events": (SpeechStart, SpeechPause, SpeechEnd, EotDecision, Interrupt, Transcript, TurnMark, Cancelled, JobFailed,
               JobDropped, JobRun),
    "tokens": (TokenChunk,),
    "audio.out": (AudioOut, OpusOut),
}
STAGE_JOB: dict[str, type[Message]] = {"asr": AsrJob, "llm": LlmJob, "tts": TtsJob, "eot": EotJob}
Stage = Literal["asr", "llm", "tts", "eot"]
