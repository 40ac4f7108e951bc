"""Chat completions over real HTTP against the embedded model: reply shapes and sampling."""

from __future__ import annotations

import json

from tests.conftest import EMBEDDED_ID


def chat(http, **fields):
    body = {"model": EMBEDDED_ID, "messages": [{"role": "user", "content": "What is 2+2?"}],
            "max_tokens": 8, "temperature": 0}
    body.update(fields)
    return http.post("/v1/chat/completions", json=body)


def sse_events(response) -> list[str]:
    """Raw `data:` payloads of an SSE reply; asserts no `event:` lines are sent."""
    payloads = []
    for line in response.iter_lines():
        assert not line.startswith("event:"), "named SSE events are dropped by Together SDKs"
        if line.startswith("data: "):
            payloads.append(line[len("data: "):])
    return payloads


def test_non_streaming_reply_has_every_field_sdks_read(http):
    r = chat(http)
    assert r.status_code == 200, r.text
    assert r.headers["x-request-id"]
    body = r.json()
    assert body["id"].startswith("chatcmpl-")
    assert body["object"] == "chat.completion"
    assert isinstance(body["created"], int)
    assert body["model"] == EMBEDDED_ID
    assert body["prompt"] == []
    (choice,) = body["choices"]
    assert choice["index"] == 0
    assert choice["message"]["role"] == "assistant"
    assert isinstance(choice["message"]["content"], str) and choice["message"]["content"]
    assert choice["finish_reason"] in ("stop", "length")
    usage = body["usage"]
    assert usage["prompt_tokens"] > 5
    assert 1 <= usage["completion_tokens"] <= 8
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_greedy_is_deterministic_and_length_finish(http):
    a = chat(http, max_tokens=5).json()
    b = chat(http, max_tokens=5).json()
    assert a["choices"][0]["message"]["content"] == b["choices"][0]["message"]["content"]
    long = chat(http, max_tokens=3,
                messages=[{"role": "user", "content": "Write a long story about a dragon."}]).json()
    assert long["choices"][0]["finish_reason"] == "length"
    assert long["usage"]["completion_tokens"] == 3


def test_stream_chunks_deltas_usage_and_done(http):
    with http.stream("POST", "/v1/chat/completions", json={
            "model": EMBEDDED_ID, "max_tokens": 12, "temperature": 0, "stream": True,
            "messages": [{"role": "user", "content": "Tell me about Paris."}]}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        payloads = sse_events(r)
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert len(chunks) >= 2, "tokens must stream as separate chunks"
    assert len({c["id"] for c in chunks}) == 1
    for c in chunks:
        assert c["object"] == "chat.completion.chunk"
        assert c["choices"][0]["delta"]["role"] == "assistant"
    assert all(c["usage"] is None for c in chunks[:-1])
    last = chunks[-1]
    assert last["choices"][0]["finish_reason"] in ("stop", "length")
    assert last["usage"]["completion_tokens"] >= 1
    streamed = "".join(c["choices"][0]["delta"]["content"] for c in chunks)
    whole = chat(http, max_tokens=12,
                 messages=[{"role": "user", "content": "Tell me about Paris."}]).json()
    assert streamed == whole["choices"][0]["message"]["content"]
    without_cache = lambda u: {k: v for k, v in u.items() if k != "prompt_tokens_details"}  # noqa: E731
    assert without_cache(last["usage"]) == without_cache(whole["usage"])
    # The same prompt again: its full blocks come from the prefix cache.
    assert whole["usage"]["prompt_tokens_details"]["cached_tokens"] >= 16


def test_stop_string_is_honoured_and_not_leaked(http):
    base = chat(http, max_tokens=20,
                messages=[{"role": "user", "content": "Count from 1 to 10, comma separated."}])
    text = base.json()["choices"][0]["message"]["content"]
    # Pick a stop string from the middle of what the model says anyway.
    assert len(text) > 6, text
    stop = text[3:6]
    for stream in (False, True):
        fields = dict(max_tokens=20, stop=[stop, "NEVER-SEEN"],
                      messages=[{"role": "user", "content": "Count from 1 to 10, comma separated."}])
        if stream:
            with http.stream("POST", "/v1/chat/completions",
                             json={"model": EMBEDDED_ID, "temperature": 0, "stream": True,
                                   **fields}) as r:
                chunks = [json.loads(p) for p in sse_events(r)[:-1]]
            got = "".join(c["choices"][0]["delta"]["content"] for c in chunks)
            finish = chunks[-1]["choices"][0]["finish_reason"]
        else:
            reply = chat(http, **fields).json()
            got = reply["choices"][0]["message"]["content"]
            finish = reply["choices"][0]["finish_reason"]
        assert got == text[:text.index(stop)]
        assert stop not in got
        assert finish == "stop"


def test_n_choices_and_seeded_sampling(http):
    fields = dict(max_tokens=10, temperature=1.0, top_p=0.95, seed=1234, n=3,
                  messages=[{"role": "user", "content": "Name a color."}])
    a = chat(http, **fields).json()
    b = chat(http, **fields).json()
    assert [c["index"] for c in a["choices"]] == [0, 1, 2]
    texts_a = [c["message"]["content"] for c in a["choices"]]
    assert texts_a == [c["message"]["content"] for c in b["choices"]]
    assert a["usage"]["completion_tokens"] >= 3  # every choice is counted
    assert a["usage"]["completion_tokens"] == b["usage"]["completion_tokens"]


def test_logprobs_openai_and_together_forms(http):
    openai_form = chat(http, logprobs=True, top_logprobs=3, max_tokens=4).json()
    content = openai_form["choices"][0]["logprobs"]["content"]
    assert len(content) == openai_form["usage"]["completion_tokens"]
    for entry in content:
        assert entry["logprob"] <= 0
        assert len(entry["top_logprobs"]) == 3
        # Greedy: the chosen token is the most likely one.
        assert abs(entry["top_logprobs"][0]["logprob"] - entry["logprob"]) < 1e-4
        assert bytes(entry["bytes"]).decode("utf-8", "replace") == entry["token"]

    together_form = chat(http, logprobs=2, max_tokens=4).json()
    lp = together_form["choices"][0]["logprobs"]
    n = together_form["usage"]["completion_tokens"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["token_ids"]) == n
    assert all(len(top) == 2 for top in lp["top_logprobs"])


def test_sampling_parameters_are_accepted_and_logit_bias_works(http):
    r = chat(http, top_k=20, min_p=0.05, repetition_penalty=1.2, presence_penalty=0.5,
             frequency_penalty=0.5, temperature=0.7, seed=7, stream_options={"include_usage": True},
             user="someone", parallel_tool_calls=False)
    assert r.status_code == 200, r.text
    # A +100 bias on one token forces it at every step.
    forced = http.post("/v1/completions", json={
        "model": EMBEDDED_ID, "prompt": "Hello", "max_tokens": 3, "temperature": 0,
        "logit_bias": {"28": 100}, "logprobs": 1}).json()
    assert forced["choices"][0]["logprobs"]["token_ids"] == [28, 28, 28]


def test_echo_returns_the_rendered_prompt(http):
    body = chat(http, echo=True, max_tokens=2).json()
    (part,) = body["prompt"]
    assert "<|im_start|>user\nWhat is 2+2?<|im_end|>" in part["text"]
    assert part["text"].endswith("<|im_start|>assistant\n")


def test_developer_role_and_text_parts(http):
    r = chat(http, messages=[
        {"role": "developer", "content": "You answer briefly."},
        {"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "!"}]},
    ], echo=True)
    assert r.status_code == 200, r.text
    prompt = r.json()["prompt"][0]["text"]
    assert "<|im_start|>system\nYou answer briefly.<|im_end|>" in prompt
    assert "<|im_start|>user\nHi\n!<|im_end|>" in prompt  # parts joined by newlines, as vLLM does


def test_v1_v1_alias_for_together3_with_v1_base(http):
    assert http.post("/v1/v1/chat/completions", json={
        "model": EMBEDDED_ID, "max_tokens": 1,
        "messages": [{"role": "user", "content": "Hi"}]}).status_code == 200
