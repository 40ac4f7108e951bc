"""Our DeepSeek-V3 / Kimi K2 model against transformers' DeepseekV3ForCausalLM.

Random tiny configs cover q_lora_rank set / null, expert groups (n_group, topk_group > 1),
first_k_dense_replace 0-2, YaRN (K2-like and with an attention factor != 1) and plain rope,
interleaved and rotate-half rope, shared experts 1-2, norm_topk_prob on/off, tied
embeddings. Each checks prefill logits, 16 decode steps through the contiguous latent cache
(vs transformers' own cached decode), and greedy tokens + logprobs through the engine's
paged path inside a mixed batch with chunked prefill and a prefix-cache hit (vs
transformers' generate). The last test loads the tiny K2 checkpoint writer's output in
transformers, which checks its names, shapes and K2-style config keys.
"""

from __future__ import annotations

import inspect
import json
import shutil

import pytest
import torch

transformers = pytest.importorskip("transformers")

from k2serve.engine.config import EngineConfig  # noqa: E402
from k2serve.engine.core import EngineCore  # noqa: E402
from k2serve.engine.sampling_params import SamplingParams  # noqa: E402
from k2serve.engine.sequence import GenerationRequest  # noqa: E402
from k2serve.models.deepseek_v3 import DeepseekV3ForCausalLM  # noqa: E402
from k2serve.models.layers.attention import ContiguousAttention, Segment, SequenceKVCache  # noqa: E402
from k2serve.models.loader import load_model  # noqa: E402
from k2serve.models.tiny_k2 import write_tiny_k2_checkpoint  # noqa: E402

ATOL = 1e-4
DECODE_STEPS = 16
VOCAB = 256

COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_attention_heads=4,
              num_key_value_heads=4, max_position_embeddings=4096, rms_norm_eps=1e-6,
              bos_token_id=None, eos_token_id=None, pad_token_id=None)
CONFIGS = {
    # K2's shape: q_lora, one dense layer first, YaRN with beta 1/1 and mscale 1/1, groups.
    "k2like": dict(num_hidden_layers=3, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16,
                   qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8, num_experts_per_tok=2,
                   n_group=2, topk_group=1, n_shared_experts=1, moe_intermediate_size=32,
                   first_k_dense_replace=1, routed_scaling_factor=2.827, norm_topk_prob=True,
                   rope_parameters={"rope_type": "yarn", "rope_theta": 50000.0, "factor": 32.0,
                                    "original_max_position_embeddings": 128, "beta_fast": 1.0,
                                    "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0}),
    # q_proj directly, 4 groups pick 2, two dense layers, YaRN with cos/sin factor != 1.
    "direct_q_groups": dict(num_hidden_layers=4, q_lora_rank=None, kv_lora_rank=24, qk_nope_head_dim=8,
                            qk_rope_head_dim=16, v_head_dim=12, n_routed_experts=16, num_experts_per_tok=4,
                            n_group=4, topk_group=2, n_shared_experts=2, moe_intermediate_size=16,
                            first_k_dense_replace=2, routed_scaling_factor=2.5, norm_topk_prob=True,
                            rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 8.0,
                                             "original_max_position_embeddings": 512, "beta_fast": 32.0,
                                             "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 0.8}),
    # every layer MoE, plain rope in rotate-half layout, unnormalised weights, tied embeddings.
    "all_moe_plain_rope": dict(num_hidden_layers=2, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8,
                               qk_rope_head_dim=8, v_head_dim=8, n_routed_experts=6, num_experts_per_tok=3,
                               n_group=1, topk_group=1, n_shared_experts=2, moe_intermediate_size=24,
                               first_k_dense_replace=0, routed_scaling_factor=1.5, norm_topk_prob=False,
                               rope_interleave=False, tie_word_embeddings=True,
                               rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
}
MEASURED: dict[str, dict[str, float]] = {}  # config -> check -> max abs diff (printed at the end)


@pytest.fixture(scope="module", autouse=True)
def print_measured(one_torch_thread):
    yield
    for name, diffs in MEASURED.items():
        print(f"\n{name}: " + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))


def random_hf_model(name: str) -> transformers.DeepseekV3ForCausalLM:
    config = transformers.DeepseekV3Config(**COMMON, **CONFIGS[name])
    torch.manual_seed(sorted(CONFIGS).index(name))
    model = transformers.DeepseekV3ForCausalLM(config).eval()
    with torch.no_grad():  # O(1) activations, non-trivial norms, routing-changing bias
        for pname, p in model.named_parameters():
            if "norm" in pname:
                p.uniform_(0.5, 1.5)
            elif "embed_tokens" in pname:
                p.normal_(0, 1)
            else:
                p.normal_(0, p.shape[-1] ** -0.5)
        for bname, b in model.named_buffers():
            if bname.endswith("e_score_correction_bias"):
                b.normal_(0, 0.1)
    return model


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request, tmp_path_factory):
    """(config name, transformers model, our model loaded from its save_pretrained)."""
    hf = random_hf_model(request.param)
    directory = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(directory, max_shard_size="100KB")  # several shards + index
    ours, config = load_model(str(directory), progress=False)
    assert isinstance(ours, DeepseekV3ForCausalLM) and config.num_layers == hf.config.num_hidden_layers
    return request.param, hf, ours


def prompt(seed: int, length: int) -> list[int]:
    return torch.randint(0, VOCAB, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def record(name: str, check: str, value: float) -> None:
    MEASURED.setdefault(name, {})[check] = value


def test_prefill_and_decode_logits(pair):
    name, hf, ours = pair
    c = ours.config
    ids = torch.tensor(prompt(1, 24))
    cache = SequenceKVCache(c.num_layers, 1, c.latent_dim, value_dim=0)

    def step(tokens, start):
        ctx = ContiguousAttention([Segment(cache, start, len(tokens))])
        logits = ours.compute_logits(ours(tokens, torch.arange(start, start + len(tokens)), ctx))
        ctx.commit()
        return logits

    with torch.no_grad():
        out = hf(ids[None], use_cache=True)
    logits = step(ids, 0)
    assert logits.dtype == torch.float32
    prefill = (logits - out.logits[0]).abs().max().item()
    record(name, "prefill", prefill)
    assert prefill <= ATOL

    # transformers 5.24 renamed past_key_values to cache (the old name warns)
    cache_kw = "cache" if "cache" in inspect.signature(hf.forward).parameters else "past_key_values"
    hf_cache, decode = getattr(out, cache_kw), 0.0
    token = out.logits[0, -1].argmax()
    for i in range(DECODE_STEPS):
        with torch.no_grad():
            out = hf(token.view(1, 1), use_cache=True, **{cache_kw: hf_cache})
        hf_cache = getattr(out, cache_kw)
        logits = step(token.view(1), len(ids) + i)
        decode = max(decode, (logits[0] - out.logits[0, -1]).abs().max().item())
        token = out.logits[0, -1].argmax()
    record(name, "decode", decode)
    assert cache.length == len(ids) + DECODE_STEPS
    assert decode <= ATOL


def test_engine_mixed_batch_matches_generate(pair):
    name, hf, ours = pair
    prompts = {"short": prompt(2, 5), "medium": prompt(3, 24), "long": prompt(4, 37)}
    prompts["shares_prefix"] = prompts["long"][:32] + prompt(5, 6)  # two full 16-token blocks hit
    core = EngineCore(ours, EngineConfig(num_kv_blocks=64, context_length=512, max_step_tokens=32))
    params = SamplingParams(temperature=0, max_tokens=DECODE_STEPS, ignore_eos=True, logprobs=0)
    requests = [GenerationRequest(rid, ids, params) for rid, ids in prompts.items()]
    tokens = {rid: [] for rid in prompts}
    logprobs = {rid: [] for rid in prompts}
    cached = {}
    for r in requests[:2]:
        core.add(r)
    steps = 0
    while core.has_work():
        if steps == 2:  # join while the first two decode: prefill chunks mix with decodes
            for r in requests[2:]:
                core.add(r)
        for out in core.step():
            tokens[out.request_id] += out.token_ids
            logprobs[out.request_id] += [lp.logprob for lp in out.logprobs]
            cached[out.request_id] = out.num_cached_tokens
        steps += 1
    assert cached["shares_prefix"] == 32

    worst = 0.0
    for rid, ids in prompts.items():
        inputs = torch.tensor([ids])  # an explicit mask: generate would mask pad_token_id tokens
        g = hf.generate(inputs, attention_mask=torch.ones_like(inputs), max_new_tokens=DECODE_STEPS,
                        do_sample=False, eos_token_id=None, pad_token_id=0, output_logits=True,
                        return_dict_in_generate=True)
        assert tokens[rid] == g.sequences[0, len(ids):].tolist(), rid
        ref = [torch.log_softmax(step_logits[0].float(), -1)[t].item() for step_logits, t in zip(g.logits, tokens[rid])]
        worst = max(worst, max(abs(a - b) for a, b in zip(logprobs[rid], ref)))
    record(name, "in-batch logprob", worst)
    assert worst <= ATOL
    assert core.blocks.num_free == core.blocks.num_blocks  # every block back (cached ones stay reusable)


def test_tiny_k2_checkpoint_loads_in_transformers(tmp_path):
    """The writer's bf16 checkpoint (K2 config keys, HF names) read by transformers as deepseek_v3."""
    ours_dir = write_tiny_k2_checkpoint(tmp_path / "k2", seed=3, fp8=False)
    hf_dir = tmp_path / "hf"
    shutil.copytree(ours_dir, hf_dir)
    config = json.loads((hf_dir / "config.json").read_text())
    config["model_type"] = "deepseek_v3"  # kimi_k2 needs trust_remote_code in transformers
    del config["auto_map"]
    (hf_dir / "config.json").write_text(json.dumps(config))
    hf = transformers.DeepseekV3ForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    ours, c = load_model(str(ours_dir), progress=False)
    ids = torch.randint(0, c.vocab_size, (20,), generator=torch.Generator().manual_seed(0))
    cache = SequenceKVCache(c.num_layers, 1, c.latent_dim, value_dim=0)
    logits = ours.compute_logits(ours(ids, torch.arange(20), ContiguousAttention([Segment(cache, 0, 20)])))
    with torch.no_grad():
        diff = (logits - hf(ids[None]).logits[0]).abs().max().item()
    record("tiny_k2_writer", "prefill", diff)
    assert diff <= ATOL


def test_k2_0905_rope_and_softmax_scale():
    """K2-0905's YaRN (factor 64, beta 1/1, theta 50000, dim 64): NOTES §1.4 / §1.6 values."""
    from k2serve.models.deepseek_config import DeepseekV3Config
    from k2serve.models.layers.yarn_rotary import yarn_inv_freq
    from k2serve.models.tiny_k2 import tiny_k2_config

    hf_config = tiny_k2_config(1024) | dict(
        qk_nope_head_dim=128, qk_rope_head_dim=64, rope_theta=50000.0, max_position_embeddings=262144,
        rope_scaling={"type": "yarn", "factor": 64.0, "original_max_position_embeddings": 4096,
                      "beta_fast": 1.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0})
    config = DeepseekV3Config.from_hf_config(hf_config)
    assert config.softmax_scale() == pytest.approx(0.1446796, abs=1e-7)
    inv_freq, attention_factor = yarn_inv_freq(64, 50000.0, config.rope_scaling, config.yarn_factor())
    assert attention_factor == 1.0
    base = 50000.0 ** (-torch.arange(0, 64, 2, dtype=torch.float64) / 64)
    expected = torch.cat((base[:20], base[20:] / 64)).float()  # indices 0..19 kept, 20..31 / 64
    assert torch.allclose(inv_freq, expected, rtol=1e-6)
