"""A full server refuses more work with 503 + retry-after; disconnects give every block back."""

from __future__ import annotations

import random
import threading
import time

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


def test_requests_refused_after_admission_leave_no_capacity_reserved(server, http):
    """Issue 12 row 2: an n=16 request refused for an out-of-vocabulary logit_bias id kept
    its 16 slots for 10 s, so 18 of them made every user's requests 503 `server_overloaded`."""
    bad = {"model": EMBEDDED_ID, "n": 16, "logit_bias": {"99999999": 1}, "max_tokens": 1,
           "messages": [{"role": "user", "content": "Hi"}]}
    statuses = [http.post("/v1/chat/completions", json=bad).status_code for _ in range(22)]
    assert statuses == [400] * 22
    ok = http.post("/v1/chat/completions", json={
        "model": EMBEDDED_ID, "max_tokens": 1, "messages": [{"role": "user", "content": "Hi"}]})
    assert ok.status_code == 200, ok.text
    stats = wait_until_idle(http)["engines"][EMBEDDED_ID]
    assert stats["reserved"] == 0 and stats["capacity_free"] == stats["capacity"], stats


# -- fairness between keys ----------------------------------------------------------------
FLOOD = 300
FAIR_ARGS = ("--max-num-seqs", "4", "--max-waiting", "16", "--threads", "1")  # capacity 20


@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory):
    """A server with two API keys, "flood" and "other"."""
    from k2serve.platform.db import Database
    from k2serve.platform.keys import KeyStore

    home = tmp_path_factory.mktemp("k2serve-fair-home")
    live = start_server(*FAIR_ARGS, env={"K2SERVE_HOME": str(home)})
    db = Database(f"sqlite:///{home}/k2serve.db", migrate=False)
    try:
        keys = {name: KeyStore(db).create(name)[1] for name in ("flood", "other")}
    finally:
        db.close()
    yield live, keys
    stop_server(live)


def test_one_key_flooding_cannot_lock_another_key_out(keyed_server):
    """300 streams from one key fill the engine (its excess: 503 while it is alone, 429 once
    another key waits); the other key's requests are admitted, not 503, and are answered
    while the flood's own requests are still queued; every slot comes back afterwards."""
    import asyncio

    live, keys = keyed_server

    def auth(name):
        return {"Authorization": f"Bearer {keys[name]}"}

    # The flood's running streams outlive the checks below (the client closes them).
    flood_body = {**LONG, "max_tokens": 1500}
    small = {"model": EMBEDDED_ID, "max_tokens": 2, "ignore_eos": True,
             "messages": [{"role": "user", "content": "Hi"}]}

    async def scenario():
        limits = httpx.Limits(max_connections=FLOOD + 20, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=live.root, timeout=120, limits=limits) as c:
            stop_running, release = asyncio.Event(), asyncio.Event()
            answered: list[int] = []

            async def engine():
                return (await c.get("/health")).json()["engines"][EMBEDDED_ID]

            async def flood_stream():
                async with c.stream("POST", "/v1/chat/completions", json=flood_body,
                                    headers=auth("flood")) as r:
                    answered.append(r.status_code)
                    if r.status_code != 200:
                        await r.aread()
                        return r.status_code, r.headers.get("retry-after")
                    lines = r.aiter_lines()
                    while not (await anext(lines)).startswith("data:"):
                        pass  # queued until its first token arrives
                    if not stop_running.is_set():
                        await stop_running.wait()  # running at the start: closed (aborted)
                    else:
                        await release.wait()  # admitted later: held until the end
                    return 200, None

            flood = [asyncio.create_task(flood_stream()) for _ in range(FLOOD)]
            while len(answered) < FLOOD:
                await asyncio.sleep(0.05)
            full = await engine()
            others = [asyncio.create_task(c.post("/v1/chat/completions", json=small,
                                                 headers=auth("other"))) for _ in range(4)]
            while (await engine())["owners"] < 2:
                await asyncio.sleep(0.05)
            excess = await c.post("/v1/chat/completions", json=small, headers=auth("flood"))
            stop_running.set()  # the flood's running streams end; its queue stays
            others = await asyncio.gather(*others)
            after = await engine()
            release.set()
            flood_results = await asyncio.gather(*flood)
            return full, flood_results, excess, others, after

    full, flood_results, excess, others, after = asyncio.run(scenario())
    statuses = sorted(s for s, _ in flood_results)
    capacity = full["capacity"]
    assert capacity == 20
    assert statuses == [200] * capacity + [503] * (FLOOD - capacity), statuses
    assert all(ra == "1" for s, ra in flood_results if s == 503)
    assert full["capacity_free"] == 0 and full["in_flight"] + full["reserved"] == capacity
    assert excess.status_code == 429, excess.text
    assert excess.json()["error"]["code"] == "too_many_concurrent_requests"
    assert excess.headers["retry-after"] == "1"
    assert [r.status_code for r in others] == [200] * 4, [r.text for r in others]
    assert after["waiting"] > 0, after  # answered ahead of the flood's queue
    with httpx.Client(base_url=live.root) as c:
        deadline = time.time() + 60
        while True:
            stats = wait_until_idle(c, timeout=60)["engines"][EMBEDDED_ID]
            if stats["in_flight"] == stats["reserved"] == 0 or time.time() > deadline:
                break
            time.sleep(0.1)
    assert stats["capacity_free"] == capacity and stats["owners"] == 0, stats
    assert stats["kv_blocks_free"] == stats["kv_blocks_total"]
