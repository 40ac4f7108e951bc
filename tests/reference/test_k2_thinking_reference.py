"""A tiny Kimi K2-Thinking (INT4 routed experts, compressed-tensors pack-quantized) against
transformers' DeepseekV3ForCausalLM run on the dequantized weights.

The checkpoint is `k2serve tiny-k2 --thinking`'s; transformers gets its weights dequantized
by compressed-tensors itself (float32 scales, so exactly (code - 8) * scale), never by our
code. Ours loads the packed experts 4-bit (they are `Int4Linear`s holding int4) and, with
``expert_dense_min_rows=0``, computes them in float32 from the same 4-bit source: logits
within 1e-4 through the engine's paged absorbed-MLA path, prefill (chunked) and 16 decode
steps, and over every prompt position through the contiguous cache. The int4 kernel
(bfloat16 activations) is compared too, with the bound its rounding allows.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")
pytest.importorskip("compressed_tensors")
from compressed_tensors.compressors.pack_quantized import PackedQuantizationCompressor  # noqa: E402
from compressed_tensors.quantization import QuantizationScheme  # noqa: E402

from k2serve.engine.config import EngineConfig  # noqa: E402
from k2serve.engine.core import EngineCore  # noqa: E402
from k2serve.engine.sampling_params import SamplingParams  # noqa: E402
from k2serve.engine.sequence import GenerationRequest  # noqa: E402
from k2serve.models.layers.attention import (  # noqa: E402
    ContiguousAttention,
    Segment,
    SequenceKVCache,
)
from k2serve.models.layers.int4_linear import Int4Linear  # noqa: E402
from k2serve.models.layers.quantization import QuantizationConfig  # noqa: E402
from k2serve.models.loader import load_model  # noqa: E402
from k2serve.models.tiny_k2 import write_tiny_k2_checkpoint  # noqa: E402

ATOL = 1e-4
DECODE_STEPS = 16
# int4 kernel: activations rounded to bfloat16 (8 bits) before each expert; measured
# ~2e-2 on these logits (|logits| ~ 4), bound at 4x that
INT4_KERNEL_ATOL = 0.08
MEASURED: dict[str, float] = {}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module", autouse=True)
def print_measured():
    yield
    print("\nK2-Thinking int4 tiny: " + ", ".join(f"{k} {v:.2e}" for k, v in MEASURED.items()))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_tiny_k2_checkpoint(tmp_path_factory.mktemp("k2t") / "ckpt", seed=11, fp8=False,
                                    thinking=True, int4_experts=True)


@pytest.fixture(scope="module")
def hf(checkpoint, tmp_path_factory):
    """transformers on the checkpoint, its packed experts dequantized by compressed-tensors."""
    scheme = QuantizationScheme(targets=["Linear"], weights={
        "num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 32})
    stored = {}
    for shard in checkpoint.glob("model-*.safetensors"):
        stored.update(load_file(str(shard)))
    dense = {}
    for name, tensor in stored.items():
        if name.endswith(".weight_packed"):
            module = name.removesuffix(".weight_packed")
            dense[module + ".weight"] = PackedQuantizationCompressor.decompress(
                {"weight_packed": tensor, "weight_scale": stored[module + ".weight_scale"].float(),
                 "weight_shape": stored[module + ".weight_shape"]}, scheme)["weight"]
        elif not name.endswith((".weight_scale", ".weight_shape")):
            dense[name] = tensor.float()
    hf_dir = tmp_path_factory.mktemp("hf")
    for file in ("config.json", "generation_config.json"):
        shutil.copy(checkpoint / file, hf_dir / file)
    config = json.loads((hf_dir / "config.json").read_text())
    config["model_type"] = "deepseek_v3"  # kimi_k2 needs trust_remote_code in transformers
    del config["auto_map"], config["quantization_config"]
    config["torch_dtype"] = "float32"
    (hf_dir / "config.json").write_text(json.dumps(config))
    save_file(dense, str(hf_dir / "model.safetensors"), metadata={"format": "pt"})
    return transformers.DeepseekV3ForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()


def prompt(vocab: int, length: int = 24) -> list[int]:
    return torch.randint(0, vocab, (length,), generator=torch.Generator().manual_seed(3)).tolist()


def engine_logits(model, ids: list[int], max_step_tokens: int) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy tokens and every logits row the engine computed (chunked prefill's last row,
    then one per decode), through the paged KV pool."""
    rows: list[torch.Tensor] = []
    compute = model.compute_logits

    def recording(hidden):
        logits = compute(hidden)
        rows.extend(logits.clone())
        return logits

    model.compute_logits = recording
    try:
        core = EngineCore(model, EngineConfig(num_kv_blocks=16, context_length=256,
                                              max_step_tokens=max_step_tokens))
        core.add(GenerationRequest("r", ids, SamplingParams(temperature=0, max_tokens=DECODE_STEPS,
                                                            ignore_eos=True)))
        tokens = []
        while core.has_work():
            for out in core.step():
                tokens += out.token_ids
    finally:
        del model.compute_logits
    return tokens, rows


def hf_logits(hf, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0]


def test_float32_compute_matches_transformers_through_paged_mla(checkpoint, hf):
    ours, c = load_model(str(checkpoint), progress=False,
                         quantized=QuantizationConfig(expert_dense_min_rows=0, native=False))
    experts = [m for n, m in ours.named_modules() if ".experts." in n and isinstance(m, Int4Linear)]
    assert experts and all(m.is_int4 for m in experts)  # 4-bit source, float32 compute
    ids = prompt(c.vocab_size)

    tokens, rows = engine_logits(ours, ids, max_step_tokens=16)  # prefill in two chunks
    assert len(tokens) == DECODE_STEPS and len(rows) == DECODE_STEPS
    reference = hf_logits(hf, ids + tokens)
    expected = reference[len(ids) - 1:len(ids) - 1 + DECODE_STEPS]
    assert tokens == expected.argmax(-1).tolist()
    prefill = (rows[0] - expected[0]).abs().max().item()
    decode = max((r - e).abs().max().item() for r, e in zip(rows[1:], expected[1:]))
    MEASURED.update(paged_prefill=prefill, paged_decode=decode)
    assert prefill <= ATOL and decode <= ATOL

    cache = SequenceKVCache(c.num_layers, 1, c.latent_dim, value_dim=0)
    every = ours.compute_logits(ours(torch.tensor(ids), torch.arange(len(ids)),
                                     ContiguousAttention([Segment(cache, 0, len(ids))])))
    MEASURED["contiguous_all_positions"] = (every - reference[:len(ids)]).abs().max().item()
    assert MEASURED["contiguous_all_positions"] <= ATOL


def test_int4_kernel_experts_track_transformers(checkpoint, hf):
    ours, c = load_model(str(checkpoint), progress=False, quantized=QuantizationConfig())
    ids = prompt(c.vocab_size)
    tokens, rows = engine_logits(ours, ids, max_step_tokens=64)
    expected = hf_logits(hf, ids + tokens)[len(ids) - 1:len(ids) - 1 + DECODE_STEPS]
    worst = max((r - e).abs().max().item() for r, e in zip(rows, expected))
    MEASURED["int4_kernel"] = worst
    assert worst <= INT4_KERNEL_ATOL
