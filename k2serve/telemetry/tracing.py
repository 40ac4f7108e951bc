"""OpenTelemetry spans for each request's phases, exported over OTLP/HTTP only when
OTEL_EXPORTER_OTLP_ENDPOINT (or OTEL_EXPORTER_OTLP_TRACES_ENDPOINT) is set.

Off (the default), `span` hands back one shared no-op context manager and nothing of the
OpenTelemetry SDK is imported. On, `setup` installs a global tracer provider: a batch
exporter to the endpoint (the SDK reads the usual OTEL_* variables: headers, service name,
batch delay), and a processor that puts the request id (k2serve.telemetry.context) on every
span that starts while a request runs. Phases measured where no span could be open (the
engine's queue, prefill and decode, timed on its thread) are recorded afterwards from their
timestamps (`record_span`).
"""

from __future__ import annotations

import logging
import os
from contextlib import nullcontext

from k2serve.telemetry.context import REQUEST_ID

log = logging.getLogger("k2serve.telemetry")

REQUEST_ID_ATTRIBUTE = "k2serve.request_id"
_NOOP = nullcontext()
_tracer = None
_provider = None


def endpoint_configured() -> bool:
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    return bool(os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
                or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"))


def setup() -> bool:
    """Start exporting spans if an OTLP endpoint is configured; True when it does."""
    global _tracer, _provider
    if _tracer is not None or not endpoint_configured():
        return _tracer is not None
    try:
        from opentelemetry import trace
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
            OTLPSpanExporter,
        )
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:
        log.warning("k2serve: OTEL_EXPORTER_OTLP_ENDPOINT is set but the OpenTelemetry SDK is "
                    "not installed (`pip install 'k2serve[otel]'`): no traces are exported")
        return False

    class RequestIdProcessor(SpanProcessor):
        def on_start(self, span, parent_context=None) -> None:
            request_id = REQUEST_ID.get()
            if request_id is not None:
                span.set_attribute(REQUEST_ID_ATTRIBUTE, request_id)

    provider = TracerProvider(resource=Resource.create({"service.name": os.environ.get(
        "OTEL_SERVICE_NAME", "k2serve")}))
    provider.add_span_processor(RequestIdProcessor())
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    _provider = provider
    _tracer = provider.get_tracer("k2serve")
    return True


def enabled() -> bool:
    return _tracer is not None


def span(name: str, **attributes):
    """A context manager: a span around its block (current while it runs), or nothing."""
    if _tracer is None:
        return _NOOP
    return _tracer.start_as_current_span(name, attributes=attributes)


def record_span(name: str, start_s: float, end_s: float, **attributes) -> None:
    """A span for a phase already over, from epoch-second timestamps, under the current
    span."""
    if _tracer is None or end_s < start_s:
        return
    done = _tracer.start_span(name, start_time=int(start_s * 1e9), attributes=attributes)
    done.end(end_time=int(end_s * 1e9))


def tag_current(request_id: str) -> None:
    """Put the request id on the span already open when the request id became known (a
    framework's server span)."""
    if _tracer is None:
        return
    from opentelemetry import trace

    current = trace.get_current_span()
    if current.is_recording():
        current.set_attribute(REQUEST_ID_ATTRIBUTE, request_id)


def shutdown() -> None:
    """Export what is queued (the server stops)."""
    global _tracer, _provider
    if _provider is not None:
        _provider.shutdown()
    _tracer = _provider = None
