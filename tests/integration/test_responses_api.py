"""The OpenAI Responses API against the embedded model, driven by the official `openai` SDK:
plain and streamed replies (the SDK assembles the stream), a function-calling loop continued by
`previous_response_id`, structured output, stored responses, background runs, and the 400s for
what this server does not implement. What a Responses request generates is compared with the
same conversation sent to chat completions (greedy), so the translation itself is checked."""

from __future__ import annotations

import json
import time

import jsonschema
import openai
import pytest

from tests.conftest import EMBEDDED_ID

TOOLS = [{"type": "function", "name": "get_weather", "description": "Current weather in a city.",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                         "required": ["city"], "additionalProperties": False}}]
QUESTION = "What's the weather in Paris?"


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_v1, api_key="local", max_retries=0, timeout=120)


def chat_text(client, messages, **fields) -> str:
    reply = client.chat.completions.create(model=EMBEDDED_ID, messages=messages, temperature=0,
                                           **fields)
    return reply.choices[0].message


def test_create_is_the_chat_reply_with_responses_shapes(client):
    r = client.responses.create(model=EMBEDDED_ID, input="What is 2+2?",
                                instructions="Answer in one short sentence.",
                                max_output_tokens=24, temperature=0,
                                metadata={"run": "t1"})
    assert r.id.startswith("resp_") and r.object == "response"
    assert r.status in ("completed", "incomplete") and r.model == EMBEDDED_ID
    (item,) = r.output
    assert item.type == "message" and item.role == "assistant" and item.id.startswith("msg_")
    assert item.content[0].type == "output_text"
    same = chat_text(client, [{"role": "system", "content": "Answer in one short sentence."},
                              {"role": "user", "content": "What is 2+2?"}],
                     max_completion_tokens=24)
    assert r.output_text == same.content and r.output_text
    u = r.usage
    assert u.input_tokens > 10 and 1 <= u.output_tokens <= 24
    assert u.total_tokens == u.input_tokens + u.output_tokens
    assert u.output_tokens_details.reasoning_tokens == 0
    # what was asked is echoed, as OpenAI does
    assert (r.instructions, r.max_output_tokens, r.temperature) == (
        "Answer in one short sentence.", 24, 0)
    assert r.metadata == {"run": "t1"} and r.store is True and r.tool_choice == "auto"
    assert client.responses.retrieve(r.id).output_text == r.output_text


def test_stream_events_assemble_the_same_response(client):
    fields = dict(model=EMBEDDED_ID, input="What is 2+2?", instructions="Be brief.",
                  max_output_tokens=40, temperature=0)
    whole = client.responses.create(**fields)
    assert whole.status == "completed"  # (the SDK's helper needs response.completed)
    with client.responses.stream(**fields) as stream:
        events = list(stream)
        final = stream.get_final_response()
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress",
                         "response.output_item.added", "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done",
                          "response.output_item.done", f"response.{whole.status}"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert len(deltas) >= 2, "tokens must stream as separate events"
    assert "".join(deltas) == whole.output_text
    assert final.output_text == whole.output_text
    assert final.usage.output_tokens == whole.usage.output_tokens
    assert len({e.response.id for e in events if hasattr(e, "response")}) == 1


def test_max_output_tokens_makes_it_incomplete(client):
    r = client.responses.create(model=EMBEDDED_ID, input="Write a long story about a dragon.",
                                max_output_tokens=3, temperature=0)
    assert r.status == "incomplete"
    assert r.incomplete_details.reason == "max_output_tokens"
    assert r.usage.output_tokens == 3 and r.output[0].status == "incomplete"
    events = list(client.responses.create(model=EMBEDDED_ID, stream=True, max_output_tokens=3,
                                          input="Write a long story about a dragon.",
                                          temperature=0))
    assert events[-1].type == "response.incomplete"
    assert events[-1].response.output[0].content[0].text == r.output_text


def test_function_calling_loop_with_previous_response_id(client):
    first = client.responses.create(model=EMBEDDED_ID, input=QUESTION, tools=TOOLS,
                                    tool_choice="required", temperature=0,
                                    max_output_tokens=60)
    (call,) = [item for item in first.output if item.type == "function_call"]
    assert call.name == "get_weather" and call.id.startswith("fc_") and call.call_id
    jsonschema.validate(json.loads(call.arguments), TOOLS[0]["parameters"])

    # Streamed, the same call arrives as argument deltas the SDK puts together.
    with client.responses.stream(model=EMBEDDED_ID, input=QUESTION, tools=TOOLS,
                                 tool_choice="required", temperature=0,
                                 max_output_tokens=60) as stream:
        events = list(stream)
        streamed = stream.get_final_response()
    deltas = [e.delta for e in events if e.type == "response.function_call_arguments.delta"]
    (done,) = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert "".join(deltas) == done.arguments == call.arguments
    (streamed_call,) = [item for item in streamed.output if item.type == "function_call"]
    assert (streamed_call.name, streamed_call.arguments) == (call.name, call.arguments)

    # The next turn sends only the tool's output; the stored turn supplies the rest.
    second = client.responses.create(model=EMBEDDED_ID, previous_response_id=first.id,
                                     input=[{"type": "function_call_output",
                                             "call_id": call.call_id,
                                             "output": '{"temp_c": 18}'}],
                                     tools=TOOLS, temperature=0, max_output_tokens=30)
    assert second.previous_response_id == first.id
    assert second.output_text and second.output[0].type == "message"
    assert second.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens
    # ... exactly what chat completions answers to the whole conversation.
    chat_tools = [{"type": "function", "function": {k: v for k, v in TOOLS[0].items()
                                                    if k != "type"}}]
    same = chat_text(client, [
        {"role": "user", "content": QUESTION},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": call.call_id, "type": "function",
             "function": {"name": call.name, "arguments": call.arguments}}]},
        {"role": "tool", "tool_call_id": call.call_id, "content": '{"temp_c": 18}'}],
        tools=chat_tools, max_completion_tokens=30)
    assert second.output_text == same.content
    items = client.responses.input_items.list(second.id, order="asc")
    assert [i.type for i in items.data] == ["function_call_output"]


def test_json_schema_text_format(client):
    schema = {"type": "object", "properties": {"name": {"type": "string"},
                                               "age": {"type": "integer"}},
              "required": ["name", "age"], "additionalProperties": False}
    r = client.responses.create(model=EMBEDDED_ID, input="Invent a person: name and age.",
                                text={"format": {"type": "json_schema", "name": "person",
                                                 "schema": schema, "strict": True}},
                                temperature=0, max_output_tokens=60)
    assert r.status == "completed"
    jsonschema.validate(json.loads(r.output_text), schema)
    assert r.text.format.type == "json_schema"


@pytest.mark.parametrize("fields,param", [
    ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
    ({"include": ["file_search_call.results"]}, "include"),
    ({"reasoning": {"summary": "detailed"}}, "reasoning.summary"),
    ({"tools": [{"type": "namespace", "name": "ns", "tools": [{"type": "custom",
                                                                "name": "f"}]}]},
     "tools[0].tools[0].type"),
    ({"conversation": "conv_1"}, "conversation"),
    ({"reasoning": {"effort": "high"}}, "reasoning.effort"),
    ({"truncation": "auto"}, "truncation"),
    ({"prompt": {"id": "pmpt_1"}}, "prompt"),
    ({"input": [{"role": "user", "content": [
        {"type": "input_image", "file_id": "file_1"}]}]},
     "input[0].content[0].image_url"),
    ({"tool_choice": {"type": "file_search"}}, "tool_choice"),
    ({"text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format.schema"),
    ({"max_output_tokens": 0}, "max_output_tokens"),
    ({"temperature": 3}, "temperature"),
    ({"store": False, "background": True}, "background"),
])
def test_what_is_not_implemented_is_a_400_naming_it(client, fields, param):
    body = {"input": "hi", "max_output_tokens": 4, **fields}
    extra = {k: v for k, v in body.items() if k not in ("input", "max_output_tokens")}
    with pytest.raises(openai.BadRequestError) as err:
        client.responses.create(model=EMBEDDED_ID, input=body["input"],
                                max_output_tokens=body["max_output_tokens"], extra_body=extra)
    assert err.value.body["param"] == param, err.value.body
    assert err.value.body["message"]


def test_an_image_for_a_text_only_model_names_the_vision_flag(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.responses.create(model=EMBEDDED_ID, max_output_tokens=4, input=[
            {"role": "user", "content": [{"type": "input_image",
                                          "image_url": "https://example.com/a.png"}]}])
    assert err.value.body["code"] == "unsupported_content_type"
    assert "--vision-model" in err.value.body["message"], err.value.body
    assert err.value.body["param"] == "input.0.content", err.value.body


def test_store_false_previous_unknown_and_delete(client):
    kept = client.responses.create(model=EMBEDDED_ID, input="hi", max_output_tokens=2)
    unkept = client.responses.create(model=EMBEDDED_ID, input="hi", max_output_tokens=2,
                                     store=False)
    assert unkept.store is False
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unkept.id)
    with pytest.raises(openai.NotFoundError) as err:
        client.responses.create(model=EMBEDDED_ID, input="hi", previous_response_id=unkept.id)
    assert err.value.body["param"] == "previous_response_id"
    client.responses.delete(kept.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(kept.id)


def test_background_poll_and_cancel(client):
    done = client.responses.create(model=EMBEDDED_ID, input="Say hello.", background=True,
                                   max_output_tokens=4, temperature=0)
    assert done.status == "queued" and done.output == []
    deadline = time.time() + 60
    while done.status in ("queued", "in_progress") and time.time() < deadline:
        time.sleep(0.1)
        done = client.responses.retrieve(done.id)
    assert done.status in ("completed", "incomplete") and done.usage.output_tokens >= 1
    same = client.responses.create(model=EMBEDDED_ID, input="Say hello.",
                                   max_output_tokens=4, temperature=0)
    assert done.output_text == same.output_text

    long = client.responses.create(model=EMBEDDED_ID, background=True, temperature=0,
                                   input="Write a long story about a dragon.",
                                   max_output_tokens=1000)
    cancelled = client.responses.cancel(long.id)
    assert cancelled.status == "cancelled"
    assert client.responses.retrieve(long.id).status == "cancelled"


def test_a_request_shaped_as_codex_cli_sends_it(client):
    """What Codex CLI 0.169 sends on every turn (captured against this server; its web_search
    tool left out, as `-c web_search=disabled` does): functions grouped in a `namespace`,
    reasoning summary "auto", the encrypted reasoning asked for, store off, its session tags.
    A namespaced call comes back split into `namespace` and `name`, and goes back as such."""
    agents = {"type": "namespace", "name": "multi_agent_v1",
              "description": "Tools for spawning and managing sub-agents.",
              "tools": [{"type": "function", "name": "close_agent", "strict": False,
                         "description": "Close an agent.",
                         "parameters": {"type": "object", "properties": {
                             "id": {"type": "string"}}, "required": ["id"],
                             "additionalProperties": False}}]}
    shell = {"type": "function", "name": "exec_command", "strict": False,
             "description": "Runs a command.", "parameters": {
                 "type": "object", "properties": {"cmd": {"type": "string"}},
                 "required": ["cmd"], "additionalProperties": False}}
    codex = dict(store=False, include=["reasoning.encrypted_content"],
                 reasoning={"summary": "auto"}, parallel_tool_calls=True,
                 prompt_cache_key="01a245ac", extra_body={"client_metadata": {"turn_id": "t1"}})
    ask = [{"type": "message", "role": "developer", "content": [
               {"type": "input_text", "text": "You are a coding agent."}]},
           {"type": "message", "role": "user", "content": [
               {"type": "input_text", "text": "Close the agent a1."}]}]
    r = client.responses.create(model=EMBEDDED_ID, input=ask, tools=[agents, shell],
                                tool_choice={"type": "function", "name": "multi_agent_v1.close_agent"},
                                temperature=0, max_output_tokens=40, **codex)
    (call,) = [item for item in r.output if item.type == "function_call"]
    assert (call.namespace, call.name) == ("multi_agent_v1", "close_agent")
    assert set(json.loads(call.arguments)) == {"id"}
    assert r.tools[0].type == "namespace"

    with client.responses.stream(model=EMBEDDED_ID, input=ask, tools=[agents, shell],
                                 tool_choice={"type": "function",
                                              "name": "multi_agent_v1.close_agent"},
                                 temperature=0, max_output_tokens=40, **codex) as stream:
        streamed = stream.get_final_response()
    (streamed_call,) = [item for item in streamed.output if item.type == "function_call"]
    assert (streamed_call.namespace, streamed_call.name) == ("multi_agent_v1", "close_agent")
    assert streamed_call.arguments == call.arguments

    history = ask + [call.model_dump(exclude_none=True),
                     {"type": "function_call_output", "call_id": call.call_id,
                      "output": "closed"}]
    after = client.responses.create(model=EMBEDDED_ID, input=history, tools=[agents, shell],
                                    temperature=0, max_output_tokens=8, **codex)
    assert after.status in ("completed", "incomplete")
