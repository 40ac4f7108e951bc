"""The sliding-window limiter, in memory and in a real Redis (shared by two instances)."""

from __future__ import annotations

import asyncio
import random
import uuid

import pytest

from k2serve.platform.ratelimit import (
    Decision,
    MemoryBudgetHolds,
    MemoryRateLimiter,
    MemoryRetryStore,
    RedisBudgetHolds,
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
        # Retry claims and budget holds are shared too.
        ra, rb = RedisRetryStore(a), RedisRetryStore(b)
        first = await ra.claim("slot", "body", "idem", "group-1", 60)
        assert (await rb.claim("slot", "body", "idem", "g", 60)).outcome == "conflict"
        await ra.finish("slot", first.token, {"status": 200, "headers": [], "body": ""}, 60)
        replay = await rb.claim("slot", "body", "idem", "g", 60)
        assert replay.outcome == "replay" and replay.group == "group-1"
        ha, hb = RedisBudgetHolds(a), RedisBudgetHolds(b)
        await ha.hold("k", 0.25)
        assert (await hb.hold("k", 0.5))[1] == 0.25
        await a.aclose()
        await b.aclose()

    asyncio.run(run())


def make_stores(kind: str):
    if kind == "memory":
        return MemoryRetryStore(), MemoryBudgetHolds(), None
    limiter = make_limiter(kind, 30.0)
    return RedisRetryStore(limiter), RedisBudgetHolds(limiter), limiter


@pytest.mark.parametrize("kind", ["memory", "redis"])
def test_retry_claims(kind):
    """One slot per logical request: the first claim generates; the same body again
    conflicts while it runs (Idempotency-Key) and replays once it is done; another body is
    a mismatch; an attempt that ended without a reply lets the next one generate; a finish
    by an attempt whose claim was taken over changes nothing."""
    async def run():
        store, _, limiter = make_stores(kind)
        reply = {"status": 200, "headers": [["content-type", "application/json"]],
                 "body": "e30=", "request_id": "r1"}
        first = await store.claim("s1", "h1", "idem", "g1", 60)
        assert (first.outcome, first.group) == ("new", "g1") and first.token
        assert (await store.claim("s1", "h1", "idem", "gx", 60)).outcome == "conflict"
        assert (await store.claim("s1", "h2", "idem", "gx", 60)).outcome == "mismatch"
        await store.finish("s1", first.token, reply, 60)
        again = await store.claim("s1", "h1", "idem", "gx", 60)
        assert (again.outcome, again.group, again.response) == ("replay", "g1", reply)
        assert (await store.claim("s1", "h2", "idem", "gx", 60)).outcome == "mismatch"
        # Ended without a reply: the next attempt generates, in the same group.
        a = await store.claim("s2", "h", "idem", "g2", 60)
        await store.finish("s2", a.token, None, 60)
        b = await store.claim("s2", "h", "idem", "gx", 60)
        assert (b.outcome, b.group) == ("new", "g2")
        assert (await store.claim("s2", "h", "idem", "gx", 60)).outcome == "conflict"
        await store.finish("s2", a.token, reply, 60)  # a's claim is b's now: no effect
        assert (await store.claim("s2", "h", "idem", "gx", 60)).outcome == "conflict"
        # SDK retries: a retry of a running first attempt generates too; a new first
        # attempt always claims anew.
        f = await store.claim("s3", "h", "first", "g3", 60)
        assert (await store.claim("s3", "h", "retry", "gx", 60)).outcome == "new"
        assert (await store.claim("s3", "h", "first", "g4", 60)).group == "g4"
        assert f.outcome == "new"
        if limiter is not None:
            await limiter.aclose()

    asyncio.run(run())


def test_memory_retry_store_is_bounded():
    async def run():
        store = MemoryRetryStore(max_entries=2, max_bytes=10)
        reply = {"status": 200, "headers": [], "body": "x" * 8}
        for slot in "abc":
            claim = await store.claim(slot, "h", "idem", slot, 60)
            await store.finish(slot, claim.token, reply, 60)
        # 3 slots of 8 bytes > 2 entries and > 10 bytes: only the newest is kept.
        assert (await store.claim("a", "h", "idem", "a", 60)).outcome == "new"
        assert (await store.claim("c", "h", "idem", "c", 60)).outcome == "replay"
        expiring = await store.claim("d", "h", "idem", "d", 0.05)
        await store.finish("d", expiring.token, reply, 0.05)
        await asyncio.sleep(0.08)
        assert (await store.claim("d", "h", "idem", "d", 60)).outcome == "new"

    asyncio.run(run())


@pytest.mark.parametrize("kind", ["memory", "redis"])
def test_budget_holds(kind):
    async def run():
        _, holds, limiter = make_stores(kind)
        a, before = await holds.hold("k", 1.5e-5)
        assert before == 0.0
        b, before = await holds.hold("k", 2.5e-5)
        assert before == pytest.approx(1.5e-5)
        assert (await holds.hold("other", 1.0))[1] == 0.0
        await holds.settle("k", a, 1e-6)  # a's real cost is known
        assert await holds.outstanding("k") == pytest.approx(2.6e-5)
        await holds.release("k", a)
        await holds.release("k", b)
        await holds.settle("k", b, 1.0)  # settled after release: nothing comes back
        assert await holds.outstanding("k") == 0.0
        if limiter is not None:
            await limiter.aclose()

    asyncio.run(run())


def test_memory_budget_holds_expire():
    now = [0.0]
    holds = MemoryBudgetHolds(ttl_s=10, clock=lambda: now[0])

    async def run():
        await holds.hold("k", 1.0)
        now[0] = 11.0
        assert (await holds.hold("k", 2.0))[1] == 0.0  # a crashed request's hold lapsed
        assert await holds.outstanding("k") == 2.0

    asyncio.run(run())
