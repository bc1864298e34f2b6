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
BUS_RECONNECTS = Counter("voxbus_bus_reconnects_total", "Redis reconnect attempts after errors", ["component"])
BUS_HOP_MS = Histogram("voxbus_bus_hop_ms", "Publish to receipt latency of one hop", ["kind"], buckets=LATENCY_BUCKETS_MS)
CANCELS_RECEIVED = Counter("voxbus_cancels_received_total", "Cancel messages received over pub/sub")

# --- jobs ---
JOBS = Counter("voxbus_jobs_total", "Jobs by outcome", ["pool", "stage", "gpu_type", "outcome"])
JOBS_RECLAIMED = Counter("voxbus_jobs_reclaimed_total", "Jobs reclaimed from other consumers", ["pool"])
SLOTS_BUSY = Gauge("voxbus_worker_slots_busy", "Busy job slots", ["pool", "stage", "gpu_type"])
SLOTS_TOTAL = Gauge("voxbus_worker_slots_total", "Job slots", ["pool", "stage", "gpu_type"])

# --- bridge ---
ACTIVE_SESSIONS = Gauge("voxbus_active_sessions", "Live calls on this bridge")
SESSIONS_REJECTED = Counter("voxbus_sessions_rejected_total", "Calls refused", ["reason"])
BARGE_INS = Counter("voxbus_barge_ins_total", "Barge-ins by source", ["source"])
FALSE_INTERRUPTIONS = Counter("voxbus_false_interruptions_total", "VAD barge-ins with no transcript after them")
CONTROL_REJECTED = Counter("voxbus_control_rejected_total", "Client control messages ignored", ["reason"])
INGEST_TICK_MS = Histogram("voxbus_ingest_tick_ms", "Bridge ingest tick duration", buckets=LATENCY_BUCKETS_MS)
PREEMPTIVE_TURNS = Counter("voxbus_preemptive_turns_total", "Turns started before the end of speech was certain",
                           ["outcome"])
