"""The model runs off the event loop; disconnects stop generation; tokens really stream."""

from __future__ import annotations

import json
import threading
import time

import httpx

from tests.conftest import EMBEDDED_ID, wait_until_idle

LONG = {"model": EMBEDDED_ID, "max_tokens": 400, "ignore_eos": True, "temperature": 0.8,
        "messages": [{"role": "user", "content": "Write a very long story."}]}


def test_models_answers_while_a_long_generation_runs(server, http):
    result = {}

    def long_request():
        with httpx.Client(base_url=server.root, timeout=300) as c:
            result["reply"] = c.post("/v1/chat/completions", json={**LONG, "max_tokens": 120})

    worker = threading.Thread(target=long_request)
    worker.start()
    try:
        # Wait until the engine is busy with it, then time a /v1/models call.
        deadline = time.time() + 30
        while time.time() < deadline:
            if http.get("/health").json()["engines"][EMBEDDED_ID]["running"]:
                break
            time.sleep(0.05)
        else:
            raise AssertionError("the long request never started")
        start = time.perf_counter()
        r = http.get("/v1/models")
        elapsed = time.perf_counter() - start
        assert r.status_code == 200
        assert http.get("/health").json()["engines"][EMBEDDED_ID]["running"] == 1, \
            "generation should still be running while /v1/models answered"
        assert elapsed < 1.0, f"/v1/models took {elapsed:.2f}s during generation"
    finally:
        worker.join()
    assert result["reply"].json()["usage"]["completion_tokens"] == 120


def test_tokens_arrive_as_they_are_produced(server):
    arrivals = []
    with httpx.Client(base_url=server.root, timeout=120) as c:
        sent = time.perf_counter()
        with c.stream("POST", "/v1/chat/completions",
                      json={**LONG, "max_tokens": 100, "stream": True}) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    arrivals.append(time.perf_counter())
    assert len(arrivals) >= 50
    # Streamed, not buffered: the chunks are spread over most of the request's time (buffered,
    # they would all come at its end), whatever the decode speed.
    spread, total = arrivals[-1] - arrivals[0], arrivals[-1] - sent
    assert spread > 0.5 * total, f"chunks arrived within {spread:.3f} s of a {total:.3f} s request"


def test_stream_disconnect_stops_generation(server, http):
    with httpx.Client(base_url=server.root, timeout=120) as c:
        with c.stream("POST", "/v1/chat/completions", json={**LONG, "stream": True}) as r:
            seen = 0
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    seen += 1
                if seen == 3:
                    break  # leaving the block closes the connection mid-stream
    wait_until_idle(http, timeout=10)


def test_non_streaming_disconnect_stops_generation(server, http):
    def give_up_early():
        try:
            with httpx.Client(base_url=server.root, timeout=1.5) as c:
                c.post("/v1/chat/completions", json=LONG)
        except httpx.TimeoutException:
            pass

    give_up_early()
    wait_until_idle(http, timeout=10)


def test_concurrent_requests_all_complete(server):
    replies = [None] * 6

    def one(i):
        with httpx.Client(base_url=server.root, timeout=300) as c:
            replies[i] = c.post("/v1/completions", json={
                "model": EMBEDDED_ID, "prompt": f"Fact number {i}:", "max_tokens": 6,
                "temperature": 0, "ignore_eos": True})

    threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, r in enumerate(replies):
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 6
        alone = json.loads(httpx.post(server.base_v1 + "/completions", json={
            "model": EMBEDDED_ID, "prompt": f"Fact number {i}:", "max_tokens": 6,
            "temperature": 0, "ignore_eos": True}, timeout=120).text)
        assert alone["choices"][0]["text"] == r.json()["choices"][0]["text"]
