"""Every Prometheus metric voxbus exports, defined once. Labels never carry session ids."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

LATENCY_BUCKETS_MS = (1, 2, 5, 10, 20, 50, 100, 200, 300, 500, 750, 1000, 1500, 2500, 5000, 10000)

# --- bus ---
BUS_PUBLISHED = Counter("voxbus_bus_published_total", "Entries published to streams", ["kind"])
BUS_REJECTED = Counter(
    "voxbus_bus_rejected_total", "Stream entries rejected as malformed or unexpected", ["kind", "reason"]
)
BUS_DEAD_LETTERED = Counter("voxbus_bus_dead_lettered_total", "Entries moved to a dead-letter stream", ["queue"])
BUS_DUPLICATES = Counter(
    "voxbus_bus_duplicates_total", "Outputs refused because their (turn, seq) id already exists", ["kind"]
)
BUS_PUBLISH_FAILED = Counter("voxbus_bus_publish_failed_total", "Entries Redis refused with an error reply", ["kind"])
BUS_RECONNECTS = Counter("voxbus_bus_reconnects_total", "Redis reconnect attempts after errors", ["component"])
BUS_HOP_MS = Histogram("voxbus_bus_hop_ms", "Publish to receipt latency of one hop", ["kind"], buckets=LATENCY_BUCKETS_MS)
CANCELS_RECEIVED = Counter("voxbus_cancels_received_total", "Cancel messages received over pub/sub")

# --- jobs ---
JOBS = Counter("voxbus_jobs_total", "Jobs by outcome", ["pool", "stage", "gpu_type", "outcome"])
JOBS_RECLAIMED = Counter("voxbus_jobs_reclaimed_total", "Jobs reclaimed from other consumers", ["pool"])
OVERFLOWS = Counter("voxbus_overflow_total", "Jobs routed to a fallback pool", ["stage", "pool", "fallback"])
JOBS_ENQUEUE_FAILED = Counter("voxbus_jobs_enqueue_failed_total", "Jobs Redis refused to queue (the turn fails)",
                              ["stage", "pool"])
OVERFLOWS_REFUSED = Counter("voxbus_overflow_refused_total",
                            "Jobs kept on a saturated pool because its fallback had no live worker",
                            ["stage", "pool", "fallback"])
HEARTBEAT_FAILURES = Counter("voxbus_worker_heartbeat_failures_total",
                             "Worker heartbeats Redis did not take (down, OOM, read-only)", ["pool"])
SLOTS_BUSY = Gauge("voxbus_worker_slots_busy", "Busy job slots", ["pool", "stage", "gpu_type"])
SLOTS_TOTAL = Gauge("voxbus_worker_slots_total", "Job slots", ["pool", "stage", "gpu_type"])

# --- bridge ---
ACTIVE_SESSIONS = Gauge("voxbus_active_sessions", "Live calls on this bridge")
SESSIONS_REJECTED = Counter("voxbus_sessions_rejected_total", "Calls refused", ["reason"])
CONTEXT_RESTORED = Counter("voxbus_context_restored_total",
                           "Conversation contexts written again after Redis lost them (a restart)")
BARGE_INS = Counter("voxbus_barge_ins_total", "Barge-ins by source", ["source"])
FALSE_INTERRUPTIONS = Counter("voxbus_false_interruptions_total", "VAD barge-ins with no transcript after them")
HTTP_REFUSED = Counter("voxbus_http_refused_total", "Signaling requests or connections refused by a limit",
                       ["reason"])
CALLS_ENDED = Counter("voxbus_calls_ended_total", "Calls ended by the bridge, by why", ["reason"])
CONTROL_REJECTED = Counter("voxbus_control_rejected_total", "Client control messages ignored", ["reason"])
INGEST_TICK_MS = Histogram("voxbus_ingest_tick_ms", "Bridge ingest tick duration", buckets=LATENCY_BUCKETS_MS)
CONTEXT_TRIMS = Counter("voxbus_context_trims_total",
                        "Conversation contexts cut down to half their bound (the oldest messages dropped in one chunk)")
TURNS_BUSY = Counter("voxbus_turns_busy_total", "Turns whose job a worker dropped as too late (overload)", ["stage"])
TURNS_MERGED = Counter("voxbus_turns_merged_total",
                       "Turns whose reply was dropped because the caller went on before hearing it")
EOT_DECISIONS = Counter("voxbus_eot_decisions_total", "End-of-turn model verdicts at pauses", ["verdict"])
EOT_PROB = Histogram("voxbus_eot_probability", "End-of-turn model probability that the caller has finished",
                     buckets=(0.01, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0))
EOT_COST_MS = Histogram("voxbus_eot_cost_ms", "End-of-turn model: pause -> verdict, batch wait included",
                        buckets=LATENCY_BUCKETS_MS)
TURN_ENDS = Counter("voxbus_turn_ends_total", "Turn ends by what decided them (vad timeout or model)", ["by"])
PREEMPTIVE_TURNS = Counter("voxbus_preemptive_turns_total", "Turns started before the end of speech was certain",
                           ["outcome"])

# --- turn latency (issue #7): one histogram per step of a turn; labels never carry session ids ---
VOICE_BUCKETS_MS = (100, 200, 300, 400, 500, 600, 700, 800, 900, 1000, 1200, 1500, 2000, 2500, 3000, 4000, 5000, 7500,
                    10000)
TOKENS_PER_S_BUCKETS = (1, 2, 5, 10, 15, 20, 30, 40, 50, 75, 100, 150, 200, 300, 500, 1000)
# (stage, mark) are those of the TurnMark the worker publishes for the same figure: asr/done,
# llm/ttft, llm/done, tts/first_audio, tts/first_clause; <stage>/queue_wait is enqueue -> claim.
STAGE_LATENCY_MS = Histogram(
    "voxbus_stage_latency_ms", "Latency of one step of a turn in a worker, by stage and mark",
    ["stage", "mark", "pool", "gpu_type"], buckets=LATENCY_BUCKETS_MS,
)
LLM_TOKENS_PER_S = Histogram(
    "voxbus_llm_tokens_per_second", "Decode rate of one LLM reply after its first token",
    ["pool", "stage", "gpu_type"], buckets=TOKENS_PER_S_BUCKETS,
)
BARGE_IN_STOP_MS = Histogram(
    "voxbus_barge_in_stop_ms", "Cancel published by the bridge -> the worker's job stopped",
    ["pool", "stage", "gpu_type"], buckets=LATENCY_BUCKETS_MS,
)
ENDPOINTING_MS = Histogram(
    "voxbus_endpointing_ms", "Last voiced frame of the caller -> the turn's end decided (VAD timeout or model)",
    buckets=LATENCY_BUCKETS_MS,
)
VOICE_TO_VOICE_MS = Histogram(
    "voxbus_voice_to_voice_ms", "Last voiced frame of the caller -> first agent audio frame sent", buckets=VOICE_BUCKETS_MS
)

# --- archive (shared/admin/archiving.py): the process that archived a session counts it ---
ARCHIVED = Counter("voxbus_archive_sessions_total",
                   "Sessions written to the archive, by outcome (archived, snapshot, empty, failed)", ["outcome"])
ARCHIVE_BYTES = Counter("voxbus_archive_bytes_total", "Bytes of recordings written to the archive")
ARCHIVE_SECONDS = Histogram("voxbus_archive_seconds", "Export, compression and upload of one session",
                            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))
