"""Reasoning split from the reply (k2serve.text.reasoning), alone and composed with K2's
tool-call parser (k2serve.api.chat_output): streamed in any cut, it equals the whole text."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from k2serve.api.anthropic_messages import messages_to_chat
from k2serve.api.chat_output import ChoiceOutput, OutputPlan, reasoning_tokens
from k2serve.api.responses_request import responses_to_chat
from k2serve.api.tools import ToolPlan
from k2serve.errors import APIError
from k2serve.models.tiny_k2_tokenizer import write_tiny_k2_tokenizer_files
from k2serve.structured import GrammarCompiler
from k2serve.structured.grammars import (
    ThinkingSyntax,
    ToolSpec,
    json_tool_grammar,
    k2_tool_grammar,
)
from k2serve.text.chat_template import ChatTemplate
from k2serve.text.k2_tokenizer import packaged_k2_chat_template
from k2serve.text.loading import load_tokenizer
from k2serve.text.reasoning import (
    ReasoningFormat,
    ReasoningSplitter,
    reasoning_format,
    split_reasoning,
)
from k2serve.text.tool_parsers.kimi_k2 import SECTION_BEGIN

FMT = ReasoningFormat()
CALL = ('<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0'
        '<|tool_call_argument_begin|>{"city": "Paris"}<|tool_call_end|>'
        '<|tool_calls_section_end|>')
K2_TOOLS = ToolPlan("kimi_k2", [], None, True, whole_reply=False)


def test_whole_text_splits():
    out = split_reasoning("<think>Paris, so weather.</think>\n\nSunny.", FMT)
    assert (out.reasoning, out.content) == ("Paris, so weather.", "Sunny.")
    assert out.reasoning_end == len("<think>Paris, so weather.</think>")
    out = split_reasoning("No thinking here.", FMT)
    assert (out.reasoning, out.content, out.reasoning_end) == (None, "No thinking here.", 0)
    # The prompt opened the block (Qwen3/R1 templates): the reply starts inside it.
    out = split_reasoning("\nHmm.\n</think>\n\nYes.", FMT, opened=True)
    assert (out.reasoning, out.content) == ("Hmm.\n", "Yes.")
    # Cut off while thinking: all of it is reasoning.
    out = split_reasoning("<think>still going", FMT)
    assert (out.reasoning, out.content) == ("still going", "")


def test_a_call_inside_thinking_ends_it():
    """K2-Thinking opens its call section without closing the block."""
    text = "<think>I need the weather." + CALL
    out = split_reasoning(text, FMT, implicit_ends=(SECTION_BEGIN,))
    assert out.reasoning == "I need the weather."
    assert out.content == CALL  # the call stays for the tool parser
    message, has_calls, end = OutputPlan(K2_TOOLS, FMT).message(text)
    assert has_calls and end == len("<think>I need the weather.")
    assert message["reasoning_content"] == "I need the weather." and message["content"] is None
    (call,) = message["tool_calls"]
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}


def test_markers_in_the_reply_are_text():
    out = split_reasoning("<think>a</think>Use <think> tags like </think> this.", FMT)
    assert (out.reasoning, out.content) == ("a", "Use <think> tags like </think> this.")


def test_a_model_reasons_if_its_template_closes_thinking_blocks():
    assert reasoning_format(ChatTemplate(packaged_k2_chat_template())) is None
    fmt = reasoning_format(ChatTemplate(packaged_k2_chat_template(thinking=True)))
    assert fmt == ReasoningFormat(switch=None)  # K2-Thinking has no switch to turn it off
    qwen_like = ("{% for m in messages %}{{ m.content }}{% endfor %}{% if add_generation_prompt "
                 "%}<think>{% if enable_thinking is defined and not enable_thinking %}</think>"
                 "{% endif %}{% endif %}")
    fmt = reasoning_format(ChatTemplate(qwen_like))
    assert fmt.switch == "enable_thinking"
    assert fmt.opened_by("...<think>\n") and not fmt.opened_by("...<think></think>")


def _stream(plan: OutputPlan, pieces: list[str]):
    out = ChoiceOutput(plan)
    deltas = []
    for piece in pieces:
        deltas += out.feed(piece, 1)
    deltas += out.finish()
    reasoning = "".join(d.get("reasoning_content", "") for d in deltas)
    content = "".join(d.get("content") or "" for d in deltas)
    calls: dict[int, dict] = {}
    for d in deltas:
        for call in d.get("tool_calls") or ():
            entry = calls.setdefault(call["index"], {"name": None, "arguments": ""})
            function = call.get("function") or {}
            entry["name"] = function.get("name") or entry["name"]
            entry["arguments"] += function.get("arguments") or ""
    return reasoning or None, content, [calls[i] for i in sorted(calls)], out


def _cuts(text: str, points: list[int]) -> list[str]:
    points = sorted({p % (len(text) + 1) for p in points})
    edges = [0, *points, len(text)]
    return [text[a:b] for a, b in zip(edges, edges[1:])]


TEXTS = st.sampled_from([
    "<think>Weather needs a tool.</think>Let me check." + CALL,
    "<think>Weather needs a tool." + CALL,  # no </think>: the call ends the thinking
    "  <think>\nlead</think>\n\nSunny in Paris.",
    "<think></think>Plain.",
    "Plain answer, no <think> at the start.",
    "<thi",  # cut off inside the start marker
    "<think>cut off in </thi",
    "<think>a</think>" + CALL + "trailing",
])


@settings(max_examples=150, deadline=None)
@given(TEXTS, st.lists(st.integers(min_value=0, max_value=400), max_size=12),
       st.booleans())
def test_streaming_any_cut_equals_the_whole_text(text, points, tools):
    plan = OutputPlan(K2_TOOLS if tools else None, FMT)
    reasoning, content, calls, out = _stream(plan, _cuts(text, points))
    message, has_calls, end = plan.message(text)
    assert reasoning == message["reasoning_content"]
    assert content == (message["content"] or "")
    expected = [{"name": c["function"]["name"], "arguments": c["function"]["arguments"]}
                for c in message.get("tool_calls") or ()]
    assert calls == expected and out.has_tool_calls == has_calls
    if tools:  # markers never leak into what the client reads
        assert "<|" not in content and "<|" not in (reasoning or "")


@settings(max_examples=100, deadline=None)
@given(st.text(alphabet="<>/thinkab \n", max_size=40),
       st.lists(st.integers(min_value=0, max_value=60), max_size=8), st.booleans())
def test_splitter_is_cut_independent_on_any_text(text, points, opened):
    whole = split_reasoning(text, FMT, opened)
    splitter = ReasoningSplitter(FMT, opened)
    parts = [p for piece in _cuts(text, points) for p in splitter.feed(piece)]
    parts += splitter.finish()
    assert "".join(t for k, t in parts if k == "reasoning") == (whole.reasoning or "")
    assert "".join(t for k, t in parts if k == "content") == whole.content
    assert splitter.reasoning_end == whole.reasoning_end


def test_reasoning_tokens_count_the_deltas_before_the_end():
    text = ["<think>", "Hmm", ".", "</think>", "Yes", "."]
    marks, offset = [], 0
    for piece in text:
        marks.append((offset, 1))
        offset += len(piece)
    end = split_reasoning("".join(text), FMT).reasoning_end
    assert reasoning_tokens(marks, end) == 4  # the markers count: the model wrote them
    _, _, _, out = _stream(OutputPlan(None, FMT), text)
    assert out.reasoning_tokens == 4
    _, _, _, out = _stream(OutputPlan(None, FMT), ["No", " thinking"])
    assert out.reasoning_tokens == 0


WEATHER = ToolSpec("get_weather", {"type": "object", "properties": {"city": {"type": "string"}},
                                   "required": ["city"]})
JSON_CALL = '<tool_call>[{"name": "get_weather", "arguments": {"city": "Paris"}}]</tool_call>'


@pytest.fixture(scope="module", params=[True, False], ids=["think-tokens", "think-text"])
def k2_tokenizer(request, tmp_path_factory):
    """K2-Thinking's (`<think>` one token each, special for the grammar) or K2's (text)."""
    directory = tmp_path_factory.mktemp("tok")
    write_tiny_k2_tokenizer_files(str(directory), thinking=request.param)
    tokenizer = load_tokenizer(str(directory))
    return tokenizer, GrammarCompiler(tokenizer), request.param


def _accepts(k2_tokenizer, grammar: str, text: str) -> bool:
    tokenizer, compiler, _ = k2_tokenizer
    matcher = compiler.compile(grammar).new_matcher()
    return all(matcher.accept(t) for t in tokenizer.encode(text)) and matcher.accept(
        min(tokenizer.stop_token_ids))


@pytest.mark.parametrize("text, auto, required", [
    ("<think>Paris.</think>Let me check." + CALL, True, False),
    ("<think>Paris.</think>" + CALL, True, True),
    ("<think>Paris." + CALL, True, True),  # K2-Thinking: the section without </think>
    (CALL, True, True),
    ("<think>Paris.</think>It is sunny.", True, False),
    ("It is sunny.", True, False),
    ("<think>Paris.", False, False),  # thinking alone is no reply
])
def test_k2_call_grammar_allows_thinking_first(k2_tokenizer, text, auto, required):
    syntax = ThinkingSyntax(special=k2_tokenizer[2])
    assert _accepts(k2_tokenizer, k2_tool_grammar([WEATHER], None, True, True, syntax),
                    text) == auto
    assert _accepts(k2_tokenizer, k2_tool_grammar([WEATHER], None, True, False, syntax),
                    text) == required


@pytest.mark.parametrize("text, auto, required", [
    ("<think>Paris < Rome?</think>\n\n" + JSON_CALL, True, True),
    ("<think>Paris.</think>" + JSON_CALL, True, True),
    (JSON_CALL, True, True),
    ("<think>Paris.</think>Sunny.", True, False),
    ("<think>Paris." + JSON_CALL, False, False),  # our JSON calls come after the block only
    ("<think>Paris.</think>Sunny." + JSON_CALL, False, False),
])
def test_json_call_grammar_allows_thinking_first(k2_tokenizer, text, auto, required):
    syntax = ThinkingSyntax(special=k2_tokenizer[2])
    assert _accepts(k2_tokenizer, json_tool_grammar([WEATHER], None, True, True, syntax),
                    text) == auto
    assert _accepts(k2_tokenizer, json_tool_grammar([WEATHER], None, True, False, syntax),
                    text) == required


def test_an_opened_block_must_be_closed_or_end_in_a_call(k2_tokenizer):
    syntax = ThinkingSyntax(special=k2_tokenizer[2], opened=True)
    grammar = k2_tool_grammar([WEATHER], None, True, True, syntax)
    assert _accepts(k2_tokenizer, grammar, "Paris.</think>Sunny.")
    assert _accepts(k2_tokenizer, grammar, "Paris." + CALL)
    assert not _accepts(k2_tokenizer, grammar, "Sunny, no thinking.")


def test_thinking_off_where_the_template_has_a_switch():
    switch = ReasoningFormat(switch="enable_thinking")
    body = {"model": "m", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}],
            "thinking": {"type": "disabled"}}
    chat = messages_to_chat(body, switch)
    assert chat.chat_template_kwargs == {"enable_thinking": False}
    with pytest.raises(APIError, match="always thinks"):
        messages_to_chat(body, ReasoningFormat())
    assert messages_to_chat(body, None).chat_template_kwargs is None  # nothing to turn off
    enabled = {**body, "thinking": {"type": "enabled", "budget_tokens": 1024}}
    assert messages_to_chat(enabled, ReasoningFormat()).chat_template_kwargs is None
    with pytest.raises(APIError, match="does not produce thinking"):
        messages_to_chat(enabled, None)

    effort = {"model": "m", "input": "hi", "reasoning": {"effort": "none"}}
    assert responses_to_chat(effort, switch).chat_template_kwargs == {"enable_thinking": False}
    with pytest.raises(APIError, match="always thinks"):
        responses_to_chat(effort, ReasoningFormat())


def test_anthropic_thinking_blocks_become_reasoning_content():
    body = {"model": "m", "max_tokens": 8, "messages": [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "Greet back.", "signature": "x"},
            {"type": "redacted_thinking", "data": "opaque"},
            {"type": "text", "text": "Hello!"}]},
        {"role": "user", "content": "bye"}]}
    assistant = messages_to_chat(body).messages[1]
    assert (assistant.content, assistant.model_extra["reasoning_content"]) == (
        "Hello!", "Greet back.")
