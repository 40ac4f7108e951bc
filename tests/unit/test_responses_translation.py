"""The Responses API's request translation and event stream, without a model: items become the
chat conversation they mean, and chat-delta pieces the typed events the SDK assembles."""

from __future__ import annotations

import asyncio

import pytest
from openai import omit
from openai.lib.streaming.responses._responses import ResponseStreamState
from openai.types.responses import ResponseStreamEvent
from pydantic import TypeAdapter

from k2serve.api.chat_run import StreamPiece
from k2serve.api.responses_reply import EventStream, response_object, stream_events
from k2serve.api.responses_request import (
    as_responses_error,
    responses_to_chat,
    with_history,
)
from k2serve.errors import APIError


def test_items_become_one_assistant_turn_per_text_and_calls():
    req = responses_to_chat({"model": "m", "instructions": "Be brief.", "input": [
        {"role": "user", "content": [{"type": "input_text", "text": "a"},
                                     {"type": "input_text", "text": "b"}]},
        {"type": "reasoning", "id": "rs_1", "summary": [{"type": "summary_text",
                                                         "text": "think"}]},
        {"type": "message", "role": "assistant",
         "content": [{"type": "output_text", "text": "Let me check."}]},
        {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
        {"type": "function_call", "call_id": "c2", "name": "g", "arguments": "{\"x\":1}"},
        {"type": "function_call_output", "call_id": "c1", "output": "one"},
        {"type": "function_call_output", "call_id": "c2",
         "output": [{"type": "input_text", "text": "two"}]},
        {"role": "developer", "content": "more"}],
        "tools": [{"type": "function", "name": "f", "parameters": {"type": "object"},
                   "strict": True}],
        "tool_choice": {"type": "function", "name": "f"}, "max_output_tokens": 7,
        "text": {"format": {"type": "json_object"}}})
    messages = [m.model_dump(exclude_none=True) for m in req.messages]
    assert messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "a\nb"},
        {"role": "assistant", "content": "Let me check.", "reasoning_content": "think",
         "tool_calls": [
             {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}},
             {"id": "c2", "type": "function",
              "function": {"name": "g", "arguments": "{\"x\":1}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "one"},
        {"role": "tool", "tool_call_id": "c2", "content": "two"},
        {"role": "developer", "content": "more"}]
    assert req.tools == [{"type": "function",
                          "function": {"name": "f", "parameters": {"type": "object"}}}]
    assert req.tool_choice == {"type": "function", "function": {"name": "f"}}
    assert req.max_completion_tokens == 7
    assert req.response_format == {"type": "json_object"}


def test_history_goes_before_the_new_input():
    body = with_history({"model": "m", "previous_response_id": "resp_1", "input": "next"},
                        [{"id": "msg_1", "type": "message", "role": "user",
                          "content": [{"type": "input_text", "text": "first"}]}],
                        [{"id": "msg_2", "type": "message", "role": "assistant",
                          "content": [{"type": "output_text", "text": "reply"}]}])
    assert "previous_response_id" not in body
    req = responses_to_chat(body)
    assert [(m.role, m.content) for m in req.messages] == [
        ("user", "first"), ("assistant", "reply"), ("user", "next")]


@pytest.mark.parametrize("chat,responses", [
    ("max_completion_tokens", "max_output_tokens"), ("messages.2.content", "input.2.content"),
    ("response_format.json_schema.schema", "text.format.schema"),
    ("tools.1.function.parameters", "tools[1].parameters"), ("temperature", "temperature")])
def test_chat_errors_name_the_responses_field(chat, responses):
    assert as_responses_error(APIError(400, "bad", param=chat)).param == responses


def _events(pieces, fail: Exception | None = None) -> list[dict]:
    async def source():
        for piece in pieces:
            yield piece
        if fail is not None:
            raise fail

    async def run():
        stream = EventStream(response_object("resp_1", {"model": "m"}, 0, "in_progress"))
        return [e async for e in stream_events(source(), stream)]

    return asyncio.run(run())


def test_text_then_calls_stream_as_items_the_sdk_assembles():
    usage = {"prompt_tokens": 5, "completion_tokens": 9,
             "prompt_tokens_details": {"cached_tokens": 2}}
    events = _events([
        StreamPiece(0, {"content": "Let me "}), StreamPiece(0, {"content": "check."}),
        StreamPiece(0, {"tool_calls": [{"index": 0, "id": "c1", "type": "function",
                                        "function": {"name": "f", "arguments": ""}}]}),
        StreamPiece(0, {"tool_calls": [{"index": 0, "function": {"arguments": "{\"a\""}}]}),
        StreamPiece(0, {"tool_calls": [{"index": 0, "function": {"arguments": ":1}"}}]}),
        StreamPiece(0, {"tool_calls": [{"index": 1, "id": "c2", "type": "function",
                                        "function": {"name": "g", "arguments": "{}"}}]}),
        StreamPiece(0, {"content": ""}, "tool_calls", usage)])
    state = ResponseStreamState(input_tools=omit, text_format=omit)
    adapter = TypeAdapter(ResponseStreamEvent)
    for event in events:
        state.handle_event(adapter.validate_python(event))
    final = state._completed_response
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert final.output_text == "Let me check."
    calls = [(o.call_id, o.name, o.arguments, o.status) for o in final.output[1:]]
    assert calls == [("c1", "f", "{\"a\":1}", "completed"), ("c2", "g", "{}", "completed")]
    assert final.usage.input_tokens_details.cached_tokens == 2
    assert final.usage.total_tokens == 14 and final.status == "completed"


def test_a_failure_after_the_first_event_is_in_band():
    events = _events([StreamPiece(0, {"content": "partial"})],
                     fail=APIError(503, "engine stopped", code="engine_stopped"))
    kinds = [e["type"] for e in events]
    assert kinds[-2:] == ["error", "response.failed"]
    assert events[-2]["message"] == "engine stopped"
    failed = events[-1]["response"]
    assert failed["status"] == "failed" and failed["error"]["code"] == "server_error"
    assert failed["output"][0]["status"] == "incomplete"
    assert failed["output"][0]["content"][0]["text"] == "partial"
