"""Per-request timing records -> benchmark metrics, and the result table.

Definitions follow `vllm bench serve`: TTFT is request start to the first non-empty content
chunk; ITL is each gap between consecutive content chunks; TPOT is (E2E - TTFT) /
(output tokens - 1), so it exists only for requests with two or more output tokens; E2E is
request start to the end of the stream. Latency statistics cover successful requests only.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

LATENCY_METRICS = {  # key -> title of its table section
    "ttft": "Time to First Token",
    "tpot": "Time per Output Token (excl. 1st token)",
    "itl": "Inter-token Latency",
    "e2el": "End-to-end Latency",
}
PERCENTILES = (90, 99)
TABLE_WIDTH = 50


@dataclass
class RequestRecord:
    """What one request measured; times are in seconds."""

    success: bool
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    itl: list[float] = field(default_factory=list)
    latency: float = 0.0
    error: str = ""

    @property
    def tpot(self) -> float | None:
        if self.output_tokens < 2:
            return None
        return (self.latency - self.ttft) / (self.output_tokens - 1)


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default method)."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summarize_ms(name: str, seconds: list[float]) -> dict[str, float | None]:
    """mean / median / p90 / p99 of `seconds`, in milliseconds; None when there are none."""
    keys = [f"mean_{name}_ms", f"median_{name}_ms", *(f"p{p}_{name}_ms" for p in PERCENTILES)]
    if not seconds:
        return dict.fromkeys(keys)
    ms = [s * 1000 for s in seconds]
    values = [sum(ms) / len(ms), percentile(ms, 50), *(percentile(ms, p) for p in PERCENTILES)]
    return dict(zip(keys, values))


def aggregate(records: list[RequestRecord], duration_s: float) -> dict:
    ok = [r for r in records if r.success]
    total_in = sum(r.prompt_tokens for r in ok)
    total_out = sum(r.output_tokens for r in ok)
    per_second = (lambda n: n / duration_s) if duration_s > 0 else (lambda n: 0.0)
    metrics = {
        "completed": len(ok),
        "failed": len(records) - len(ok),
        "duration_s": duration_s,
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "request_throughput": per_second(len(ok)),
        "output_throughput": per_second(total_out),
        "total_token_throughput": per_second(total_in + total_out),
    }
    samples = {
        "ttft": [r.ttft for r in ok],
        "tpot": [r.tpot for r in ok if r.tpot is not None],
        "itl": [gap for r in ok for gap in r.itl],
        "e2el": [r.latency for r in ok],
    }
    for name in LATENCY_METRICS:
        metrics.update(summarize_ms(name, samples[name]))
    metrics["errors"] = dict(Counter(r.error for r in records if not r.success).most_common(5))
    return metrics


def _row(label: str, value) -> str:
    if value is None:
        text = "-"
    elif isinstance(value, float):
        text = f"{value:.2f}"
    else:
        text = str(value)
    return f"{label:<40} {text:<10}".rstrip()


def _rule(title: str, fill: str) -> str:
    return f"{title:{fill}^{TABLE_WIDTH}}"


def format_table(metrics: dict) -> str:
    """The result table, laid out like vLLM's so the two are easy to compare."""
    lines = [_rule(" Serving Benchmark Result ", "="),
             _row("Successful requests:", metrics["completed"]),
             _row("Failed requests:", metrics["failed"])]
    if metrics.get("max_concurrency") is not None:
        lines.append(_row("Maximum request concurrency:", metrics["max_concurrency"]))
    if "request_rate" in metrics:
        lines.append(_row("Request rate (req/s):", metrics["request_rate"]))
    lines += [
        _row("Benchmark duration (s):", metrics["duration_s"]),
        _row("Total input tokens:", metrics["total_input_tokens"]),
        _row("Total generated tokens:", metrics["total_output_tokens"]),
        _row("Request throughput (req/s):", metrics["request_throughput"]),
        _row("Output token throughput (tok/s):", metrics["output_throughput"]),
        _row("Total token throughput (tok/s):", metrics["total_token_throughput"]),
    ]
    for name, title in LATENCY_METRICS.items():
        label = name.upper()
        lines += [_rule(title, "-"),
                  _row(f"Mean {label} (ms):", metrics[f"mean_{name}_ms"]),
                  _row(f"Median {label} (ms):", metrics[f"median_{name}_ms"]),
                  *(_row(f"P{p} {label} (ms):", metrics[f"p{p}_{name}_ms"])
                    for p in PERCENTILES)]
    lines.append("=" * TABLE_WIDTH)
    for message, count in metrics.get("errors", {}).items():
        lines.append(f"error x{count}: {message}")
    return "\n".join(lines)
