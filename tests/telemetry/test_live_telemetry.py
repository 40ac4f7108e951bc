"""A real `k2serve serve` seen as an operator sees it: /metrics scraped while the official
openai SDK sends requests (the counters move by what the replies report), its spans received
by a real OTLP/HTTP receiver on loopback, its JSON log lines, and `k2serve top --once`.

One server for the module (open mode first, then keys), with tracing and JSON logs on.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from k2serve.platform.db import Database
from k2serve.platform.keys import KeyStore
from tests.conftest import EMBEDDED_ID, start_server, stop_server, wait_until_idle
from tests.telemetry.otlp_receiver import OtlpReceiver

SAFETY_ID = "irfanalidv/toxic-comment-classifier"
# Long enough to fill several 16-token KV blocks: a second request finds them cached.
SYSTEM = ("You are a concise assistant for a museum of natural history. Answer visitors' "
          "questions about the exhibits, the opening hours and the café in one sentence. ") * 3


@pytest.fixture(scope="module")
def receiver():
    r = OtlpReceiver()
    yield r
    r.close()


@pytest.fixture(scope="module")
def live(receiver):
    home = tempfile.mkdtemp(prefix="k2serve-telemetry-")
    output: list[str] = []
    server = start_server(
        "--families", "chat,moderation", "--threads", "1",
        "--log-format", "json", "--log-level", "info",
        env={"K2SERVE_HOME": home, "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
             "OTEL_BSP_SCHEDULE_DELAY": "100", "OMP_NUM_THREADS": "1"},
        output=output)
    server.output = output
    server.home = home
    yield server
    stop_server(server)
    shutil.rmtree(home, ignore_errors=True)


def scrape(server, key: str | None = None) -> list:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    r = httpx.get(server.root + "/metrics", headers=headers, timeout=30)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    return [s for family in text_string_to_metric_families(r.text) for s in family.samples]


def value(samples: list, name: str, **labels: str) -> float:
    """The sum of the samples named `name` whose labels include `labels`."""
    return sum(s.value for s in samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def delta(before: list, after: list, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def test_metrics_move_by_what_the_replies_report(live):
    client = openai.OpenAI(base_url=live.base_v1, api_key="open-mode", max_retries=0)
    messages = [{"role": "system", "content": SYSTEM},
                {"role": "user", "content": "When does the museum open?"}]
    m = {"model_name": EMBEDDED_ID}

    before = scrape(live)
    reply = client.chat.completions.create(model=EMBEDDED_ID, messages=messages, max_tokens=6)
    after = scrape(live)
    usage = reply.usage
    assert delta(before, after, "k2serve:prompt_tokens_total", **m) == usage.prompt_tokens
    assert delta(before, after, "k2serve:generation_tokens_total", **m) == \
        usage.completion_tokens
    assert delta(before, after, "k2serve:prefix_cache_queries_total", **m) == \
        usage.prompt_tokens
    assert delta(before, after, "k2serve:time_to_first_token_seconds_count", **m) == 1
    assert delta(before, after, "k2serve:e2e_request_latency_seconds_count", **m) == 1
    assert delta(before, after, "k2serve:request_queue_time_seconds_count", **m) == 1
    assert delta(before, after, "k2serve:request_success_total", **m,
                 finished_reason=reply.choices[0].finish_reason) == 1
    assert delta(before, after, "k2serve:http_requests_total", **m, method="POST",
                 endpoint="/v1/chat/completions", status="200") == 1
    # The end-to-end time covers the first token.
    assert delta(before, after, "k2serve:e2e_request_latency_seconds_sum", **m) >= \
        delta(before, after, "k2serve:time_to_first_token_seconds_sum", **m) > 0

    # The same prompt again, streamed: its prefix comes from the cache.
    before = after
    stream = client.chat.completions.create(model=EMBEDDED_ID, messages=messages, max_tokens=6,
                                            stream=True, stream_options={"include_usage": True})
    usage = [chunk.usage for chunk in stream if chunk.usage is not None][-1]
    after = scrape(live)
    cached = usage.prompt_tokens_details.cached_tokens
    assert cached >= 32
    assert delta(before, after, "k2serve:cached_prompt_tokens_total", **m) == cached
    assert delta(before, after, "k2serve:prefix_cache_hits_total", **m) == cached
    # One gap between each two consecutive tokens of the stream.
    assert delta(before, after, "k2serve:inter_token_latency_seconds_count", **m) == \
        usage.completion_tokens - 1

    # A refusal is counted by its status; the model label never takes a client's string.
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=messages, max_tokens=1)
    final = scrape(live)
    assert delta(after, final, "k2serve:http_requests_total", model_name="",
                 endpoint="/v1/chat/completions", status="404") == 1
    assert not any(s.labels.get("model_name") == "no-such-model" for s in final)

    # Idle engine, read at scrape time.
    wait_until_idle(httpx.Client(base_url=live.root))
    idle = scrape(live)
    assert value(idle, "k2serve:num_requests_running", **m) == 0
    assert value(idle, "k2serve:num_requests_waiting", **m) == 0
    assert 0 <= value(idle, "k2serve:kv_cache_usage_perc", **m) < 1
    assert value(idle, "k2serve:model_load_state", **m, state="ready") == 1
    assert value(idle, "k2serve:ledger_write_lag_seconds_count") >= 3


def test_one_request_traced_end_to_end_with_its_id(live, receiver):
    request_id = f"trace-{uuid.uuid4().hex[:12]}"
    client = openai.OpenAI(base_url=live.base_v1, api_key="open-mode", max_retries=0,
                           default_headers={"x-request-id": request_id}, timeout=300)
    schema = {"type": "object", "properties": {"answer": {"type": "string"}},
              "required": ["answer"], "additionalProperties": False}
    reply = client.chat.completions.create(
        model=EMBEDDED_ID, max_tokens=12,
        messages=[{"role": "user", "content": "Name a museum."}],
        response_format={"type": "json_schema",
                         "json_schema": {"name": "reply", "schema": schema}},
        extra_body={"safety_model": SAFETY_ID})
    assert reply.usage.completion_tokens > 0

    def ours(spans):
        return [s for s in spans if s["attributes"].get("k2serve.request_id") == request_id]

    spans = ours(receiver.wait_for(lambda got: any(s["name"] == "decode" for s in ours(got))
                                   and any(s["name"] == "request" for s in ours(got))))
    names = {s["name"] for s in spans}
    assert {"request", "admission", "ledger write", "grammar compile", "safety check", "queue",
            "prefill", "decode"} <= names, names
    traces = {s["trace_id"] for s in spans}
    assert len(traces) == 1
    # Every span of the request's trace carries its id, the framework's own included.
    whole_trace = [s for s in receiver.spans if s["trace_id"] in traces]
    assert all(s["attributes"].get("k2serve.request_id") == request_id for s in whole_trace)
    by_name = {s["name"]: s for s in spans}
    root = by_name["request"]
    for phase in ("queue", "prefill", "decode", "admission", "grammar compile"):
        assert root["start_ns"] <= by_name[phase]["start_ns"] <= by_name[phase]["end_ns"]
    assert by_name["queue"]["end_ns"] <= by_name["prefill"]["end_ns"] <= \
        by_name["decode"]["end_ns"]
    assert by_name["decode"]["attributes"]["k2serve.completion_tokens"] == \
        reply.usage.completion_tokens
    assert root["resource"]["service.name"] == "k2serve"
    assert root["attributes"]["http.response.status_code"] == 200

    # JSON log lines: every line about this request parses and names it.
    lines = [line for line in list(live.output) if request_id in line]
    assert lines
    docs = [json.loads(line) for line in lines]
    assert all(doc["request_id"] == request_id for doc in docs)
    usage_lines = [d for d in docs if d.get("logger") == "k2serve.requests"
                   and d.get("endpoint") == "chat.completions"]
    assert usage_lines and usage_lines[-1]["completion_tokens"] == reply.usage.completion_tokens


@pytest.fixture(scope="module")
def keys(live):
    db = Database(f"sqlite:///{live.home}/k2serve.db", migrate=False)
    try:
        store = KeyStore(db)
        return {"admin": store.create("ops", admin=True)[1],
                "user": store.create("limited", rpm=2)[1]}
    finally:
        db.close()


def test_metrics_need_an_admin_key_and_count_each_keys_use(live, keys):
    anonymous = httpx.get(live.root + "/metrics", timeout=30)
    assert anonymous.status_code == 401
    assert anonymous.json()["error"]["code"] == "missing_api_key"
    user = httpx.get(live.root + "/metrics", timeout=30,
                     headers={"authorization": f"Bearer {keys['user']}"})
    assert user.status_code == 403 and user.json()["error"]["code"] == "admin_key_required"

    before = scrape(live, keys["admin"])
    client = openai.OpenAI(base_url=live.base_v1, api_key=keys["user"], max_retries=0)
    replies = [client.completions.create(model=EMBEDDED_ID, prompt="Hello", max_tokens=2)
               for _ in range(2)]
    with pytest.raises(openai.RateLimitError):
        client.completions.create(model=EMBEDDED_ID, prompt="Hello", max_tokens=2)
    after = scrape(live, keys["admin"])
    assert delta(before, after, "k2serve:key_requests_total", key="limited") == 3
    assert delta(before, after, "k2serve:key_tokens_total", key="limited") == \
        sum(r.usage.total_tokens for r in replies)
    assert delta(before, after, "k2serve:rate_limited_requests_total", key="limited",
                 code="rate_limit_exceeded") == 1
    assert delta(before, after, "k2serve:http_requests_total",
                 endpoint="/v1/completions", status="429") == 1
    assert value(after, "k2serve:key_rate_limit", key="limited", kind="rpm") == 2


def test_top_prints_one_frame(live, keys):
    command = [sys.executable, "-m", "k2serve.cli", "top", "--url", live.root, "--once",
               "--interval", "0.2"]
    env = {k: v for k, v in os.environ.items() if k != "K2SERVE_API_KEY"}
    refused = subprocess.run(command, capture_output=True, text=True, timeout=60, env=env)
    assert refused.returncode == 1 and "admin key" in refused.stderr

    frame = subprocess.run(command + ["--api-key", keys["admin"]], capture_output=True,
                           text=True, timeout=60, env=env)
    assert frame.returncode == 0, frame.stderr
    out = frame.stdout
    assert EMBEDDED_ID in out and "ready" in out
    key_row = next(line for line in out.splitlines() if "limited" in line)
    # key, req/min, RPM limit, tokens/min, TPM limit (none), 429s, requests, tokens
    cells = [c.strip() for c in key_row.strip("│ ").split("│")]
    now = scrape(live, keys["admin"])
    assert cells[0] == "limited" and cells[2] == "2" and cells[4] == "—" and cells[5] == "1"
    assert cells[6] == f"{value(now, 'k2serve:key_requests_total', key='limited'):.0f}"
    assert cells[7] == f"{value(now, 'k2serve:key_tokens_total', key='limited'):.0f}"


def test_the_dashboard_reads_only_metrics_the_server_exports(live, keys):
    """docs/grafana-k2serve.json: every metric a panel queries is one /metrics declares."""
    dashboard = json.loads((Path(__file__).parents[2] / "docs" / "grafana-k2serve.json")
                           .read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", ())]
    queried = {re.sub(r"_(bucket|sum|count)$", "", name).removesuffix("_total")
               for e in exprs for name in re.findall(r"k2serve:[a-z0-9_]+", e)}
    r = httpx.get(live.root + "/metrics", timeout=30,
                  headers={"authorization": f"Bearer {keys['admin']}"})
    declared = {family.name for family in text_string_to_metric_families(r.text)}
    assert len(queried) > 25
    assert queried <= declared, queried - declared
