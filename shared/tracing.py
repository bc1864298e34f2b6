"""OpenTelemetry traces of calls, joined across processes.

One trace per session: the bridge opens a `session` span, a `turn` span per
turn and a span per job it queues (`asr`, `eot`, `llm`, `tts`), plus
`endpointing` and `playout`. Each job message carries its span as a W3C
`traceparent` (`Job.trace`); the worker that runs it adds `<stage>.queue`
and `<stage>.run` under it, and spans for its own marks (`llm.ttft`,
`llm.generation`, `tts.first_audio`). So the spans of the bridge and of every
worker process are one tree in any OTLP backend.

Off unless configured, with the standard variables only:
``OTEL_EXPORTER_OTLP_ENDPOINT`` (or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``) turns
it on, OTLP over HTTP/protobuf through the SDK's exporter, which also reads
``OTEL_EXPORTER_OTLP_HEADERS``, ``..._TIMEOUT`` and so on; ``OTEL_SERVICE_NAME``
and ``OTEL_RESOURCE_ATTRIBUTES`` name the process; ``OTEL_BSP_*`` tune batching;
``OTEL_SDK_DISABLED=true`` or ``OTEL_TRACES_EXPORTER=none`` keep it off.

Attributes are ids, pools, GPU types, workers, turns and outcomes. Never audio;
transcript and reply text only with ``VOXBUS_TRACE_TEXT=1`` (it is what the
caller said: personal data).

The provider is this module's own, not OpenTelemetry's global one, so a library
that configures the global provider (livekit-agents does) neither receives nor
changes voxbus's spans.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Span, Tracer

log = logging.getLogger("voxbus.tracing")

TEXT_ENV = "VOXBUS_TRACE_TEXT"
_lock = threading.Lock()
_provider: TracerProvider | None = None
_tracer: Tracer | None = None


def configured() -> bool:
    """Whether the environment asks for traces (an OTLP endpoint, and not disabled)."""
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    if os.environ.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() == "none":
        return False
    return bool(os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"))


def setup(service: str) -> bool:
    """Start exporting spans if the environment asks for it (once per process); True when on.
    `service` names the process unless OTEL_SERVICE_NAME does."""
    global _provider, _tracer
    with _lock:
        if _tracer is not None:
            return True
        if not configured():
            return False
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            from opentelemetry.sdk.resources import SERVICE_NAME, Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor
        except ImportError as exc:
            log.warning("OTEL_EXPORTER_OTLP_ENDPOINT is set but OpenTelemetry is not installed (%s): "
                        "pip install 'voxbus[otel]'; not tracing", exc)
            return False
        attrs = {} if os.environ.get("OTEL_SERVICE_NAME") else {SERVICE_NAME: service}
        provider = TracerProvider(resource=Resource.create(attrs))
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        _provider, _tracer = provider, provider.get_tracer("voxbus")
        log.info("tracing: exporting spans over OTLP/HTTP as %s", provider.resource.attributes.get(SERVICE_NAME))
        return True


def tracer() -> Tracer | None:
    """The tracer, or None when tracing is off (every caller checks: spans cost nothing then)."""
    return _tracer


def include_text() -> bool:
    return os.environ.get(TEXT_ENV, "").strip().lower() in ("1", "true", "yes")


def shutdown() -> None:
    """Export what is still batched and stop (at process exit)."""
    global _provider, _tracer
    with _lock:
        provider, _provider, _tracer = _provider, None, None
    if provider is not None:
        try:
            provider.shutdown()
        except Exception as exc:  # a collector that is gone must not fail the shutdown
            log.warning("tracing: final export failed: %s", exc)


def ns(ts: float) -> int:
    """Wall-clock seconds as OpenTelemetry's nanoseconds."""
    return int(ts * 1e9)


def traceparent(span: Span) -> str:
    """The W3C traceparent of `span` (what job messages carry)."""
    ctx = span.get_span_context()
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"


def parent_context(value: str) -> Context | None:
    """The context a traceparent names, or None for "" or a malformed value (never raises:
    it comes from a message, so from anyone who can write to the job stream)."""
    if not value:
        return None
    from opentelemetry import trace
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    ctx = TraceContextTextMapPropagator().extract({"traceparent": value})
    return ctx if trace.get_current_span(ctx).get_span_context().is_valid else None


def start_span(name: str, parent: Context | Span | None, start: float, attributes: dict[str, Any] | None = None) -> Span | None:
    """A span under `parent` (a context or a span) starting at wall-clock `start`; None when off."""
    t = _tracer
    if t is None:
        return None
    from opentelemetry import trace

    # A Context is a dict (what parent_context returns); anything else is a span of ours.
    ctx = parent if parent is None or isinstance(parent, dict) else trace.set_span_in_context(parent)
    return t.start_span(name, context=ctx, start_time=ns(start), attributes=attributes)


def span_between(name: str, parent: Context | Span | None, start: float, end: float,
                 attributes: dict[str, Any] | None = None) -> None:
    """A finished span from `start` to `end` (both wall clock), for steps measured after the fact."""
    span = start_span(name, parent, start, attributes)
    if span is not None:
        span.end(end_time=ns(max(end, start)))
