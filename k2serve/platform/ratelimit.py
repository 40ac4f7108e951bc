"""Per-key requests-per-minute and tokens-per-minute, over a sliding 60-second window.

Every admitted request is an entry (admission time, tokens). A request is admitted when the
entries of the last 60 s, plus itself, stay within the key's RPM and TPM. Its tokens are
reserved up front (prompt + n x max_tokens) and settled to the real count (prompt +
completion) when it ends, so a refund frees TPM at once. Entries are counted over a true
sliding window, so over ANY 60-second interval a key never gets more than RPM requests
admitted nor more than TPM tokens used (as long as a reservation bounds the real use, which
the reservation rule guarantees).

Two backends with one interface: in memory (one server process), or Redis (`--redis-url`:
every server sharing the Redis shares the counters; one Lua script per decision, Redis's own
clock, so the instances' clocks do not matter).

Headers (Together's and OpenAI's names): limits, what remains after this request, and the
seconds until the oldest entry leaves the window (when capacity next grows). A 429 carries
`retry-after` (whole seconds) and `retry-after-ms`: when this very request would fit.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
import uuid
from collections import OrderedDict, deque
from dataclasses import dataclass

WINDOW_S = 60.0
RETRY_GROUP_TTL_S = 900  # how long a body fingerprint is remembered for retries


@dataclass
class Decision:
    allowed: bool
    admitted_at: float  # limiter clock (Unix seconds)
    entry_id: str | None
    rpm: int | None
    tpm: int | None
    requests_used: int  # in the window, this request included when admitted
    tokens_used: int
    reset_requests_s: float
    reset_tokens_s: float
    retry_after_s: float = 0.0
    reason: str | None = None  # "requests" | "tokens" | "too_large"

    @property
    def remaining_requests(self) -> int | None:
        return None if not self.rpm else max(0, self.rpm - self.requests_used)

    @property
    def remaining_tokens(self) -> int | None:
        return None if not self.tpm else max(0, self.tpm - self.tokens_used)

    def headers(self) -> dict[str, str]:
        h: dict[str, str] = {}
        if self.rpm:
            reset = self.reset_requests_s
            h.update({
                "x-ratelimit-limit": str(self.rpm),
                "x-ratelimit-remaining": str(self.remaining_requests),
                "x-ratelimit-reset": str(math.ceil(reset)),
                "x-ratelimit-limit-requests": str(self.rpm),
                "x-ratelimit-remaining-requests": str(self.remaining_requests),
                "x-ratelimit-reset-requests": go_duration(reset),
            })
        if self.tpm:
            h.update({
                "x-tokenlimit-limit": str(self.tpm),
                "x-tokenlimit-remaining": str(self.remaining_tokens),
                "x-ratelimit-limit-tokens": str(self.tpm),
                "x-ratelimit-remaining-tokens": str(self.remaining_tokens),
                "x-ratelimit-reset-tokens": go_duration(self.reset_tokens_s),
            })
        if not self.allowed and self.reason != "too_large":
            h["retry-after"] = str(max(1, math.ceil(self.retry_after_s)))
            h["retry-after-ms"] = str(max(1, math.ceil(self.retry_after_s * 1000)))
        return h


def go_duration(seconds: float) -> str:
    """OpenAI's reset format: Go durations such as `12ms`, `6s`, `1m0s`."""
    if seconds <= 0:
        return "0s"
    if seconds < 1:
        return f"{max(1, round(seconds * 1000))}ms"
    minutes, rest = divmod(round(seconds, 3), 60)
    text = f"{rest:.3f}".rstrip("0").rstrip(".") + "s"
    return f"{int(minutes)}m{text}" if minutes else text


def _decide(now: float, window: float, times: list[float], weights: list[int],
            rpm: int | None, tpm: int | None, want: int) -> tuple[bool, str | None, float]:
    """(allowed, reason, retry_after) given the live entries, oldest first."""
    n = len(times)
    used = sum(weights)
    if tpm and want > tpm:
        return False, "too_large", 0.0
    wait = 0.0
    reason = None
    if rpm and n + 1 > rpm:
        reason = "requests"
        wait = max(wait, times[n - rpm] + window - now)
    if tpm and used + want > tpm:
        reason = reason or "tokens"
        freed = 0
        for t, w in zip(times, weights):
            freed += w
            if used - freed + want <= tpm:
                wait = max(wait, t + window - now)
                break
    return reason is None, reason, max(wait, 0.0)


def _resets(now: float, window: float, times: list[float], weights: list[int]) -> tuple[float, float]:
    reset_req = times[0] + window - now if times else 0.0
    reset_tok = next((t + window - now for t, w in zip(times, weights) if w > 0), 0.0)
    return max(reset_req, 0.0), max(reset_tok, 0.0)


class MemoryRateLimiter:
    """Sliding-window log per key, in this process."""

    def __init__(self, window_s: float = WINDOW_S, clock=time.time):
        self.window = window_s
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: dict[str, deque[list]] = {}  # key -> deque of [time, id, tokens]
        self._by_id: dict[str, list] = {}

    def _live(self, key: str, now: float) -> deque[list]:
        entries = self._entries.setdefault(key, deque())
        while entries and entries[0][0] <= now - self.window:
            self._by_id.pop(entries.popleft()[1], None)
        return entries

    async def acquire(self, key: str, rpm: int | None, tpm: int | None, tokens: int) -> Decision:
        with self._lock:
            now = self._clock()
            entries = self._live(key, now)
            times = [e[0] for e in entries]
            weights = [e[2] for e in entries]
            allowed, reason, wait = _decide(now, self.window, times, weights, rpm, tpm, tokens)
            entry_id = None
            if allowed:
                entry_id = uuid.uuid4().hex
                entry = [now, entry_id, tokens]
                entries.append(entry)
                self._by_id[entry_id] = entry
                times.append(now)
                weights.append(tokens)
            reset_req, reset_tok = _resets(now, self.window, times, weights)
            return Decision(allowed, now, entry_id, rpm, tpm, len(times), sum(weights),
                            reset_req, reset_tok, wait, reason)

    async def peek(self, key: str, rpm: int | None, tpm: int | None) -> Decision:
        with self._lock:
            now = self._clock()
            entries = self._live(key, now)
            times = [e[0] for e in entries]
            weights = [e[2] for e in entries]
            reset_req, reset_tok = _resets(now, self.window, times, weights)
            return Decision(True, now, None, rpm, tpm, len(times), sum(weights),
                            reset_req, reset_tok)

    async def settle(self, key: str, entry_id: str, tokens: int) -> None:
        with self._lock:
            entry = self._by_id.get(entry_id)
            if entry is not None:
                entry[2] = tokens

    async def aclose(self) -> None:
        pass


# KEYS[1]: sorted set entry id -> admission time; KEYS[2]: hash entry id -> tokens.
# ARGV: window, rpm (0: none), tpm (0: none), tokens, entry id ("" to only look).
_ACQUIRE_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local window = tonumber(ARGV[1])
local rpm = tonumber(ARGV[2])
local tpm = tonumber(ARGV[3])
local want = tonumber(ARGV[4])
local id = ARGV[5]
local cutoff = now - window
local expired = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', cutoff)
for i = 1, #expired, 500 do
  redis.call('HDEL', KEYS[2], unpack(expired, i, math.min(i + 499, #expired)))
end
if #expired > 0 then redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', cutoff) end
local live = redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')
local n = #live / 2
local times, weights, used = {}, {}, 0
for i = 1, n do times[i] = tonumber(live[2 * i]) end
for i = 1, n, 500 do
  local ids = {}
  for j = i, math.min(i + 499, n) do ids[#ids + 1] = live[2 * j - 1] end
  local ws = redis.call('HMGET', KEYS[2], unpack(ids))
  for j = 1, #ws do
    local w = tonumber(ws[j]) or 0
    weights[i + j - 1] = w
    used = used + w
  end
end
local allowed, reason, wait = 1, '', 0
if id ~= '' then
  if tpm > 0 and want > tpm then
    allowed, reason = 0, 'too_large'
  else
    if rpm > 0 and n + 1 > rpm then
      allowed, reason = 0, 'requests'
      wait = math.max(wait, times[n - rpm + 1] + window - now)
    end
    if tpm > 0 and used + want > tpm then
      allowed = 0
      if reason == '' then reason = 'tokens' end
      local freed = 0
      for i = 1, n do
        freed = freed + weights[i]
        if used - freed + want <= tpm then
          wait = math.max(wait, times[i] + window - now)
          break
        end
      end
    end
  end
  if allowed == 1 then
    redis.call('ZADD', KEYS[1], now, id)
    redis.call('HSET', KEYS[2], id, want)
    n = n + 1
    times[n] = now
    weights[n] = want
    used = used + want
  end
  local ttl = math.ceil((window + 5) * 1000)
  redis.call('PEXPIRE', KEYS[1], ttl)
  redis.call('PEXPIRE', KEYS[2], ttl)
end
local reset_req, reset_tok = 0, 0
if n > 0 then reset_req = times[1] + window - now end
for i = 1, n do
  if weights[i] > 0 then reset_tok = times[i] + window - now break end
end
return {allowed, string.format('%.6f', now), n, used, string.format('%.6f', wait),
        string.format('%.6f', math.max(reset_req, 0)), string.format('%.6f', math.max(reset_tok, 0)),
        reason}
"""

_SETTLE_LUA = """
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
  return 1
end
return 0
"""


class RedisRateLimiter:
    """The same sliding window, kept in Redis so that every instance shares it."""

    def __init__(self, url: str, window_s: float = WINDOW_S, namespace: str = "k2serve"):
        import redis.asyncio as aioredis

        self.url = url
        self.window = window_s
        self.namespace = namespace
        self._redis = aioredis.from_url(url, decode_responses=True)
        self._acquire = self._redis.register_script(_ACQUIRE_LUA)
        self._settle = self._redis.register_script(_SETTLE_LUA)

    def _keys(self, key: str) -> list[str]:
        return [f"{self.namespace}:rl:{{{key}}}:t", f"{self.namespace}:rl:{{{key}}}:w"]

    async def _run(self, key: str, rpm, tpm, tokens: int, entry_id: str) -> Decision:
        r = await self._acquire(keys=self._keys(key),
                                args=[self.window, rpm or 0, tpm or 0, tokens, entry_id])
        allowed = int(r[0]) == 1
        return Decision(allowed, float(r[1]), entry_id if (allowed and entry_id) else None,
                        rpm, tpm, int(r[2]), int(r[3]), float(r[5]), float(r[6]),
                        float(r[4]), r[7] or None)

    async def acquire(self, key: str, rpm: int | None, tpm: int | None, tokens: int) -> Decision:
        return await self._run(key, rpm, tpm, tokens, uuid.uuid4().hex)

    async def peek(self, key: str, rpm: int | None, tpm: int | None) -> Decision:
        return await self._run(key, rpm, tpm, 0, "")

    async def settle(self, key: str, entry_id: str, tokens: int) -> None:
        await self._settle(keys=self._keys(key), args=[entry_id, tokens])

    async def ping(self) -> None:
        await self._redis.ping()

    async def aclose(self) -> None:
        await self._redis.aclose()


# -- which requests are retries of one another ------------------------------------------
class MemoryRetryStore:
    """Body fingerprint -> the retry group of its latest first attempt (this process)."""

    def __init__(self, ttl_s: float = RETRY_GROUP_TTL_S, max_entries: int = 100_000):
        self.ttl = ttl_s
        self.max_entries = max_entries
        self._groups: OrderedDict[str, tuple[float, str]] = OrderedDict()

    async def get(self, fingerprint: str) -> str | None:
        item = self._groups.get(fingerprint)
        if item is None or item[0] < time.monotonic():
            return None
        return item[1]

    async def put(self, fingerprint: str, group: str) -> None:
        self._groups[fingerprint] = (time.monotonic() + self.ttl, group)
        self._groups.move_to_end(fingerprint)
        while len(self._groups) > self.max_entries:
            self._groups.popitem(last=False)


class RedisRetryStore:
    def __init__(self, limiter: RedisRateLimiter, ttl_s: int = RETRY_GROUP_TTL_S):
        self._redis = limiter._redis
        self._ns = limiter.namespace
        self.ttl = ttl_s

    async def get(self, fingerprint: str) -> str | None:
        return await self._redis.get(f"{self._ns}:retry:{fingerprint}")

    async def put(self, fingerprint: str, group: str) -> None:
        await self._redis.set(f"{self._ns}:retry:{fingerprint}", group, ex=self.ttl)


def run_soon(coro) -> asyncio.Task | None:
    """Schedule a coroutine from synchronous code on the running loop (keeps a reference)."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        asyncio.run(coro)
        return None
    task = loop.create_task(coro)
    _background.add(task)
    task.add_done_callback(_background.discard)
    return task


_background: set[asyncio.Task] = set()
