"""A full server refuses more work with 503 + retry-after; disconnects give every block back."""

from __future__ import annotations

import random
import threading

import httpx
import pytest

from tests.conftest import EMBEDDED_ID, start_server, stop_server, wait_until_idle

LONG = {"model": EMBEDDED_ID, "max_tokens": 200, "ignore_eos": True, "stream": True,
        "messages": [{"role": "user", "content": "Tell me a story."}]}


@pytest.fixture(scope="module")
def small_server():
    live = start_server("--max-num-seqs", "2", "--max-waiting", "2")
    yield live
    stop_server(live)


def test_queue_overflow_is_503_with_retry_after(small_server):
    """8 streams at once on a server that runs 2 and queues 2: 4 are refused."""
    statuses: list[int] = []
    headers: list[httpx.Headers] = []
    started = threading.Barrier(8)
    answered = threading.Barrier(8, timeout=60)  # hold every slot until all have a status
    lock = threading.Lock()

    def one():
        with httpx.Client(base_url=small_server.root, timeout=120) as c:
            started.wait()
            with c.stream("POST", "/v1/chat/completions", json=LONG) as r:
                with lock:
                    statuses.append(r.status_code)
                    headers.append(r.headers)
                answered.wait()
                if r.status_code != 200:
                    r.read()
            # leaving the block disconnects: the accepted streams are aborted

    threads = [threading.Thread(target=one) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(statuses) == [200] * 4 + [503] * 4, statuses
    refused = [h for s, h in zip(statuses, headers) if s == 503]
    assert all(h["retry-after"] == "1" for h in refused)
    with httpx.Client(base_url=small_server.root) as c:
        wait_until_idle(c)


def test_random_disconnects_give_every_block_back(server, http):
    rng = random.Random(3)

    def client(i):
        body = {"model": EMBEDDED_ID, "max_tokens": rng.randint(5, 40), "ignore_eos": True,
                "stream": rng.random() < 0.7, "temperature": 0.7,
                "messages": [{"role": "user", "content": f"Question {i}: " + "why? " * rng.randint(1, 30)}]}
        timeout = rng.choice([0.3, 1.0, 60])  # short timeouts drop the connection mid-way
        try:
            with httpx.Client(base_url=server.root, timeout=timeout) as c:
                if body["stream"]:
                    with c.stream("POST", "/v1/chat/completions", json=body) as r:
                        for n, _ in enumerate(r.iter_lines()):
                            if n == rng.randint(1, 50):
                                break
                else:
                    c.post("/v1/chat/completions", json=body)
        except httpx.TimeoutException:
            pass

    threads = [threading.Thread(target=client, args=(i,)) for i in range(30)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stats = wait_until_idle(http, timeout=60)["engines"][EMBEDDED_ID]
    assert stats["kv_blocks_free"] == stats["kv_blocks_total"]
    assert stats["in_flight"] == 0
