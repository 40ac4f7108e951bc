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
import json
import math
import threading
import time
import uuid
from collections import OrderedDict, deque
from dataclasses import dataclass

WINDOW_S = 60.0
RETRY_GROUP_TTL_S = 900  # how long a body fingerprint is remembered for SDK retries


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
# A slot is one logical request: an `Idempotency-Key` of a key, or (for the SDKs' retries)
# the fingerprint of a body. Its record: the hash of the body that claimed it, its state
# (`running` while an attempt generates, `done` with the stored reply, `open` when the
# attempt ended without a reply worth replaying), the attempt's token (so a finished
# attempt only ever touches its own claim) and its retry group.
RUNNING_TTL_S = 300  # a claim left by a crashed server frees itself after this long
IDEMPOTENCY_TTL_S = 24 * 3600  # how long an Idempotency-Key is remembered (Stripe's 24 h)


@dataclass
class Claim:
    outcome: str  # "new" (generate), "replay", "conflict" (running), "mismatch" (other body)
    group: str | None = None
    token: str | None = None
    response: dict | None = None  # for "replay": {"status", "headers", "body"}


def _claim(record: dict | None, body_hash: str, mode: str, group: str, token: str) -> tuple[Claim, dict | None]:
    """The decision, and the record to store (None: leave it as it is). `mode`: "idem"
    (Idempotency-Key), "first" (an SDK's first attempt: always claims anew), "retry"."""
    if record is None or mode == "first":
        return Claim("new", group, token), {"body": body_hash, "state": "running",
                                             "token": token, "group": group}
    if record["body"] != body_hash:
        return Claim("mismatch"), None
    if record["state"] == "done":
        return Claim("replay", record["group"], None, record["response"]), None
    if record["state"] == "running" and mode == "idem":
        return Claim("conflict", record["group"]), None
    return Claim("new", record["group"], token), dict(record, state="running", token=token,
                                                       response=None)


class MemoryRetryStore:
    """Slots in this process, bounded in count and in stored reply bytes (oldest first out)."""

    def __init__(self, max_entries: int = 10_000, max_bytes: int = 64 << 20):
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._slots: OrderedDict[str, tuple[float, dict]] = OrderedDict()  # slot -> (expiry, record)
        self._bytes = 0

    def _get(self, slot: str) -> dict | None:
        item = self._slots.get(slot)
        if item is None:
            return None
        if item[0] < time.monotonic():
            self._drop(slot)
            return None
        return item[1]

    def _drop(self, slot: str) -> None:
        _, record = self._slots.pop(slot)
        self._bytes -= _size(record)

    def _set(self, slot: str, record: dict, ttl: float) -> None:
        if slot in self._slots:
            self._drop(slot)
        self._slots[slot] = (time.monotonic() + ttl, record)
        self._bytes += _size(record)
        while self._slots and (len(self._slots) > self.max_entries or self._bytes > self.max_bytes):
            self._drop(next(iter(self._slots)))

    async def claim(self, slot: str, body_hash: str, mode: str, group: str, ttl: float) -> Claim:
        token = uuid.uuid4().hex
        claim, record = _claim(self._get(slot), body_hash, mode, group, token)
        if record is not None:
            self._set(slot, record, min(ttl, RUNNING_TTL_S))
        return claim

    async def finish(self, slot: str, token: str, response: dict | None, ttl: float) -> None:
        record = self._get(slot)
        if record is None or record.get("token") != token:
            return  # expired, or claimed since by a later attempt
        done = dict(record, state="done" if response else "open", response=response)
        self._set(slot, done, ttl)


def _size(record: dict) -> int:
    response = record.get("response")
    return len(response["body"]) if response else 0


# KEYS[1]: the slot (a hash). ARGV: body hash, mode, new group, token, running TTL.
# Returns {outcome, group, response JSON or ""}; the decision is _claim's.
_CLAIM_LUA = """
local rec = redis.call('HMGET', KEYS[1], 'body', 'state', 'group', 'response')
local body, state, group, response = rec[1], rec[2], rec[3], rec[4]
local mode = ARGV[2]
if (not body) or mode == 'first' then
  redis.call('DEL', KEYS[1])
  redis.call('HSET', KEYS[1], 'body', ARGV[1], 'state', 'running', 'token', ARGV[4],
             'group', ARGV[3])
  redis.call('EXPIRE', KEYS[1], ARGV[5])
  return {'new', ARGV[3], ''}
end
if body ~= ARGV[1] then return {'mismatch', '', ''} end
if state == 'done' then return {'replay', group, response or ''} end
if state == 'running' and mode == 'idem' then return {'conflict', group, ''} end
redis.call('HSET', KEYS[1], 'state', 'running', 'token', ARGV[4])
redis.call('HDEL', KEYS[1], 'response')
redis.call('EXPIRE', KEYS[1], ARGV[5])
return {'new', group, ''}
"""

# KEYS[1]: the slot. ARGV: token, state ("done" | "open"), response JSON, TTL.
_FINISH_LUA = """
if redis.call('HGET', KEYS[1], 'token') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'state', ARGV[2])
if ARGV[3] ~= '' then redis.call('HSET', KEYS[1], 'response', ARGV[3]) end
redis.call('EXPIRE', KEYS[1], ARGV[4])
return 1
"""


class RedisRetryStore:
    """The same slots in Redis, shared by every server using it (replies stored as JSON)."""

    def __init__(self, limiter: RedisRateLimiter):
        self._redis = limiter._redis
        self._ns = limiter.namespace
        self._claim = self._redis.register_script(_CLAIM_LUA)
        self._finish = self._redis.register_script(_FINISH_LUA)

    def _key(self, slot: str) -> str:
        return f"{self._ns}:retry:{slot}"

    async def claim(self, slot: str, body_hash: str, mode: str, group: str, ttl: float) -> Claim:
        token = uuid.uuid4().hex
        outcome, group, response = await self._claim(
            keys=[self._key(slot)],
            args=[body_hash, mode, group, token, int(min(ttl, RUNNING_TTL_S))])
        if outcome == "replay":
            return Claim("replay", group, None, json.loads(response))
        return Claim(outcome, group or None, token if outcome == "new" else None)

    async def finish(self, slot: str, token: str, response: dict | None, ttl: float) -> None:
        await self._finish(keys=[self._key(slot)],
                           args=[token, "done" if response else "open",
                                 json.dumps(response) if response else "", int(ttl)])


# -- budgets: the worst-case cost of requests in progress --------------------------------
HOLD_TTL_S = 900  # a hold left by a crashed server frees itself after this long


class MemoryBudgetHolds:
    """Per key: hold id -> (USD, expiry). `hold` adds one and returns what the key's other
    live holds add up to, in one step."""

    def __init__(self, ttl_s: float = HOLD_TTL_S, clock=time.monotonic):
        self.ttl = ttl_s
        self._clock = clock
        self._holds: dict[str, dict[str, tuple[float, float]]] = {}

    async def hold(self, key: str, usd: float) -> tuple[str, float]:
        now = self._clock()
        holds = self._holds.setdefault(key, {})
        for hid in [h for h, (_, expiry) in holds.items() if expiry <= now]:
            del holds[hid]
        others = sum(usd for usd, _ in holds.values())
        hold_id = uuid.uuid4().hex
        holds[hold_id] = (usd, now + self.ttl)
        return hold_id, others

    async def settle(self, key: str, hold_id: str, usd: float) -> None:
        """The request's real cost is known: hold that (until its row is written)."""
        holds = self._holds.get(key)
        if holds is not None and hold_id in holds:
            holds[hold_id] = (usd, holds[hold_id][1])

    async def release(self, key: str, hold_id: str) -> None:
        holds = self._holds.get(key)
        if holds is not None:
            holds.pop(hold_id, None)
            if not holds:
                del self._holds[key]

    async def outstanding(self, key: str) -> float:
        now = self._clock()
        return sum(usd for usd, expiry in self._holds.get(key, {}).values() if expiry > now)


# KEYS[1]: hash hold id -> "usd|expiry" (Redis clock). ARGV: hold id, usd, ttl.
_HOLD_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local all = redis.call('HGETALL', KEYS[1])
local sum = 0
for i = 1, #all, 2 do
  local v = all[i + 1]
  local sep = string.find(v, '|', 1, true)
  if tonumber(string.sub(v, sep + 1)) <= now then
    redis.call('HDEL', KEYS[1], all[i])
  else
    sum = sum + tonumber(string.sub(v, 1, sep - 1))
  end
end
if ARGV[1] ~= '' then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2] .. '|' .. string.format('%.6f', now + tonumber(ARGV[3])))
  redis.call('EXPIRE', KEYS[1], tonumber(ARGV[3]) + 5)
end
return string.format('%.17g', sum)
"""


# KEYS[1]: as above. ARGV: hold id, usd. Changes the amount of a hold that still exists.
_SETTLE_HOLD_LUA = """
local v = redis.call('HGET', KEYS[1], ARGV[1])
if not v then return 0 end
local sep = string.find(v, '|', 1, true)
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2] .. string.sub(v, sep))
return 1
"""


class RedisBudgetHolds:
    def __init__(self, limiter: RedisRateLimiter, ttl_s: int = HOLD_TTL_S):
        self._redis = limiter._redis
        self._ns = limiter.namespace
        self.ttl = ttl_s
        self._hold = self._redis.register_script(_HOLD_LUA)
        self._settle = self._redis.register_script(_SETTLE_HOLD_LUA)

    def _key(self, key: str) -> str:
        return f"{self._ns}:budget:{{{key}}}"

    async def hold(self, key: str, usd: float) -> tuple[str, float]:
        hold_id = uuid.uuid4().hex
        others = await self._hold(keys=[self._key(key)], args=[hold_id, repr(float(usd)), self.ttl])
        return hold_id, float(others)

    async def settle(self, key: str, hold_id: str, usd: float) -> None:
        await self._settle(keys=[self._key(key)], args=[hold_id, repr(float(usd))])

    async def release(self, key: str, hold_id: str) -> None:
        await self._redis.hdel(self._key(key), hold_id)

    async def outstanding(self, key: str) -> float:
        return float(await self._hold(keys=[self._key(key)], args=["", "0", self.ttl]))


# Each store in the server process or in Redis (`--redis-url`), used through one interface.
RateLimiter = MemoryRateLimiter | RedisRateLimiter
RetryStore = MemoryRetryStore | RedisRetryStore
BudgetHolds = MemoryBudgetHolds | RedisBudgetHolds


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
