"""Billing correctness and admission (issue #12): every delivered token billed, retries
replayed or billed, Idempotency-Key rules, budgets under concurrency, the real chat
reservation, and the model allow-list on every model a request uses.

Each test runs with the in-memory stores and, when K2SERVE_TEST_REDIS_URL is set, with the
Redis ones (`limiter_kind`); the database is SQLite, or PostgreSQL when configured."""

from __future__ import annotations

import asyncio
import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from starlette.testclient import TestClient

from k2serve.app import create_app
from k2serve.platform.form_fields import multipart_model
from k2serve.platform.keys import KeyStore
from k2serve.platform.ledger import ledger_rows, usage_totals
from k2serve.platform.service import Platform
from k2serve.serving.backend import TextDelta
from k2serve.serving.registry import ModelRegistry, ModelSpec
from tests.platform.conftest import live_server, redis_url
from tests.platform.test_api import MODEL, OTHER, PRICE, FakeBackend, ShortBackend

COST = (3 * 1.0 + 4 * 3.0) / 1e6  # a 3-word prompt with max_tokens=4 at PRICE


class PacedBackend(FakeBackend):
    """Like FakeBackend, one token every `delay` seconds (so requests overlap)."""

    def __init__(self, delay=0.01):
        super().__init__()
        self.delay = delay

    async def generate(self, prompt_ids, params, stop, reservation=None):
        for i in range(params.max_tokens):
            await asyncio.sleep(self.delay)
            yield TextDelta(text="x", token_ids=[7], logprobs=None,
                            finish_reason=("length" if i == params.max_tokens - 1 else None),
                            prompt_tokens=len(prompt_ids), completion_tokens=i + 1)


def make_platform(database, kind):
    return Platform(database, redis_url=redis_url() if kind == "redis" else None)


def make_app(database, kind, backend=None, extra=()):
    registry = ModelRegistry()
    registry.register(ModelSpec(id=MODEL, type="chat", context_length=64, pricing=PRICE),
                      backend or FakeBackend())
    registry.register(ModelSpec(id=OTHER, type="chat", context_length=64, pricing=PRICE),
                      ShortBackend())
    for spec, b in extra:
        registry.register(spec, b)
    platform = make_platform(database, kind)
    return create_app(registry, platform=platform), platform


def post(c, key, path="/v1/completions", headers=None, **body):
    h = {"Authorization": f"Bearer {key}", **(headers or {})}
    return c.post(path, headers=h, json=body)


def rows(database):
    return {r.request_id: r for r in ledger_rows(database)}


def error_of(r):
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    return err


# -- retries and Idempotency-Key ----------------------------------------------------------
def test_idempotency_key_replays_refuses_other_bodies_and_bills_what_generates(database,
                                                                               limiter_kind):
    _, key = KeyStore(database).create("k")
    app, platform = make_app(database, limiter_kind)
    body = {"model": MODEL, "prompt": "a b c", "max_tokens": 4}
    with TestClient(app) as c:
        first = post(c, key, headers={"Idempotency-Key": "op-1", "x-request-id": "first"},
                     **body)
        assert first.status_code == 200 and "idempotent-replayed" not in first.headers
        # The same request again: the stored reply, marked, nothing generated.
        again = post(c, key, headers={"Idempotency-Key": "op-1", "x-request-id": "again"},
                     **body)
        assert again.status_code == 200 and again.json() == first.json()
        assert again.headers["idempotent-replayed"] == "true"
        assert again.headers["original-request-id"] == "first"
        assert again.headers["content-type"].startswith("application/json")
        # Another body (or endpoint) with the same key: 422, in the API's error shape.
        other = post(c, key, headers={"Idempotency-Key": "op-1", "x-request-id": "other"},
                     **{**body, "prompt": "another story entirely"})
        assert other.status_code == 422
        assert error_of(other)["code"] == "idempotency_key_reused"
        assert other.headers["x-should-retry"] == "false"
        chat = post(c, key, "/v1/chat/completions", headers={"Idempotency-Key": "op-1"},
                    model=MODEL, messages=[{"role": "user", "content": "a b c"}], max_tokens=4)
        assert chat.status_code == 422
        # Keys are per API key: another key's "op-1" is its own request.
        _, key2 = KeyStore(database).create("k2")
        assert "idempotent-replayed" not in post(c, key2, headers={"Idempotency-Key": "op-1"},
                                                 **body).headers
        # A first attempt that failed (400: too long for the context) stores nothing: the
        # retry generates, and is billed.
        long = {**body, "max_tokens": 70}
        assert post(c, key, headers={"Idempotency-Key": "op-2"}, **long).status_code == 400
        assert post(c, key, headers={"Idempotency-Key": "op-2"}, **long).status_code == 400
        # A stream is not stored: its retry generates again, and is billed again.
        stream = {**body, "stream": True}
        for rid in ("s1", "s2"):
            r = post(c, key, headers={"Idempotency-Key": "op-3", "x-request-id": rid}, **stream)
            assert r.status_code == 200 and "idempotent-replayed" not in r.headers
        assert post(c, key, headers={"Idempotency-Key": "x" * 256}, **body).status_code == 400
    by_id = rows(database)
    assert by_id["first"].billed and by_id["first"].completion_tokens == 4
    assert by_id["again"].status == "replayed" and not by_id["again"].billed
    assert by_id["again"].total_tokens == 0
    assert by_id["again"].retry_group == by_id["first"].retry_group
    assert by_id["other"].status == "rejected" and by_id["other"].error == "idempotency_key_reused"
    assert by_id["s1"].billed and by_id["s2"].billed
    assert by_id["s1"].completion_tokens == by_id["s2"].completion_tokens == 4


def test_concurrent_duplicate_is_409_then_replayed(database, limiter_kind):
    _, key = KeyStore(database).create("k")
    app, _ = make_app(database, limiter_kind, backend=PacedBackend(0.05))
    body = {"model": MODEL, "prompt": "a b c", "max_tokens": 20}  # 1 s of generation
    with TestClient(app) as c:
        with ThreadPoolExecutor(2) as pool:
            one = pool.submit(post, c, key, headers={"Idempotency-Key": "op"}, **body)
            time.sleep(0.2)
            two = pool.submit(post, c, key, headers={"Idempotency-Key": "op"}, **body)
            replies = sorted([one.result(30), two.result(30)], key=lambda r: r.status_code)
        first, busy = replies
        assert (first.status_code, busy.status_code) == (200, 409)
        assert error_of(busy)["code"] == "idempotency_key_in_use"
        assert busy.headers["retry-after"] == "1" and "x-should-retry" not in busy.headers
        later = post(c, key, headers={"Idempotency-Key": "op"}, **body)
        assert later.headers["idempotent-replayed"] == "true"
        assert later.json() == first.json()


def test_sdk_retries_replay_a_completed_request(database, limiter_kind):
    _, key = KeyStore(database).create("k")
    app, platform = make_app(database, limiter_kind)
    with TestClient(app) as c:
        def send(rid, prompt="a b c", count=None):
            h = {"x-request-id": rid}
            if count is not None:
                h["x-stainless-retry-count"] = str(count)
            return post(c, key, headers=h, model=MODEL, prompt=prompt, max_tokens=2)

        sdk0 = send("sdk-0", count=0)
        sdk1 = send("sdk-1", count=1)  # the SDK's retry of a request that completed
        assert sdk1.headers["idempotent-replayed"] == "true" and sdk1.json() == sdk0.json()
        # A new first attempt (count 0) with the same body is a new request.
        assert "idempotent-replayed" not in send("sdk-0b", count=0).headers
        # Identical bodies without retry headers: two requests, both billed.
        send("plain-1")
        send("plain-2")
        # A retry header for a body never seen: a request of its own.
        send("orphan", prompt="never seen", count=2)
    by_id = rows(database)
    billed = {rid for rid, r in by_id.items() if r.billed}
    assert billed == {"sdk-0", "sdk-0b", "plain-1", "plain-2", "orphan"}
    assert by_id["sdk-1"].status == "replayed"
    assert by_id["sdk-0"].retry_group == by_id["sdk-1"].retry_group
    totals = usage_totals(database)["total"]
    assert totals["requests"] == 6 and totals["billed_requests"] == 5


# -- the abuse patterns, through a real server --------------------------------------------
class Received:
    """Tokens a client received, per key: the prompt of every reply that started (it was
    processed), plus each completion token it read. Replays add nothing (stored tokens)."""

    def __init__(self):
        self.tokens = 0
        self.replays = 0

    def reply(self, r: httpx.Response) -> None:
        if r.status_code != 200:
            return
        if r.headers.get("idempotent-replayed") == "true":
            self.replays += 1
            return
        usage = r.json()["usage"]
        self.tokens += usage["prompt_tokens"] + usage["completion_tokens"]

    def stream(self, c: httpx.Client, body: dict, headers: dict, drop_after: int | None) -> None:
        with c.stream("POST", "/v1/completions", json={**body, "stream": True},
                      headers=headers) as r:
            if r.status_code != 200:
                return
            self.tokens += 3  # the 3-word prompt
            got = 0
            for line in r.iter_lines():
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line[6:])
                got += sum(1 for ch in chunk.get("choices", []) if ch.get("text"))
                if drop_after is not None and got >= drop_after:
                    break  # the client leaves mid-stream
            self.tokens += got


def test_abuse_patterns_never_get_tokens_unbilled(database, limiter_kind):
    """Shared Idempotency-Keys with different bodies, retry-count headers, identical bodies,
    dropped streams (with and without keys), concurrent duplicates: per key, the billed
    tokens are at least the tokens its client received."""
    store = KeyStore(database)
    keys = {name: store.create(name)[1] for name in ("abuser", "sdk", "dropper")}
    app, platform = make_app(database, limiter_kind, backend=PacedBackend(0.003))
    received = {name: Received() for name in keys}
    stories = ["tell me a story", "tell me another story", "a story about a cat",
               "a story about a dog", "the longest story"]
    with live_server(app) as root, httpx.Client(base_url=root, timeout=30) as c:
        def auth(name, **h):
            return {"Authorization": f"Bearer {keys[name]}", **h}

        def body(prompt, max_tokens=20):
            return {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens}

        # 1. One Idempotency-Key for five different stories (the free-token trick).
        codes = []
        for s in stories:
            r = c.post("/v1/completions", json=body(s), headers=auth("abuser",
                                                                      **{"Idempotency-Key": "x"}))
            codes.append(r.status_code)
            received["abuser"].reply(r)
        # 2. Retry-count headers chosen by the client, on new and repeated bodies.
        for i, s in enumerate(stories):
            for count in (str(i + 1), "0", "1", "1000", "-5", "junk"):
                r = c.post("/v1/completions", json=body(s, 6),
                           headers=auth("sdk", **{"x-stainless-retry-count": count}))
                assert r.status_code == 200
                received["sdk"].reply(r)
        # 3. Identical bodies, no headers.
        for _ in range(3):
            received["abuser"].reply(c.post("/v1/completions", json=body("same"),
                                            headers=auth("abuser")))
        # 4. Drops: streams left after a few tokens, bare and under one Idempotency-Key,
        # then the key's retry completes; and concurrent duplicates of one key.
        for n in range(3):
            received["dropper"].stream(c, body(stories[n], 40), auth("dropper"), drop_after=3)
            received["dropper"].stream(c, body("one story", 40),
                                       auth("dropper", **{"Idempotency-Key": "d"}),
                                       drop_after=2 + n)
        received["dropper"].stream(c, body("one story", 40),
                                   auth("dropper", **{"Idempotency-Key": "d"}), None)
        with ThreadPoolExecutor(4) as pool:
            replies = list(pool.map(lambda _: c.post(
                "/v1/completions", json=body("race", 10),
                headers=auth("dropper", **{"Idempotency-Key": "race"})), range(4)))
        for r in replies:
            received["dropper"].reply(r)
        for _ in range(100):  # the dropped streams' rows land when their generations end
            platform.writer.flush()
            if len(ledger_rows(database)) >= 5 + 30 + 3 + 7 + 4:
                break
            time.sleep(0.05)
        time.sleep(0.2)
        platform.writer.flush()
    billed = {k["key"]: k["total_tokens"] for k in usage_totals(database)["keys"]}
    for name, got in received.items():
        assert got.tokens > 0
        assert billed[name] >= got.tokens, (name, billed[name], got.tokens)
    assert codes == [200, 422, 422, 422, 422]  # one story; the other four refused
    assert sorted({r.status_code for r in replies}) in ([200], [200, 409])
    assert received["sdk"].replays == 5 * 2  # "1" and "1000" after a "0": replays


# -- budgets under concurrency ------------------------------------------------------------
def wait_for_holds(client, platform, key_id, timeout=5.0):
    """Until the key holds nothing (on the app's own event loop: the Redis client is its)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        platform.writer.flush()
        if client.portal.call(platform.budgets.outstanding, key_id) == 0:
            return
        time.sleep(0.02)
    raise AssertionError("budget holds were not released")


def test_budget_holds_under_concurrency(database, limiter_kind):
    """30 concurrent requests on a nearly spent key: at most one overshoot of one request's
    cost (the worst case of each is held at admission until its row is written)."""
    info, key = KeyStore(database).create("nearly", budget_usd=1.5 * COST)
    app, platform = make_app(database, limiter_kind, backend=PacedBackend(0.02))
    body = {"model": MODEL, "prompt": "a b c", "max_tokens": 4}
    with TestClient(app) as c:
        assert post(c, key, **body).status_code == 200  # spends COST of 1.5 COST
        platform.writer.flush()
        wait_for_holds(c, platform, info.id)
        with ThreadPoolExecutor(30) as pool:
            replies = list(pool.map(lambda _: post(c, key, **body), range(30)))
        codes = [r.status_code for r in replies]
        assert set(codes) <= {200, 429} and codes.count(200) >= 1
        for r in replies:
            if r.status_code == 429:
                assert error_of(r)["code"] == "insufficient_quota"
        platform.writer.flush()
        after = post(c, key, **body)
        assert after.status_code == 429 and after.headers["x-should-retry"] == "false"
    spent = KeyStore(database).get_by_name("nearly").spent_usd
    assert spent <= info.budget_usd + COST + 1e-12
    assert spent == pytest.approx(usage_totals(database)["total"]["cost_usd"])


def test_budget_holds_are_released_when_rows_are_written(database, limiter_kind):
    """Holds free themselves once the request's cost is in the key's spend: a key with room
    for ten requests gets ten, then refusals; refusals and errors hold nothing."""
    info, key = KeyStore(database).create("ten", budget_usd=10 * COST)
    app, platform = make_app(database, limiter_kind)
    body = {"model": MODEL, "prompt": "a b c", "max_tokens": 4}
    with TestClient(app) as c:
        for _ in range(3):
            assert post(c, key, **{**body, "max_tokens": 70}).status_code == 400
        paid = {"Idempotency-Key": "paid"}
        for i in range(10):
            wait_for_holds(c, platform, info.id)
            assert post(c, key, headers=paid if i == 0 else None, **body).status_code == 200, i
        wait_for_holds(c, platform, info.id)
        assert post(c, key, **body).status_code == 429
        # A reply already paid for is still replayed.
        replay = post(c, key, headers=paid, **body)
        assert replay.status_code == 200 and replay.headers["idempotent-replayed"] == "true"
    assert KeyStore(database).get_by_name("ten").spent_usd == pytest.approx(10 * COST)


# -- the chat reservation -----------------------------------------------------------------
def test_chat_reservation_is_its_real_prompt_tokens_plus_max_tokens(database):
    _, key = KeyStore(database).create("metered", tpm=5000)
    app, platform = make_app(database, "memory")
    messages = [{"role": "system", "content": "be brief"},
                {"role": "user", "content": "one two three four five " * 6}]
    with TestClient(app) as c:
        r = post(c, key, "/v1/chat/completions", model=MODEL, messages=messages, max_tokens=3)
        assert r.status_code == 200
        prompt = r.json()["usage"]["prompt_tokens"]
        # The headers are the admission's: remaining = TPM - reservation.
        assert int(r.headers["x-tokenlimit-remaining"]) == 5000 - (prompt + 3)
        body = {"model": MODEL, "messages": messages, "max_tokens": 3, "n": 2}
        assert platform.reservation("chat.completions", body, json.dumps(body).encode()) == \
            prompt + 2 * 3


# -- the allow-list -----------------------------------------------------------------------
def _multipart(fields: list[tuple[str, str, bool]]) -> tuple[bytes, str]:
    boundary = "b0und4ry"
    parts = []
    for name, value, is_file in fields:
        disposition = f'form-data; name="{name}"' + ('; filename="a.wav"' if is_file else "")
        parts.append(f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n{value}\r\n")
    return ("".join(parts) + f"--{boundary}--\r\n").encode(), \
        f"multipart/form-data; boundary={boundary}"


def test_multipart_model_is_the_field_the_route_reads():
    raw, ctype = _multipart([("model", "first", False), ("file", "RIFF", True),
                             ("model", "last", False)])
    assert multipart_model(raw, ctype) == "last"  # Starlette's form keeps the last value
    raw, ctype = _multipart([("model", "first", False), ("model", "data", True)])
    assert multipart_model(raw, ctype) is None  # a file part is no model to the route
    raw, ctype = _multipart([("file", "RIFF", True)])
    assert multipart_model(raw, ctype) is None


def test_allow_list_checks_every_model_a_request_uses(database):
    from k2serve.audio.serving import TranscriptionBackend
    from k2serve.safety.serving import ModerationBackend

    moderation = ModelSpec(id="fake/guard", type="moderation", context_length=512)
    whisper = ModelSpec(id="fake/whisper", type="transcribe", context_length=0)
    app, _ = make_app(database, "memory",
                      extra=[(moderation, ModerationBackend(None)),
                             (whisper, TranscriptionBackend(None, None, 30.0, 1 << 20))])
    _, key = KeyStore(database).create("chat-only", models=[MODEL])
    auth = {"Authorization": f"Bearer {key}"}
    with TestClient(app) as c:
        # The route uses the LAST multipart `model`: a key may not hide it behind an allowed one.
        raw, ctype = _multipart([("model", MODEL, False), ("file", "RIFF", True),
                                 ("model", "fake/whisper", False)])
        r = c.post("/v1/audio/transcriptions", content=raw,
                   headers={**auth, "content-type": ctype})
        assert r.status_code == 403 and error_of(r)["code"] == "model_not_allowed"
        assert "fake/whisper" in error_of(r)["message"]
        # A model-less upload: the one transcription model, checked.
        raw, ctype = _multipart([("file", "RIFF", True)])
        r = c.post("/v1/audio/transcriptions", content=raw,
                   headers={**auth, "content-type": ctype})
        assert r.status_code == 403 and error_of(r)["param"] == "model"
        # safety_model is a model the request uses.
        r = post(c, key, "/v1/chat/completions", model=MODEL, safety_model="fake/guard",
                 messages=[{"role": "user", "content": "hi"}], max_tokens=2)
        assert r.status_code == 403 and error_of(r)["param"] == "safety_model"
        r = post(c, key, model=MODEL, prompt="a b", max_tokens=2, safety_model="fake/guard")
        assert r.status_code == 403 and error_of(r)["code"] == "model_not_allowed"
        # A model-less moderation: the route's default (first moderation model), checked.
        r = post(c, key, "/v1/moderations", input="hello")
        assert r.status_code == 403 and "fake/guard" in error_of(r)["message"]
        assert post(c, key, model=MODEL, prompt="a b", max_tokens=2).status_code == 200
