"""What structured output costs: batch-1 decode speed with a JSON schema active vs without, on
the embedded model as `k2serve serve` runs it, and grammar compile time cold vs cached.

Both modes run in this one process, interleaved (free, constrained, free, ...), each decoding
`--tokens` tokens greedily after the same prompt; decode tokens/s counts the tokens after the
first (prefill excluded). The schema holds one long string field, so the constrained run decodes
as many tokens as the free one. Medians over `--repeat` rounds, and their ratio; the machine is
shared and noisy, so read the ratio, not single figures.

    python benchmarks/structured_cost.py [--tokens 128] [--repeat 7] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from k2serve.engine.config import EngineConfig
from k2serve.engine.core import EngineCore
from k2serve.engine.sampling_params import SamplingParams
from k2serve.engine.sequence import GenerationRequest
from k2serve.models.embedded import embedded_smollm2_gguf_path
from k2serve.models.loader import load_model
from k2serve.serving.loader import SERVING_QUANTIZATION
from k2serve.structured import GrammarCompiler
from k2serve.structured.grammars import ToolSpec, json_schema_grammar, json_tool_grammar
from k2serve.text.tokenizer import Tokenizer

PROMPT = ("<|im_start|>user\nWrite a long story about a dragon, as JSON with a 'story' field."
          "<|im_end|>\n<|im_start|>assistant\n")
LONG = {"type": "object", "required": ["story"], "additionalProperties": False,
        "properties": {"story": {"type": "string", "minLength": 4000}}}
TOOLS = [ToolSpec("get_weather", {"type": "object", "required": ["city"], "properties": {
    "city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]},
    "days": {"type": "integer", "minimum": 1, "maximum": 14}}}),
         ToolSpec("search", {"type": "object", "required": ["queries"], "properties": {
             "queries": {"type": "array", "items": {"type": "string"}, "maxItems": 3}}})]


def decode_rate(model, tok, grammar, tokens: int) -> float:
    core = EngineCore(model, EngineConfig(context_length=2048, num_kv_blocks=64))
    params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=grammar is None,
                            stop_token_ids=tok.stop_token_ids, grammar=grammar)
    core.add(GenerationRequest("r", tok.encode(PROMPT), params))
    produced, first_at = 0, None
    while core.has_work():
        for out in core.step():
            produced += len(out.token_ids)
            if first_at is None and produced:
                first_at = time.perf_counter()
    assert produced == tokens, f"stopped early after {produced} tokens"
    return (produced - 1) / (time.perf_counter() - first_at)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    path = embedded_smollm2_gguf_path()
    model = load_model(path, progress=False, quantized=SERVING_QUANTIZATION)[0]
    tok = Tokenizer.from_gguf(path)

    compiler = GrammarCompiler(tok)
    start = time.perf_counter()
    _ = compiler.lltokenizer
    tokenizer_s = time.perf_counter() - start
    tool_grammar = json_tool_grammar(TOOLS, None, True, True)
    cold, cached = [], []
    for i in range(args.repeat):  # a new schema each time (cold), then the same one (cached)
        fresh = tool_grammar.replace('"maxItems": 3', f'"maxItems": {4 + i}')
        start = time.perf_counter()
        compiler.compile(fresh)
        cold.append(time.perf_counter() - start)
        start = time.perf_counter()
        compiler.compile(fresh)
        cached.append(time.perf_counter() - start)
    grammar = compiler.compile(json_schema_grammar(LONG))

    decode_rate(model, tok, None, 8)  # warm-up
    free, constrained = [], []
    for _ in range(args.repeat):
        free.append(decode_rate(model, tok, None, args.tokens))
        constrained.append(decode_rate(model, tok, grammar, args.tokens))
    f, c = statistics.median(free), statistics.median(constrained)
    print(f"SmolLM2-135M (int4 as served), batch 1, {args.tokens} tokens, {args.repeat} rounds, "
          f"{args.threads} thread(s)")
    print(f"  decode tok/s unconstrained  median {f:7.1f}  (runs {', '.join(f'{x:.1f}' for x in free)})")
    print(f"  decode tok/s JSON schema    median {c:7.1f}  (runs {', '.join(f'{x:.1f}' for x in constrained)})")
    print(f"  ratio constrained/free      {c / f:.3f}")
    print(f"  llguidance tokenizer set-up (once per model)  {tokenizer_s * 1e3:.0f} ms")
    print(f"  tool grammar compile: cold median {statistics.median(cold) * 1e3:.2f} ms, "
          f"cached median {statistics.median(cached) * 1e6:.1f} us")


if __name__ == "__main__":
    main()
