"""Our Llama against HF transformers, both loading the embedded SmolLM2-135M Q4_1 GGUF.

transformers dequantizes the GGUF itself (and un-permutes q/k itself), so this checks our
GGUF loader, un-permutation, model code and KV-cached decoding end to end.
"""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

transformers = pytest.importorskip("transformers")

from k2serve.models.embedded import embedded_smollm2_gguf_path  # noqa: E402
from k2serve.models.layers.attention import ContiguousAttention, Segment, SequenceKVCache  # noqa: E402
from k2serve.models.loader import load_model  # noqa: E402

LOGITS_ATOL = 1e-3
PROMPTS = [
    "The capital of France is",
    "<|im_start|>user\nWrite a haiku about the sea.<|im_end|>\n<|im_start|>assistant\n",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Once upon a time, in a small village at the edge of a great forest, there lived an old "
    "clockmaker who had never once left the valley. Every morning he opened his shop, wound "
    "the hundred clocks on its walls, and waited for customers who rarely came. One day",
    "Hi",
]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def gguf_path():
    try:
        return embedded_smollm2_gguf_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def hf(gguf_path):
    directory, name = os.path.split(gguf_path)
    try:
        import accelerate  # noqa: F401  (from_pretrained(gguf_file=...) requires it)
    except ImportError:
        # Same dequantization and q/k un-permutation, without from_pretrained's accelerate check.
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

        config = transformers.AutoConfig.from_pretrained(directory, gguf_file=name)
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        tensors = load_gguf_checkpoint(gguf_path, return_tensors=True, model_to_load=model)["tensors"]
        missing, unexpected = model.load_state_dict(tensors, strict=False)
        assert not unexpected and set(missing) <= {"lm_head.weight"}
        model.tie_weights()
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory, gguf_file=name)
    return model.eval(), tokenizer


@pytest.fixture(scope="module")
def ours(gguf_path):
    model, config = load_model(gguf_path, progress=False)
    return model, config


@pytest.fixture(scope="module")
def prompt_ids(hf):
    _, tokenizer = hf
    return [torch.tensor(tokenizer(p).input_ids, dtype=torch.long) for p in PROMPTS]


@pytest.fixture(scope="module")
def hf_logits(hf, prompt_ids):
    model, _ = hf
    with torch.no_grad():
        return [model(ids[None]).logits[0].float() for ids in prompt_ids]


def new_cache(config):
    return SequenceKVCache(config.num_layers, config.num_kv_heads, config.head_dim)


def run_step(model, segments, token_chunks):
    """One flattened forward over several segments; returns logits split per segment."""
    ids = torch.cat(token_chunks)
    positions = torch.cat([torch.arange(s.start, s.start + s.count) for s in segments])
    ctx = ContiguousAttention(list(segments))
    hidden = model(ids, positions, ctx)
    ctx.commit()
    return list(model.compute_logits(hidden).split([s.count for s in segments]))


def test_config_from_gguf(ours):
    _, config = ours
    assert (config.architecture, config.num_layers, config.hidden_size) == ("llama", 30, 576)
    assert (config.num_heads, config.num_kv_heads, config.head_dim) == (9, 3, 64)
    assert (config.vocab_size, config.rope_theta, config.tie_word_embeddings) == (49152, 100000.0, True)
    assert config.intermediate_size == 1536 and config.context_length == 8192


def test_prefill_logits_match_transformers(ours, prompt_ids, hf_logits):
    model, config = ours
    assert len({len(ids) for ids in prompt_ids}) == len(prompt_ids)  # all different lengths
    diffs = []
    for ids, ref in zip(prompt_ids, hf_logits):
        (logits,) = run_step(model, [Segment(new_cache(config), 0, len(ids))], [ids])
        assert logits.dtype == torch.float32 and logits.shape == ref.shape
        diffs.append((logits - ref).abs().max().item())
    print(f"max abs logits diff per prompt: {[f'{d:.2e}' for d in diffs]}")
    assert max(diffs) <= LOGITS_ATOL, diffs


def greedy_generate(model, config, ids, max_new_tokens):
    cache = new_cache(config)
    (logits,) = run_step(model, [Segment(cache, 0, len(ids))], [ids])
    out = []
    for _ in range(max_new_tokens):
        token = int(logits[-1].argmax())
        out.append(token)
        if token == config.eos_token_id or len(out) == max_new_tokens:
            break
        (logits,) = run_step(model, [Segment(cache, cache.length, 1)], [torch.tensor([token])])
    return out


def test_greedy_generation_matches_transformers(ours, hf, prompt_ids):
    model, config = ours
    hf_model, _ = hf
    full_length = 0
    for ids in prompt_ids[:4]:
        with torch.no_grad():
            ref = hf_model.generate(ids[None], attention_mask=torch.ones_like(ids)[None],
                                    do_sample=False, max_new_tokens=32)[0, len(ids):].tolist()
        got = greedy_generate(model, config, ids, 32)
        assert got == ref
        full_length += len(got) == 32
    assert full_length >= 2  # most prompts really decode 32 tokens (no early EOS)


def test_batched_step_matches_single_sequences(ours, prompt_ids, hf_logits):
    """Continuous-batching shapes in one flattened step: a decode, a full prefill and the
    second chunk of a chunked prefill, each its own Segment."""
    model, config = ours
    a, b, c = prompt_ids[0], prompt_ids[3], prompt_ids[1]

    # Step 1: prefill a (all but its last token) and the first half of c, batched.
    cache_a, cache_b, cache_c = new_cache(config), new_cache(config), new_cache(config)
    half = len(c) // 2
    la, lc = run_step(model, [Segment(cache_a, 0, len(a) - 1), Segment(cache_c, 0, half)], [a[:-1], c[:half]])
    # Step 2: decode a's last token, prefill all of b, finish c.
    da, lb, lc2 = run_step(
        model,
        [Segment(cache_a, len(a) - 1, 1), Segment(cache_b, 0, len(b)), Segment(cache_c, half, len(c) - half)],
        [a[-1:], b, c[half:]],
    )
    batched = {
        "a": torch.cat([la, da]),
        "b": lb,
        "c": torch.cat([lc, lc2]),
    }
    singles = {}
    for key, ids in (("a", a), ("b", b), ("c", c)):
        (singles[key],) = run_step(model, [Segment(new_cache(config), 0, len(ids))], [ids])
    refs = {"a": hf_logits[0], "b": hf_logits[3], "c": hf_logits[1]}
    for key in batched:
        assert (batched[key] - singles[key]).abs().max().item() <= 1e-4, key
        assert (batched[key] - refs[key]).abs().max().item() <= LOGITS_ATOL, key
    assert (cache_a.length, cache_b.length, cache_c.length) == (len(a), len(b), len(c))
