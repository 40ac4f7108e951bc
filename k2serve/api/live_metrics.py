"""What /metrics reads when it is scraped: the engines' live state (vLLM's gauge names), each
model's load state, upstream replicas' health, batches running, and whatever the layers above
add to `app.state.metrics_sources` (the platform's ledger backlog). Nothing here runs on the
engine's step: the engine keeps plain counters and this reads them."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from k2serve.telemetry.metrics import scrape_source

MetricsSource = Callable[[], Iterable]  # yields prometheus_client metric families
LOAD_STATES = ("loading", "ready", "failed")
M = ["model_name"]


class _Proxy(Collector):
    def __init__(self, source):
        self.source = source

    def collect(self):
        return self.source.collect()


class LiveCollector(Collector):
    def __init__(self, app):
        self.app = app

    def collect(self):
        state = self.app.state
        running = GaugeMetricFamily("k2serve:num_requests_running",
                                    "Sequences in the engine's running batch.", labels=M)
        waiting = GaugeMetricFamily("k2serve:num_requests_waiting",
                                    "Sequences waiting for the engine to admit them.", labels=M)
        kv = GaugeMetricFamily("k2serve:kv_cache_usage_perc",
                               "KV-cache use, 0 to 1 (1: no free block).", labels=M)
        free = GaugeMetricFamily("k2serve:engine_capacity_free",
                                 "Requests the engine would still admit (running + queued "
                                 "bound, less those held).", labels=M)
        queries = CounterMetricFamily("k2serve:prefix_cache_queries",
                                      "Prompt tokens looked up in the prefix cache.", labels=M)
        hits = CounterMetricFamily("k2serve:prefix_cache_hits",
                                   "Prompt tokens found in the prefix cache.", labels=M)
        preemptions = CounterMetricFamily("k2serve:num_preemptions",
                                          "Sequences preempted (KV cache full).", labels=M)
        load = GaugeMetricFamily("k2serve:model_load_state",
                                 "1 for the model's load state (loading, ready, failed).",
                                 labels=["model_name", "state"])
        up = GaugeMetricFamily("k2serve:upstream_replica_up",
                               "1 while an upstream replica takes requests, 0 while it is "
                               "marked down after failures.", labels=["model_name", "replica"])
        replica_busy = GaugeMetricFamily("k2serve:upstream_replica_in_flight",
                                         "Requests in flight on an upstream replica.",
                                         labels=["model_name", "replica"])
        for spec, backend in state.registry.models():
            model = spec.id
            current = backend.load_state or "ready"
            for name in LOAD_STATES:
                load.add_metric([model, name], 1.0 if name == current else 0.0)
            stats = backend.stats() if current == "ready" else None
            if not stats:
                continue
            if "running" in stats:  # our engine (k2serve.engine.async_engine.AsyncEngine.stats)
                running.add_metric([model], stats["running"])
                waiting.add_metric([model], stats["waiting"])
                total = stats.get("kv_blocks_total") or 0
                if total:
                    kv.add_metric([model], 1.0 - stats["kv_blocks_free"] / total)
                if "capacity_free" in stats:
                    free.add_metric([model], stats["capacity_free"])
                queries.add_metric([model], stats.get("prefix_cache_queries", 0))
                hits.add_metric([model], stats.get("prefix_cache_hits", 0))
                preemptions.add_metric([model], stats.get("preemptions", 0))
            for replica in stats.get("replicas", ()):  # an upstream engine's
                up.add_metric([model, replica["url"]], 1.0 if replica["up"] else 0.0)
                replica_busy.add_metric([model, replica["url"]], replica["in_flight"])
        yield from (running, waiting, kv, free, queries, hits, preemptions, load, up,
                    replica_busy)
        runner = getattr(state, "batch_runner", None)
        if runner is not None:
            batches = GaugeMetricFamily("k2serve:batches_running",
                                        "Batch jobs running in this server.")
            batches.add_metric([], runner.running)
            yield batches
        for source in getattr(state, "metrics_sources", ()):
            yield from source()


def exposition(app) -> tuple[bytes, str]:
    """The text exposition of every metric, and its content type."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Proxy(scrape_source()))
    registry.register(LiveCollector(app))
    return generate_latest(registry), CONTENT_TYPE_LATEST
