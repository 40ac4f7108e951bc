"""llguidance vs xgrammar on our tokenizers: how we chose the grammar library.

For SmolLM2's 49k-token vocabulary and the tiny K2 checkpoint's tiktoken vocabulary (K2's
special tokens included), a typical tool schema: tokenizer set-up, grammar compile time, and
the per-token mask time while walking a valid JSON reply token by token (median and p90).
xgrammar is optional (`pip install --no-deps xgrammar apache-tvm-ffi`; its declared deps pull
triton and a CUDA torch); without it only llguidance is measured.

    python benchmarks/grammar_libs.py [--repeat 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from k2serve.models.embedded import embedded_smollm2_gguf_path
from k2serve.structured.tokenizer_bridge import lltokenizer
from k2serve.text.tokenizer import Tokenizer

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["city", "unit"],
          "properties": {"city": {"type": "string", "description": "City name"},
                         "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                         "days": {"type": "integer", "minimum": 1, "maximum": 14},
                         "include": {"type": "array", "items": {"type": "string"}}}}
REPLY = json.dumps({"city": "San Francisco", "unit": "celsius", "days": 3,
                    "include": ["wind", "humidity", "precipitation"]})


def timed(fn):
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def bench_llguidance(tok, ids: list[int]) -> dict:
    import llguidance
    from llguidance.torch import allocate_token_bitmask, fill_next_token_bitmask
    from k2serve.structured.grammars import json_schema_grammar
    lltok, setup = timed(lambda: lltokenizer(tok))
    grammar = json_schema_grammar(SCHEMA)
    matcher, compile_s = timed(lambda: llguidance.LLMatcher(lltok, grammar, log_level=0))
    bitmask = allocate_token_bitmask(1, tok.vocab_size)
    per_token = []
    for token in ids:
        _, dt = timed(lambda: fill_next_token_bitmask(matcher, bitmask))
        per_token.append(dt)
        assert matcher.consume_token(token), matcher.get_error()
    return {"setup_s": setup, "compile_s": compile_s, "mask_us": per_token}


def bench_xgrammar(tok, ids: list[int]) -> dict | None:
    try:
        import xgrammar as xgr
    except ImportError:
        return None
    vocab = [tok.token_bytes(i) for i in range(tok.vocab_size)]
    info, setup = timed(lambda: xgr.TokenizerInfo(vocab, xgr.VocabType.RAW,
                                                  vocab_size=tok.vocab_size,
                                                  stop_token_ids=sorted(tok.stop_token_ids)))
    compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
    compiled, compile_s = timed(lambda: compiler.compile_json_schema(
        json.dumps(SCHEMA), any_whitespace=False, separators=(", ", ": ")))
    matcher = xgr.GrammarMatcher(compiled)
    bitmask = xgr.allocate_token_bitmask(1, tok.vocab_size)
    per_token = []
    for token in ids:
        _, dt = timed(lambda: matcher.fill_next_token_bitmask(bitmask))
        per_token.append(dt)
        assert matcher.accept_token(token)
    return {"setup_s": setup, "compile_s": compile_s, "mask_us": per_token}


def k2_tokenizer():
    from k2serve.models.tiny_k2 import write_tiny_k2_checkpoint
    from k2serve.text.loading import load_tokenizer
    path = write_tiny_k2_checkpoint(Path(tempfile.mkdtemp()) / "k2", seed=0, fp8=False)
    return load_tokenizer(str(path))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    tokenizers = {"SmolLM2 (HF tokenizers, GGUF)": Tokenizer.from_gguf(embedded_smollm2_gguf_path()),
                  "tiny K2 (tiktoken + K2 specials)": k2_tokenizer()}
    print(f"schema: {len(json.dumps(SCHEMA))} chars; reply: {REPLY}")
    print(f"{'tokenizer':34} {'library':11} {'vocab':>7} {'setup ms':>9} {'compile ms':>11} "
          f"{'mask us p50':>12} {'mask us p90':>12}")
    for name, tok in tokenizers.items():
        ids = tok.encode(REPLY)
        for lib, bench in (("llguidance", bench_llguidance), ("xgrammar", bench_xgrammar)):
            runs = [bench(tok, ids) for _ in range(args.repeat)]
            if runs[0] is None:
                print(f"{name:34} {lib:11} (not installed)")
                continue
            masks = sorted(t * 1e6 for r in runs for t in r["mask_us"])
            print(f"{name:34} {lib:11} {tok.vocab_size:>7} "
                  f"{statistics.median(r['setup_s'] for r in runs) * 1e3:>9.1f} "
                  f"{statistics.median(r['compile_s'] for r in runs) * 1e3:>11.2f} "
                  f"{statistics.median(masks):>12.1f} {masks[int(len(masks) * 0.9)]:>12.1f}")


if __name__ == "__main__":
    main()
