"""What k2serve sends an upstream depends on its engine (k2serve.serving.upstream): a grammar
goes where that engine reads it — vLLM's `structured_outputs.grammar`, SGLang's `ebnf` — and
the stop string an engine reports (vLLM's `stop_reason`, SGLang's `matched_stop`) is kept.
The upstream here is httpx's MockTransport: these tests read the requests the backend makes."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from k2serve.engine.sampling_params import SamplingParams
from k2serve.models.embedded import embedded_smollm2_gguf_path
from k2serve.serving.upstream import UpstreamBackend, UpstreamConfig
from k2serve.structured import GrammarCompiler
from k2serve.structured.grammars import json_schema_grammar
from k2serve.text.loading import load_tokenizer

SCHEMA = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(embedded_smollm2_gguf_path())


def sse(*events: dict) -> bytes:
    return "".join(f"data: {json.dumps(e)}\n\n" for e in events).encode() + b"data: [DONE]\n\n"


def run(engine: str, tokenizer, params: SamplingParams, stop_key: str = "stop_reason"):
    """One generation against a recording upstream: (the request body, the deltas)."""
    seen = []

    def upstream(request: httpx.Request) -> httpx.Response:
        seen.append(json.loads(request.content))
        choice = {"index": 0, "text": '{"n": 1}', "finish_reason": "stop", stop_key: "}"}
        usage = {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
        return httpx.Response(200, content=sse({"choices": [choice]},
                                               {"choices": [], "usage": usage}),
                              headers={"content-type": "text/event-stream"})

    deltas = generate(engine, tokenizer, upstream, params, ["}"])
    return seen[0], deltas


def generate(engine: str, tokenizer, upstream, params: SamplingParams, stop: list[str]):
    """The deltas of one generation through an UpstreamBackend whose replica is `upstream`
    (an httpx MockTransport handler)."""
    backend = UpstreamBackend(UpstreamConfig("m", ["http://upstream/v1"], engine=engine),
                              tokenizer, context_length=2048, chat_template=None)
    backend._client = httpx.AsyncClient(transport=httpx.MockTransport(upstream))

    async def collect():
        return [d async for d in backend.generate([1, 2, 3], params, stop)]

    return asyncio.run(collect())


def constrained(tokenizer, **fields) -> SamplingParams:
    grammar = GrammarCompiler(tokenizer).compile(json_schema_grammar(SCHEMA))
    return SamplingParams(max_tokens=8, grammar=grammar, **fields)


@pytest.mark.parametrize("engine", ["vllm", "k2serve"])
def test_vllm_and_k2serve_get_the_grammar_as_structured_outputs(engine, tokenizer):
    body, deltas = run(engine, tokenizer, constrained(tokenizer, logprobs=1))
    assert body["structured_outputs"]["grammar"].startswith("start: %json")
    assert "ebnf" not in body and body["return_tokens_as_token_ids"] is True
    assert deltas[-1].finish_reason == "stop" and deltas[-1].stop_sequence == "}"


def test_sglang_gets_the_grammar_as_ebnf_and_its_matched_stop_is_kept(tokenizer):
    body, deltas = run("sglang", tokenizer, constrained(tokenizer, logprobs=1),
                       stop_key="matched_stop")
    # SGLang ignores fields it does not know: a grammar in vLLM's field would go unenforced.
    assert "structured_outputs" not in body and "return_tokens_as_token_ids" not in body
    assert body["ebnf"].startswith("start: %json")
    assert "".join(d.text for d in deltas) == '{"n": 1}'
    assert deltas[-1].stop_sequence == "}" and deltas[-1].completion_tokens == 4


def test_text_with_unicode_line_separators_passes_through_whole(tokenizer):
    """vLLM's JSON is UTF-8 with U+2028 & co. left raw; the SSE standard ends lines at CR/LF
    only (httpx's aiter_lines() also splits at those, which cut the event's JSON in two)."""
    text = "a\u2028b\u0085c\u2029d\x1ce"
    usage = {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}
    events = [{"choices": [{"index": 0, "text": text, "finish_reason": None}]},
              {"choices": [{"index": 0, "text": "", "finish_reason": "stop"}], "usage": usage}]
    body = "".join(f"data: {json.dumps(e, ensure_ascii=False)}\r\n\r\n" for e in events)
    body += "data: [DONE]\r\n\r\n"

    def upstream(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=body.encode(),
                              headers={"content-type": "text/event-stream; charset=utf-8"})

    deltas = generate("vllm", tokenizer, upstream, SamplingParams(max_tokens=8), [])
    assert "".join(d.text for d in deltas) == text
    assert deltas[-1].finish_reason == "stop" and deltas[-1].completion_tokens == 5
