"""Bad input gets a clear 4xx in the OpenAI/Together error shape — never a 500 or a hang."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from tests.conftest import EMBEDDED_ID

USER = [{"role": "user", "content": "Hi"}]


def assert_error(r, status: int, *, param: str | None = None, contains: str = ""):
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    assert isinstance(err["type"], str)
    if param is not None:
        assert err["param"] == param, err
    assert contains.lower() in err["message"].lower(), err["message"]
    return err


def test_unknown_model_is_404(http):
    err = assert_error(http.post("/v1/chat/completions", json={"model": "nope/nothing",
                                                                "messages": USER}),
                       404, param="model", contains="nope/nothing")
    assert err["code"] == "model_not_found"
    assert EMBEDDED_ID in err["message"]  # says what is available
    assert_error(http.post("/v1/completions", json={"model": "x", "prompt": "a"}), 404,
                 param="model")


@pytest.mark.parametrize("fields,param,contains", [
    ({"messages": []}, "messages", "at least one"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role", ""),
    ({"messages": [{"content": "x"}]}, "messages.0.role", "missing"),
    ({"max_tokens": -1}, "max_tokens", ""),
    ({"max_tokens": 0}, "max_tokens", "at least 1"),
    ({"temperature": 2.5}, "temperature", ""),
    ({"temperature": -0.1}, "temperature", ""),
    ({"top_p": 0}, "top_p", ""),
    ({"n": 1000}, "n", ""),
    ({"logprobs": 50}, "logprobs", "between 0 and 20"),
    ({"top_logprobs": 21}, "top_logprobs", ""),
    ({"presence_penalty": 3}, "presence_penalty", ""),
    ({"stop": ["x"] * 17}, "stop", "at most 16"),
    ({"stop": [""]}, "stop", "non-empty"),
    ({"logit_bias": {"abc": 1}}, "logit_bias", "token ids"),
    ({"logit_bias": {"5": 500}}, "logit_bias", "between -100 and 100"),
    ({"logit_bias": {"99999999": 1}}, "logit_bias", "outside"),
    ({"model": 42}, "model", ""),
    ({"messages": "hello"}, "messages", ""),
    ({"messages": [{"role": "user", "content": [{"type": "image_url",
                                                  "image_url": {"url": "http://x/y.png"}}]}]},
     "messages.0.content", "text only"),
    ({"messages": [{"role": "user"}]}, "messages.0.content", "must have content"),
    ({"context_length_exceeded_behavior": "explode"}, "context_length_exceeded_behavior", ""),
    # union fields: the param is the field, not pydantic's union member (`tool_choice.str`)
    ({"tool_choice": 5}, "tool_choice", "valid dictionary"),
    ({"stop": 5}, "stop", "valid list"),
    ({"logprobs": "x"}, "logprobs", "valid integer"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages.0.content", ""),
])
def test_invalid_chat_fields_are_400_naming_the_param(http, fields, param, contains):
    body = {"model": EMBEDDED_ID, "messages": USER, "max_tokens": 2}
    body.update(fields)
    assert_error(http.post("/v1/chat/completions", json=body), 400, param=param, contains=contains)


def test_malformed_json_and_wrong_body_type(http):
    assert_error(http.post("/v1/chat/completions", content=b'{"model": "x", "messages": [',
                           headers={"content-type": "application/json"}), 400, contains="JSON")
    assert_error(http.post("/v1/chat/completions", content=b"[1, 2]",
                           headers={"content-type": "application/json"}), 400)


def test_body_over_the_limit_is_413(http):
    huge = "x" * (17 * 1024 * 1024)
    assert_error(http.post("/v1/completions", json={"model": EMBEDDED_ID, "prompt": huge}), 413,
                 contains="limit")


def test_chunked_body_over_the_limit_is_413(http):
    def chunks():
        yield b'{"model": "%s", "prompt": "' % EMBEDDED_ID.encode()
        for _ in range(17):
            yield b"y" * (1024 * 1024)
        yield b'"}'
    assert_error(http.post("/v1/completions", content=chunks(),
                           headers={"content-type": "application/json"}), 413)


def test_context_length_exceeded_is_400_unless_truncate(http):
    err = assert_error(http.post("/v1/chat/completions", json={
        "model": EMBEDDED_ID, "messages": USER, "max_tokens": 9000}), 400, param="max_tokens",
        contains="context length")
    assert err["code"] == "context_length_exceeded"
    r = http.post("/v1/chat/completions", json={
        "model": EMBEDDED_ID, "messages": USER, "max_tokens": 9000, "temperature": 0,
        "context_length_exceeded_behavior": "truncate", "stop": ["\n", "."]})
    assert r.status_code == 200, r.text
    assert "lowered" in r.json()["warnings"][0]["message"]


def test_prompt_longer_than_context(http):
    long_prompt = "hello " * 9000
    assert_error(http.post("/v1/completions", json={"model": EMBEDDED_ID, "prompt": long_prompt,
                                                    "max_tokens": 1}),
                 400, param="prompt", contains="context length")


def test_completions_specific_errors(http):
    assert_error(http.post("/v1/completions", json={"model": EMBEDDED_ID}), 400, param="prompt",
                 contains="missing")
    # a batch of prompts is not served (one prompt of token ids is)
    assert_error(http.post("/v1/completions", json={"model": EMBEDDED_ID, "prompt": ["a", "b"]}),
                 400, param="prompt")


def test_unknown_path_and_method(http):
    assert_error(http.get("/v1/nothing-here"), 404)
    assert_error(http.get("/v1/chat/completions"), 405)


# Issue #12, row 3: each of these was a 500 (over the real server, with its platform).
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
@pytest.mark.parametrize("fields,param,contains", [
    ({"seed": 2**64}, "seed", ""),  # torch: "Overflow when unpacking long long"
    ({"seed": -(2**63) - 1}, "seed", ""),
    ({"logit_bias": {"²": 1}}, "logit_bias", "token ids"),  # "²".isdigit(), int("²") fails
    ({"logit_bias": {"9" * 5000: 1}}, "logit_bias", "token ids"),  # int() digit limit
])
def test_out_of_range_sampling_fields_are_400(http, path, fields, param, contains):
    body = {"model": EMBEDDED_ID, "max_tokens": 1}
    body.update({"messages": USER} if path == "/v1/chat/completions" else {"prompt": "Hi"})
    body.update(fields)
    assert_error(http.post(path, json=body), 400, param=param, contains=contains)


def test_largest_seed_is_accepted(http):
    r = http.post("/v1/completions", json={"model": EMBEDDED_ID, "prompt": "Hi", "max_tokens": 1,
                                           "seed": 2**63 - 1, "n": 2})
    assert r.status_code == 200, r.text
    assert [c["seed"] for c in r.json()["choices"]] == [2**63 - 1, 2**63]


@pytest.mark.parametrize("key", ["tools", "messages", "add_generation_prompt", "self"])
def test_chat_template_kwargs_cannot_override_the_request(http, key):
    assert_error(http.post("/v1/chat/completions", json={
        "model": EMBEDDED_ID, "messages": USER, "max_tokens": 1,
        "chat_template_kwargs": {key: 1}}), 400, param="chat_template_kwargs", contains=key)


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/v1/embeddings",
                                  "/v1/moderations", "/v1/audio/speech"])
def test_json_nested_100000_deep_is_400(http, path):
    deep = b'{"model": "%s", "messages": %s}' % (EMBEDDED_ID.encode(), b"[" * 100_000 + b"]" * 100_000)
    err = assert_error(http.post(path, content=deep, headers={"content-type": "application/json"}),
                       400, contains="nested too deeply")
    assert err["code"] == "invalid_json"
    assert http.get("/health").status_code == 200


@pytest.mark.parametrize("body, param", [
    (b'{"model": "\\ud800", "messages": [{"role": "user", "content": "hi"}]}', "model"),
    (b'{"model": "%s", "messages": [{"role": "user", "content": "a\\udc00b"}], "max_tokens": 2}'
     % EMBEDDED_ID.encode(), "messages[0].content"),
])
def test_a_lone_surrogate_is_400_naming_the_field(http, body, param):
    """JSON may spell "\\ud800"; Unicode has no such character, and the tokenizer and the
    UTF-8 error reply both failed on it (500s)."""
    err = assert_error(http.post("/v1/chat/completions", content=body,
                                 headers={"content-type": "application/json"}),
                       400, contains="lone UTF-16 surrogate")
    assert err["code"] == "invalid_unicode" and err["param"] == param
    # a valid pair is one character, and welcome
    ok = http.post("/v1/chat/completions", content=b'{"model": "%s", "max_tokens": 1, '
                   b'"messages": [{"role": "user", "content": "\\ud83d\\ude00"}]}'
                   % EMBEDDED_ID.encode(), headers={"content-type": "application/json"})
    assert ok.status_code == 200, ok.text


def test_a_huge_prompt_does_not_block_other_requests(server):
    """Tokenizing a 4 MB prompt takes seconds; it runs on a worker thread, so /health (and
    every other request) answers meanwhile. On the event loop, /health waited for it."""
    http = httpx.Client(base_url=server.root, timeout=120)  # its own connections
    prompt = "hello world, " * 300_000  # ~3.9 MB, ~900k tokens: over the context -> 400
    done = threading.Event()
    result = {}

    def big():
        start = time.monotonic()
        with httpx.Client(base_url=server.root, timeout=120) as client:
            result["r"] = client.post("/v1/completions", json={
                "model": EMBEDDED_ID, "prompt": prompt, "max_tokens": 1})
        result["s"] = time.monotonic() - start
        done.set()

    thread = threading.Thread(target=big)
    thread.start()
    worst = 0.0
    while not done.is_set():
        start = time.monotonic()
        assert http.get("/health").status_code == 200
        worst = max(worst, time.monotonic() - start)
        time.sleep(0.05)
    thread.join()
    http.close()
    assert_error(result["r"], 400, param="prompt", contains="context length")
    assert result["s"] > 1.0, "the prompt tokenized too fast to show anything"
    assert worst < result["s"] / 2, (worst, result["s"])
