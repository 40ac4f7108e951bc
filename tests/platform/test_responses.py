"""The Responses API on the platform, with the official `openai` SDK against a live app over
SQLite and PostgreSQL: stored responses belong to their key, generations are ledger rows of
endpoint `responses` (a background one settled when it finishes), and a continued
conversation reserves its stored history."""

from __future__ import annotations

import asyncio
import time

import openai
import pytest

from k2serve.platform.keys import KeyStore
from k2serve.platform.ledger import ledger_rows
from k2serve.serving.registry import ModelSpec
from tests.platform.conftest import live_server
from tests.platform.test_api import MODEL, PRICE, FakeBackend, TestClient, make_app

SLOW = "fake/slow"


def client(root: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=root + "/v1", api_key=key, max_retries=0)


def test_stored_responses_belong_to_their_key_and_are_ledger_rows(database):
    store = KeyStore(database)
    _, alice_key = store.create("alice")
    _, bob_key = store.create("bob")
    app, platform = make_app(database)
    with live_server(app) as root:
        alice, bob = client(root, alice_key), client(root, bob_key)
        made = alice.responses.create(model=MODEL, input="one two three",
                                      max_output_tokens=4,
                                      extra_headers={"x-request-id": "resp-1"})
        assert made.status == "incomplete"  # the fake model writes until max_output_tokens
        assert made.incomplete_details.reason == "max_output_tokens"
        assert made.output_text == "xxxx" and made.usage.output_tokens == 4
        assert alice.responses.retrieve(made.id).output_text == "xxxx"
        with pytest.raises(openai.NotFoundError) as err:
            bob.responses.retrieve(made.id)
        assert err.value.body["code"] == "response_not_found"
        with pytest.raises(openai.NotFoundError):
            bob.responses.delete(made.id)
        with pytest.raises(openai.NotFoundError) as err:  # nor may bob continue it
            bob.responses.create(model=MODEL, input="four", previous_response_id=made.id,
                                 max_output_tokens=1, extra_headers={"x-request-id": "bob"})
        assert err.value.body["param"] == "previous_response_id"
        # Alice continues it: the earlier input and output come first in the prompt.
        more = alice.responses.create(model=MODEL, input="four", previous_response_id=made.id,
                                      max_output_tokens=1,
                                      extra_headers={"x-request-id": "resp-2"})
        assert more.usage.input_tokens == made.usage.input_tokens + 2  # "xxxx" and "four"
        alice.responses.delete(made.id)
        with pytest.raises(openai.NotFoundError):
            alice.responses.retrieve(made.id)
        # GET, DELETE and cancel are not generations: no rows.
        platform.writer.flush()
    rows = {r.request_id: r for r in ledger_rows(database)}
    assert set(rows) == {"resp-1", "resp-2", "bob"}
    assert (rows["bob"].status, rows["bob"].http_status) == ("rejected", 404)
    row = rows["resp-1"]
    assert (row.endpoint, row.status, row.model) == ("responses", "ok", MODEL)
    assert (row.prompt_tokens, row.completion_tokens) == (made.usage.input_tokens, 4)
    assert row.billed and row.cost_usd > 0


class SlowBackend(FakeBackend):
    """The fake model at 50 ms a token: a background response is still running when polled."""

    async def generate(self, prompt_ids, params, stop, reservation=None):
        async for delta in super().generate(prompt_ids, params, stop, reservation):
            await asyncio.sleep(0.05)
            yield delta


def wait_for(alice: openai.OpenAI, response_id: str, statuses: tuple[str, ...]):
    deadline = time.time() + 20
    while time.time() < deadline:
        got = alice.responses.retrieve(response_id)
        if got.status in statuses:
            return got
        time.sleep(0.05)
    raise AssertionError(f"{response_id} never reached {statuses}: {got.status}")


def test_background_responses_are_billed_when_they_finish_and_can_be_cancelled(database):
    _, key = KeyStore(database).create("alice")
    app, platform = make_app(database)
    app.state.registry.register(ModelSpec(id=SLOW, type="chat", context_length=64,
                                          pricing=PRICE), SlowBackend())
    with live_server(app) as root:
        alice = client(root, key)
        queued = alice.responses.create(model=SLOW, input="one two three", background=True,
                                        max_output_tokens=6,
                                        extra_headers={"x-request-id": "bg-done"})
        assert queued.status == "queued" and queued.background is True
        done = wait_for(alice, queued.id, ("completed", "incomplete"))
        assert done.output_text == "x" * 6 and done.usage.output_tokens == 6
        with pytest.raises(openai.BadRequestError):  # finished: nothing to cancel
            alice.responses.cancel(queued.id)

        running = alice.responses.create(model=SLOW, input="one two three", background=True,
                                         max_output_tokens=40,
                                         extra_headers={"x-request-id": "bg-cancelled"})
        wait_for(alice, running.id, ("in_progress",))
        time.sleep(0.3)
        cancelled = alice.responses.cancel(running.id)
        assert cancelled.status == "cancelled"
        assert alice.responses.retrieve(running.id).status == "cancelled"
        assert alice.responses.cancel(running.id).status == "cancelled"  # idempotent

        plain = alice.responses.create(model=MODEL, input="one", max_output_tokens=1)
        with pytest.raises(openai.BadRequestError) as err:
            alice.responses.cancel(plain.id)
        assert "background" in err.value.message
        deadline = time.time() + 10
        while time.time() < deadline:  # the cancelled run's row is written as it ends
            platform.writer.flush()
            rows = {r.request_id: r for r in ledger_rows(database)}
            if rows["bg-cancelled"].status != "in_progress":
                break
            time.sleep(0.05)
    # Settled from the generation itself, after the `queued` reply had long gone.
    assert (rows["bg-done"].status, rows["bg-done"].endpoint) == ("ok", "responses")
    assert rows["bg-done"].completion_tokens == 6 and rows["bg-done"].billed
    assert rows["bg-cancelled"].status == "client_closed"
    assert 0 < rows["bg-cancelled"].completion_tokens < 40


def test_a_continued_conversation_reserves_its_stored_history(database):
    _, key = KeyStore(database).create("metered", tpm=60)
    app, _ = make_app(database)
    words = " ".join(["word"] * 45)
    with TestClient(app) as c:
        headers = {"Authorization": f"Bearer {key}"}
        first = c.post("/v1/responses", headers=headers, json={
            "model": MODEL, "input": words, "max_output_tokens": 4})
        assert first.status_code == 200, first.text
        assert first.json()["usage"]["total_tokens"] == 50  # "<chat>" + 45 words, 4 out
        body = {"model": MODEL, "input": " ".join(["more"] * 12), "max_output_tokens": 2}
        # Alone it would reserve 15 tokens (only 10 are left this minute) ...
        alone = c.post("/v1/responses", headers=headers, json=body)
        assert alone.status_code == 429
        assert alone.json()["error"]["code"] == "rate_limit_exceeded"
        # ... continued, it reserves its whole prompt: 46 + 1 + 12 + 2 = 61 > the key's 60.
        continued = c.post("/v1/responses", headers=headers,
                           json={**body, "previous_response_id": first.json()["id"]})
        assert continued.status_code == 429
        assert continued.json()["error"]["code"] == "request_exceeds_token_limit"
