"""`k2serve serve --model DIR` on tiny Kimi K2 checkpoints, driven by the official SDKs.

One checkpoint is the writer's FP8 random-weight one (`k2serve tiny-k2`); the other was
taught to answer one conversation with a tool call, so K2's tool-call format is really
generated, parsed and streamed.
"""

from __future__ import annotations

import json
import subprocess
import sys

import httpx
import pytest

from tests.conftest import start_server, stop_server
from tests.k2_trained import ARGUMENTS, MESSAGES, TOOLS

K2_ID = "moonshotai/Kimi-K2-Instruct-0905"


@pytest.fixture(scope="module")
def fp8_server(tmp_path_factory):
    directory = tmp_path_factory.mktemp("k2") / "Kimi-K2-tiny"
    out = subprocess.run([sys.executable, "-m", "k2serve.cli", "tiny-k2", str(directory)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert (directory / "model.safetensors.index.json").exists()
    live = start_server("--model", str(directory))
    yield live
    stop_server(live)


@pytest.fixture(scope="module")
def tool_server(k2_tool_server):
    return k2_tool_server


def test_models_lists_k2_with_its_price_and_context(fp8_server):
    (model,) = httpx.get(fp8_server.base_v1 + "/models").json()
    assert model["id"] == K2_ID  # from the checkpoint's config
    assert model["context_length"] == 4096  # the tiny config's max_position_embeddings
    assert model["pricing"]["input"] == 1.0 and model["pricing"]["output"] == 3.0


def test_fp8_checkpoint_chats_through_both_sdks(fp8_server):
    import openai
    import together
    oa = openai.OpenAI(base_url=fp8_server.base_v1, api_key="local", max_retries=0)
    reply = oa.chat.completions.create(model=K2_ID, messages=MESSAGES, max_tokens=6,
                                       temperature=0)
    assert reply.usage.completion_tokens == 6 or reply.choices[0].finish_reason == "stop"
    tg = together.Together(base_url=fp8_server.root, api_key="local", max_retries=0)
    stream = tg.chat.completions.create(model=K2_ID, messages=MESSAGES, max_tokens=6,
                                        temperature=0, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == reply.choices[0].message.content


def test_tools_are_declared_in_k2_format(fp8_server):
    body = httpx.post(fp8_server.base_v1 + "/chat/completions", json={
        "model": K2_ID, "messages": MESSAGES, "tools": TOOLS, "max_tokens": 2, "echo": True},
        timeout=60).json()
    prompt = body["prompt"][0]["text"]
    assert prompt.startswith("<|im_system|>tool_declare<|im_middle|>[{\"type\":\"function\"")
    assert prompt.endswith("<|im_assistant|>assistant<|im_middle|>")


def test_openai_sdk_gets_the_tool_call(tool_server):
    import openai
    client = openai.OpenAI(base_url=tool_server.base_v1, api_key="local", max_retries=0)
    reply = client.chat.completions.create(model=K2_ID, messages=MESSAGES, tools=TOOLS,
                                           temperature=0)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Let me check."
    (call,) = choice.message.tool_calls
    assert call.id == "functions.get_weather:0"
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == json.loads(ARGUMENTS)
    assert "<|" not in (choice.message.content or "")

    # Streaming: name first, then argument fragments; no marker leaks into content.
    stream = client.chat.completions.create(model=K2_ID, messages=MESSAGES, tools=TOOLS,
                                            temperature=0, stream=True)
    content, names, arguments, finish = "", [], "", None
    for chunk in stream:
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for tc in delta.tool_calls or []:
            if tc.function.name:
                names.append((tc.index, tc.id, tc.function.name))
            arguments += tc.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert content == "Let me check."
    assert names == [(0, "functions.get_weather:0", "get_weather")]
    assert arguments == call.function.arguments
    assert finish == "tool_calls"


def test_together_sdk_tool_call_and_the_next_turn(tool_server):
    import together
    client = together.Together(base_url=tool_server.root, api_key="local", max_retries=0)
    reply = client.chat.completions.create(model=K2_ID, messages=MESSAGES, tools=TOOLS,
                                           temperature=0)
    call = reply.choices[0].message.tool_calls[0]
    assert reply.choices[0].finish_reason == "tool_calls"
    # The next turn sends the call back under a client-side id and the tool's result.
    history = MESSAGES + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_abc123", "type": "function",
             "function": {"name": call.function.name, "arguments": call.function.arguments}}]},
        {"role": "tool", "tool_call_id": "call_abc123", "content": '{"temp_c": 18}'}]
    body = httpx.post(tool_server.base_v1 + "/chat/completions", json={
        "model": K2_ID, "messages": history, "tools": TOOLS, "max_tokens": 3, "echo": True},
        timeout=60).json()
    prompt = body["prompt"][0]["text"]
    # Ids normalised to functions.<name>:<idx> before rendering, as Moonshot asks vendors.
    assert "<|tool_call_begin|>functions.get_weather:0<|tool_call_argument_begin|>" in prompt
    assert "## Return of functions.get_weather:0\n{\"temp_c\": 18}" in prompt
    assert "call_abc123" not in prompt


def test_cut_off_tool_call_is_length_not_a_crash(tool_server):
    r = httpx.post(tool_server.base_v1 + "/chat/completions", json={
        "model": K2_ID, "messages": MESSAGES, "tools": TOOLS, "temperature": 0,
        "max_tokens": 12}, timeout=60)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "length"
    assert "tool_calls" not in choice["message"]  # a half-written call is not passed off
    assert "<|" not in (choice["message"]["content"] or "")


def test_tool_choice_errors(tool_server):
    def post(**fields):
        return httpx.post(tool_server.base_v1 + "/chat/completions", json={
            "model": K2_ID, "messages": MESSAGES, "tools": TOOLS, **fields}, timeout=60)
    r = post(tool_choice={"type": "function", "function": {"name": "send_email"}})
    assert r.status_code == 400 and "send_email" in r.json()["error"]["message"]
    assert r.json()["error"]["param"] == "tool_choice"
    r = post(tools=[{"type": "function", "function": {"description": "no name"}}])
    assert r.status_code == 400 and r.json()["error"]["param"] == "tools.0.function.name"


# -- constrained tool calls (issue #5) --------------------------------------------------------
TIME_TOOL = {"type": "function", "function": {
    "name": "get_time", "description": "Current time in a time zone.",
    "parameters": {"type": "object", "properties": {"tz": {"enum": ["UTC", "CET", "JST"]}},
                   "required": ["tz"], "additionalProperties": False}}}


def _check_calls(calls, tools):
    import jsonschema
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    assert calls
    for call in calls:
        assert call.id == f"functions.{call.function.name}:{call.id.rsplit(':', 1)[1]}"
        jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])


def test_required_makes_random_weights_call_validly(fp8_server):
    """Random weights write nothing sensible on their own; the grammar alone makes every reply
    a well-formed K2 call to a declared tool with schema-valid arguments."""
    import openai
    client = openai.OpenAI(base_url=fp8_server.base_v1, api_key="local", max_retries=0)
    for seed in range(3):
        reply = client.chat.completions.create(
            model=K2_ID, messages=MESSAGES, tools=[TIME_TOOL], tool_choice="required",
            parallel_tool_calls=False, max_tokens=40, temperature=1.0, seed=seed)
        choice = reply.choices[0]
        assert choice.finish_reason == "tool_calls", choice.message
        assert len(choice.message.tool_calls) == 1
        _check_calls(choice.message.tool_calls, [TIME_TOOL])


def test_named_tool_choice_overrides_what_the_model_learned(tool_server):
    import openai
    client = openai.OpenAI(base_url=tool_server.base_v1, api_key="local", max_retries=0)
    tools = TOOLS + [TIME_TOOL]
    reply = client.chat.completions.create(
        model=K2_ID, messages=MESSAGES, tools=tools, temperature=0, max_tokens=40,
        tool_choice={"type": "function", "function": {"name": "get_time"}})
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert [c.function.name for c in choice.message.tool_calls] == ["get_time"]
    _check_calls(choice.message.tool_calls, tools)


def test_auto_call_is_held_to_the_declared_schema(tool_server):
    """The model learned get_weather(city="Paris"); declared with an enum that excludes Paris,
    the call it opens under `auto` still names the tool and validates."""
    import openai
    tools = [{"type": "function", "function": {**TOOLS[0]["function"], "parameters": {
        "type": "object", "properties": {"city": {"enum": ["Berlin", "Rome"]}},
        "required": ["city"], "additionalProperties": False}}}]
    client = openai.OpenAI(base_url=tool_server.base_v1, api_key="local", max_retries=0)
    reply = client.chat.completions.create(model=K2_ID, messages=MESSAGES, tools=tools,
                                           temperature=0, max_tokens=40)
    choice = reply.choices[0]
    assert choice.message.content == "Let me check."  # free text before the section
    assert choice.finish_reason == "tool_calls"
    _check_calls(choice.message.tool_calls, tools)
    assert json.loads(choice.message.tool_calls[0].function.arguments)["city"] in ("Berlin", "Rome")


def test_required_streams_a_call_without_content(tool_server):
    import together
    client = together.Together(base_url=tool_server.root, api_key="local", max_retries=0)
    stream = client.chat.completions.create(model=K2_ID, messages=MESSAGES, tools=TOOLS,
                                            tool_choice="required", temperature=0,
                                            max_tokens=40, stream=True)
    content, header, arguments, finish = "", None, "", None
    for chunk in stream:
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for tc in delta.tool_calls or []:
            if tc.function.name:
                header = (tc.index, tc.id, tc.function.name)
            else:
                arguments += tc.function.arguments
        finish = chunk.choices[0].finish_reason or finish
    assert content == "" and finish == "tool_calls"
    assert header == (0, "functions.get_weather:0", "get_weather")
    assert json.loads(arguments) == json.loads(ARGUMENTS)


def test_responses_api_tool_call_round_trip(tool_server):
    """The OpenAI Responses API on K2: the learned call comes back as a function_call item
    (streamed too), and the next turn continues it by previous_response_id."""
    import openai
    client = openai.OpenAI(base_url=tool_server.base_v1, api_key="local", max_retries=0)
    flat = [{"type": "function", **TOOLS[0]["function"]}]
    first = client.responses.create(model=K2_ID, input=MESSAGES[0]["content"], tools=flat,
                                    temperature=0)
    message, call = first.output
    assert message.type == "message" and message.content[0].text == "Let me check."
    assert call.type == "function_call" and call.name == "get_weather"
    assert call.call_id == "functions.get_weather:0"
    assert json.loads(call.arguments) == json.loads(ARGUMENTS)
    assert first.status == "completed"

    with client.responses.stream(model=K2_ID, input=MESSAGES[0]["content"], tools=flat,
                                 temperature=0) as stream:
        kinds = [e.type for e in stream]
        streamed = stream.get_final_response()
    assert [(o.type, getattr(o, "arguments", None)) for o in streamed.output] == [
        ("message", None), ("function_call", call.arguments)]
    assert "response.function_call_arguments.delta" in kinds
    assert streamed.output_text == "Let me check."

    second = client.responses.create(model=K2_ID, previous_response_id=first.id, tools=flat,
                                     input=[{"type": "function_call_output",
                                             "call_id": call.call_id,
                                             "output": '{"temp_c": 18}'}],
                                     max_output_tokens=3, temperature=0)
    assert second.status in ("completed", "incomplete")
    assert second.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens
