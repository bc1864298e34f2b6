"""OpenTelemetry end to end: `voxbus demo` (the bridge in one process, each worker in its own)
exports to a real OTLP/HTTP receiver this test runs on loopback, which decodes the protobuf
requests as any collector would. The spans of one call form one trace: bridge and worker
spans joined, parents right, durations consistent with the demo's own waterfall.

The unit tests below it check the pieces with the SDK's in-memory exporter.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import threading
from collections import defaultdict
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest, ExportTraceServiceResponse

from shared import tracing

ROOT = Path(__file__).resolve().parents[2]


class Receiver(ThreadingHTTPServer):
    """The OTLP/HTTP protobuf trace endpoint (POST /v1/traces), keeping every span it gets."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.spans: list[dict[str, Any]] = []
        self.requests = 0
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    server: Receiver

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        if self.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        if self.path != "/v1/traces" or self.headers.get("Content-Type") != "application/x-protobuf":
            self.send_error(404)
            return
        req = ExportTraceServiceRequest.FromString(body)
        with self.server.lock:
            self.server.requests += 1
            for rs in req.resource_spans:
                service = next(a.value.string_value for a in rs.resource.attributes if a.key == "service.name")
                for ss in rs.scope_spans:
                    for s in ss.spans:
                        attrs = {a.key: _value(a.value) for a in s.attributes}
                        self.server.spans.append({
                            "service": service, "name": s.name, "trace": s.trace_id.hex(), "id": s.span_id.hex(),
                            "parent": s.parent_span_id.hex(), "start": s.start_time_unix_nano / 1e9,
                            "end": s.end_time_unix_nano / 1e9, "attrs": attrs})
        out = ExportTraceServiceResponse().SerializeToString()
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *args: Any) -> None:
        pass


def _value(v: Any) -> Any:
    kind = v.WhichOneof("value")
    return getattr(v, kind) if kind else None


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.mark.timeout(420)
def test_one_trace_per_call_joins_bridge_and_worker_spans(receiver: Receiver, tmp_path: Path) -> None:
    env = dict(os.environ, OTEL_EXPORTER_OTLP_ENDPOINT=receiver.url, OTEL_BSP_SCHEDULE_DELAY="200")
    env.pop("OTEL_SERVICE_NAME", None)
    proc = subprocess.run([sys.executable, "-m", "shared.cli", "demo", "--json", "--out", str(tmp_path)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    sid = result["session_id"]

    spans = receiver.spans
    sessions = [s for s in spans if s["name"] == "session" and s["attrs"].get("voxbus.session") == sid]
    assert len(sessions) == 1, [s["name"] for s in spans]
    root = sessions[0]
    trace = [s for s in spans if s["trace"] == root["trace"]]
    by_id = {s["id"]: s for s in trace}
    assert {s["service"] for s in trace} == {"voxbus-bridge", "voxbus-worker"}
    assert root["parent"] == "" and all(s["parent"] in by_id for s in trace if s is not root), "a span's parent is missing"

    def parent(s: dict[str, Any]) -> dict[str, Any]:
        return by_id[s["parent"]]

    names: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for s in trace:
        names[s["name"]].append(s)
    turns = names["turn"]
    assert turns and all(parent(t) is root for t in turns)
    for stage in ("asr", "llm", "tts"):
        bridge_spans = [s for s in names[stage] if s["service"] == "voxbus-bridge"]
        assert bridge_spans and all(parent(s)["name"] == "turn" for s in bridge_spans), stage
        runs = names[f"{stage}.run"]
        assert runs and all(s["service"] == "voxbus-worker" and parent(s)["name"] == stage for s in runs), stage
        for run in runs:
            assert run["attrs"]["voxbus.pool"] and run["attrs"]["voxbus.worker"] and run["attrs"]["voxbus.gpu_type"]
            assert run["attrs"]["voxbus.outcome"] == "done"
            assert parent(run)["start"] <= run["start"] <= run["end"] <= parent(run)["end"] + 0.005
    for name in ("endpointing", "playout"):
        assert names[name] and all(parent(s)["name"] == "turn" for s in names[name]), name
    # The worker's marks are spans under its run, as long as the waterfall says they took.
    (ttft,) = names["llm.ttft"]
    assert parent(ttft)["name"] == "llm.run"
    assert abs((ttft["end"] - ttft["start"]) * 1000 - result["llm_ttft_ms"]) < 2.0, (ttft, result["llm_ttft_ms"])
    (first_audio,) = [s for s in names["tts.first_audio"]][:1]
    assert abs((first_audio["end"] - first_audio["start"]) * 1000 - result["tts_first_audio_ms"]) < 2.0
    (endpointing,) = [s for s in names["endpointing"] if parent(s) is turns[0]][:1] or names["endpointing"][:1]
    assert endpointing["end"] > endpointing["start"]
    assert names["llm.generation"] and names["asr.queue"]
    # Nothing said is exported unless VOXBUS_TRACE_TEXT opts in.
    assert not any("text" in k for s in trace for k in s["attrs"]), [s["attrs"] for s in trace]


# ---------------------------------------------------------------- the pieces, in memory


@pytest.fixture
def memory(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(tracing, "_tracer", provider.get_tracer("test"))
    yield exporter
    provider.shutdown()


def test_off_unless_an_endpoint_is_configured(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_SDK_DISABLED",
                "OTEL_TRACES_EXPORTER"):
        monkeypatch.delenv(var, raising=False)
    assert not tracing.configured()
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318")
    assert tracing.configured()
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    assert not tracing.configured()


def test_traceparent_round_trips_and_bad_values_are_ignored(memory: Any) -> None:
    span = tracing.start_span("x", None, 1000.0)
    assert span is not None
    value = tracing.traceparent(span)
    ctx = tracing.parent_context(value)
    child = tracing.start_span("y", ctx, 1000.5)
    assert child is not None
    child.end()
    span.end()
    x, y = sorted(memory.get_finished_spans(), key=lambda s: s.name)
    assert y.parent is not None and y.parent.span_id == x.context.span_id and y.context.trace_id == x.context.trace_id
    for bad in ("", "00-zz-yy-01", "garbage", "00-" + "0" * 32 + "-" + "0" * 16 + "-01", "x" * 5000):
        assert tracing.parent_context(bad) is None


def test_call_trace_nests_jobs_under_turns_and_closes_everything(memory: Any) -> None:
    from bridge.call_trace import CallTrace
    from bridge.waterfall import TurnTimes
    from shared.protocol import JobOutcome, JobRun

    trace = CallTrace("sess-1", "webrtc", started=100.0)
    tp = trace.job("asr", 0, "asr-cpu", turn_start=100.5)
    trace.job("llm", 0, "llm-cpu")
    trace.job_ended(JobRun(session="sess-1", turn=0, stage="asr", pool="asr-cpu", gpu_type="cpu", worker="w1",
                           entry_id="1-0", queued=101.0, started=101.01, ended=101.1, outcome=JobOutcome.DONE, trace=tp))
    trace.turn_over(0, TurnTimes(0, speech_end_ts=100.9, endpoint_ts=101.0, first_audio_ts=101.5))
    trace.close()
    spans = {s.name: s for s in memory.get_finished_spans()}
    assert set(spans) == {"session", "turn", "asr", "llm", "endpointing", "playout"}
    session, turn = spans["session"], spans["turn"]
    assert turn.parent.span_id == session.context.span_id
    for name in ("asr", "llm", "endpointing", "playout"):
        assert spans[name].parent.span_id == turn.context.span_id, name
    assert spans["asr"].attributes["voxbus.worker"] == "w1" and spans["asr"].end_time == tracing.ns(101.1)
    assert spans["llm"].attributes["voxbus.outcome"] == "unfinished"  # closed with the call
    assert spans["endpointing"].start_time == tracing.ns(100.9) and spans["endpointing"].end_time == tracing.ns(101.0)
    assert not any("text" in k for s in spans.values() for k in (s.attributes or {}))


def test_call_trace_is_free_when_off(monkeypatch: pytest.MonkeyPatch) -> None:
    from bridge.call_trace import CallTrace

    monkeypatch.setattr(tracing, "_tracer", None)
    trace = CallTrace("sess-2", "webrtc")
    assert not trace.on and trace.job("asr", 0, "asr-cpu") == ""
    trace.close()
