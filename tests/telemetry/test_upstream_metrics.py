"""An upstream engine whose replicas are down, as /metrics shows it: each failure counted
against its replica, the replicas marked down, the attempts timed (in-process app; the
replicas are loopback ports nothing listens on)."""

from __future__ import annotations

from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from k2serve.app import create_app
from k2serve.models.embedded import embedded_smollm2_gguf_path
from k2serve.serving.registry import ModelRegistry
from k2serve.serving.upstream_loader import load_upstream_model
from tests.conftest import free_port


def _samples(client: TestClient) -> list:
    r = client.get("/metrics")
    assert r.status_code == 200
    return [s for f in text_string_to_metric_families(r.text) for s in f.samples]


def _value(samples, name, **labels) -> float:
    return sum(s.value for s in samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def test_down_replicas_are_counted_and_shown_down():
    urls = [f"http://127.0.0.1:{free_port()}/v1" for _ in range(2)]
    registry = ModelRegistry()
    registry.register(*load_upstream_model("up-model", urls, str(embedded_smollm2_gguf_path()),
                                           context_length=2048))
    with TestClient(create_app(registry)) as client:
        before = _samples(client)
        assert all(_value(before, "k2serve:upstream_replica_up", model_name="up-model",
                          replica=url) == 1 for url in urls)
        r = client.post("/v1/completions", json={"model": "up-model", "prompt": "Hi",
                                                 "max_tokens": 2})
        assert r.status_code >= 500 and r.json()["error"]
        after = _samples(client)
    for url in urls:  # tried once each (the request goes to a second replica, no further)
        labels = {"model_name": "up-model", "replica": url}
        assert _value(after, "k2serve:upstream_failures_total", **labels) - \
            _value(before, "k2serve:upstream_failures_total", **labels) == 1
        assert _value(after, "k2serve:upstream_replica_up", **labels) == 0
        assert _value(after, "k2serve:upstream_request_duration_seconds_count", **labels,
                      outcome="error") >= 1
    assert _value(after, "k2serve:http_requests_total", model_name="up-model",
                  endpoint="/v1/completions", status=str(r.status_code)) == 1
