"""Reasoning output on all three chat surfaces, from a tiny K2-Thinking (K2's checkpoint with
K2-Thinking's `<think>` tokens and template, and its native INT4 routed experts, served through
the int4 kernels) taught two replies: one thinks, closes the block,
says a word and calls get_weather; one opens its call section inside the thinking, without
`</think>`, as K2-Thinking does. Driven by the official openai and anthropic SDKs.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import anthropic
import httpx
import openai
import pytest

from tests.conftest import start_server, stop_server
from tests.k2_trained import (
    ARGUMENTS,
    MESSAGES,
    ROME_ARGUMENTS,
    ROME_MESSAGES,
    ROME_THINKING,
    THINKING,
    TOOLS,
    write_thinking_k2,
)

MODEL = "moonshotai/Kimi-K2-Thinking"
GREEDY = {"temperature": 0}
ANTHROPIC_TOOL = {"name": "get_weather", "description": "Current weather in a city.",
                  "input_schema": TOOLS[0]["function"]["parameters"]}
FLAT_TOOL = {"type": "function", **TOOLS[0]["function"]}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    directory = write_thinking_k2(tmp_path_factory.mktemp("k2thinking") / "ckpt")
    live = start_server("--model", str(directory), "--served-model-name", MODEL)
    yield live
    stop_server(live)


@pytest.fixture(scope="module")
def oa(server):
    return openai.OpenAI(base_url=server.base_v1, api_key="local", max_retries=0)


def _streamed_chat(client, **kwargs):
    reasoning, aliased, content, calls, usage, finish = "", "", "", {}, None, None
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        if chunk.usage is not None:
            usage = chunk.usage
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        extra = delta.model_extra or {}
        reasoning += extra.get("reasoning_content") or ""
        aliased += extra.get("reasoning") or ""
        content += delta.content or ""
        for tc in delta.tool_calls or ():
            entry = calls.setdefault(tc.index, ["", ""])
            entry[0] += tc.function.name or ""
            entry[1] += tc.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert aliased == reasoning  # vLLM's name and DeepSeek's carry the same text
    return reasoning, content, [tuple(calls[i]) for i in sorted(calls)], usage, finish


def test_chat_returns_reasoning_apart_from_content_and_calls(oa):
    reply = oa.chat.completions.create(model=MODEL, messages=MESSAGES, tools=TOOLS, **GREEDY)
    choice = reply.choices[0]
    extra = choice.message.model_extra
    assert extra["reasoning_content"] == THINKING and extra["reasoning"] == THINKING
    assert choice.message.content == "Let me check."
    (call,) = choice.message.tool_calls
    assert (call.function.name, json.loads(call.function.arguments)) == (
        "get_weather", json.loads(ARGUMENTS))
    assert choice.finish_reason == "tool_calls"
    details = reply.usage.completion_tokens_details
    assert 0 < details.reasoning_tokens < reply.usage.completion_tokens

    streamed = _streamed_chat(oa, model=MODEL, messages=MESSAGES, tools=TOOLS, **GREEDY)
    reasoning, content, calls, usage, finish = streamed
    assert reasoning == THINKING and content == "Let me check."
    assert calls == [("get_weather", call.function.arguments)] and finish == "tool_calls"
    assert usage.completion_tokens_details.reasoning_tokens == details.reasoning_tokens


def test_a_call_opened_inside_thinking_is_a_call(oa):
    """The reply is `<think>Rome needs a lookup.<|tool_calls_section_begin|>…`: no `</think>`."""
    for stream in (False, True):
        if stream:
            reasoning, content, calls, _, finish = _streamed_chat(
                oa, model=MODEL, messages=ROME_MESSAGES, tools=TOOLS, **GREEDY)
        else:
            choice = oa.chat.completions.create(model=MODEL, messages=ROME_MESSAGES,
                                                tools=TOOLS, **GREEDY).choices[0]
            reasoning, content = choice.message.model_extra["reasoning_content"], \
                choice.message.content
            calls = [(c.function.name, c.function.arguments) for c in choice.message.tool_calls]
            finish = choice.finish_reason
        assert reasoning == ROME_THINKING and not content
        assert [(n, json.loads(a)) for n, a in calls] == [("get_weather",
                                                            json.loads(ROME_ARGUMENTS))]
        assert finish == "tool_calls"


def test_required_tool_choice_still_lets_it_think_first(oa):
    """The call grammar allows the thinking block before the call section (and nothing else)."""
    reply = oa.chat.completions.create(model=MODEL, messages=MESSAGES, tools=TOOLS,
                                       tool_choice="required", max_tokens=80, **GREEDY)
    choice = reply.choices[0]
    assert choice.message.model_extra["reasoning_content"] == THINKING
    assert choice.message.content is None  # "Let me check." is not a call: the grammar says no
    assert choice.finish_reason == "tool_calls"
    assert json.loads(choice.message.tool_calls[0].function.arguments) == json.loads(ARGUMENTS)


def test_history_reasoning_reaches_the_template_by_its_rules(server):
    """K2-Thinking's template keeps the reasoning of the current tool loop and drops it from
    turns before the last answer."""
    call = {"id": "functions.get_weather:0", "type": "function",
            "function": {"name": "get_weather", "arguments": ARGUMENTS}}
    loop = MESSAGES + [{"role": "assistant", "content": "Let me check.",
                        "reasoning_content": THINKING, "tool_calls": [call]},
                       {"role": "tool", "tool_call_id": call["id"], "content": "18C"}]

    def prompt(messages):
        return httpx.post(server.base_v1 + "/chat/completions", timeout=60, json={
            "model": MODEL, "messages": messages, "tools": TOOLS, "max_tokens": 1,
            "echo": True}).json()["prompt"][0]["text"]

    assert f"<think>{THINKING}</think>Let me check.<|tool_calls_section_begin|>" in prompt(loop)
    answered = loop + [{"role": "assistant", "content": "18C in Paris.",
                        "reasoning_content": "Report it."}, ROME_MESSAGES[0]]
    text = prompt(answered)
    assert THINKING not in text and "Report it." not in text
    assert "<think></think>Let me check." in text


def test_anthropic_thinking_blocks(server):
    client = anthropic.Anthropic(base_url=server.root, api_key="local", max_retries=0)
    kwargs = dict(model=MODEL, max_tokens=80, messages=MESSAGES, tools=[ANTHROPIC_TOOL],
                  thinking={"type": "enabled", "budget_tokens": 1024}, extra_body=GREEDY)
    reply = client.messages.create(**kwargs)
    thinking, text, tool_use = reply.content
    assert thinking.type == "thinking" and thinking.thinking == THINKING and thinking.signature
    assert text.type == "text" and text.text == "Let me check."
    assert tool_use.type == "tool_use" and tool_use.input == json.loads(ARGUMENTS)
    assert reply.stop_reason == "tool_use"

    events = []
    with client.messages.stream(**kwargs) as stream:
        for event in stream:
            events.append((event.type, getattr(getattr(event, "delta", None), "type", None)))
        final = stream.get_final_message()
    assert [b.type for b in final.content] == ["thinking", "text", "tool_use"]
    assert final.content[0].thinking == THINKING
    assert final.content[0].signature == thinking.signature
    assert final.content[2].input == tool_use.input
    deltas = [d for kind, d in events if kind == "content_block_delta"]
    assert deltas.index("signature_delta") > deltas.index("thinking_delta")
    assert deltas.index("signature_delta") < deltas.index("text_delta")

    # The next turn sends the thinking back: it is the assistant's reasoning_content, which
    # this template keeps in the current tool loop.
    blocks = [b.model_dump(exclude_none=True) for b in reply.content]
    result = {"role": "user", "content": [{"type": "tool_result", "tool_use_id": tool_use.id,
                                           "content": "18C"}]}
    turn = [*MESSAGES, {"role": "assistant", "content": blocks}, result]
    without = [*MESSAGES, {"role": "assistant", "content": blocks[1:]}, result]
    count = client.messages.count_tokens(model=MODEL, messages=turn, tools=[ANTHROPIC_TOOL])
    bare = client.messages.count_tokens(model=MODEL, messages=without, tools=[ANTHROPIC_TOOL])
    assert count.input_tokens > bare.input_tokens
    cleared = client.messages.count_tokens(
        model=MODEL, messages=turn, tools=[ANTHROPIC_TOOL],
        extra_body={"context_management": {"edits": [
            {"type": "clear_thinking_20251015", "keep": {"type": "thinking_turns",
                                                         "value": 0}}]}})
    assert cleared.input_tokens == bare.input_tokens

    with pytest.raises(anthropic.BadRequestError, match="always thinks"):
        client.messages.create(model=MODEL, max_tokens=8, messages=MESSAGES,
                               thinking={"type": "disabled"})


def test_responses_reasoning_items(oa):
    first = oa.responses.create(model=MODEL, input=MESSAGES[0]["content"], tools=[FLAT_TOOL],
                                **GREEDY)
    reasoning, message, call = first.output
    assert reasoning.type == "reasoning" and reasoning.summary == []
    assert [c.text for c in reasoning.content] == [THINKING]
    assert message.type == "message" and message.content[0].text == "Let me check."
    assert call.type == "function_call" and json.loads(call.arguments) == json.loads(ARGUMENTS)
    assert 0 < first.usage.output_tokens_details.reasoning_tokens < first.usage.output_tokens

    with oa.responses.stream(model=MODEL, input=MESSAGES[0]["content"], tools=[FLAT_TOOL],
                             **GREEDY) as stream:
        events = [e for e in stream]
        streamed = stream.get_final_response()
    kinds = [e.type for e in events]
    assert "".join(e.delta for e in events if e.type == "response.reasoning_text.delta") \
        == THINKING
    done = next(e for e in events if e.type == "response.reasoning_text.done")
    assert done.text == THINKING and kinds.index("response.reasoning_text.done") \
        < kinds.index("response.output_text.delta")
    assert [o.type for o in streamed.output] == ["reasoning", "message", "function_call"]
    assert streamed.output[0].content[0].text == THINKING
    assert streamed.usage.output_tokens_details.reasoning_tokens \
        == first.usage.output_tokens_details.reasoning_tokens

    # A reasoning item sent back goes onto the assistant turn, which the template keeps.
    def input_tokens(items):
        return oa.responses.create(model=MODEL, input=items, tools=[FLAT_TOOL],
                                   max_output_tokens=1, store=False).usage.input_tokens
    history = [{"role": "user", "content": MESSAGES[0]["content"]},
               reasoning.model_dump(exclude_none=True),
               {"type": "function_call", "call_id": call.call_id, "name": call.name,
                "arguments": call.arguments},
               {"type": "function_call_output", "call_id": call.call_id, "output": "18C"}]
    assert input_tokens(history) > input_tokens(history[:1] + history[2:])

    with pytest.raises(openai.BadRequestError, match="always"):
        oa.responses.create(model=MODEL, input="hi", reasoning={"effort": "none"})


def test_models_lists_k2_thinking_with_its_price_and_context(oa):
    (model,) = oa.models.list().data
    extra = model.model_extra
    assert model.id == MODEL and extra["display_name"] == "Kimi K2 Thinking"
    assert (extra["pricing"]["input"], extra["pricing"]["output"]) == (0.60, 2.50)
    assert extra["context_length"] == 4096  # the tiny config's; the catalog caps at 262144


def test_required_call_inside_unclosed_thinking_follows_the_schema(oa):
    """tool_choice "required": the grammar lets the section open inside the thinking block
    (no `</think>`) and still holds the arguments to the tool's schema."""
    for stream in (False, True):
        if stream:
            reasoning, _, calls, _, finish = _streamed_chat(
                oa, model=MODEL, messages=ROME_MESSAGES, tools=TOOLS, tool_choice="required",
                max_tokens=80, **GREEDY)
        else:
            choice = oa.chat.completions.create(model=MODEL, messages=ROME_MESSAGES, tools=TOOLS,
                                                tool_choice="required", max_tokens=80,
                                                **GREEDY).choices[0]
            reasoning = choice.message.model_extra["reasoning_content"]
            calls = [(c.function.name, c.function.arguments) for c in choice.message.tool_calls]
            finish = choice.finish_reason
        assert reasoning == ROME_THINKING and finish == "tool_calls"
        assert [(n, json.loads(a)) for n, a in calls] == [("get_weather",
                                                            json.loads(ROME_ARGUMENTS))]


def test_k2vv_tool_call_f1_on_the_thinking_model(server, tmp_path):
    """benchmarks/k2vv.py against the tiny thinking model: both trained calls (one after
    `</think>`, one inside an unclosed block), streamed and not, are calls; a request without
    tools is not; F1 against the expected triggers is 100% and no call is left as text."""
    bodies = [{"messages": MESSAGES, "tools": TOOLS, "stream": False},
              {"messages": ROME_MESSAGES, "tools": TOOLS, "stream": False},
              {"messages": MESSAGES, "tools": TOOLS, "stream": True},
              {"messages": ROME_MESSAGES, "tools": TOOLS, "stream": True},
              {"messages": [{"role": "_input", "content": "Be brief."}, *ROME_MESSAGES],
               "stream": True}]
    requests = tmp_path / "requests.jsonl"
    requests.write_text("".join(json.dumps({"model": "x", **b}) + "\n" for b in bodies))
    truth = tmp_path / "truth.jsonl"
    truth.write_text("".join(json.dumps({"data_index": i, "finish_reason": f}) + "\n" for i, f in
                             enumerate(["tool_calls"] * 4 + ["stop"])))
    summary = tmp_path / "summary.json"
    done = subprocess.run(
        [sys.executable, "benchmarks/k2vv.py", str(requests), "--base-url", server.base_v1,
         "--model", MODEL, "--thinking", "--temperature", "0", "--max-tokens", "48",
         "--ground-truth", str(truth), "--summary", str(summary), "--output",
         str(tmp_path / "results.jsonl")],
        capture_output=True, text=True, timeout=120, cwd=Path(__file__).parents[2])
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(summary.read_text())
    assert result["finish_tool_calls"] == 4 and result["schema_accuracy"] == 1.0
    assert result["replies_with_reasoning"] >= 4 and result["calls_left_as_text"] == 0
    assert result["tool_call_f1"] == 1.0
    assert "tool-call trigger F1" in done.stdout and "100.00%" in done.stdout
