"""Real `k2serve serve` processes on the embedded model: SQLite with one server, and
PostgreSQL with two servers sharing one Redis (limits and retries across instances).

The load test is issue 7's acceptance: 400 concurrent requests over 5 keys, with random
client disconnects and retries; afterwards every attempt has exactly one ledger row, the
billed tokens per key equal what the clients received (plus the streams they dropped; a
retry of a completed request is a replay, billed nothing — issue 12), and no key got more
than its limits in any 60-second window.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field

import httpx
import pytest

from k2serve.platform.db import Database
from k2serve.platform.keys import KeyStore
from k2serve.platform.ledger import ledger_rows, usage_totals
from tests.conftest import EMBEDDED_ID, start_server, stop_server, wait_until_idle
from tests.platform.conftest import PostgresSchema, postgres_base_url, redis_url

SERVER_ARGS = ("--max-num-seqs", "64", "--max-waiting", "1024")


@dataclass
class Stack:
    kind: str
    db_url: str
    servers: list
    startup_lines: list[str]
    open_probe: int
    cleanup: list = field(default_factory=list)

    def db(self) -> Database:
        return Database(self.db_url, migrate=False)

    def create_key(self, name, **kw) -> str:
        db = self.db()
        try:
            return KeyStore(db).create(name, **kw)[1]
        finally:
            db.close()


def _start_many(n: int, *args: str, env: dict) -> list:
    servers: list = [None] * n
    errors: list = []

    def one(i):
        try:
            servers[i] = start_server(*SERVER_ARGS, *args, env=env)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        for s in servers:
            if s is not None:
                stop_server(s)
        raise errors[0]
    return servers


@pytest.fixture(scope="module", params=["sqlite", "postgres+redis"])
def stack(request):
    if request.param == "sqlite":
        home = tempfile.mkdtemp(prefix="k2serve-live-")
        servers = _start_many(1, env={"K2SERVE_HOME": home})
        url = f"sqlite:///{home}/k2serve.db"
        cleanup = [lambda: shutil.rmtree(home, ignore_errors=True)]
    else:
        schema = PostgresSchema(postgres_base_url())
        # One torch thread each: two servers with a thread per core each would oversubscribe
        # the cores, and spinning OpenMP threads then run ~10x slower (280 s for this load).
        servers = _start_many(2, "--database-url", schema.url, "--redis-url", redis_url(),
                              "--threads", "1", env={})
        url = schema.url
        cleanup = [schema.drop]
    # Before any key exists: open mode (on loopback), as the start-up line says.
    probe = httpx.post(servers[0].root + "/v1/completions", timeout=60,
                       json={"model": EMBEDDED_ID, "prompt": "Hi", "max_tokens": 1})
    live = Stack(request.param, url, servers, [s.startup_line for s in servers],
                 probe.status_code, cleanup)
    yield live
    for s in servers:
        stop_server(s)
    for fn in cleanup:
        fn()


def test_open_until_a_key_exists_then_keys_required(stack):
    assert all("auth: OPEN" in line for line in stack.startup_lines), stack.startup_lines
    assert stack.open_probe == 200
    key = stack.create_key("first-key")
    for server in stack.servers:
        r = httpx.post(server.root + "/v1/completions", timeout=60,
                       json={"model": EMBEDDED_ID, "prompt": "Hi", "max_tokens": 1})
        assert r.status_code == 401
        assert r.headers["x-request-id"]
        ok = httpx.post(server.root + "/v1/completions", timeout=60,
                        headers={"Authorization": f"Bearer {key}"},
                        json={"model": EMBEDDED_ID, "prompt": "Hi", "max_tokens": 1})
        assert ok.status_code == 200


def test_chat_tpm_reservation_is_the_prompt_the_route_builds(stack):
    """A chat request with tools reserves its real prompt tokens (the chat template and the
    tools' system block, with the model's tokenizer) + max_tokens: the reply's rate-limit
    headers are the admission's, so remaining = TPM - reservation."""
    key = stack.create_key("tpm-tools", tpm=100_000)
    tools = [{"type": "function", "function": {
        "name": "get_weather", "description": "The weather in a city, today and tomorrow.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                       "required": ["city"]}}}]
    r = httpx.post(stack.servers[0].root + "/v1/chat/completions", timeout=120,
                   headers={"Authorization": f"Bearer {key}"},
                   json={"model": EMBEDDED_ID, "max_tokens": 8, "tools": tools,
                         "messages": [{"role": "user", "content": "Weather in Paris?"}]})
    assert r.status_code == 200, r.text
    prompt = r.json()["usage"]["prompt_tokens"]
    assert prompt > 100  # the tools' block is in the prompt
    assert int(r.headers["x-tokenlimit-remaining"]) == 100_000 - (prompt + 8)


def test_sdks_with_keys(stack):
    import openai
    from together import Together

    key = stack.create_key("sdk-user", models=[EMBEDDED_ID], rpm=100, tpm=100_000)
    broke = stack.create_key("sdk-broke", budget_usd=1e-9)
    server = stack.servers[-1]

    client = openai.OpenAI(base_url=server.base_v1, api_key=key, max_retries=0)
    raw = client.completions.with_raw_response.create(model=EMBEDDED_ID, prompt="Hello",
                                                      max_tokens=2)
    assert raw.headers["x-ratelimit-limit-requests"] == "100"
    assert int(raw.headers["x-ratelimit-remaining-tokens"]) < 100_000
    assert raw.parse().usage.completion_tokens == 2

    together = Together(base_url=server.root, api_key=key)
    chat = together.chat.completions.create(
        model=EMBEDDED_ID, messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
    assert chat.usage.completion_tokens <= 2

    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.base_v1, api_key="k2s-000000000000-nope",
                      max_retries=0).completions.create(model=EMBEDDED_ID, prompt="x",
                                                        max_tokens=1)
    with pytest.raises(openai.PermissionDeniedError) as denied:
        client.completions.create(model="some/other-model", prompt="x", max_tokens=1)
    assert denied.value.code == "model_not_allowed"

    poor = openai.OpenAI(base_url=server.base_v1, api_key=broke, max_retries=0)
    poor.completions.create(model=EMBEDDED_ID, prompt="x", max_tokens=1)  # spends it
    deadline = time.time() + 10
    while True:
        try:
            poor.completions.create(model=EMBEDDED_ID, prompt="x", max_tokens=1)
        except openai.RateLimitError as exc:
            assert exc.code == "insufficient_quota"
            # Until the first request's row is written its cost is held, not yet spent:
            # refused then too, but as retryable (retry-after).
            if exc.response.headers.get("x-should-retry") == "false":
                break
            assert exc.response.headers["retry-after"] == "1"
        assert time.time() < deadline, "the budget was never enforced"
        time.sleep(0.1)


# -- the acceptance load test -----------------------------------------------------------
KEYS = {
    "load-a": {},
    # b and c are set far below their share of the load so that they refuse even on a slow
    # machine: ~80 requests each of ~15 tokens need a run of over 5 minutes to fit in them.
    "load-b": {"rpm": 15},
    "load-c": {"tpm": 180},
    "load-d": {"rpm": 55, "tpm": 700},
    "load-e": {"rpm": 400, "tpm": 4000},
}
N_REQUESTS = 400
CONCURRENCY = 32


@dataclass
class Attempt:
    rid: str
    key: str
    chain: int
    number: int
    max_tokens: int
    status: int | None = None
    outcome: str = ""  # ok | lost (full reply, treated as lost and retried) | dropped | refused
    replayed: bool = False  # the stored reply of an earlier attempt (README: "Retries")
    usage: dict | None = None
    chunks: int = 0
    headers: dict = field(default_factory=dict)
    error: str | None = None  # the error code of a refusal


def _error_code(body: bytes) -> str | None:
    try:
        return json.loads(body)["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return None


async def _one_chain(i, plan, key, servers, clients, sem, attempts, tag):
    body = {"model": EMBEDDED_ID, "prompt": f"Request {i}: a few words about the number {i}",
            "max_tokens": plan["max_tokens"], "temperature": 0.8, "seed": i,
            "stream": plan["stream"]}
    number = 0
    while True:
        server = (i + number) % len(servers)  # a retry goes to the other instance
        a = Attempt(f"{tag}-{i}-{number}", plan["key"], i, number, plan["max_tokens"])
        attempts.append(a)
        headers = {"Authorization": f"Bearer {key}", "x-request-id": a.rid,
                   "x-stainless-retry-count": str(number)}
        if plan["idempotency"]:
            headers["Idempotency-Key"] = f"{tag}-op-{i}"
        async with sem:
            client = clients[server]
            if plan["stream"]:
                async with client.stream("POST", "/v1/completions", json=body,
                                         headers=headers) as r:
                    a.status, a.headers = r.status_code, dict(r.headers)
                    if r.status_code != 200:
                        a.error = _error_code(await r.aread())
                    else:
                        async for line in r.aiter_lines():
                            if not line.startswith("data: {"):
                                continue
                            a.chunks += 1
                            if plan["drop"] and number == 0:
                                break  # the client goes away mid-stream
                            chunk = json.loads(line[6:])
                            if chunk.get("usage"):
                                a.usage = chunk["usage"]
                        a.outcome = "ok" if a.usage else "dropped"
            else:
                r = await client.post("/v1/completions", json=body, headers=headers)
                a.status, a.headers = r.status_code, dict(r.headers)
                a.replayed = r.headers.get("idempotent-replayed") == "true"
                if r.status_code == 200:
                    a.usage = r.json()["usage"]
                    a.outcome = "lost" if (plan["lose"] and number == 0) else "ok"
                else:
                    a.error = _error_code(r.content)
        if a.status != 200:
            a.outcome = "refused"
        if a.outcome == "dropped" and plan["retry_drop"] and number == 0:
            number += 1
            continue
        if a.outcome == "lost":
            number += 1
            continue
        if a.status == 409 and number < 50:  # the dropped attempt with its key still runs
            await asyncio.sleep(0.2)
            number += 1
            continue
        if a.status == 503 and number < 3:
            await asyncio.sleep(1)
            number += 1
            continue
        return


def _max_in_window(points: list[tuple[float, int]], window: float) -> tuple[int, int]:
    """The most requests and the most tokens admitted in any `window`-second interval."""
    points = sorted(points)
    most_requests = most_tokens = 0
    for i, (start, _) in enumerate(points):
        inside = [w for t, w in points[i:] if t < start + window]
        most_requests = max(most_requests, len(inside))
        most_tokens = max(most_tokens, sum(inside))
    return most_requests, most_tokens


def test_load_400_requests_5_keys_drops_and_retries(stack):
    tag = f"load{stack.kind[:2]}"
    keys = {name: stack.create_key(f"{name}-{stack.kind}", **limits)
            for name, limits in KEYS.items()}
    admin = stack.create_key(f"admin-{stack.kind}", admin=True)
    rng = random.Random(20260520)
    names = list(KEYS)
    plans = []
    for i in range(N_REQUESTS):
        stream = rng.random() < 0.5
        drop = stream and rng.random() < 0.35
        plans.append({"key": names[i % len(names)], "max_tokens": rng.randint(1, 3),
                      "stream": stream, "drop": drop,
                      "retry_drop": drop and rng.random() < 0.7,
                      "lose": (not stream) and rng.random() < 0.15,
                      "idempotency": rng.random() < 0.25})
    attempts: list[Attempt] = []

    async def run():
        sem = asyncio.Semaphore(CONCURRENCY)
        clients = [httpx.AsyncClient(base_url=s.root, timeout=120,
                                     limits=httpx.Limits(max_connections=CONCURRENCY + 8))
                   for s in stack.servers]
        try:
            await asyncio.gather(*[_one_chain(i, p, keys[p["key"]], stack.servers, clients,
                                              sem, attempts, tag)
                                   for i, p in enumerate(plans)])
        finally:
            for c in clients:
                await c.aclose()

    t0 = time.time()
    asyncio.run(run())
    elapsed = time.time() - t0
    for server in stack.servers:
        with httpx.Client(base_url=server.root) as c:
            wait_until_idle(c, timeout=60)

    # Every attempt gets a reply carrying its own request id.
    assert all(a.status is not None for a in attempts)
    assert all(a.headers.get("x-request-id") == a.rid for a in attempts)
    assert {a.status for a in attempts} <= {200, 409, 429}, \
        collections.Counter((a.status, a.error) for a in attempts)
    assert all("retry-after" in a.headers for a in attempts if a.status in (409, 429))

    key_ids = {}
    db = stack.db()
    try:
        store = KeyStore(db)
        for name in KEYS:
            key_ids[name] = store.get_by_name(f"{name}-{stack.kind}").id
        deadline = time.time() + 45
        while True:  # rows of streams closed late land a moment after the reply
            rows = [r for r in ledger_rows(db) if r.api_key_id in key_ids.values()]
            done = len(rows) >= len(attempts) and all(r.status != "in_progress" for r in rows)
            if done or time.time() > deadline:
                break
            time.sleep(0.2)
        totals = {t["key"]: t for t in usage_totals(db)["keys"]}
    finally:
        db.close()

    # Exactly one row per attempt: nothing missing, nothing twice.
    by_rid = defaultdict(list)
    for r in rows:
        by_rid[r.request_id].append(r)
    assert sorted(by_rid) == sorted(a.rid for a in attempts)
    assert all(len(v) == 1 for v in by_rid.values())
    row = {rid: v[0] for rid, v in by_rid.items()}

    # The retry rule: every attempt that generated is billed; the retry of a completed
    # (non-streamed) attempt is its stored reply, replayed and billed nothing.
    chains = defaultdict(list)
    for a in attempts:
        chains[a.chain].append(a)
    expected_billed = {a.rid for a in attempts if a.status == 200 and not a.replayed}
    assert {rid for rid, r in row.items() if r.billed} == expected_billed
    for chain in chains.values():
        for a in chain:
            if a.number > 0 and chain[a.number - 1].outcome == "lost":
                assert a.replayed and a.usage == chain[a.number - 1].usage

    figures = {}
    for name in key_ids:
        mine = [a for a in attempts if a.key == name]
        client_tokens = partial_tokens = 0
        for a in mine:
            r = row[a.rid]
            if a.status in (409, 429):
                assert r.status == "rejected" and r.total_tokens == 0 and r.admitted_at is None
                continue
            if a.replayed:
                assert r.status == "replayed" and r.total_tokens == 0 and not r.billed
                continue
            if a.usage is not None:  # what the client received equals the row, exactly
                assert (r.prompt_tokens, r.completion_tokens,
                        r.cached_tokens) == (a.usage["prompt_tokens"],
                                             a.usage["completion_tokens"],
                                             a.usage["prompt_tokens_details"]["cached_tokens"])
                assert r.status == "ok"
            else:  # a dropped stream: billed for what it produced, no more than it asked
                assert r.status in ("ok", "client_closed")
                assert 1 <= r.completion_tokens <= a.max_tokens and r.prompt_tokens > 0
            if a.rid in expected_billed:
                if a.usage is not None:
                    client_tokens += a.usage["total_tokens"]
                else:
                    partial_tokens += r.total_tokens
        billed = sum(row[a.rid].total_tokens for a in mine if row[a.rid].billed)
        assert billed == client_tokens + partial_tokens
        assert totals[f"{name}-{stack.kind}"]["total_tokens"] == billed
        assert totals[f"{name}-{stack.kind}"]["cost_usd"] == pytest.approx(
            sum(row[a.rid].cost_usd for a in mine if row[a.rid].billed))

        # The limits held in every window of the limiter's 60 s (on the limiter's clock).
        admitted = [(row[a.rid].admitted_at, row[a.rid].total_tokens) for a in mine
                    if row[a.rid].admitted_at is not None]
        most_requests, most_tokens = _max_in_window(admitted, 60.0)
        limits = KEYS[name]
        if "rpm" in limits:
            assert most_requests <= limits["rpm"]
        if "tpm" in limits:
            assert most_tokens <= limits["tpm"]
        refused = sum(a.status == 429 for a in mine)
        figures[name] = dict(attempts=len(mine), refused_429=refused,
                             dropped=sum(a.outcome == "dropped" for a in mine),
                             billed_tokens=billed, client_tokens=client_tokens,
                             partial_tokens=partial_tokens, max_requests_60s=most_requests,
                             max_tokens_60s=most_tokens)
        for a in mine:  # every reply of a limited key carries its headers
            if a.status == 409:  # refused before the limits are looked at
                continue
            if "rpm" in limits:
                assert a.headers["x-ratelimit-limit"] == str(limits["rpm"])
                assert "x-ratelimit-remaining-requests" in a.headers
                assert "x-ratelimit-reset" in a.headers
            if "tpm" in limits:
                assert a.headers["x-tokenlimit-limit"] == str(limits["tpm"])
                assert "x-ratelimit-remaining-tokens" in a.headers
    # The limits were reached (the load exceeds them), and the unlimited key never refused.
    assert figures["load-b"]["refused_429"] > 0 and figures["load-c"]["refused_429"] > 0, \
        (elapsed, figures)
    assert figures["load-a"]["refused_429"] == 0
    assert sum(f["dropped"] for f in figures.values()) > 20
    assert sum(a.number > 0 for a in attempts) > 20

    # The admin endpoint and `k2serve usage --json` report the same totals.
    r = httpx.get(stack.servers[0].root + "/admin/usage", timeout=30,
                  headers={"Authorization": f"Bearer {admin}"})
    assert r.status_code == 200
    cli = subprocess.run([sys.executable, "-m", "k2serve.cli", "usage", "--json",
                          "--database-url", stack.db_url], capture_output=True, text=True,
                         env=dict(os.environ), timeout=60)
    assert cli.returncode == 0, cli.stderr
    assert json.loads(cli.stdout) == r.json()
    for name in KEYS:
        assert {k["key"]: k for k in r.json()["keys"]}[f"{name}-{stack.kind}"] == \
            totals[f"{name}-{stack.kind}"]
    print(f"\n[{stack.kind}] {len(attempts)} attempts for {N_REQUESTS} requests over "
          f"{len(stack.servers)} server(s) in {elapsed:.1f} s")
    for name, f in figures.items():
        print(f"  {name} {KEYS[name] or 'no limits'}: {f}")
