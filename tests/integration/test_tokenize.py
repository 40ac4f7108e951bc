"""POST /tokenize and /detokenize (vLLM's shapes) on a real server: the counts are those the
generation endpoints bill, for a raw prompt and for a chat conversation with tools."""

from __future__ import annotations

import httpx
import pytest

from tests.conftest import EMBEDDED_ID

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}]
MESSAGES = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What's the weather in Zürich? ☀️"}]


def post(server, path, **body):
    return httpx.post(server.root + path, json=body, timeout=60)


def test_a_prompts_count_is_what_completions_bills(server):
    prompt = "The capital of France is"
    counted = post(server, "/tokenize", model=EMBEDDED_ID, prompt=prompt).json()
    billed = post(server, "/v1/completions", model=EMBEDDED_ID, prompt=prompt,
                  max_tokens=1).json()["usage"]["prompt_tokens"]
    assert counted["count"] == len(counted["tokens"]) == billed
    assert counted["max_model_len"] == 8192 and counted["token_strs"] is None


def test_a_chat_with_tools_counts_what_chat_bills(server):
    counted = post(server, "/v1/tokenize", messages=MESSAGES, tools=TOOLS,
                   return_token_strs=True).json()  # the one chat model: no `model` needed
    billed = post(server, "/v1/chat/completions", model=EMBEDDED_ID, messages=MESSAGES,
                  tools=TOOLS, max_tokens=1).json()["usage"]["prompt_tokens"]
    assert counted["count"] == billed
    assert len(counted["token_strs"]) == counted["count"]
    without_tools = post(server, "/tokenize", messages=MESSAGES).json()["count"]
    assert without_tools < counted["count"]  # the tools are declared in the prompt


def test_detokenize_inverts_tokenize(server):
    text = "naïve café — 東京 ☀️"
    ids = post(server, "/tokenize", prompt=text, add_special_tokens=False).json()["tokens"]
    assert post(server, "/detokenize", tokens=ids).json() == {"prompt": text}
    chat = post(server, "/tokenize", messages=MESSAGES).json()["tokens"]
    rendered = post(server, "/v1/detokenize", model=EMBEDDED_ID, tokens=chat).json()["prompt"]
    assert "<|im_start|>user" in rendered and rendered.endswith("<|im_start|>assistant\n")


@pytest.mark.parametrize("path, body, status, param", [
    ("/tokenize", {"prompt": "x", "messages": MESSAGES}, 400, None),
    ("/tokenize", {}, 400, None),
    ("/tokenize", {"model": "no/such", "prompt": "x"}, 404, "model"),
    ("/detokenize", {"tokens": [1, 10**9]}, 400, "tokens.1"),
    ("/tokenize", {"prompt": "x", "add_generation_prompt": False}, 400, None),
])
def test_bad_requests_are_named(server, path, body, status, param):
    r = post(server, path, **body)
    assert r.status_code == status, r.text
    assert "message" in r.json()["error"]
    if param is not None:
        assert r.json()["error"]["param"] == param
