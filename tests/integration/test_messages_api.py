"""Anthropic's Messages API (POST /v1/messages), driven by the official `anthropic` SDK against
a real server: the embedded model, and a tiny K2 taught to answer with a tool call.

The SDK of this date no longer takes `temperature` as an argument (Anthropic's newest models
drop it); clients that send it still reach the server, here through `extra_body`.
"""

from __future__ import annotations

import json

import anthropic
import httpx
import jsonschema
import pytest

from k2serve.api.anthropic_messages import to_chat
from k2serve.api.schemas.messages import MessagesRequest
from tests.conftest import EMBEDDED_ID
from tests.k2_trained import ARGUMENTS

GREEDY = {"temperature": 0}
QUESTION = [{"role": "user", "content": "Name three colours."}]
WEATHER_TOOL = {"name": "get_weather", "description": "Current weather in a city.",
                "input_schema": {"type": "object", "properties": {"city": {"type": "string"}},
                                 "required": ["city"]}}
K2_ID = "moonshotai/Kimi-K2-Instruct-0905"


@pytest.fixture()
def client(server):
    return anthropic.Anthropic(base_url=server.root, api_key="local", max_retries=0)


def test_a_reply_is_the_chat_completions_reply_in_anthropics_shape(client, server):
    reply = client.messages.create(model=EMBEDDED_ID, max_tokens=12, messages=QUESTION,
                                   extra_body=GREEDY)
    chat = httpx.post(server.base_v1 + "/chat/completions", timeout=120, json={
        "model": EMBEDDED_ID, "messages": QUESTION, "max_tokens": 12, "temperature": 0}).json()
    (block,) = reply.content
    assert block.type == "text" and block.text == chat["choices"][0]["message"]["content"]
    assert reply.id.startswith("msg_") and reply.role == "assistant"
    assert reply.stop_reason == "max_tokens" and reply.stop_sequence is None
    usage = reply.usage
    assert usage.output_tokens == 12
    assert usage.input_tokens + usage.cache_read_input_tokens == chat["usage"]["prompt_tokens"]
    counted = client.messages.count_tokens(model=EMBEDDED_ID, messages=QUESTION)
    assert counted.input_tokens == chat["usage"]["prompt_tokens"]


def test_the_stream_assembles_into_the_same_message(client):
    whole = client.messages.create(model=EMBEDDED_ID, max_tokens=12, messages=QUESTION,
                                   system=[{"type": "text", "text": "Be brief."}],
                                   extra_body=GREEDY)
    events = []
    with client.messages.stream(model=EMBEDDED_ID, max_tokens=12, messages=QUESTION,
                                system=[{"type": "text", "text": "Be brief."}],
                                extra_body=GREEDY) as stream:
        for event in stream:
            events.append(event.type)
        final = stream.get_final_message()
    assert final.content[0].text == whole.content[0].text
    assert final.stop_reason == "max_tokens" and final.usage.output_tokens == 12
    assert events[0] == "message_start" and events[-1] == "message_stop"
    assert {"content_block_start", "content_block_delta", "content_block_stop",
            "message_delta"} <= set(events)
    assert events.count("content_block_start") == 1  # one text block


def test_a_stop_sequence_is_named(client):
    whole = client.messages.create(model=EMBEDDED_ID, max_tokens=12, messages=QUESTION,
                                   extra_body=GREEDY).content[0].text
    stop_at = whole.split()[1]
    for stream in (False, True):
        if stream:
            with client.messages.stream(model=EMBEDDED_ID, max_tokens=12, messages=QUESTION,
                                        stop_sequences=[stop_at], extra_body=GREEDY) as s:
                reply = s.get_final_message()
        else:
            reply = client.messages.create(model=EMBEDDED_ID, max_tokens=12, messages=QUESTION,
                                           stop_sequences=[stop_at], extra_body=GREEDY)
        assert reply.stop_reason == "stop_sequence" and reply.stop_sequence == stop_at
        assert stop_at not in reply.content[0].text


def test_tool_use_round_trip_is_schema_valid(client):
    ask = [{"role": "user", "content": "What's the weather in Paris?"}]
    # Greedy, with room to finish the call: a sampled argument can run past any max_tokens.
    reply = client.messages.create(model=EMBEDDED_ID, max_tokens=100, messages=ask,
                                   tools=[WEATHER_TOOL], extra_body=GREEDY,
                                   tool_choice={"type": "any", "disable_parallel_tool_use": True})
    assert reply.stop_reason == "tool_use"
    (call,) = [b for b in reply.content if b.type == "tool_use"]
    assert call.name == "get_weather" and call.id.startswith("toolu_")
    jsonschema.validate(call.input, WEATHER_TOOL["input_schema"])

    # Streamed: the tool_use block's input_json_delta pieces join into the same kind of input.
    with client.messages.stream(model=EMBEDDED_ID, max_tokens=100, messages=ask,
                                tools=[WEATHER_TOOL], extra_body=GREEDY,
                                tool_choice={"type": "tool", "name": "get_weather"}) as s:
        partial = "".join(e.delta.partial_json for e in s if e.type == "content_block_delta"
                          and e.delta.type == "input_json_delta")
        streamed = s.get_final_message()
    assert streamed.stop_reason == "tool_use"
    (streamed_call,) = [b for b in streamed.content if b.type == "tool_use"]
    assert json.loads(partial) == streamed_call.input
    jsonschema.validate(streamed_call.input, WEATHER_TOOL["input_schema"])
    assert streamed.stop_reason == "tool_use"

    # The next turn: the call and its result (also as an error) go back; the model answers.
    for is_error in (False, True):
        history = ask + [
            {"role": "assistant", "content": [b.model_dump(exclude_none=True)
                                              for b in reply.content]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id,
                                          "content": [{"type": "text", "text": "18 C, sunny"}],
                                          "is_error": is_error}]}]
        answer = client.messages.create(model=EMBEDDED_ID, max_tokens=8, messages=history,
                                        tools=[WEATHER_TOOL], extra_body=GREEDY)
        assert answer.stop_reason in ("end_turn", "max_tokens", "tool_use")
        counted = client.messages.count_tokens(model=EMBEDDED_ID, messages=history,
                                               tools=[WEATHER_TOOL])
        usage = answer.usage
        assert usage.input_tokens + usage.cache_read_input_tokens == counted.input_tokens


def test_structured_output_follows_the_schema(client):
    # maxLength: sampled at Anthropic's default temperature 1, unbounded strings can run past
    # max_tokens (stop_reason "max_tokens") however well the grammar holds
    schema = {"type": "object", "properties": {"colours": {"type": "array", "items": {
        "type": "string", "maxLength": 12}, "maxItems": 3}}, "required": ["colours"],
        "additionalProperties": False}
    reply = client.messages.create(model=EMBEDDED_ID, max_tokens=80, messages=QUESTION,
                                   output_config={"format": {"type": "json_schema",
                                                             "schema": schema}})
    assert reply.stop_reason == "end_turn"
    jsonschema.validate(json.loads(reply.content[0].text), schema)


@pytest.mark.parametrize("body, param", [
    ({"messages": QUESTION}, "max_tokens"),
    ({"max_tokens": 5, "messages": QUESTION, "container": "c1"}, "container"),
    ({"max_tokens": 5, "messages": QUESTION, "thinking": {"type": "enabled",
                                                          "budget_tokens": 2048}},
     "thinking.type"),
    ({"max_tokens": 5, "messages": [{"role": "user", "content": [
        {"type": "document", "source": {"type": "text", "data": "x"}}]}]},
     "messages.0.content.0.type"),
    ({"max_tokens": 5, "messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                     "data": "iVBORw0KGgo="}}]}]}, "--vision-model"),
    ({"max_tokens": 5, "messages": QUESTION + [{"role": "assistant", "content": "Red,"}]},
     "messages.1.role"),
    ({"max_tokens": 5, "messages": QUESTION, "tools": [{"type": "web_search_20250305",
                                                        "name": "web_search"}]}, "tools.0"),
    ({"max_tokens": 5, "messages": QUESTION, "temperature": 1.5}, "temperature"),
])
def test_unsupported_or_invalid_fields_are_named_in_anthropics_error_shape(server, body, param):
    r = httpx.post(server.root + "/v1/messages", json={"model": EMBEDDED_ID, **body},
                   headers={"anthropic-version": "2023-06-01"}, timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()
    assert error["type"] == "error" and error["error"]["type"] == "invalid_request_error"
    assert param in error["error"]["message"]


def test_an_unknown_model_is_the_sdks_not_found_error(client):
    with pytest.raises(anthropic.NotFoundError) as caught:
        client.messages.create(model="nobody/none", max_tokens=5, messages=QUESTION)
    assert caught.value.body["error"]["type"] == "not_found_error"


def test_temperature_is_scaled_by_the_models_anthropic_factor():
    req = MessagesRequest.model_validate({"model": K2_ID, "max_tokens": 5, "messages": QUESTION,
                                          "temperature": 0.5})
    assert to_chat(req, 0.6).temperature == pytest.approx(0.3)
    default = MessagesRequest.model_validate({"model": K2_ID, "max_tokens": 5,
                                              "messages": QUESTION})
    assert to_chat(default, 0.6).temperature == pytest.approx(0.6)  # Anthropic's default 1


@pytest.fixture(scope="module")
def k2_server(k2_tool_server):
    return k2_tool_server


def test_k2_tool_call_through_the_messages_api(k2_server):
    """The taught K2 answers with text, then a call in K2's own format: Anthropic's client
    sees a text block and a tool_use block, streamed in that order."""
    client = anthropic.Anthropic(base_url=k2_server.root, api_key="local", max_retries=0)
    ask = [{"role": "user", "content": "What's the weather in Paris?"}]
    reply = client.messages.create(model=K2_ID, max_tokens=64, messages=ask,
                                   tools=[WEATHER_TOOL], extra_body=GREEDY)
    assert [b.type for b in reply.content] == ["text", "tool_use"]
    assert reply.content[0].text == "Let me check."
    assert reply.content[1].input == json.loads(ARGUMENTS)
    assert reply.stop_reason == "tool_use"
    with client.messages.stream(model=K2_ID, max_tokens=64, messages=ask, tools=[WEATHER_TOOL],
                                extra_body=GREEDY) as stream:
        starts = [e.content_block.type for e in stream if e.type == "content_block_start"]
        final = stream.get_final_message()
    assert starts == ["text", "tool_use"]
    assert final.content[1].input == json.loads(ARGUMENTS)
    assert "<|" not in final.content[0].text


def test_a_request_shaped_as_claude_code_sends_it(server):
    """The fields Claude Code 2.1.197 sends on every turn (captured from a headless run against
    this server): billing text and cache_control in system blocks, a system message between
    turns, adaptive thinking, a clear_thinking context edit, effort, its 32000 max_tokens
    (capped to the context here), a record schema written with propertyNames."""
    task_tool = {"name": "TaskUpdate", "description": "Update a task.", "input_schema": {
        "$schema": "https://json-schema.org/draft/2020-12/schema", "type": "object",
        "properties": {"metadata": {"type": "object", "propertyNames": {"type": "string"},
                                    "additionalProperties": {}}},
        "additionalProperties": False}}
    body = {
        "model": EMBEDDED_ID, "max_tokens": 32000, "stream": True, "temperature": 0,
        "system": [{"type": "text", "text": "x-anthropic-billing-header: cc_version=2.1.197;"},
                   {"type": "text", "text": "You are a helpful assistant.",
                    "cache_control": {"type": "ephemeral"}}],
        "messages": [{"role": "user", "content": [
            {"type": "text", "text": "<system-reminder>Today is 2026-12-05.</system-reminder>"},
            {"type": "text", "text": "What is the capital of France?",
             "cache_control": {"type": "ephemeral"}}]},
            {"role": "system", "content": "Answer in one short sentence."}],
        "tools": [task_tool],
        "metadata": {"user_id": json.dumps({"device_id": "d", "session_id": "s"})},
        "thinking": {"type": "adaptive"},
        "context_management": {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]},
        "output_config": {"effort": "high"}}
    headers = {"anthropic-version": "2023-06-01", "x-api-key": "local",
               "anthropic-beta": "claude-code-20250219,interleaved-thinking-2025-05-14"}
    with httpx.stream("POST", server.root + "/v1/messages", json=body, headers=headers,
                      timeout=300) as r:
        assert r.status_code == 200, r.read()
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
    assert events[0]["type"] == "message_start" and events[-1]["type"] == "message_stop"
    text = "".join(e["delta"]["text"] for e in events if e["type"] == "content_block_delta")
    (final,) = [e for e in events if e["type"] == "message_delta"]
    assert text.strip() and final["delta"]["stop_reason"] == "end_turn"
    assert 0 < final["usage"]["output_tokens"] < 8192
