"""A finished request's usage record as metrics (tokens, latencies, finish reason) and as the
spans of its engine phases (queue, prefill, decode), timed from the record's stamps. A usage
sink (app.state.usage_sinks): called once per request, on the event loop, in its context."""

from __future__ import annotations

from k2serve.api.usage import UsageRecord
from k2serve.telemetry import metrics, tracing

_STATUS_REASONS = {"client_closed": "abort", "error": "error", "content_filter": "content_filter"}


def finished_reason(record: UsageRecord) -> str:
    if record.status in _STATUS_REASONS:
        return _STATUS_REASONS[record.status]
    return record.finish_reason or "stop"


def observe_usage(record: UsageRecord) -> None:
    model = record.model
    metrics.PROMPT_TOKENS.labels(model).inc(record.prompt_tokens)
    metrics.GENERATION_TOKENS.labels(model).inc(record.completion_tokens)
    if record.cached_tokens:
        metrics.CACHED_PROMPT_TOKENS.labels(model).inc(record.cached_tokens)
    metrics.REQUEST_SUCCESS.labels(model, finished_reason(record)).inc()
    metrics.E2E.labels(model).observe(record.duration_s)
    metrics.REQUEST_PROMPT_TOKENS.labels(model).observe(record.prompt_tokens)
    metrics.REQUEST_GENERATION_TOKENS.labels(model).observe(record.completion_tokens)
    ttft = record.ttft_s
    if ttft is not None:
        metrics.TTFT.labels(model).observe(ttft)
        if record.completion_tokens > 1:
            metrics.TPOT.labels(model).observe(
                (record.duration_s - ttft) / (record.completion_tokens - 1))
        metrics.DECODE_TIME.labels(model).observe(max(0.0, record.duration_s - ttft))
        if record.queue_s is not None:
            metrics.QUEUE_TIME.labels(model).observe(record.queue_s)
            metrics.PREFILL_TIME.labels(model).observe(max(0.0, ttft - record.queue_s))
    if tracing.enabled():
        _phase_spans(record)


def _phase_spans(record: UsageRecord) -> None:
    start, ttft, end = record.started_at, record.ttft_s, record.started_at + record.duration_s
    attrs = {"k2serve.model": record.model, "k2serve.endpoint": record.endpoint}
    if ttft is None:
        return
    first = start + ttft
    scheduled = start + record.queue_s if record.queue_s is not None else None
    if scheduled is not None:
        tracing.record_span("queue", start, scheduled, **attrs)
    tracing.record_span("prefill", scheduled if scheduled is not None else start, first,
                        **attrs, **{"k2serve.prompt_tokens": record.prompt_tokens,
                                    "k2serve.cached_tokens": record.cached_tokens})
    tracing.record_span("decode", first, end, **attrs,
                        **{"k2serve.completion_tokens": record.completion_tokens,
                           "k2serve.finish_reason": finished_reason(record)})
