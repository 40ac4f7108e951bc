"""POST /v1/moderations and the `safety_model` field, on a live server, through the
official SDKs (openai, together 3.x, together 2.x from its side copy) and plain HTTP."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import tempfile
import textwrap
import time

import httpx
import pytest

from k2serve.safety.labels import LABELS
from k2serve.serving.catalog import SAFETY_MODEL_ID
from tests.conftest import EMBEDDED_ID, start_server, stop_server

REPO = pathlib.Path(__file__).resolve().parents[2]
SDK2_PATH = REPO / ".sdk" / "together2"
FIXTURE = json.loads((pathlib.Path(__file__).parent / "fixtures" / "package_scores.json")
                     .read_text())["rows"]
TOXIC = "You are so dumb and stupid!"
CLEAN = "What are some fun things to do in New York?"
STUPID_TOKEN = "27275"  # SmolLM2's " stupid": a logit bias makes a clean prompt's output toxic


@pytest.fixture(scope="module")
def live():
    home = tempfile.mkdtemp(prefix="k2serve-safety-home-")
    server = start_server("--families", "chat,moderation", "--threads", "1",
                          env={"K2SERVE_HOME": home})
    server.home = home
    yield server
    stop_server(server)


@pytest.fixture()
def http(live):
    with httpx.Client(base_url=live.root, timeout=120) as client:
        yield client


@pytest.fixture()
def openai_client(live):
    import openai
    return openai.OpenAI(base_url=live.base_v1, api_key="sk-local", max_retries=0)


def package_scores(text: str) -> dict:
    return next(r["scores"] for r in FIXTURE if r["text"] == text)


# -- /v1/models and /v1/moderations ----------------------------------------------------
def test_listed_with_its_type_and_price(http):
    models = {m["id"]: m for m in http.get("/v1/models").json()}
    assert models[SAFETY_MODEL_ID]["type"] == "moderation"
    assert models[SAFETY_MODEL_ID]["pricing"]["input"] > 0
    assert models[EMBEDDED_ID]["type"] == "chat"


def test_openai_sdk_moderations_match_the_package(openai_client):
    texts = [TOXIC, "Have a nice day :)", "I hate gay people, they should all disappear."]
    reply = openai_client.moderations.create(input=texts)
    assert reply.model == SAFETY_MODEL_ID and reply.id.startswith("modr-")
    assert [r.flagged for r in reply.results] == [True, False, True]
    toxic, clean, hate = reply.results
    assert toxic.categories.harassment is True and toxic.categories.violence is False
    assert hate.categories.hate is True
    assert clean.categories.harassment is False
    for text, result in zip(texts, reply.results):
        expected = package_scores(text)
        labels = result.model_extra["label_scores"]
        for label in LABELS:
            assert labels[label] == pytest.approx(expected[label], abs=1e-5)
        assert result.category_scores.harassment == pytest.approx(
            max(expected["toxic"], expected["severe_toxic"], expected["insult"]), abs=1e-5)
        assert result.category_scores.hate == pytest.approx(expected["identity_hate"], abs=1e-5)
        assert result.model_extra["flagged_labels"] == [
            label for label in LABELS if expected[label] >= 0.5]
    # Named explicitly, and as a single string.
    one = openai_client.moderations.create(model=SAFETY_MODEL_ID, input=TOXIC)
    assert len(one.results) == 1 and one.results[0].flagged


def test_a_moderation_is_billed_by_the_words_read(live, http):
    r = http.post("/v1/moderations", json={"input": ["one two three", "four five"]})
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == 5
    row = _ledger_row(live, r.headers["x-request-id"])
    assert (row.endpoint, row.status, row.prompt_tokens) == ("moderations", "ok", 5)
    assert row.cost_usd == pytest.approx(5 * 0.01 / 1e6)


@pytest.mark.parametrize("body,fragment", [
    ({"input": ""}, "must not be an empty string"),
    ({"input": []}, "must not be empty"),
    ({"input": ["fine", 3]}, "input[1] must be a string"),
    ({"input": {"text": "x"}}, "must be a string or a list of strings"),
    ({"input": ["x"] * 33}, "at most 32"),
    ({"input": "x" * 40_000}, "at most 32768"),
    ({"input": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}, "text only"),
    ({}, "Missing required parameter: 'input'"),
])
def test_bad_input_is_a_400_naming_input(http, body, fragment):
    r = http.post("/v1/moderations", json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "input" and fragment in err["message"]


def test_wrong_models_on_moderations(http):
    r = http.post("/v1/moderations", json={"model": EMBEDDED_ID, "input": "hi"})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["param"] == "model" and err["code"] == "model_not_supported"
    assert "is a chat model and cannot classify content" in err["message"]
    assert "it serves chat and text completions" in err["message"]
    assert SAFETY_MODEL_ID in err["message"]
    r = http.post("/v1/moderations", json={"model": "omni-moderation-latest", "input": "hi"})
    assert r.status_code == 404 and SAFETY_MODEL_ID in r.json()["error"]["message"]


# -- safety_model on chat and completions ----------------------------------------------
def test_unknown_safety_model_is_a_400_listing_the_served_ones(http):
    for safety_model in ("meta-llama/Meta-Llama-Guard-3-8B", EMBEDDED_ID):
        for path, body in (("/v1/chat/completions",
                            {"messages": [{"role": "user", "content": CLEAN}]}),
                           ("/v1/completions", {"prompt": CLEAN})):
            r = http.post(path, json={"model": EMBEDDED_ID, "safety_model": safety_model,
                                      "max_tokens": 4, **body})
            assert r.status_code == 400, r.text
            err = r.json()["error"]
            assert err["param"] == "safety_model" and SAFETY_MODEL_ID in err["message"]


def test_clean_exchange_is_unaffected(http):
    base = {"model": EMBEDDED_ID, "messages": [{"role": "user", "content": CLEAN}],
            "max_tokens": 24, "temperature": 0}
    plain = http.post("/v1/chat/completions", json=base).json()
    guarded = http.post("/v1/chat/completions", json={**base, "safety_model": SAFETY_MODEL_ID})
    guarded = guarded.json()
    assert guarded["choices"][0]["message"] == plain["choices"][0]["message"]
    assert guarded["choices"][0]["finish_reason"] == plain["choices"][0]["finish_reason"]
    for key in ("prompt_tokens", "completion_tokens"):  # (the second one hits the prefix cache)
        assert guarded["usage"][key] == plain["usage"][key]
    assert guarded["safety"] == {"model": SAFETY_MODEL_ID, "flagged": False, "flags": []}
    streamed = _stream_text(http, "/v1/chat/completions", {**base,
                                                           "safety_model": SAFETY_MODEL_ID})
    assert streamed == (plain["choices"][0]["message"]["content"],
                        plain["choices"][0]["finish_reason"])
    prompt = {"model": EMBEDDED_ID, "prompt": "A horse is a horse", "max_tokens": 12,
              "temperature": 0}
    plain = http.post("/v1/completions", json=prompt).json()["choices"][0]
    guarded = http.post("/v1/completions", json={**prompt, "safety_model": SAFETY_MODEL_ID})
    assert guarded.json()["choices"][0]["text"] == plain["text"]


def test_flagged_input_generates_nothing_and_is_recorded(live, http):
    body = {"model": EMBEDDED_ID, "messages": [{"role": "user", "content": TOXIC}],
            "max_tokens": 16, "n": 2, "safety_model": SAFETY_MODEL_ID}
    r = http.post("/v1/chat/completions", json=body)
    reply = r.json()
    assert [c["finish_reason"] for c in reply["choices"]] == ["content_filter"] * 2
    assert [c["message"]["content"] for c in reply["choices"]] == ["", ""]
    assert reply["usage"]["completion_tokens"] == 0
    flag = reply["safety"]["flags"][0]
    assert reply["safety"]["flagged"] and flag["stage"] == "input"
    assert flag["labels"][0] == "toxic" and "harassment" in flag["categories"]
    row = _ledger_row(live, r.headers["x-request-id"])
    assert row.status == "content_filter" and row.completion_tokens == 0
    assert row.error.startswith("input: toxic")

    r = http.post("/v1/completions", json={"model": EMBEDDED_ID, "prompt": TOXIC,
                                           "max_tokens": 8, "safety_model": SAFETY_MODEL_ID})
    # (no `logprobs` key unless asked for: Together's schema has no null there)
    assert r.json()["choices"][0] == {"index": 0, "text": "", "finish_reason": "content_filter"}
    text, finish = _stream_text(http, "/v1/completions", {
        "model": EMBEDDED_ID, "prompt": TOXIC, "max_tokens": 8, "stream": True,
        "safety_model": SAFETY_MODEL_ID})
    assert (text, finish) == ("", "content_filter")


def test_flagged_output_is_withheld_and_generation_stops(live, http):
    """A clean prompt whose output a logit bias turns into insults."""
    body = {"model": EMBEDDED_ID, "messages": [{"role": "user", "content": CLEAN}],
            "max_tokens": 200, "temperature": 0, "logit_bias": {STUPID_TOKEN: 100},
            "safety_model": SAFETY_MODEL_ID}
    r = http.post("/v1/chat/completions", json=body)
    reply = r.json()
    choice = reply["choices"][0]
    assert choice["finish_reason"] == "content_filter"
    assert "stupid" not in choice["message"]["content"]
    assert reply["safety"]["flags"][0]["stage"] == "output"
    # Stopped at the first check (16 words), long before max_tokens.
    assert reply["usage"]["completion_tokens"] < 40
    row = _ledger_row(live, r.headers["x-request-id"])
    assert row.status == "content_filter" and row.error.startswith("output: toxic")
    assert 0 < row.completion_tokens < 60
    text, finish = _stream_text(http, "/v1/chat/completions", body)
    assert (text, finish) == (choice["message"]["content"], "content_filter")
    # Without the guard the same request really does produce the insults.
    plain = http.post("/v1/chat/completions", json={**body, "safety_model": None,
                                                    "max_tokens": 20}).json()
    assert plain["choices"][0]["message"]["content"].count("stupid") >= 10


# -- the official SDKs accept content_filter -------------------------------------------
def test_openai_sdk_flagged_chat_streaming_and_not(openai_client):
    extra = {"safety_model": SAFETY_MODEL_ID}
    messages = [{"role": "user", "content": TOXIC}]
    reply = openai_client.chat.completions.create(model=EMBEDDED_ID, messages=messages,
                                                  max_tokens=8, extra_body=extra)
    assert reply.choices[0].finish_reason == "content_filter"
    assert reply.choices[0].message.content == ""
    chunks = list(openai_client.chat.completions.create(
        model=EMBEDDED_ID, messages=messages, max_tokens=8, stream=True, extra_body=extra))
    assert chunks[-1].choices[0].finish_reason == "content_filter"
    completion = openai_client.completions.create(model=EMBEDDED_ID, prompt=TOXIC, max_tokens=8,
                                                  extra_body=extra)
    assert completion.choices[0].finish_reason == "content_filter"


def test_together3_sdk_flagged_chat_streaming_and_not(live):
    import together
    client = together.Together(base_url=live.root, api_key="local", max_retries=0)
    messages = [{"role": "user", "content": TOXIC}]
    reply = client.chat.completions.create(model=EMBEDDED_ID, messages=messages, max_tokens=8,
                                           safety_model=SAFETY_MODEL_ID)
    assert reply.choices[0].finish_reason == "content_filter"
    chunks = list(client.chat.completions.create(model=EMBEDDED_ID, messages=messages,
                                                 max_tokens=8, stream=True,
                                                 safety_model=SAFETY_MODEL_ID))
    assert chunks[-1].choices[0].finish_reason == "content_filter"
    completion = client.completions.create(model=EMBEDDED_ID, prompt=TOXIC, max_tokens=8,
                                           safety_model=SAFETY_MODEL_ID)
    assert completion.choices[0].finish_reason == "content_filter"
    with pytest.raises(together.BadRequestError):
        client.chat.completions.create(model=EMBEDDED_ID, messages=messages, max_tokens=8,
                                       safety_model="meta-llama/Meta-Llama-Guard-3-8B")


SDK2_SCRIPT = textwrap.dedent("""
    import json, sys
    import together
    assert together.__version__.startswith("2."), together.__version__
    client = together.Together(base_url=sys.argv[1], api_key="local", max_retries=0)
    messages = [{"role": "user", "content": sys.argv[3]}]
    kw = dict(model=sys.argv[2], max_tokens=8, safety_model=sys.argv[4])
    chat = client.chat.completions.create(messages=messages, **kw)
    chunks = list(client.chat.completions.create(messages=messages, stream=True, **kw))
    completion = client.completions.create(prompt=sys.argv[3], **kw)
    print(json.dumps([chat.choices[0].finish_reason, chunks[-1].choices[0].finish_reason,
                      completion.choices[0].finish_reason]))
""")


def test_together2_sdk_flagged_chat_streaming_and_not(live):
    if not (SDK2_PATH / "together").is_dir():
        pytest.fail(f"together 2.x side copy missing: run scripts/install-sdk-2x ({SDK2_PATH})")
    out = subprocess.run([sys.executable, "-c", SDK2_SCRIPT, live.base_v1, EMBEDDED_ID, TOXIC,
                          SAFETY_MODEL_ID], env=dict(os.environ, PYTHONPATH=str(SDK2_PATH)),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == ["content_filter"] * 3


def test_together1_user_agent_gets_a_finish_reason_its_enum_holds(http):
    """Together's legacy 1.x SDK rejects content_filter (pydantic enum); by its User-Agent
    it gets "error" instead (checked by hand with together==1.5.35: chat, stream and
    completions parse, where content_filter raises ValidationError)."""
    headers = {"User-Agent": "Together/v1 PythonBindings/1.5.35"}
    r = http.post("/v1/chat/completions", headers=headers, json={
        "model": EMBEDDED_ID, "messages": [{"role": "user", "content": TOXIC}],
        "max_tokens": 8, "safety_model": SAFETY_MODEL_ID})
    assert r.json()["choices"][0]["finish_reason"] == "error"
    assert r.json()["safety"]["flagged"] is True


# -- helpers ---------------------------------------------------------------------------
def _stream_text(http: httpx.Client, path: str, body: dict) -> tuple[str, str | None]:
    text, finish = "", None
    with http.stream("POST", path, json={**body, "stream": True}) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choice = json.loads(line[6:])["choices"][0]
            text += choice.get("text") if "text" in choice else choice["delta"].get("content", "")
            finish = choice["finish_reason"] or finish
    return text, finish


def _ledger_row(live, request_id: str, timeout: float = 20.0):
    from k2serve.platform.db import Database
    from k2serve.platform.ledger import ledger_rows

    deadline = time.time() + timeout
    while time.time() < deadline:
        db = Database(f"sqlite:///{live.home}/k2serve.db", migrate=False)
        try:
            rows = [r for r in ledger_rows(db) if r.request_id == request_id]
        finally:
            db.close()
        if rows and rows[0].status != "in_progress":  # rows exist from admission
            return rows[0]
        time.sleep(0.2)
    raise AssertionError(f"no ledger row for request {request_id}")

