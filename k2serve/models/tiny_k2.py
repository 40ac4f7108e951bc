"""A tiny random-weight Kimi K2 checkpoint in K2's real on-disk layout, for tests and demos.

``write_tiny_k2_checkpoint(directory)`` writes what a K2 repository holds, at toy sizes:
config.json with K2's keys (model_type kimi_k2, DeepseekV3ForCausalLM, auto_map, YaRN
rope_scaling, quantization_config fp8 128x128), generation_config.json, sharded
safetensors ``model-0000i-of-0000N.safetensors`` + ``model.safetensors.index.json`` in HF
DeepseekV3 names, and the K2 tokenizer files (``tiny_k2_tokenizer``). With
``fp8=True`` the attention / MLP / expert linears are float8_e4m3fn with float32
``weight_scale_inv`` block scales, as K2 ships them (one partial 128x128 block per weight at
these sizes); embeddings, lm_head, norms and the router stay bf16, the correction bias fp32.
The same seed gives the same underlying weights with ``fp8`` on or off.

``int4_experts=True`` writes K2-Thinking's layout instead: the routed experts in
compressed-tensors' pack-quantized INT4 (symmetric, group 32: ``X.weight_packed`` int32,
``X.weight_scale`` bf16, ``X.weight_shape``), everything else bf16, and K2-Thinking's
``quantization_config`` (``loaders/compressed_tensors.py``). The experts' underlying weights
are then their int4 projection, (code - 8) * scale, exactly.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from k2serve.models.deepseek_config import DeepseekV3Config
from k2serve.models.deepseek_v3 import checkpoint_shapes
from k2serve.models.loaders.compressed_tensors import (
    PACKED,
    SCALE,
    SHAPE,
    pack_int4,
    quantize_int4_symmetric,
)
from k2serve.models.loaders.fp8 import SCALE_SUFFIX, quantize_fp8_blocks
from k2serve.models.tiny_k2_tokenizer import write_tiny_k2_tokenizer_files

BLOCK = (128, 128)
INT4_GROUP = 32
# Kimi-K2-Thinking's config.json quantization_config: every Linear but attention, the shared
# experts, the dense layers' MLP and lm_head is pack-quantized int4, i.e. the routed experts.
K2_THINKING_QUANTIZATION = {
    "config_groups": {"group_0": {
        "input_activations": None, "output_activations": None, "targets": ["Linear"],
        "weights": {"actorder": None, "block_structure": None, "dynamic": False,
                    "group_size": INT4_GROUP, "num_bits": 4, "observer": "minmax",
                    "observer_kwargs": {}, "strategy": "group", "symmetric": True,
                    "type": "int"}}},
    "format": "pack-quantized",
    "ignore": ["lm_head", "re:.*self_attn.*", "re:.*shared_experts.*",
               r"re:.*mlp\.(gate|up|gate_up|down)_proj.*"],
    "kv_cache_scheme": None,
    "quant_method": "compressed-tensors",
    "quantization_status": "compressed",
}


def tiny_k2_config(vocab_size: int, *, q_lora_rank: int | None = 32, bos_token_id: int | None = None,
                   eos_token_id: int | None = None, fp8: bool = True,
                   int4_experts: bool = False) -> dict:
    """K2-Instruct's config.json keys (NOTES §1.1) with toy sizes (K2-Thinking's with
    int4_experts)."""
    name = "moonshotai/Kimi-K2-Thinking" if int4_experts else "moonshotai/Kimi-K2-Instruct-0905"
    config = {
        "_name_or_path": name,  # the id it is served under
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "kimi_k2",
        "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekV3Config",
                     "AutoModel": "modeling_deepseek.DeepseekV3Model",
                     "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM"},
        "vocab_size": vocab_size, "bos_token_id": bos_token_id, "eos_token_id": eos_token_id,
        "hidden_size": 64, "num_hidden_layers": 3, "intermediate_size": 128,
        "first_k_dense_replace": 1, "moe_layer_freq": 1,
        "n_routed_experts": 8, "num_experts_per_tok": 2, "n_shared_experts": 1, "moe_intermediate_size": 32,
        "n_group": 2, "topk_group": 1, "topk_method": "noaux_tc", "scoring_func": "sigmoid",
        "norm_topk_prob": True, "routed_scaling_factor": 2.827, "seq_aux": True, "aux_loss_alpha": 0.001,
        "num_attention_heads": 4, "num_key_value_heads": 4,
        "q_lora_rank": q_lora_rank, "kv_lora_rank": 32, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8,
        "v_head_dim": 16,
        "attention_bias": False, "attention_dropout": 0.0, "hidden_act": "silu", "rms_norm_eps": 1e-06,
        "rope_theta": 50000.0,
        "rope_scaling": {"type": "yarn", "factor": 32.0, "original_max_position_embeddings": 128,
                         "beta_fast": 1.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0},
        "max_position_embeddings": 4096,
        "num_nextn_predict_layers": 0,
        "initializer_range": 0.02, "pretraining_tp": 1,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True,
        "transformers_version": "4.48.3",
    }
    if fp8:
        config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                         "weight_block_size": list(BLOCK)}
    if int4_experts:
        config["quantization_config"] = json.loads(json.dumps(K2_THINKING_QUANTIZATION))
    return config


def is_routed_expert(name: str) -> bool:
    return ".mlp.experts." in name and name.endswith(".weight")


def is_fp8_quantized(name: str, shape: tuple[int, ...]) -> bool:
    """K2 quantizes the linears of attention, dense MLPs and experts; not the router."""
    return (len(shape) == 2 and name.endswith(".weight") and (".self_attn." in name or ".mlp." in name)
            and not name.endswith("mlp.gate.weight"))


def random_weights(config: DeepseekV3Config, seed: int) -> dict[str, torch.Tensor]:
    """bf16 weights (fp32 correction bias) scaled so activations stay O(1) through the layers."""
    g = torch.Generator().manual_seed(seed)
    weights = {}
    for name, shape in checkpoint_shapes(config).items():
        if name.endswith("e_score_correction_bias"):
            weights[name] = torch.randn(shape, generator=g) * 0.1  # large enough to change routing
            continue
        if name.endswith("norm.weight"):
            w = torch.rand(shape, generator=g) + 0.5  # non-trivial norms
        elif name == "model.embed_tokens.weight":
            w = torch.randn(shape, generator=g)
        else:
            w = torch.randn(shape, generator=g) * shape[1] ** -0.5
        weights[name] = w.to(torch.bfloat16)
    return weights


def write_tiny_k2_checkpoint(directory: str | os.PathLike, *, seed: int = 0, fp8: bool = True,
                             num_shards: int = 3, q_lora_rank: int | None = 32,
                             tokenizer: bool = True, vocab_size: int = 512,
                             thinking: bool = False, int4_experts: bool = False) -> Path:
    """Write the checkpoint into `directory` (created if needed); returns its path.

    tokenizer: write K2's tokenizer files and size the vocabulary to them; False: no
    tokenizer files, `vocab_size` tokens. thinking: K2-Thinking's tokenizer and template.
    int4_experts: K2-Thinking's INT4 routed experts (not with fp8).
    """
    if fp8 and int4_experts:
        raise ValueError("fp8 and int4_experts are two checkpoint layouts: pick one")
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    bos = eos = end_of_turn = None
    if tokenizer:
        vocab_size = write_tiny_k2_tokenizer_files(str(path), thinking)
        with open(path / "tokenizer_config.json") as f:
            ids = {t["content"]: int(i) for i, t in json.load(f)["added_tokens_decoder"].items()}
        bos, eos, end_of_turn = ids.get("[BOS]"), ids.get("[EOS]"), ids.get("<|im_end|>")

    hf_config = tiny_k2_config(vocab_size, q_lora_rank=q_lora_rank, bos_token_id=bos, eos_token_id=eos,
                               fp8=fp8, int4_experts=int4_experts)
    config = DeepseekV3Config.from_hf_config(hf_config)
    tensors: dict[str, torch.Tensor] = {}
    for name, w in random_weights(config, seed).items():
        if int4_experts and is_routed_expert(name):
            module = name.removesuffix(".weight")
            codes, scale = quantize_int4_symmetric(w, INT4_GROUP)
            tensors[module + PACKED] = pack_int4(codes)
            tensors[module + SCALE] = scale
            tensors[module + SHAPE] = torch.tensor(w.shape)
        elif fp8 and is_fp8_quantized(name, tuple(w.shape)):
            tensors[name], tensors[name + SCALE_SUFFIX] = quantize_fp8_blocks(w, BLOCK)
        else:
            tensors[name] = w
    _write_shards(path, tensors, num_shards)

    with open(path / "config.json", "w") as f:
        json.dump(hf_config, f, indent=2)
    with open(path / "generation_config.json", "w") as f:
        json.dump({"max_length": hf_config["max_position_embeddings"],
                   "eos_token_id": end_of_turn if end_of_turn is not None else eos}, f, indent=2)
    return path


def _write_shards(path: Path, tensors: dict[str, torch.Tensor], num_shards: int) -> None:
    """Split in order (each scale right after its weight) into shards of about equal bytes."""
    names = list(tensors)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    shards: list[list[str]] = [[] for _ in range(num_shards)]
    done = 0
    for name in names:
        shards[min(num_shards - 1, done * num_shards // total)].append(name)
        done += tensors[name].numel() * tensors[name].element_size()
    weight_map = {}
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{num_shards:05d}.safetensors"
        save_file({n: tensors[n].contiguous() for n in shard}, str(path / file), metadata={"format": "pt"})
        weight_map.update({n: file for n in shard})
    with open(path / "model.safetensors.index.json", "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
