"""Engine invariants: batching, prefix caching and preemption never change greedy tokens;
every KV block comes back; seeds reproduce."""

from __future__ import annotations

import asyncio
import random
import time

import pytest
import torch

from k2serve.engine.async_engine import AsyncEngine
from k2serve.engine.config import EngineConfig
from k2serve.engine.core import EngineCore
from k2serve.engine.sampling_params import SamplingParams
from k2serve.engine.sequence import GenerationRequest
from k2serve.models.loader import load_model
from k2serve.serving.loader import SERVING_QUANTIZATION
from k2serve.text.tokenizer import Tokenizer
from tests.tiny_models import smollm2_gguf_path, tiny_hf_llama


@pytest.fixture(scope="module", params=["fp32", "int4"])
def smollm2(request):
    """The embedded model dequantized, and as `k2serve serve` runs it (4-bit kept 4-bit)."""
    quantized = SERVING_QUANTIZATION if request.param == "int4" else False
    model, config = load_model(smollm2_gguf_path(), progress=False, quantized=quantized)
    return model, config, Tokenizer.from_gguf(smollm2_gguf_path())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny")
    tiny_hf_llama().save_pretrained(directory)
    return load_model(str(directory), progress=False)


def make_core(model, **overrides) -> EngineCore:
    engine_config = EngineConfig(**{"context_length": 2048, "num_kv_blocks": 512, **overrides})
    return EngineCore(model, engine_config)


def run(core: EngineCore, requests: list[GenerationRequest], abort_at: dict[str, int] = None):
    """Step until idle; returns request id -> (token ids, finish reason, cached tokens)."""
    abort_at = abort_at or {}
    for r in requests:
        core.add(r)
    results = {r.request_id: ([], None, 0) for r in requests}
    step = 0
    while core.has_work():
        for request_id, when in abort_at.items():
            if when == step:
                core.abort(request_id)
        for out in core.step():
            ids, _, _ = results[out.request_id]
            results[out.request_id] = (ids + out.token_ids, out.finish_reason,
                                       out.num_cached_tokens)
        step += 1
    return results


def greedy(request_id, prompt_ids, max_tokens, **kw):
    return GenerationRequest(request_id, list(prompt_ids),
                             SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, **kw))


PROMPTS = [
    "The history of Rome begins",
    "def fibonacci(n):",
    "List three fruits:",
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
    "<|im_start|>assistant\n",
]


LONG_PROMPT = (  # past EngineConfig.dense_prompt_min_tokens: its prompt rows run dense
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face. "
    "Answer briefly, in plain words, and say so when you do not know something. Never invent "
    "facts, dates or names; prefer short lists to long paragraphs.<|im_end|>\n<|im_start|>user\n"
    "Which river flows through Paris, and which sea does it reach?<|im_end|>\n"
    "<|im_start|>assistant\n")


@pytest.mark.parametrize("target_text", [PROMPTS[3], LONG_PROMPT], ids=["short", "long"])
def test_greedy_tokens_same_alone_in_a_batch_with_cache_and_across_preemption(smollm2, target_text):
    model, config, tok = smollm2
    target = tok.encode(target_text)
    if target_text is LONG_PROMPT:
        assert len(target) >= EngineConfig().dense_prompt_min_tokens
    alone = run(make_core(model), [greedy("t", target, 16)])["t"][0]

    # Inside a batch of 16 mixed requests: other prompts, lengths, sampling settings.
    rng = random.Random(0)
    others = []
    for i in range(15):
        prompt = tok.encode(PROMPTS[i % 3] + " " + " ".join(str(rng.randint(0, 99)) for _ in range(i)))
        params = SamplingParams(max_tokens=rng.randint(4, 20), temperature=rng.choice([0, 0.7, 1.2]),
                                top_p=rng.choice([1.0, 0.9]), top_k=rng.choice([0, 20]), seed=i,
                                ignore_eos=True, repetition_penalty=rng.choice([1.0, 1.1]))
        others.append(GenerationRequest(f"o{i}", prompt, params))
    core = make_core(model, max_step_tokens=64)  # chunked prefill too
    mixed = run(core, others[:7] + [greedy("t", target, 16)] + others[7:])
    assert mixed["t"][0] == alone

    # With a prefix-cache hit: the same core has the prompt's full blocks cached now.
    cached = run(core, [greedy("t2", target, 16)])["t2"]
    assert cached[2] == len(target) // 16 * 16 >= 32
    assert cached[0] == alone

    # Across preemption: a pool too small for everything at once forces recompute.
    small = make_core(model, num_kv_blocks=10, max_step_tokens=64)
    preempted = run(small, [greedy("t", target, 16)] + others[:6])
    assert small.stats()["preemptions"] > 0
    assert preempted["t"][0] == alone
    assert small.stats()["kv_blocks_free"] == small.stats()["kv_blocks_total"]


def test_prefix_cache_is_lru_and_shared_by_concurrent_requests(tiny):
    model, config = tiny
    core = make_core(model, num_kv_blocks=16, block_size=4)
    prefix = list(range(1, 17))  # 4 full blocks
    first = run(core, [greedy("a", prefix + [20], 2)])
    assert first["a"][2] == 0
    # Siblings submitted together: the second waits for the first's blocks and shares them.
    together = run(core, [greedy("b", prefix + [21], 2), greedy("c", prefix + [22], 2)])
    assert together["b"][2] == 16 and together["c"][2] == 16
    # Enough other traffic evicts the least recently used blocks.
    for i in range(6):
        run(core, [greedy(f"x{i}", [100 + i] * 12, 2)])
    assert run(core, [greedy("d", prefix + [23], 2)])["d"][2] < 16
    assert core.stats()["kv_blocks_free"] == 16


def test_n_choices_share_the_prompt_blocks(tiny):
    model, config = tiny
    core = make_core(model, block_size=4)
    prompt = list(range(1, 30))
    params = SamplingParams(max_tokens=3, temperature=1.0, seed=1, ignore_eos=True)
    results = run(core, [GenerationRequest(f"n{i}", prompt, params) for i in range(4)])
    cached = sorted(r[2] for r in results.values())
    assert cached == [0, 28, 28, 28]


def test_300_random_requests_with_aborts_free_every_block(tiny):
    model, config = tiny
    core = make_core(model, num_kv_blocks=64, block_size=4, max_num_seqs=12,
                     max_step_tokens=48)
    rng = random.Random(1)
    requests, abort_at = [], {}
    for i in range(300):
        prompt = [rng.randint(0, 255) for _ in range(rng.randint(1, 40))]
        if rng.random() < 0.3:
            prompt = [7] * 8 + prompt  # some shared prefixes
        params = SamplingParams(max_tokens=rng.randint(1, 24), temperature=rng.choice([0, 1.0]),
                                seed=rng.choice([None, i]), stop_token_ids=frozenset({3}),
                                logprobs=rng.choice([None, 2]),
                                prompt_logprobs=rng.random() < 0.05)
        requests.append(GenerationRequest(f"r{i}", prompt, params))
        if rng.random() < 0.25:
            abort_at[f"r{i}"] = rng.randint(0, 400)
    results = run(core, requests, abort_at)
    stats = core.stats()
    assert stats["kv_blocks_free"] == stats["kv_blocks_total"] == 64
    assert stats["running"] == stats["waiting"] == 0
    finished = [r for r in results.values() if r[1] is not None]
    assert len(finished) >= 200
    for request in requests:
        ids, reason, _ = results[request.request_id]
        if reason == "length":
            assert len(ids) == request.params.max_tokens
        elif reason == "stop":
            assert ids[-1] == 3


def test_seeded_sampling_is_reproducible_across_batches(tiny):
    model, config = tiny
    params = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=1234, ignore_eos=True)
    alone = run(make_core(model), [GenerationRequest("s", [5, 6, 7], params)])["s"][0]
    noise = [GenerationRequest(f"z{i}", [9, i], SamplingParams(max_tokens=5, temperature=1.0))
             for i in range(5)]
    batched = run(make_core(model), noise + [GenerationRequest("s", [5, 6, 7], params)])
    assert batched["s"][0] == alone


def test_async_engine_abort_on_close_frees_blocks(tiny):
    model, config = tiny
    engine = AsyncEngine(make_core(model, num_kv_blocks=300, block_size=4))

    async def scenario():
        stream = engine.generate(greedy("long", [1, 2, 3], 1000))
        received = 0
        async for _ in stream:
            received += 1
            if received == 3:
                break
        await stream.aclose()
        full = [o async for o in engine.generate(greedy("short", [1, 2, 3], 4))]
        return received, full

    try:
        received, full = asyncio.run(scenario())
        assert received == 3
        assert full[-1].finish_reason == "length" and len(full) == 4
        deadline = time.time() + 5
        while engine.stats()["kv_blocks_free"] != 300 and time.time() < deadline:
            time.sleep(0.01)
        assert engine.stats()["kv_blocks_free"] == 300
        assert engine.stats()["running"] == 0
    finally:
        engine.shutdown()


def test_request_larger_than_the_cache_is_refused(tiny):
    model, config = tiny
    core = make_core(model, num_kv_blocks=4, block_size=4)
    with pytest.raises(ValueError, match="KV blocks"):
        core.add(greedy("big", list(range(10)), 10))
    torch.testing.assert_close(torch.tensor(core.stats()["kv_blocks_free"]), torch.tensor(4))


def test_kv_pool_dtype_follows_the_model_unless_configured(smollm2):
    """4-bit weights: a bfloat16 pool (their linears take bfloat16 activations), twice the
    blocks in the same bytes; float32 models keep float32; EngineConfig overrides either."""
    model, _, _ = smollm2
    expected = torch.bfloat16 if model.quantization is not None else torch.float32
    default = EngineCore(model, EngineConfig(kv_cache_bytes=64 << 20))
    assert default.kv.dtype == default.kv.k[0].dtype == expected
    wide = EngineCore(model, EngineConfig(kv_cache_bytes=64 << 20, kv_cache_dtype=torch.float32))
    narrow = EngineCore(model, EngineConfig(kv_cache_bytes=64 << 20, kv_cache_dtype=torch.bfloat16))
    assert wide.kv.k[0].dtype == torch.float32 and narrow.kv.v[0].dtype == torch.bfloat16
    assert narrow.blocks.num_blocks + 1 == 2 * (wide.blocks.num_blocks + 1)


def test_a_prompt_computes_alike_whole_chunked_or_after_a_prefix_cache_hit(smollm2, request):
    """As served (int4), the first token's logprobs are bitwise the same whether the prompt
    ran in one chunk, in chunks of 16, or after a prefix-cache hit: before every prompt row
    ran the decode kernel, a whole-prompt prefill rounded differently and greedy replies to
    this prompt changed once it was cached. (The float32 model's dense GEMMs round by M.)"""
    if request.node.callspec.params["smollm2"] != "int4":
        pytest.skip("float32 dense GEMMs round by the step's row count (MKL picks by M)")
    model, config, tok = smollm2
    ids = tok.encode("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained "
                     "by Hugging Face<|im_end|>\n<|im_start|>user\nSay hello there.<|im_end|>\n"
                     "<|im_start|>assistant\n")

    def first_logprobs(core, request_id):
        core.add(greedy(request_id, ids, 1, logprobs=5))
        while core.has_work():
            for out in core.step():
                if out.logprobs:
                    return out.logprobs[0], out.num_cached_tokens

    core = make_core(model)
    whole, cached_before = first_logprobs(core, "whole")
    after_hit, cached = first_logprobs(core, "cached")
    chunked, _ = first_logprobs(make_core(model, max_step_tokens=16), "chunked")
    assert cached_before == 0 and cached == len(ids) // 16 * 16 > 0
    assert whole == after_hit == chunked
