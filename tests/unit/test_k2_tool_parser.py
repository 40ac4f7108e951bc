import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from k2serve.models.tiny_k2_tokenizer import write_tiny_k2_tokenizer_files
from k2serve.text.detokenizer import IncrementalDetokenizer
from k2serve.text.loading import load_tokenizer
from k2serve.text.tool_parsers import (
    StreamingToolParser,
    ToolCall,
    normalize_tool_call_ids,
    parse_tool_calls,
)
from k2serve.text.tool_parsers.kimi_k2 import (
    ARGUMENT_BEGIN as AB,
    CALL_BEGIN as CB,
    CALL_END as CE,
    MARKERS,
    SECTION_BEGIN as SB,
    SECTION_END as SE,
)


def call(call_id, args):
    return f"{CB}{call_id}{AB}{args}{CE}"


def stream_all(pieces):
    """Feed `pieces`; returns (content, calls {index: [id, name, arguments]}, parser)."""
    p = StreamingToolParser()
    deltas = [d for piece in pieces for d in p.feed(piece)] + p.finish()
    content, calls = "", {}
    for d in deltas:
        assert set(d) in ({"content"}, {"tool_calls"})
        if "content" in d:
            assert d["content"] and not any(m in d["content"] for m in MARKERS)
            content += d["content"]
            continue
        (tc,) = d["tool_calls"]
        if "id" in tc:  # the header comes first, once, with empty arguments
            assert tc["index"] == len(calls) and tc["type"] == "function"
            assert tc["function"]["arguments"] == ""
            calls[tc["index"]] = [tc["id"], tc["function"]["name"], ""]
        else:
            assert set(tc) == {"index", "function"} and tc["function"]["arguments"]
            calls[tc["index"]][2] += tc["function"]["arguments"]
    return content, calls, p


def assert_stream_matches_parse(text, pieces):
    parsed = parse_tool_calls(text)
    content, calls, p = stream_all(pieces)
    assert p.result() == parsed
    assert content == (parsed.content or "")
    kept = [c for i, c in sorted(calls.items()) if i not in p.withdrawn]
    assert kept == [[c.id, c.name, c.arguments] for c in parsed.tool_calls]
    return parsed, p


# ---- non-streaming ---------------------------------------------------------------------------------


def test_content_only_and_empty():
    assert parse_tool_calls("Hello <b>world</b> a<|b").content == "Hello <b>world</b> a<|b"
    out = parse_tool_calls("")
    assert out.content is None and out.tool_calls == [] and not out.has_tool_calls


def test_one_call_with_content_before():
    out = parse_tool_calls("Let me check." + SB + call("functions.get_weather:0", '{"city": "Beijing"}') + SE)
    assert out.content == "Let me check."
    assert out.tool_calls == [ToolCall("functions.get_weather:0", "get_weather", '{"city": "Beijing"}')]
    assert out.has_tool_calls and out.invalid_tool_calls == []
    assert out.tool_calls[0].to_openai() == {
        "id": "functions.get_weather:0", "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Beijing"}'}}


def test_multiple_calls_stay_separate():
    # vLLM #24478: a greedy `.+` ran from the first call's id to the last call's end.
    text = SB + call("functions.a:0", '{"x": 1}') + "\n" + call("functions.b:1", '{"y": "<|"}') + SE
    out = parse_tool_calls(text)
    assert [(c.name, c.arguments) for c in out.tool_calls] == [("a", '{"x": 1}'), ("b", '{"y": "<|"}')]
    assert out.content is None


def test_text_inside_the_section_does_not_leak():
    # vLLM #28543 / Kimi-K2#89: text between the section and call markers leaked into content.
    text = f"Sure.{SB}\n  stray words {call('functions.f:0', '{}')} more {SE}"
    out = parse_tool_calls(text)
    assert out.content == "Sure." and [c.name for c in out.tool_calls] == ["f"]


def test_content_after_the_section_and_stray_markers():
    out = parse_tool_calls(f"a{CE}b{SE}{AB}c{SB}{call('functions.f:0', '{}')}{SE} done")
    assert out.content == "abc done" and len(out.tool_calls) == 1


def test_call_without_section_marker():
    out = parse_tool_calls("x" + call("functions.f:3", '{"k": [1, 2]}'))
    assert out.content == "x" and out.tool_calls == [ToolCall("functions.f:3", "f", '{"k": [1, 2]}')]


@pytest.mark.parametrize("call_id, name", [
    ("functions.get_weather:0", "get_weather"),
    ("search:2", "search"),  # vLLM #27565: `id.split('.')[1]` raised IndexError
    ("functions.web.search:11", "web.search"),  # dotted names keep their dots
    ("functions.get-weather:1", "get-weather"),  # OpenAI names may contain "-"
    ("  functions.f:0\n", "f"),  # whitespace and newlines around the id (vLLM #38274)
    ("functions.f", "f"),
])
def test_call_ids(call_id, name):
    (c,) = parse_tool_calls(SB + call(call_id, "{}") + SE).tool_calls
    assert (c.id, c.name) == (call_id.strip(), name)


@pytest.mark.parametrize("body, reason", [
    (call("call_59adf", "{}"), "not functions.NAME:IDX"),  # HF K2 discussion #48: OpenAI-style id
    (call("functions.:0", "{}"), "not functions.NAME:IDX"),
    (call("functions.f:0", '{"city": "Bei'), "not valid JSON"),
    (call("functions.f:0", '{"a": 1} trailing'), "not valid JSON"),
    (call("functions.f:0", "[1, 2]"), "not a JSON object"),
    (call("functions.f:0", ""), "not valid JSON"),
    (f"{CB}functions.f:0{CE}", "no <|tool_call_argument_begin|>"),
    (f"{CB}functions.f:0{AB}{{}}{AB}{{}}{CE}", "second <|tool_call_argument_begin|>"),
    (f"{CB}functions.f:0{AB}{{}}{SE}", "section ended"),
])
def test_malformed_calls_are_reported_not_returned(body, reason):
    out = parse_tool_calls("Hi" + SB + body + SE + call("functions.g:1", "{}"))
    assert out.content == "Hi"
    assert [c.name for c in out.tool_calls] == ["g"]  # a later good call is unaffected
    (bad,) = out.invalid_tool_calls
    assert reason in bad.reason


def test_next_call_without_end_marker():
    out = parse_tool_calls(SB + f"{CB}functions.f:0{AB}{{}}" + call("functions.g:1", "{}") + SE)
    assert [c.name for c in out.tool_calls] == ["g"]
    assert "next call began" in out.invalid_tool_calls[0].reason


def test_cut_off_by_max_tokens_keeps_complete_calls():
    # ai-dynamo #8208 (also Moonshot's sample parser, vLLM, SGLang): no section end -> calls lost.
    done = SB + call("functions.a:0", '{"x": 1}') + call("functions.b:1", '{"y": 2}')
    out = parse_tool_calls(done)
    assert [c.name for c in out.tool_calls] == ["a", "b"] and out.invalid_tool_calls == []
    for cut in (f"{CB}functions.c:2", f"{CB}functions.c:2{AB}", f'{CB}functions.c:2{AB}{{"z": ', f"{CB}func"):
        out = parse_tool_calls(done + cut)
        assert [c.name for c in out.tool_calls] == ["a", "b"]
        assert len(out.invalid_tool_calls) == 1 and "cut off" in out.invalid_tool_calls[0].reason


def test_long_arguments():
    # vLLM #37184: an 8 KB limit on the section; SGLang #23363: long arguments dropped or hung.
    args = json.dumps({"code": "print('x')\n" * 20_000, "n": list(range(2000))})
    text = "Writing it." + SB + call("functions.write_file:0", args) + SE
    out = parse_tool_calls(text)
    assert out.tool_calls[0].arguments == args
    pieces = [text[i:i + 7] for i in range(0, len(text), 7)]  # ~35k deltas
    assert_stream_matches_parse(text, pieces)


# ---- streaming ---------------------------------------------------------------------------------------


def test_streaming_deltas_shape():
    text = "Hi." + SB + call("functions.get_weather:7", ' {"city": "Oslo"} ') + call("search:8", "{}") + SE
    p = StreamingToolParser()
    deltas = [d for ch in text for d in p.feed(ch)] + p.finish()
    assert deltas[:3] == [{"content": "H"}, {"content": "i"}, {"content": "."}]
    # Stream indexes count calls in this response, not K2's global :IDX (SGLang #10600).
    assert deltas[3] == {"tool_calls": [{"index": 0, "id": "functions.get_weather:7", "type": "function",
                                         "function": {"name": "get_weather", "arguments": ""}}]}
    assert deltas[4] == {"tool_calls": [{"index": 0, "function": {"arguments": "{"}}]}
    headers = [d["tool_calls"][0] for d in deltas if "id" in d.get("tool_calls", [{}])[0]]
    assert [(h["index"], h["id"]) for h in headers] == [(0, "functions.get_weather:7"), (1, "search:8")]
    assert_stream_matches_parse(text, list(text))


def test_partial_markers_are_held_back():
    # vLLM #31207: marker text leaked into content while streaming.
    p = StreamingToolParser()
    assert p.feed("Let me check <|tool_c") == [{"content": "Let me check "}]
    assert p.feed("alls_section_be") == []
    assert p.feed("gin|>") == []
    assert p.feed("<|tool_call_begin|>functions.f:0<|tool_call_argument_begin|>{}<|tool_c") == [
        {"tool_calls": [{"index": 0, "id": "functions.f:0", "type": "function",
                         "function": {"name": "f", "arguments": ""}}]},
        {"tool_calls": [{"index": 0, "function": {"arguments": "{}"}}]}]
    assert p.feed("all_end|>") == []
    # Text that only looked like a marker is released once it cannot be one.
    p = StreamingToolParser()
    assert p.feed("a <|tool") == [{"content": "a "}]
    assert p.feed("box|>") == [{"content": "<|toolbox|>"}]
    p = StreamingToolParser()
    assert p.feed("x<|") == [{"content": "x"}] and p.finish() == [{"content": "<|"}]


def test_bundled_deltas():
    # Speculative decoding can hand over several tokens at once, markers included (vLLM #38579).
    text = "a" + SB + call("functions.f:0", '{"q": 1}') + call("functions.g:1", "{}") + SE + "z"
    head = "a" + SB + CB + "functions.f:0" + AB + '{"q"'
    for pieces in ([text], [text[:40], text[40:]], [head, text[len(head):]]):
        assert "".join(pieces) == text
        parsed, _ = assert_stream_matches_parse(text, pieces)
        assert parsed.content == "az" and len(parsed.tool_calls) == 2


def test_streamed_call_that_turns_out_malformed_is_withdrawn():
    text = SB + call("functions.f:0", '{"a": tru e}') + call("functions.g:1", "{}") + SE
    content, calls, p = stream_all(list(text))
    assert calls[0][:2] == ["functions.f:0", "f"] and p.withdrawn == [0]
    assert calls[1] == ["functions.g:1", "g", "{}"]
    assert [c.name for c in p.result().tool_calls] == ["g"]
    # A call whose arguments do not even start like JSON is never announced.
    content, calls, p = stream_all(list(SB + call("functions.f:0", "oops") + SE))
    assert calls == {} and p.withdrawn == [] and len(p.result().invalid_tool_calls) == 1


# ---- property: streaming == non-streaming == what was generated ---------------------------------------

CONTENT_PIECES = st.sampled_from([
    "Hello", " ", "\n", "<", "|", ">", "<|", "|>", "<|tool", "<|tool_call", "<|tool_calls_section_be",
    "<|im_e", "中文", "😀", "naïve", "{", "}", '"', "x", "42", "<|tool_call_end",
])
NAMES = st.from_regex(r"[a-zA-Z_][a-zA-Z0-9_]{0,6}(\.[a-z]{1,4})?(-[a-z]{1,3})?", fullmatch=True)
JSON_SCALARS = (st.none() | st.booleans() | st.integers(-10**6, 10**6)
                | st.text(alphabet=st.sampled_from('ab <|>"\\\n中😀'), max_size=8))
JSON_VALUES = st.recursive(JSON_SCALARS, lambda c: st.lists(c, max_size=3)
                           | st.dictionaries(st.text(max_size=4), c, max_size=3), max_leaves=6)
WS = st.sampled_from(["", "", " ", "\n"])


@st.composite
def model_outputs(draw):
    """A K2 output as a list of (text, role) "tokens" (markers whole), and its calls."""
    toks = [(p, "content") for p in draw(st.lists(CONTENT_PIECES, max_size=6))]
    calls = []
    if draw(st.booleans()):
        toks += [(SB, "m"), (draw(WS), "ws")]
        for i in range(draw(st.integers(0, 3))):
            idx = draw(st.integers(0, 30))
            name = draw(NAMES)
            args = json.dumps(draw(st.dictionaries(st.text(max_size=5), JSON_VALUES, max_size=3)),
                              ensure_ascii=draw(st.booleans()),
                              separators=draw(st.sampled_from([None, (",", ":")])))
            cid = f"functions.{name}:{idx}"
            calls.append((cid, name, args))
            toks += [(CB, "m"), (draw(WS) + cid + draw(WS), "id"), (AB, "m")]
            toks += [(draw(WS), "ws")] + [(args[j:j + 3], "args") for j in range(0, len(args), 3)]
            toks += [(draw(WS), "ws"), (CE, ("end", len(calls) - 1)), (draw(WS), "ws")]
        if draw(st.booleans()):
            toks.append((SE, "m"))
            toks += [(p, "content") for p in draw(st.lists(CONTENT_PIECES, max_size=3))]
    if draw(st.booleans()):  # cut off by max_tokens at a token boundary
        toks = toks[:draw(st.integers(0, len(toks)))]
    toks = [(t, r) for t, r in toks if t]
    return toks, calls


def _expected(toks, calls):
    content = "".join(t for t, r in toks if r == "content")
    ended = [r[1] for _, r in toks if isinstance(r, tuple)]
    return content, [list(calls[i]) for i in ended]


@settings(max_examples=300, deadline=None)
@given(out=model_outputs(), data=st.data())
def test_property_stream_equals_parse_equals_generated(out, data):
    toks, calls = out
    text = "".join(t for t, _ in toks)
    content, expected_calls = _expected(toks, calls)
    parsed = parse_tool_calls(text)
    if any(m in content for m in MARKERS):  # content pieces happened to spell a marker
        return
    assert (parsed.content or "") == content
    assert [[c.id, c.name, c.arguments] for c in parsed.tool_calls] == expected_calls
    assert len(parsed.invalid_tool_calls) <= 1  # only a cut-off call
    # Split at random token boundaries, or anywhere (a marker may then be split).
    if data.draw(st.booleans()):
        cuts = sorted(data.draw(st.sets(st.integers(1, max(1, len(toks) - 1)), max_size=len(toks))))
        pieces = ["".join(t for t, _ in toks[a:b]) for a, b in zip([0, *cuts], [*cuts, len(toks)])]
    else:
        cuts = sorted(data.draw(st.sets(st.integers(1, max(1, len(text) - 1)), max_size=20)))
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
    assert "".join(pieces) == text
    _, p = assert_stream_matches_parse(text, pieces)
    assert len(p.withdrawn) <= 1 and (not p.withdrawn or p.withdrawn[0] == p.announced - 1)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("k2parse")
    write_tiny_k2_tokenizer_files(str(d))
    return load_tokenizer(str(d))


@settings(max_examples=100, deadline=None)
@given(out=model_outputs(), data=st.data())
def test_property_through_the_real_tokenizer_and_detokenizer(tok, out, data):
    # The serving path: ids -> IncrementalDetokenizer deltas (tool markers survive
    # skip_special_tokens) -> StreamingToolParser, cut at any token.
    toks, _ = out
    ids = tok.encode("".join(t for t, _ in toks))
    ids = ids[:data.draw(st.integers(0, len(ids)))]
    detok = IncrementalDetokenizer(tok, prompt_ids=tok.encode("<|im_assistant|>assistant<|im_middle|>"))
    pieces = [detok.add(i) for i in ids] + [detok.flush()]
    assert_stream_matches_parse(tok.decode(ids), pieces)


# ---- history ids -----------------------------------------------------------------------------------------


def _tc(call_id, name):
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": "{}"}}


def test_normalize_ids_counts_calls_across_the_conversation():
    messages = [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "", "tool_calls": [_tc("call_a", "search"), _tc("call_b", "fetch")]},
        {"role": "tool", "tool_call_id": "call_b", "content": "B"},  # answered out of order
        {"role": "tool", "tool_call_id": "call_a", "content": "A"},
        {"role": "assistant", "content": None, "tool_calls": [_tc("search:0", "search")]},
        {"role": "tool", "tool_call_id": "search:0", "content": "C"},
        {"role": "user", "content": "and?"},
    ]
    before = json.dumps(messages)
    out = normalize_tool_call_ids(messages)
    assert json.dumps(messages) == before  # input untouched
    assert [c["id"] for c in out[1]["tool_calls"]] == ["functions.search:0", "functions.fetch:1"]
    assert [out[2]["tool_call_id"], out[3]["tool_call_id"]] == ["functions.fetch:1", "functions.search:0"]
    assert out[4]["tool_calls"][0]["id"] == out[5]["tool_call_id"] == "functions.search:2"
    assert out[6] == messages[6]
    assert out[1]["tool_calls"][0]["function"] == messages[1]["tool_calls"][0]["function"]


def test_normalize_ids_missing_duplicate_and_earlier_ids():
    messages = [
        {"role": "assistant", "tool_calls": [_tc("x", "f"), _tc("x", "g"), _tc(None, "h")]},
        {"role": "tool", "tool_call_id": "x", "content": "1"},
        {"role": "tool", "tool_call_id": "x", "content": "2"},
        {"role": "tool", "content": "3"},  # no id: the next unanswered call
        {"role": "assistant", "tool_calls": [_tc("y", "f"), {"id": "z", "type": "function", "function": {}}]},
        {"role": "tool", "tool_call_id": "x", "content": "late answer to an earlier call"},
        {"role": "tool", "tool_call_id": "z", "content": "nameless call keeps its id"},
        {"role": "tool", "tool_call_id": "unknown", "content": "next unanswered"},
    ]
    out = normalize_tool_call_ids(messages)
    assert [c["id"] for c in out[0]["tool_calls"]] == ["functions.f:0", "functions.g:1", "functions.h:2"]
    assert [m["tool_call_id"] for m in out[1:4]] == ["functions.f:0", "functions.g:1", "functions.h:2"]
    assert [c["id"] for c in out[4]["tool_calls"]] == ["functions.f:3", "z"]
    assert out[5]["tool_call_id"] == "functions.g:1"  # "x" named two earlier calls: the later one
    assert out[6]["tool_call_id"] == "z" and out[7]["tool_call_id"] == "functions.f:3"
