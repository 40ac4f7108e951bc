"""`k2serve bench` client: stream timing, failures and load shaping against a scripted SSE
server, then one small run against the real `k2serve serve` (the session `server` fixture)."""

from __future__ import annotations

import asyncio
import json
import math
import threading
import time

import httpx
import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from k2serve.bench.client import (BenchConfig, arrival_gaps, benchmark_records, run_benchmark,
                                  run_requests, send_request)
from k2serve.bench.datasets import file_requests, random_requests
from k2serve.cli import main
from tests.conftest import free_port

FIRST_TOKEN_DELAY = 0.05  # seconds the fake server waits before its first content chunk
TOKEN_DELAY = 0.02  # ... and between later ones


# -- a scripted SSE server -------------------------------------------------------------------
class FakeServer:
    """Streams one word per token; the prompt text picks a behaviour: 'fail' (HTTP 500),
    'inband' (error chunk after a 200), 'nousage' (no usage chunk)."""

    def __init__(self, bare_model_list: bool = False):
        self.payloads: list[dict] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.bare_model_list = bare_model_list
        self.app = self._build_app()
        self.port = free_port()
        self.base_v1 = f"http://127.0.0.1:{self.port}/v1"

    def _build_app(self) -> FastAPI:
        app = FastAPI()

        @app.get("/v1/models")
        async def models():
            listing = [{"id": "fake-model", "object": "model"}]
            return JSONResponse(listing if self.bare_model_list
                                else {"object": "list", "data": listing})

        @app.post("/v1/chat/completions")
        async def chat(request: Request):
            return await self._respond(await request.json(), chat=True)

        @app.post("/v1/completions")
        async def completions(request: Request):
            return await self._respond(await request.json(), chat=False)

        return app

    async def _respond(self, payload: dict, chat: bool):
        self.payloads.append(payload)
        text = payload["messages"][-1]["content"] if chat else payload["prompt"]
        if "fail" in text:
            return JSONResponse({"error": {"message": "boom"}}, status_code=500)
        return StreamingResponse(self._stream(payload, text, chat),
                                 media_type="text/event-stream")

    async def _stream(self, payload: dict, text: str, chat: bool):
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)

        def chunk(content: str, usage=None) -> str:
            choice = ({"index": 0, "delta": {"role": "assistant", "content": content}} if chat
                      else {"index": 0, "text": content})
            return f"data: {json.dumps({'choices': [choice], 'usage': usage})}\n\n"

        yield ": keep-alive comment, to be skipped\n\n"
        yield chunk("")  # role-only chunk: must not count as the first token
        await asyncio.sleep(FIRST_TOKEN_DELAY)
        if "inband" in text:
            self.in_flight -= 1
            yield 'data: {"error": {"message": "engine died"}}\n\n'
            yield "data: [DONE]\n\n"
            return
        count = payload["max_tokens"]
        for i in range(count):
            if i:
                await asyncio.sleep(TOKEN_DELAY)
            yield chunk(f" w{i}")
        if "nousage" not in text:  # OpenAI-style usage-only final chunk
            usage = {"prompt_tokens": 11, "completion_tokens": count, "total_tokens": 11 + count}
            yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n"
        # Leave before [DONE]: the client may start its next request as soon as it reads it.
        self.in_flight -= 1
        yield "data: [DONE]\n\n"


@pytest.fixture()
def fake():
    yield from _serve(FakeServer())


@pytest.fixture()
def fake_bare_models():
    yield from _serve(FakeServer(bare_model_list=True))


def _serve(fake: FakeServer):
    server = uvicorn.Server(uvicorn.Config(fake.app, host="127.0.0.1", port=fake.port,
                                           log_level="error", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 10
    while not server.started:
        assert time.time() < deadline, "fake server did not start"
        time.sleep(0.01)
    yield fake
    server.should_exit = True
    thread.join(timeout=10)


def _send(fake: FakeServer, text: str, max_tokens: int = 4, endpoint: str = "chat"):
    async def go():
        async with httpx.AsyncClient() as client:
            if endpoint == "chat":
                payload = {"model": "m", "messages": [{"role": "user", "content": text}]}
                url = fake.base_v1 + "/chat/completions"
            else:
                payload = {"model": "m", "prompt": text}
                url = fake.base_v1 + "/completions"
            payload["max_tokens"] = max_tokens
            return await send_request(client, url, payload, endpoint, estimated_prompt_tokens=3)
    return asyncio.run(go())


# -- one request -----------------------------------------------------------------------------
@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_stream_is_timed_from_content_chunks(fake, endpoint):
    record = _send(fake, "hello", max_tokens=4, endpoint=endpoint)
    assert record.success, record.error
    assert record.output_tokens == 4 and record.prompt_tokens == 11  # from usage
    assert record.ttft >= FIRST_TOKEN_DELAY  # the empty role chunk came earlier
    assert len(record.itl) == 3
    # Single gaps can shrink when a loaded client reads two chunks at once; their sum
    # (first to last content chunk) cannot be shorter than the server's pauses.
    assert record.ttft + sum(record.itl) >= FIRST_TOKEN_DELAY + 3 * TOKEN_DELAY
    assert record.latency >= record.ttft + sum(record.itl) - 1e-6
    assert record.tpot == pytest.approx((record.latency - record.ttft) / 3)


def test_without_usage_output_tokens_are_content_chunks(fake):
    record = _send(fake, "nousage", max_tokens=5)
    assert record.success
    assert record.output_tokens == 5 and record.prompt_tokens == 3  # the estimate


def test_http_error_is_recorded(fake):
    record = _send(fake, "fail")
    assert not record.success and record.error.startswith("HTTP 500:")
    assert "boom" in record.error


def test_in_band_error_is_recorded(fake):
    record = _send(fake, "inband")
    assert not record.success and "engine died" in record.error


def test_unreachable_server_is_recorded():
    async def go():
        async with httpx.AsyncClient() as client:
            url = f"http://127.0.0.1:{free_port()}/v1/chat/completions"
            return await send_request(client, url, {"model": "m"}, "chat")
    record = asyncio.run(go())
    assert not record.success and "ConnectError" in record.error


# -- load shaping ----------------------------------------------------------------------------
def test_concurrency_caps_requests_in_flight(fake):
    async def go():
        async with httpx.AsyncClient() as client:
            payloads = [({"model": "m", "max_tokens": 3,
                          "messages": [{"role": "user", "content": f"p{i}"}]}, 0)
                        for i in range(6)]
            return await run_requests(client, fake.base_v1 + "/chat/completions", "chat",
                                      payloads, concurrency=2, request_rate=math.inf, seed=0)
    records, duration = asyncio.run(go())
    assert all(r.success for r in records) and len(records) == 6
    assert fake.max_in_flight == 2
    # Three waves of (first-token delay + 2 token gaps) at the least.
    assert duration >= 3 * (FIRST_TOKEN_DELAY + 2 * TOKEN_DELAY)


def test_poisson_gaps_are_seeded_exponential():
    gaps = arrival_gaps(2000, request_rate=4.0, seed=7)
    assert gaps[0] == 0.0 and all(g > 0 for g in gaps[1:])
    assert gaps == arrival_gaps(2000, request_rate=4.0, seed=7)
    assert gaps != arrival_gaps(2000, request_rate=4.0, seed=8)
    assert sum(gaps[1:]) / 1999 == pytest.approx(0.25, rel=0.1)  # mean gap 1 / rate
    assert arrival_gaps(3, math.inf, seed=0) == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError):
        arrival_gaps(3, 0.0, seed=0)


# -- prompt sources --------------------------------------------------------------------------
def test_random_prompts_are_seeded_and_distinct():
    first = random_requests(5, input_len=12, output_len=7, seed=1)
    assert [r.prompt for r in first] == [r.prompt for r in random_requests(5, 12, 7, seed=1)]
    assert len({r.prompt for r in first}) == 5
    assert all(len(r.prompt.split()) == 12 and r.max_tokens == 7 for r in first)


def test_jsonl_prompts(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "one two three", "max_tokens": 3}\n\n'
                    '{"messages": [{"role": "user", "content": "hi there"}]}\n')
    requests = file_requests(path, num_prompts=3, default_output_len=9)
    assert [r.max_tokens for r in requests] == [3, 9, 3]  # lines repeat in order
    assert requests[0].completion_prompt() == "one two three"
    assert requests[1].chat_messages() == [{"role": "user", "content": "hi there"}]
    assert requests[0].chat_messages() == [{"role": "user", "content": "one two three"}]
    with pytest.raises(ValueError, match="completions endpoint"):
        requests[1].completion_prompt()
    (tmp_path / "bad.jsonl").write_text('{"text": "no prompt"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        file_requests(tmp_path / "bad.jsonl", None, 9)


# -- whole runs against the fake -------------------------------------------------------------
def test_run_benchmark_with_warmup_and_rate(fake):
    metrics = run_benchmark(BenchConfig(base_url=fake.base_v1, num_prompts=4,
                                        random_input_len=5, random_output_len=3,
                                        request_rate=50.0, warmup=2))
    assert metrics["model"] == "fake-model"  # the first id from GET /models
    assert (metrics["completed"], metrics["failed"]) == (4, 0)
    assert metrics["total_output_tokens"] == 12 and metrics["total_input_tokens"] == 44
    assert metrics["request_rate"] == 50.0
    assert len(fake.payloads) == 6  # two warm-up requests, not counted
    sent = fake.payloads[-1]
    assert sent["stream"] is True and sent["temperature"] == 0 and sent["ignore_eos"] is True
    assert sent["max_tokens"] == 3 and sent["model"] == "fake-model"
    assert len(sent["messages"][0]["content"].split()) == 5
    assert metrics["mean_ttft_ms"] >= FIRST_TOKEN_DELAY * 1000
    assert metrics["mean_e2el_ms"] >= (FIRST_TOKEN_DELAY + 2 * TOKEN_DELAY) * 1000


def test_cli_on_file_dataset_with_failures(fake_bare_models, tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "fine", "max_tokens": 2}\n{"prompt": "fail"}\n')
    out = tmp_path / "m.json"
    code = main(["bench", "--base-url", fake_bare_models.base_v1, "--endpoint", "completions",
                 "--dataset", str(prompts), "--no-ignore-eos", "--json-out", str(out)])
    assert code == 1  # a request failed
    metrics = json.loads(out.read_text())
    assert (metrics["completed"], metrics["failed"]) == (1, 1)
    assert metrics["model"] == "fake-model"  # from Together's bare-array model list
    assert "ignore_eos" not in fake_bare_models.payloads[0]
    table = capsys.readouterr().out
    assert "Failed requests:                         1" in table
    assert "error x1: HTTP 500:" in table


def test_cli_reports_an_unreachable_server(capsys):
    code = main(["bench", "--base-url", f"http://127.0.0.1:{free_port()}/v1",
                 "--num-prompts", "1"])
    assert code == 2
    assert "ConnectError" in capsys.readouterr().err


# -- the real server -------------------------------------------------------------------------
def test_real_server_records(server):
    config = BenchConfig(base_url=server.base_v1, num_prompts=4, random_input_len=16,
                         random_output_len=8, concurrency=2, seed=0)
    run = asyncio.run(benchmark_records(config))
    assert run.model == server.model
    assert [r.error for r in run.records] == [""] * 4
    assert [r.output_tokens for r in run.records] == [8] * 4  # ignore_eos: full length
    for record in run.records:
        assert 0 < record.ttft <= record.latency
        assert record.prompt_tokens > 16  # the server's count includes the chat template


def test_real_server_cli(server, tmp_path, capsys):
    out = tmp_path / "metrics.json"
    code = main(["bench", "--base-url", server.base_v1, "--endpoint", "completions",
                 "--num-prompts", "2", "--random-input-len", "16", "--random-output-len", "4",
                 "--concurrency", "2", "--json-out", str(out)])
    assert code == 0
    metrics = json.loads(out.read_text())
    assert (metrics["completed"], metrics["failed"]) == (2, 0)
    assert metrics["total_output_tokens"] == 8
    assert metrics["mean_ttft_ms"] <= metrics["mean_e2el_ms"]
    assert metrics["output_throughput"] > 0
    assert "Successful requests:                     2" in capsys.readouterr().out
