"""The benchmark's request loop: streamed requests under a load pattern -> timing records."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import random
import time
from dataclasses import dataclass

import httpx

from k2serve.bench.datasets import BenchRequest, load_requests
from k2serve.bench.metrics import RequestRecord, aggregate
from k2serve.serving.sse import sse_lines

log = logging.getLogger(__name__)

ENDPOINT_PATHS = {"chat": "/chat/completions", "completions": "/completions"}
ERROR_TEXT_LIMIT = 300  # characters of an error body kept in a record


@dataclass
class BenchConfig:
    base_url: str  # e.g. http://127.0.0.1:8000/v1
    model: str | None = None  # None: the first id from GET {base_url}/models
    endpoint: str = "chat"  # "chat" or "completions"
    dataset: str = "random"  # "random" or a JSONL path
    num_prompts: int | None = None  # None: 100 random prompts, or every line of a file
    random_input_len: int = 256
    random_output_len: int = 128
    concurrency: int | None = None  # None: no cap on requests in flight
    request_rate: float = math.inf  # mean arrivals per second (Poisson); inf: all at once
    seed: int = 0
    ignore_eos: bool = True
    api_key: str | None = None
    warmup: int = 0  # requests sent, and not measured, before the run
    timeout_s: float = 600.0  # per request, while waiting for the next bytes


# -- one request ---------------------------------------------------------------------------
def build_payload(request: BenchRequest, endpoint: str, model: str, ignore_eos: bool) -> dict:
    payload = {"model": model, "max_tokens": request.max_tokens, "temperature": 0,
               "stream": True, "stream_options": {"include_usage": True}}
    if endpoint == "chat":
        payload["messages"] = request.chat_messages()
    else:
        payload["prompt"] = request.completion_prompt()
    if ignore_eos:  # only when asked: servers without vLLM's extension may reject it
        payload["ignore_eos"] = True
    return payload


def chunk_text(chunk: dict, endpoint: str) -> str:
    """The generated text in one stream chunk ('' for role-only or usage-only chunks)."""
    choices = chunk.get("choices") or []
    if not choices:
        return ""
    if endpoint == "chat":
        return (choices[0].get("delta") or {}).get("content") or ""
    return choices[0].get("text") or ""


async def send_request(client: httpx.AsyncClient, url: str, payload: dict, endpoint: str,
                       estimated_prompt_tokens: int = 0) -> RequestRecord:
    """Stream one request and time it; any failure is recorded, never raised."""
    record = RequestRecord(success=False, prompt_tokens=estimated_prompt_tokens)
    content_chunks = 0
    reported_output_tokens = None
    start = last = time.perf_counter()
    try:
        async with client.stream("POST", url, json=payload) as response:
            if response.status_code != 200:
                body = (await response.aread()).decode("utf-8", "replace")
                record.error = f"HTTP {response.status_code}: {body[:ERROR_TEXT_LIMIT]}"
                return record
            async for line in sse_lines(response):
                if not line.startswith("data:"):
                    continue  # blank separators, SSE comments and other fields
                data = line[len("data:"):].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:  # in-band error after a 200
                    record.error = f"stream error: {json.dumps(chunk['error'])[:ERROR_TEXT_LIMIT]}"
                    return record
                if chunk_text(chunk, endpoint):
                    now = time.perf_counter()
                    if content_chunks == 0:
                        record.ttft = now - start
                    else:
                        record.itl.append(now - last)
                    last = now
                    content_chunks += 1
                usage = chunk.get("usage")
                if usage:
                    reported_output_tokens = usage.get("completion_tokens",
                                                       reported_output_tokens)
                    record.prompt_tokens = usage.get("prompt_tokens", record.prompt_tokens)
        record.latency = time.perf_counter() - start
    except Exception as exc:  # network errors, bad JSON: the run goes on without this one
        record.error = f"{type(exc).__name__}: {exc}"[:ERROR_TEXT_LIMIT]
        return record
    if content_chunks == 0:
        record.error = "the stream carried no generated text"
        return record
    record.output_tokens = (reported_output_tokens if reported_output_tokens is not None
                            else content_chunks)
    record.success = True
    return record


# -- load pattern --------------------------------------------------------------------------
def arrival_gaps(count: int, request_rate: float, seed: int) -> list[float]:
    """Seconds to wait before each request: 0 first, then exponential gaps (Poisson arrivals)."""
    if count == 0:
        return []
    if math.isinf(request_rate):
        return [0.0] * count
    if request_rate <= 0:
        raise ValueError("request rate must be positive (or inf)")
    rng = random.Random(seed)
    return [0.0] + [rng.expovariate(request_rate) for _ in range(count - 1)]


async def run_requests(client: httpx.AsyncClient, url: str, endpoint: str,
                       requests: list[tuple[dict, int]], concurrency: int | None,
                       request_rate: float, seed: int) -> tuple[list[RequestRecord], float]:
    """Send (payload, estimated prompt tokens) pairs; return their records and the duration."""
    limit = asyncio.Semaphore(concurrency) if concurrency else None

    async def one(payload: dict, estimate: int) -> RequestRecord:
        if limit is None:
            return await send_request(client, url, payload, endpoint, estimate)
        async with limit:
            return await send_request(client, url, payload, endpoint, estimate)

    start = time.perf_counter()
    tasks = []
    for gap, (payload, estimate) in zip(arrival_gaps(len(requests), request_rate, seed),
                                        requests):
        if gap:
            await asyncio.sleep(gap)
        tasks.append(asyncio.create_task(one(payload, estimate)))
    records = await asyncio.gather(*tasks)
    return list(records), time.perf_counter() - start


# -- whole benchmark -----------------------------------------------------------------------
async def first_model_id(client: httpx.AsyncClient, base_url: str) -> str:
    """GET /models answers with OpenAI's {"data": [...]} or Together's bare array."""
    response = await client.get(base_url.rstrip("/") + "/models")
    response.raise_for_status()
    body = response.json()
    models = body.get("data", []) if isinstance(body, dict) else body
    if not models:
        raise ValueError(f"{base_url}/models lists no models; pass --model")
    return models[0]["id"]


def _client(config: BenchConfig, connections: int) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    # No pool timeout: queued requests wait for a connection on purpose.
    timeout = httpx.Timeout(config.timeout_s, pool=None)
    return httpx.AsyncClient(headers=headers, limits=limits, timeout=timeout)


@dataclass
class BenchRun:
    model: str
    records: list[RequestRecord]
    duration_s: float


async def benchmark_records(config: BenchConfig) -> BenchRun:
    """Warm up, then run the measured requests; per-request records, not yet aggregated."""
    if config.endpoint not in ENDPOINT_PATHS:
        raise ValueError(f"endpoint must be one of {sorted(ENDPOINT_PATHS)}")
    bench_requests = load_requests(config.dataset, config.num_prompts, config.random_input_len,
                                   config.random_output_len, config.seed)
    connections = max(config.concurrency or len(bench_requests), config.warmup, 1)
    url = config.base_url.rstrip("/") + ENDPOINT_PATHS[config.endpoint]
    async with _client(config, connections) as client:
        model = config.model or await first_model_id(client, config.base_url)
        requests = [(build_payload(r, config.endpoint, model, config.ignore_eos),
                     r.estimated_prompt_tokens) for r in bench_requests]
        if config.warmup:
            warm = [requests[i % len(requests)] for i in range(config.warmup)]
            records, _ = await run_requests(client, url, config.endpoint, warm,
                                            config.concurrency, math.inf, config.seed)
            failed = [r.error for r in records if not r.success]
            if failed:
                log.warning("%d of %d warm-up requests failed, first: %s", len(failed),
                            len(records), failed[0])
        records, duration = await run_requests(client, url, config.endpoint, requests,
                                               config.concurrency, config.request_rate,
                                               config.seed)
    return BenchRun(model, records, duration)


async def run_benchmark_async(config: BenchConfig) -> dict:
    run = await benchmark_records(config)
    metrics = {"model": run.model, "endpoint": config.endpoint, "num_prompts": len(run.records),
               "max_concurrency": config.concurrency,
               # "inf" as a string: JSON has no infinity
               "request_rate": "inf" if math.isinf(config.request_rate) else config.request_rate}
    metrics.update(aggregate(run.records, run.duration_s))
    return metrics


def run_benchmark(config: BenchConfig) -> dict:
    """Run the benchmark to the end and return its metrics (see metrics.aggregate)."""
    return asyncio.run(run_benchmark_async(config))
