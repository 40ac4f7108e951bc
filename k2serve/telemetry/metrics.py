"""The server's Prometheus metrics, defined once.

Names follow vLLM's where the meaning is the same (`vllm:x` -> `k2serve:x`, label
`model_name`), so a vLLM dashboard works with the prefix changed; the rest are k2serve's own.
Counters and histograms here are updated where things happen (a request ends, a row lands);
gauges of live state (queue depths, KV-cache use, load state) are not kept here at all: the
/metrics route reads them from the engine when it is scraped (k2serve.api.live_metrics), so
the decode loop pays nothing for them.

One process: the default registry. Several processes behind one port (not how `k2serve
serve` runs: the engine lives in its process) would set PROMETHEUS_MULTIPROC_DIR to an empty
per-run directory before start-up: prometheus_client then keeps these values in files there
and `scrape_source` sums them over the processes (live gauges stay per process).
"""

from __future__ import annotations

import os

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

disable_created_metrics()  # no `_created` twin of every series (vLLM leaves them out too)

# vLLM's buckets (vllm/v1/metrics/loggers.py), so its dashboards' quantiles read the same.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
               7.5, 10.0, 20.0, 40.0, 80.0)
LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                   60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)
HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                120.0, 300.0)
TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000,
                 100000, 200000)

M = "model_name"

# -- HTTP (every request, by the middleware: k2serve.api.http_metrics) ---------------------
HTTP_REQUESTS = Counter("k2serve:http_requests", "HTTP requests answered, by route and status.",
                        [M, "endpoint", "method", "status"])
HTTP_LATENCY = Histogram("k2serve:http_request_duration_seconds",
                         "Time from a request's arrival to its reply's last byte.",
                         [M, "endpoint"], buckets=HTTP_BUCKETS)

# -- requests that ran a model (their usage record: k2serve.api.request_metrics) -------------
PROMPT_TOKENS = Counter("k2serve:prompt_tokens", "Prefill tokens processed.", [M])
GENERATION_TOKENS = Counter("k2serve:generation_tokens", "Generation tokens produced.", [M])
CACHED_PROMPT_TOKENS = Counter("k2serve:cached_prompt_tokens",
                               "Prompt tokens served from the prefix cache (billed as cached).",
                               [M])
REQUEST_SUCCESS = Counter("k2serve:request_success", "Requests finished, by finish reason.",
                          [M, "finished_reason"])
TTFT = Histogram("k2serve:time_to_first_token_seconds", "Time to the first generated token.",
                 [M], buckets=TTFT_BUCKETS)
INTER_TOKEN = Histogram("k2serve:inter_token_latency_seconds",
                        "Time between a choice's consecutive tokens.", [M], buckets=ITL_BUCKETS)
TPOT = Histogram("k2serve:request_time_per_output_token_seconds",
                 "A request's mean time per output token after the first.", [M],
                 buckets=ITL_BUCKETS)
E2E = Histogram("k2serve:e2e_request_latency_seconds", "A request's whole generation time.",
                [M], buckets=LATENCY_BUCKETS)
QUEUE_TIME = Histogram("k2serve:request_queue_time_seconds",
                       "Time a request waited before the engine first scheduled it.", [M],
                       buckets=LATENCY_BUCKETS)
PREFILL_TIME = Histogram("k2serve:request_prefill_time_seconds",
                         "Time from first scheduled to the first token.", [M],
                         buckets=LATENCY_BUCKETS)
DECODE_TIME = Histogram("k2serve:request_decode_time_seconds",
                        "Time from the first token to the last.", [M], buckets=LATENCY_BUCKETS)
REQUEST_PROMPT_TOKENS = Histogram("k2serve:request_prompt_tokens", "Prompt tokens per request.",
                                  [M], buckets=TOKEN_BUCKETS)
REQUEST_GENERATION_TOKENS = Histogram("k2serve:request_generation_tokens",
                                      "Generated tokens per request.", [M],
                                      buckets=TOKEN_BUCKETS)

# -- the platform: keys, rate limits, the ledger --------------------------------------------
KEY_REQUESTS = Counter("k2serve:key_requests", "Requests per API key (rate: its RPM).",
                       ["key"])
KEY_TOKENS = Counter("k2serve:key_tokens",
                     "Tokens billed per API key, prompt + completion (rate: its TPM).", ["key"])
KEY_LIMIT = Gauge("k2serve:key_rate_limit", "An API key's limit per minute (kind rpm or tpm).",
                  ["key", "kind"], multiprocess_mode="max")
RATE_LIMITED = Counter("k2serve:rate_limited_requests",
                       "Requests answered 429, by key and error code.", ["key", "code"])
LEDGER_LAG = Histogram("k2serve:ledger_write_lag_seconds",
                       "Time from a ledger write being queued to its commit.",
                       buckets=HTTP_BUCKETS)
LEDGER_SET_ASIDE = Counter("k2serve:ledger_rows_set_aside",
                           "Ledger writes the database kept refusing (logged in full).")

# -- upstream engines (k2serve.serving.upstream) --------------------------------------------
UPSTREAM_LATENCY = Histogram("k2serve:upstream_request_duration_seconds",
                             "Time an upstream replica took over one generation, by outcome.",
                             [M, "replica", "outcome"], buckets=LATENCY_BUCKETS)
UPSTREAM_FAILURES = Counter("k2serve:upstream_failures",
                            "Upstream replica failures (each marks it down for a while).",
                            [M, "replica"])

# -- batch jobs (k2serve.api.batch_runner) ---------------------------------------------------
BATCH_LINES = Counter("k2serve:batch_lines", "Batch lines run, by outcome (ok or error).",
                      ["outcome"])


def scrape_source():
    """What /metrics exposes of the values above: this process's registry, or, in
    multiprocess mode, every process's files summed."""
    directory = os.environ.get(MULTIPROC_ENV)
    if not directory:
        return REGISTRY
    from prometheus_client import multiprocess

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=directory)
    return registry
