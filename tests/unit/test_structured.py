"""Grammar-constrained decoding: schema checks, the tokenizer bridge, and the engine hook.

Outputs are checked with `jsonschema` (a validator nobody here wrote), never against expected
strings: a constrained sample must validate whatever the sampling parameters do to it.
"""

from __future__ import annotations

import json

import jsonschema
import pytest

from k2serve.engine.config import EngineConfig
from k2serve.engine.core import EngineCore
from k2serve.engine.sampling_params import SamplingParams
from k2serve.engine.sequence import GenerationRequest
from k2serve.models.loader import load_model
from k2serve.serving.loader import SERVING_QUANTIZATION
from k2serve.structured import GrammarCompiler, GrammarError
from k2serve.structured.bitmask import allowed_tokens
from k2serve.structured.grammars import (
    ToolSpec,
    as_lark,
    check_json_schema,
    json_schema_grammar,
    json_tool_grammar,
    k2_tool_grammar,
    regex_grammar,
)
from k2serve.text.tokenizer import Tokenizer
from tests.tiny_models import smollm2_gguf_path

PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "tags"],
          "properties": {"name": {"type": "string", "maxLength": 12},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120},
                         "tags": {"type": "array", "items": {"enum": ["a", "b"]},
                                  "maxItems": 3}}}
CHAT = ("<|im_start|>user\nDescribe a person as JSON.<|im_end|>\n<|im_start|>assistant\n")


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_gguf(smollm2_gguf_path())


@pytest.fixture(scope="module")
def compiler(tok):
    return GrammarCompiler(tok)


@pytest.fixture(scope="module")
def model(one_torch_thread):
    return load_model(smollm2_gguf_path(), progress=False, quantized=SERVING_QUANTIZATION)[0]


def run(core, requests):
    for r in requests:
        core.add(r)
    out = {r.request_id: ([], None) for r in requests}
    while core.has_work():
        for o in core.step():
            ids, _ = out[o.request_id]
            out[o.request_id] = (ids + o.token_ids, o.finish_reason)
    return out


# -- checks -----------------------------------------------------------------------------------
def test_invalid_schema_is_named():
    with pytest.raises(GrammarError, match=r"not a valid JSON schema.*'properties/a/type'"):
        check_json_schema({"type": "object", "properties": {"a": {"type": "strng"}}}, "s")
    with pytest.raises(GrammarError, match="must be a JSON schema object"):
        check_json_schema(["type"], "s")


def test_unsupported_keyword_and_bad_regex_are_named(compiler):
    with pytest.raises(GrammarError, match="uniqueItems"):
        compiler.compile(json_schema_grammar({"type": "array", "uniqueItems": True}))
    with pytest.raises(GrammarError, match="look-around"):
        compiler.compile(regex_grammar("(?=a)b"))


def test_a_vacuous_property_names_is_no_constraint_to_refuse(compiler, tok):
    """Claude Code's tools declare records as `propertyNames: {"type": "string"}`: every JSON
    key is a string, so the schema compiles and allows exactly what it allowed."""
    record = {"type": "object", "properties": {
        "metadata": {"type": "object", "propertyNames": {"type": "string"},
                     "additionalProperties": {"type": "integer"}},
        "propertyNames": {"type": "string"}}}  # a property of that name stays a property
    grammar = json_schema_grammar(record)
    assert accepts(compiler, tok, grammar, '{"metadata": {"a": 1}, "propertyNames": "x"}')
    assert not accepts(compiler, tok, grammar, '{"metadata": {"a": "one"}}')
    assert not accepts(compiler, tok, grammar, '{"propertyNames": 3}')
    tool = ToolSpec("tag", {"type": "object", "properties": {"m": record["properties"]["metadata"]}})
    assert accepts(compiler, tok, json_tool_grammar([tool], None, True, False),
                   '<tool_call>[{"name": "tag", "arguments": {"m": {"k": 2}}}]</tool_call>')
    with pytest.raises(GrammarError, match="propertyNames"):  # a real constraint is refused
        compiler.compile(json_schema_grammar({"type": "object",
                                              "propertyNames": {"pattern": "^a"}}))


def test_vocabulary_prepared_ahead_is_the_one_compiling_uses(tok):
    fresh = GrammarCompiler(tok)
    assert fresh._lltok is None
    fresh.prepare_in_background().join(timeout=60)
    prepared = fresh._lltok
    assert prepared is not None
    fresh.compile('start: "yes" | "no"')
    assert fresh.lltokenizer is prepared


def test_compile_is_cached(compiler):
    grammar = json_schema_grammar({"type": "object", "properties": {"z": {"type": "number"}}})
    misses = compiler.misses
    first = compiler.compile(grammar)
    assert compiler.compile(grammar) is first
    assert compiler.misses == misses + 1


# -- masks ------------------------------------------------------------------------------------
def test_mask_allows_exactly_the_continuations(compiler, tok):
    matcher = compiler.compile(regex_grammar("(yes|no)")).new_matcher()
    (mask,) = allowed_tokens([matcher], tok.vocab_size + 7, [tok.stop_token_ids])
    assert mask.shape == (tok.vocab_size + 7,) and not mask[tok.vocab_size:].any()
    for token in range(tok.vocab_size):
        text = tok.token_bytes(token)
        ok = bool(text) and token not in tok.special_ids and any(
            w.startswith(text) for w in (b"yes", b"no"))
        assert bool(mask[token]) == ok, (token, text)
    assert matcher.accept(tok.encode("yes")[0])


# -- the engine -------------------------------------------------------------------------------
def test_constrained_rows_validate_under_every_sampling_param(model, tok, compiler):
    """Constrained and free sequences share each step; temperature, top-p/k, min-p, penalties,
    logit bias toward a forbidden token, seeds and logprobs all act on constrained rows."""
    grammar = compiler.compile(json_schema_grammar(PERSON))
    prompt = tok.encode(CHAT)
    brace_free = tok.encode("Hello")[0]  # a token the grammar never allows first
    variants = [dict(temperature=0), dict(temperature=1.3, top_p=0.9, seed=1),
                dict(temperature=1.0, top_k=5, min_p=0.05, seed=2),
                dict(temperature=0.8, repetition_penalty=1.3, presence_penalty=1.0,
                     frequency_penalty=0.5, seed=3),
                dict(temperature=1.0, logit_bias={brace_free: 100.0}, seed=4, logprobs=2)]
    requests = [GenerationRequest(f"c{i}", prompt, SamplingParams(
        max_tokens=80, grammar=grammar, stop_token_ids=tok.stop_token_ids, **kw))
        for i, kw in enumerate(variants)]
    free = GenerationRequest("free", prompt, SamplingParams(max_tokens=12, temperature=0,
                                                            ignore_eos=True))
    core = EngineCore(model, EngineConfig(context_length=2048, num_kv_blocks=256))
    results = run(core, requests + [free])
    for i in range(len(variants)):
        ids, finish = results[f"c{i}"]
        assert finish == "stop", (variants[i], tok.decode(ids))
        jsonschema.validate(json.loads(tok.decode(ids)), PERSON)
    alone = run(EngineCore(model, EngineConfig(context_length=2048, num_kv_blocks=256)),
                [GenerationRequest("free", prompt, SamplingParams(
                    max_tokens=12, temperature=0, ignore_eos=True))])
    assert results["free"] == alone["free"]  # the hook leaves unconstrained rows alone


def test_constrained_output_survives_preemption(model, tok, compiler):
    """Preemption by recompute keeps the sampled tokens, so the matcher stays in step."""
    grammar = compiler.compile(json_schema_grammar(PERSON))
    prompt = tok.encode(CHAT)

    def requests():
        return [GenerationRequest(f"p{i}", prompt, SamplingParams(
            max_tokens=60, temperature=0, grammar=grammar, stop_token_ids=tok.stop_token_ids,
            repetition_penalty=1.0 + 0.1 * i)) for i in range(3)]
    roomy = run(EngineCore(model, EngineConfig(context_length=2048, num_kv_blocks=256)),
                requests())
    tight_core = EngineCore(model, EngineConfig(context_length=2048, num_kv_blocks=6))
    tight = run(tight_core, requests())
    assert tight_core.scheduler.num_preemptions > 0
    assert tight == roomy
    for ids, _ in tight.values():
        jsonschema.validate(json.loads(tok.decode(ids)), PERSON)


def test_length_cut_is_reported_not_faked(model, tok, compiler):
    grammar = compiler.compile(json_schema_grammar(PERSON))
    core = EngineCore(model, EngineConfig(context_length=2048, num_kv_blocks=64))
    ids, finish = run(core, [GenerationRequest("short", tok.encode(CHAT), SamplingParams(
        max_tokens=4, temperature=0, grammar=grammar, stop_token_ids=tok.stop_token_ids))])["short"]
    assert finish == "length" and len(ids) == 4


# -- tool grammars ----------------------------------------------------------------------------
WEATHER = ToolSpec("get_weather", {"type": "object", "properties": {
    "city": {"type": "string"}, "unit": {"enum": ["c", "f"]}}, "required": ["city"]})
TIME = ToolSpec("get_time", {"type": "object", "properties": {"tz": {"type": "string"}},
                             "required": ["tz"], "additionalProperties": False})


def accepts(compiler, tok, grammar: str, text: str) -> bool:
    matcher = compiler.compile(grammar).new_matcher()
    return all(matcher.accept(t) for t in tok.encode(text)) and matcher.accept(
        min(tok.stop_token_ids))


@pytest.mark.parametrize("grammar, texts", [
    (json_schema_grammar(PERSON), ['{"name": "Ann", "age": 30, "tags": ["a"]}',
                                   '{"name": "Ann", "age": 30, "tags": []}',
                                   '{"name":"Ann","age":30,"tags":[]}', '{"name": "Ann"}',
                                   '{"name": "Ann", "age": 130, "tags": []}']),
    (regex_grammar(r"(red|blue)/[0-9]+"), ["red/12", "blue/1", "red/", "red12", "green/1"]),
])
def test_the_lark_form_for_an_upstream_accepts_what_the_grammar_does(compiler, tok, grammar,
                                                                      texts):
    """vLLM takes `structured_outputs.grammar` as Lark text only: the form sent to it must be
    the same language as the grammar k2serve itself would enforce."""
    lark = as_lark(grammar)
    assert not lark.lstrip().startswith("{")
    verdicts = [accepts(compiler, tok, grammar, t) for t in texts]
    assert any(verdicts) and not all(verdicts)
    assert [accepts(compiler, tok, lark, t) for t in texts] == verdicts


@pytest.mark.parametrize("text, auto, required", [
    ("Sure, it is sunny.", True, False),
    ('<tool_call>[{"name": "get_weather", "arguments": {"city": "Paris"}}]</tool_call>',
     True, True),
    ('<tool_call>[{"name": "get_time", "arguments": {"tz": "UTC"}}, {"name": "get_weather", '
     '"arguments": {"city": "Oslo", "unit": "c"}}]</tool_call>', True, True),
    ('<tool_call>[{"name": "send_email", "arguments": {}}]</tool_call>', False, False),
    ('<tool_call>[{"name": "get_weather", "arguments": {"unit": "c"}}]</tool_call>', False, False),
    ('<tool_call>[{"name": "get_time", "arguments": {"tz": "UTC", "x": 1}}]</tool_call>',
     False, False),
    ('Text then <tool_call>[{"name": "get_time", "arguments": {"tz": "UTC"}}]</tool_call>',
     False, False),
])
def test_json_tool_grammar(compiler, tok, text, auto, required):
    tools = [WEATHER, TIME]
    assert accepts(compiler, tok, json_tool_grammar(tools, None, True, True), text) == auto
    assert accepts(compiler, tok, json_tool_grammar(tools, None, True, False), text) == required


def test_json_tool_grammar_named_and_single_call(compiler, tok):
    one = '<tool_call>[{"name": "get_time", "arguments": {"tz": "UTC"}}]</tool_call>'
    two = one.replace("}}]", '}}, {"name": "get_time", "arguments": {"tz": "CET"}}]')
    assert accepts(compiler, tok, json_tool_grammar([WEATHER, TIME], "get_time", True, False), one)
    assert not accepts(compiler, tok, json_tool_grammar([WEATHER, TIME], "get_weather", True,
                                                        False), one)
    assert accepts(compiler, tok, json_tool_grammar([WEATHER, TIME], None, True, False), two)
    assert not accepts(compiler, tok, json_tool_grammar([WEATHER, TIME], None, False, False), two)


@pytest.fixture(scope="module")
def k2(tmp_path_factory):
    from k2serve.models.tiny_k2 import write_tiny_k2_checkpoint
    from k2serve.text.loading import load_tokenizer
    path = write_tiny_k2_checkpoint(tmp_path_factory.mktemp("k2tok") / "k2", seed=0, fp8=False)
    tok = load_tokenizer(str(path))
    return tok, GrammarCompiler(tok)


K2_CALL = ("<|tool_calls_section_begin|><|tool_call_begin|>functions.{name}:{idx}"
           "<|tool_call_argument_begin|>{args}<|tool_call_end|><|tool_calls_section_end|>")


@pytest.mark.parametrize("text, auto, required", [
    ("Let me check.", True, False),
    ("Let me check." + K2_CALL.format(name="get_weather", idx=0, args='{"city": "Paris"}'),
     True, False),
    (K2_CALL.format(name="get_weather", idx=3, args='{"city": "Paris", "unit": "f"}'), True, True),
    (K2_CALL.format(name="search", idx=0, args='{"q": "x"}'), False, False),  # undeclared
    (K2_CALL.format(name="get_weather", idx=0, args='{"town": "Paris"}'), False, False),
    (K2_CALL.format(name="get_weather", idx=0, args='{"city": "Paris", "unit": "k"}'),
     False, False),
    ("Text <|tool_call_begin|> smuggled", False, False),  # markers only where the grammar says
])
def test_k2_tool_grammar(k2, text, auto, required):
    tok, compiler = k2
    assert accepts(compiler, tok, k2_tool_grammar([WEATHER, TIME], None, True, True), text) == auto
    assert accepts(compiler, tok, k2_tool_grammar([WEATHER, TIME], None, True, False),
                   text) == required


# -- the JSON call format's parser ------------------------------------------------------------
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st

from k2serve.text.tool_parsers.json_calls import (  # noqa: E402
    JsonStreamingToolParser,
    parse_json_tool_calls,
)

CALLS_TEXT = ('<tool_call>[{"name": "get_weather", "arguments": {"city": "Pa\\"}ris", '
              '"days": [1, {"a": "]"}]}}, {"name": "get_time", "arguments": {}}]</tool_call>')


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=len(CALLS_TEXT) - 1), max_size=12))
def test_streamed_json_calls_do_not_depend_on_how_text_is_split(cuts):
    bounds = [0, *sorted(set(cuts)), len(CALLS_TEXT)]
    parser = JsonStreamingToolParser()
    deltas = []
    for a, b in zip(bounds, bounds[1:]):
        deltas += parser.feed(CALLS_TEXT[a:b])
    deltas += parser.finish()
    assert not any("content" in d for d in deltas)
    headers = [tc for d in deltas for tc in d.get("tool_calls", []) if "id" in tc]
    assert [h["function"]["name"] for h in headers] == ["get_weather", "get_time"]
    args = ["", ""]
    for d in deltas:
        for tc in d.get("tool_calls", []):
            args[tc["index"]] += tc["function"]["arguments"]
    final = parse_json_tool_calls(CALLS_TEXT).tool_calls
    assert args == [c.arguments for c in final]
    assert json.loads(args[0]) == {"city": 'Pa"}ris', "days": [1, {"a": "]"}]}


def test_json_call_parser_text_and_cut_off():
    assert parse_json_tool_calls("<tool").content == "<tool"  # text that only looked like one
    cut = parse_json_tool_calls('<tool_call>[{"name": "f", "arguments": {"a": 1}}, '
                                '{"name": "g", "arguments": {"b": ')
    assert [c.name for c in cut.tool_calls] == ["f"] and cut.content is None
    assert cut.invalid_tool_calls[0].reason == "cut off"


# -- SGLang's field for a grammar -------------------------------------------------------------
def sglang_accepts(compiler, tok, lark: str, text: str) -> bool:
    """What SGLang's llguidance grammar backend does with a request's `ebnf` text
    (`grammar_from("ebnf", text)`, then an LLMatcher), followed token by token."""
    import llguidance

    matcher = llguidance.LLMatcher(compiler.lltokenizer, llguidance.grammar_from("ebnf", lark),
                                   log_level=0)
    return all(matcher.consume_token(t) for t in tok.encode(text)) and \
        matcher.consume_token(min(tok.stop_token_ids)) and not matcher.is_error()


@pytest.mark.parametrize("grammar, texts", [
    (json_schema_grammar(PERSON), ['{"name": "Ann", "age": 30, "tags": ["a"]}',
                                   '{"name": "Ann"}', '{"name": "Ann", "age": 130, "tags": []}']),
    (regex_grammar(r"(red|blue)/[0-9]+"), ["red/12", "red/", "green/1"]),
    (json_tool_grammar([WEATHER, TIME], None, True, False),
     ['<tool_call>[{"name": "get_weather", "arguments": {"city": "Paris"}}]</tool_call>',
      '<tool_call>[{"name": "get_weather", "arguments": {"unit": "c"}}]</tool_call>']),
])
def test_sglangs_ebnf_field_takes_the_same_language(compiler, tok, grammar, texts):
    lark = as_lark(grammar)
    verdicts = [accepts(compiler, tok, grammar, t) for t in texts]
    assert any(verdicts) and not all(verdicts)
    assert [sglang_accepts(compiler, tok, lark, t) for t in texts] == verdicts


def test_sglangs_ebnf_field_takes_the_k2_tool_grammar(k2):
    tok, compiler = k2
    grammar = k2_tool_grammar([WEATHER, TIME], None, True, True)
    texts = ["Let me check.",
             K2_CALL.format(name="get_weather", idx=3, args='{"city": "Paris", "unit": "f"}'),
             K2_CALL.format(name="get_weather", idx=0, args='{"town": "Paris"}'),
             "Text <|tool_call_begin|> smuggled"]
    verdicts = [accepts(compiler, tok, grammar, t) for t in texts]
    assert verdicts == [True, True, False, False]
    assert [sglang_accepts(compiler, tok, as_lark(grammar), t) for t in texts] == verdicts
