"""The sliding-window limiter, in memory and in a real Redis (shared by two instances)."""

from __future__ import annotations

import asyncio
import random
import uuid

import pytest

from k2serve.platform.ratelimit import (
    Decision,
    MemoryRateLimiter,
    MemoryRetryStore,
    RedisRateLimiter,
    RedisRetryStore,
    go_duration,
)
from tests.platform.conftest import redis_url


def make_limiter(kind: str, window: float):
    if kind == "memory":
        return MemoryRateLimiter(window)
    return RedisRateLimiter(redis_url(), window, namespace="k2test-" + uuid.uuid4().hex[:8])


def test_go_durations_and_headers():
    assert go_duration(0) == "0s"
    assert go_duration(0.0124) == "12ms"
    assert go_duration(6) == "6s"
    assert go_duration(59.8154) == "59.815s"
    assert go_duration(60) == "1m0s"
    assert go_duration(61.5) == "1m1.5s"
    d = Decision(False, 0.0, None, rpm=10, tpm=100, requests_used=10, tokens_used=40,
                 reset_requests_s=12.2, reset_tokens_s=3.0, retry_after_s=12.2,
                 reason="requests")
    h = d.headers()
    assert h["x-ratelimit-limit"] == "10" and h["x-ratelimit-remaining"] == "0"
    assert h["x-ratelimit-reset"] == "13" and h["x-ratelimit-reset-requests"] == "12.2s"
    assert h["x-tokenlimit-limit"] == "100" and h["x-tokenlimit-remaining"] == "60"
    assert h["x-ratelimit-remaining-tokens"] == "60" and h["x-ratelimit-reset-tokens"] == "3s"
    assert h["retry-after"] == "13" and h["retry-after-ms"] == "12200"
    only_tpm = Decision(True, 0.0, "e", None, 50, 1, 5, 1.0, 1.0).headers()
    assert "x-ratelimit-limit" not in only_tpm and only_tpm["x-tokenlimit-remaining"] == "45"
    assert "retry-after" not in only_tpm


@pytest.mark.parametrize("kind", ["memory", "redis"])
def test_requests_per_window(kind):
    async def run():
        limiter = make_limiter(kind, 1.0)
        got = [await limiter.acquire("k", 3, None, 1) for _ in range(4)]
        assert [d.allowed for d in got] == [True, True, True, False]
        assert [d.remaining_requests for d in got[:3]] == [2, 1, 0]
        denied = got[3]
        assert denied.reason == "requests" and 0 < denied.retry_after_s <= 1.0
        assert denied.headers()["retry-after"] == "1"
        await asyncio.sleep(denied.retry_after_s + 0.05)
        again = await limiter.acquire("k", 3, None, 1)
        assert again.allowed
        assert (await limiter.acquire("other", 3, None, 1)).allowed  # keys are separate
        await limiter.aclose()

    asyncio.run(run())


@pytest.mark.parametrize("kind", ["memory", "redis"])
def test_tokens_reserved_then_refunded(kind):
    async def run():
        limiter = make_limiter(kind, 30.0)
        first = await limiter.acquire("k", None, 100, 60)
        assert first.allowed and first.remaining_tokens == 40
        second = await limiter.acquire("k", None, 100, 50)
        assert not second.allowed and second.reason == "tokens"
        assert 29 < second.retry_after_s <= 30
        await limiter.settle("k", first.entry_id, 20)  # it used 20 of its 60
        peek = await limiter.peek("k", None, 100)
        assert peek.remaining_tokens == 80 and peek.requests_used == 1
        third = await limiter.acquire("k", None, 100, 50)
        assert third.allowed and third.remaining_tokens == 30
        too_big = await limiter.acquire("k", None, 100, 101)
        assert not too_big.allowed and too_big.reason == "too_large"
        assert "retry-after" not in too_big.headers()
        await limiter.aclose()

    asyncio.run(run())


def test_no_window_ever_exceeds_the_limits():
    """Random arrivals and refunds against a fake clock: in every window of the limiter's
    length, admitted requests <= RPM and their final tokens <= TPM."""
    rng = random.Random(7)
    now = [0.0]
    limiter = MemoryRateLimiter(10.0, clock=lambda: now[0])
    rpm, tpm = 12, 300
    admitted = []  # [time, final tokens]

    async def run():
        for _ in range(2000):
            now[0] += rng.expovariate(3.0)
            want = rng.randint(1, 60)
            d = await limiter.acquire("k", rpm, tpm, want)
            if d.allowed:
                used = rng.randint(0, want)
                await limiter.settle("k", d.entry_id, used)
                admitted.append((d.admitted_at, used))

    asyncio.run(run())
    assert len(admitted) > 200
    times = [t for t, _ in admitted]
    for i, (start, _) in enumerate(admitted):
        window = [u for t, u in admitted[i:] if t < start + 10.0]
        assert len(window) <= rpm
        assert sum(window) <= tpm
    assert times == sorted(times)


def test_two_instances_share_one_redis_window():
    """Two servers' limiters on one Redis: together they admit exactly the key's RPM."""
    url = redis_url()
    namespace = "k2test-" + uuid.uuid4().hex[:8]

    async def run():
        a = RedisRateLimiter(url, 30.0, namespace=namespace)
        b = RedisRateLimiter(url, 30.0, namespace=namespace)
        results = await asyncio.gather(*[(a if i % 2 else b).acquire("shared", 20, 1000, 10)
                                         for i in range(60)])
        allowed = [d for d in results if d.allowed]
        assert len(allowed) == 20
        assert all(d.reason == "requests" for d in results if not d.allowed)
        tokens = await b.peek("shared", 20, 1000)
        assert tokens.tokens_used == 200 and tokens.requests_used == 20
        # Retry groups are shared too.
        ra, rb = RedisRetryStore(a), RedisRetryStore(b)
        await ra.put("fingerprint", "group-1")
        assert await rb.get("fingerprint") == "group-1"
        await a.aclose()
        await b.aclose()

    asyncio.run(run())


def test_memory_retry_store_expires():
    async def run():
        store = MemoryRetryStore(ttl_s=0.05, max_entries=2)
        await store.put("a", "g1")
        assert await store.get("a") == "g1"
        await asyncio.sleep(0.08)
        assert await store.get("a") is None
        for k in "bcd":
            await store.put(k, k)
        assert await store.get("b") is None and await store.get("d") == "d"

    asyncio.run(run())
