"""Speculative decoding on a code-editing workload: output tokens/s with speculation off, with
n-gram proposals (prompt lookup) and with a draft model, and the share of proposals kept.

    python benchmarks/speculative_speed.py [--streams 1,4] [--repeats 3] [--threads 2]
        [--draft-layers 8 | --draft PATH] [--k 4] [--max-tokens 160]

The workload: "rewrite this function with NAME renamed to NEW" over snippets of a few
hundred tokens, the assistant's answer opened with a code fence, so the answer copies most of
the prompt. Greedy decoding (the outputs of all modes are checked to be identical). Each
method runs twice: with proposals sized per sequence by what pays (``spec_policy``, the
server's default) and with k tokens proposed every step ("always k").
The engine is what `k2serve serve` runs (EngineCore over the serving quantization of the
embedded SmolLM2-135M-Instruct). The draft model is, by default, SmolLM2 cut to its first
``--draft-layers`` of 30 layers (the only Llama-family model with SmolLM2's tokenizer at hand;
a shallow draft is a weak one: see the acceptance rate), or any ``--draft`` checkpoint with the
same tokenizer. A run adds N requests (N = streams) at once and steps the engine until all
finish; tokens/s = output tokens / wall seconds (prefill included, the same in every mode).
Modes are interleaved per repeat and medians printed: the machine may be shared.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch
from torch import nn

from k2serve.engine.config import EngineConfig
from k2serve.engine.core import EngineCore
from k2serve.engine.sampling_params import SamplingParams
from k2serve.engine.sequence import GenerationRequest
from k2serve.models.embedded import embedded_smollm2_gguf_path
from k2serve.models.loader import load_model
from k2serve.serving.loader import SERVING_QUANTIZATION
from k2serve.text.tokenizer import Tokenizer

SNIPPETS = [
    ("subtotal", "base_amount", '''def total_price(items, tax_rate, discounts=None):
    """Price of an order: item prices times quantities, less discounts, plus tax."""
    subtotal = 0.0
    for item in items:
        if item.quantity <= 0:
            continue
        subtotal += item.price * item.quantity
    if discounts:
        for code, amount in discounts.items():
            if code.startswith("PCT"):
                subtotal -= subtotal * amount / 100
            else:
                subtotal -= amount
    subtotal = max(subtotal, 0.0)
    tax = subtotal * tax_rate
    return round(subtotal + tax, 2)
'''),
    ("records", "rows", '''def summarize(records, key, limit=10):
    """Count records by a key and return the most common values with their share."""
    counts = {}
    for record in records:
        value = record.get(key)
        if value is None:
            continue
        counts[value] = counts.get(value, 0) + 1
    total = sum(counts.values())
    ranked = sorted(counts.items(), key=lambda pair: pair[1], reverse=True)
    result = []
    for value, count in ranked[:limit]:
        result.append({"value": value, "count": count, "share": count / total})
    return {"total": total, "distinct": len(counts), "top": result, "records": len(records)}
'''),
    ("buffer", "chunk", '''def read_frames(stream, frame_size, max_frames=None):
    """Split a byte stream into fixed-size frames; the last partial frame is padded."""
    frames = []
    buffer = b""
    while True:
        data = stream.read(4096)
        if not data:
            break
        buffer += data
        while len(buffer) >= frame_size:
            frames.append(buffer[:frame_size])
            buffer = buffer[frame_size:]
            if max_frames is not None and len(frames) >= max_frames:
                return frames
    if buffer:
        frames.append(buffer + b"\\x00" * (frame_size - len(buffer)))
    return frames
'''),
]


def prompts(tok: Tokenizer) -> list[list[int]]:
    out = []
    for old, new, code in SNIPPETS:
        text = (f"<|im_start|>user\nRewrite this function with `{old}` renamed to `{new}`. "
                f"Keep everything else the same.\n```python\n{code}```<|im_end|>\n"
                "<|im_start|>assistant\n```python\n")
        out.append(tok.encode(text))
    return out


def shallow_draft(layers: int) -> nn.Module:
    model, config = load_model(embedded_smollm2_gguf_path(), progress=False,
                               quantized=SERVING_QUANTIZATION)
    model.model.layers = nn.ModuleList(list(model.model.layers)[:layers])
    model.config = dataclasses.replace(config, num_layers=layers)
    return model


def run_once(core: EngineCore, requests: list[GenerationRequest]):
    before = core.stats()
    for r in requests:
        core.add(r)
    tokens = {r.request_id: [] for r in requests}
    steps = 0
    start = time.perf_counter()
    while core.has_work():
        for out in core.step():
            tokens[out.request_id] += out.token_ids
        steps += 1
    seconds = time.perf_counter() - start
    after = core.stats()
    proposed = after["spec_proposed_tokens"] - before["spec_proposed_tokens"]
    accepted = after["spec_accepted_tokens"] - before["spec_accepted_tokens"]
    return tokens, seconds, steps, proposed, accepted


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--streams", default="1,4")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--draft-layers", type=int, default=8)
    parser.add_argument("--draft", default=None, help="a draft checkpoint (same tokenizer)")
    parser.add_argument("--k", type=int, default=4, help="tokens proposed per step")
    parser.add_argument("--max-tokens", type=int, default=160)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    path = embedded_smollm2_gguf_path()
    tok = Tokenizer.from_gguf(path)
    target, _ = load_model(path, progress=False, quantized=SERVING_QUANTIZATION)
    if args.draft:
        quantized = SERVING_QUANTIZATION if args.draft.endswith(".gguf") else False
        draft, _ = load_model(args.draft, progress=False, quantized=quantized)
        draft_name = args.draft
    else:
        draft = shallow_draft(args.draft_layers)
        draft_name = f"SmolLM2 first {args.draft_layers}/30 layers"
    stop = frozenset(tok.stop_token_ids)
    fence = tok.encode("```")  # the answer's closing fence ends it: stop on its first token
    stop |= {fence[0]} if len(fence) == 1 else frozenset()
    # mode -> (method, adaptive): proposals sized by what pays (the default), or always k
    modes = {"off": (None, True), "ngram": ("ngram", True), "ngram, always k": ("ngram", False),
             "draft": ("draft", True), "draft, always k": ("draft", False)}
    cores = {mode: EngineCore(target, EngineConfig(
        num_kv_blocks=1024, speculative=method, num_speculative_tokens=args.k,
        adaptive_speculation=adaptive), draft_model=draft if method == "draft" else None)
        for mode, (method, adaptive) in modes.items()}
    encoded = prompts(tok)
    print(f"workload: {len(encoded)} code-editing prompts of {[len(p) for p in encoded]} tokens, "
          f"greedy, up to {args.max_tokens} tokens; k = {args.k}; draft: {draft_name}; "
          f"torch threads {args.threads}")
    print("| streams | mode | tok/s (median) | spread | vs off | accepted / proposed | "
          "tokens per sequence-step |")
    print("|---|---|---|---|---|---|---|")
    for streams in [int(s) for s in args.streams.split(",")]:
        def requests(tag):
            return [GenerationRequest(f"{tag}-{i}", encoded[i % len(encoded)], SamplingParams(
                temperature=0, max_tokens=args.max_tokens, stop_token_ids=stop))
                for i in range(streams)]
        # warm-up (and the identity check): one run per mode
        reference = None
        for mode, core in cores.items():
            tokens, *_ = run_once(core, requests(f"w{mode}"))
            outs = list(tokens.values())
            if reference is None:
                reference = outs
            elif outs != reference:
                raise SystemExit(f"{mode}: outputs differ from speculation off")
        rates = {mode: [] for mode in modes}
        acceptance = {mode: [0, 0, 0, 0] for mode in modes}  # proposed, accepted, tokens, seq-steps
        for rep in range(args.repeats):
            for mode, core in cores.items():
                tokens, seconds, steps, proposed, accepted = run_once(core, requests(f"{rep}{mode}"))
                n = sum(len(t) for t in tokens.values())
                rates[mode].append(n / seconds)
                a = acceptance[mode]
                a[0] += proposed
                a[1] += accepted
                a[2] += n
                a[3] += steps
        base = statistics.median(rates["off"])
        for mode in modes:
            med = statistics.median(rates[mode])
            proposed, accepted, n, steps = acceptance[mode]
            rate = f"{accepted / proposed:.0%} ({accepted}/{proposed})" if proposed else "—"
            # output tokens per engine step per stream: 1.0 without speculation
            per_step = n / steps / streams if steps else 0
            print(f"| {streams} | {mode} | {med:.1f} | {min(rates[mode]):.1f}-"
                  f"{max(rates[mode]):.1f} | {med / base:.2f}x | {rate} | {per_step:.2f} |",
                  flush=True)
    sample = tok.decode(reference[0])
    print("\nfirst answer (all modes identical):\n" + sample[:400])


if __name__ == "__main__":
    main()
