"""DeepSeek-V3 / Kimi K2 decoder (MLA attention, noaux_tc MoE), inference only.

Same interface as ``LlamaForCausalLM``: tokens of every sequence in a step are flattened
into one dimension N; attention and its latent cache live behind the ``AttentionContext``
(see ``layers/mla.py`` for the absorbed MLA and ``layers/moe.py`` for routing). Checkpoint
tensors use HF DeepseekV3 names; FP8 checkpoints reach ``load_weight`` already dequantized
(``loaders/fp8.py``). Layers from index ``num_hidden_layers`` on (MTP) are skipped.

Weights as held here: ``self_attn.fused_qkv_a_proj`` stacks q_a_proj (q_proj without a
q LoRA) and kv_a_proj_with_mqa into one matmul, dense MLPs and shared experts stack gate and
up, routed experts are stacked per layer (``layers/moe.py``), and kv_b_proj is split into
the absorbed attention's ``w_uk`` / ``w_uv`` (``layers/mla.py``). The cache holds one latent
per token, [normalised c_kv | roped k_pe], whose first kv_lora_rank dims are the values
(``KVCacheSpec.values_in_keys``).
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from k2serve.models.deepseek_config import DeepseekV3Config
from k2serve.models.layers.attention import AttentionContext, KVCacheSpec
from k2serve.models.layers.int4_linear import Int4Linear
from k2serve.models.layers.linear import Linear
from k2serve.models.layers.mla import MLAttention
from k2serve.models.layers.moe import (
    DeepseekMoE,
    Int4RoutedExperts,
    NoAuxTCRouter,
    SwiGLUMLP,
)
from k2serve.models.layers.norm import RMSNorm
from k2serve.models.layers.quantization import QuantizationConfig
from k2serve.models.layers.yarn_rotary import DeepseekRotaryEmbedding

_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")
_EXPERT = re.compile(r"mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight")
# checkpoint projection (within a layer) -> (our module, shard of a MergedLinear or None)
_FUSED = {
    "self_attn.q_proj.weight": ("self_attn.fused_qkv_a_proj", "q_proj"),
    "self_attn.q_a_proj.weight": ("self_attn.fused_qkv_a_proj", "q_a_proj"),
    "self_attn.kv_a_proj_with_mqa.weight": ("self_attn.fused_qkv_a_proj", "kv_a_proj_with_mqa"),
    "mlp.gate_proj.weight": ("mlp.gate_up_proj", "gate"),
    "mlp.up_proj.weight": ("mlp.gate_up_proj", "up"),
    "mlp.shared_experts.gate_proj.weight": ("mlp.shared_experts.gate_up_proj", "gate"),
    "mlp.shared_experts.up_proj.weight": ("mlp.shared_experts.gate_up_proj", "up"),
}


def checkpoint_shapes(c: DeepseekV3Config) -> dict[str, tuple[int, ...]]:
    """HF name -> shape of every tensor a checkpoint must provide (FP8 scales aside)."""
    h, heads = c.hidden_size, c.num_heads
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (c.vocab_size, h)}
    for i in range(c.num_layers):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (h,)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
        a = p + "self_attn."
        if c.q_lora_rank is None:
            shapes[a + "q_proj.weight"] = (heads * c.qk_head_dim, h)
        else:
            shapes[a + "q_a_proj.weight"] = (c.q_lora_rank, h)
            shapes[a + "q_a_layernorm.weight"] = (c.q_lora_rank,)
            shapes[a + "q_b_proj.weight"] = (heads * c.qk_head_dim, c.q_lora_rank)
        shapes[a + "kv_a_proj_with_mqa.weight"] = (c.latent_dim, h)
        shapes[a + "kv_a_layernorm.weight"] = (c.kv_lora_rank,)
        shapes[a + "kv_b_proj.weight"] = (heads * (c.qk_nope_head_dim + c.v_head_dim), c.kv_lora_rank)
        shapes[a + "o_proj.weight"] = (h, heads * c.v_head_dim)
        m = p + "mlp."
        if c.is_moe_layer(i):
            inter = c.moe_intermediate_size
            shapes[m + "gate.weight"] = (c.n_routed_experts, h)
            shapes[m + "gate.e_score_correction_bias"] = (c.n_routed_experts,)
            experts = [f"experts.{e}." for e in range(c.n_routed_experts)]
            if c.n_shared_experts:
                experts.append("shared_experts.")
            for e in experts:
                size = inter * c.n_shared_experts if e == "shared_experts." else inter
                shapes[m + e + "gate_proj.weight"] = (size, h)
                shapes[m + e + "up_proj.weight"] = (size, h)
                shapes[m + e + "down_proj.weight"] = (h, size)
        else:
            shapes[m + "gate_proj.weight"] = (c.intermediate_size, h)
            shapes[m + "up_proj.weight"] = (c.intermediate_size, h)
            shapes[m + "down_proj.weight"] = (h, c.intermediate_size)
    shapes["model.norm.weight"] = (h,)
    if not c.tie_word_embeddings:
        shapes["lm_head.weight"] = (c.vocab_size, h)
    return shapes


class DeepseekV3DecoderLayer(nn.Module):
    def __init__(self, config: DeepseekV3Config, layer_idx: int, dtype: torch.dtype,
                 quantization: QuantizationConfig | None = None):
        super().__init__()
        c = config
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, dtype)
        self.self_attn = MLAttention(c, layer_idx, dtype)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, dtype)
        if c.is_moe_layer(layer_idx):
            router = NoAuxTCRouter(c.hidden_size, c.n_routed_experts, c.num_experts_per_tok, c.n_group,
                                   c.topk_group, c.norm_topk_prob, c.routed_scaling_factor)
            experts = None
            if quantization is not None:  # routed experts 4-bit (a pack-quantized checkpoint's)
                experts = Int4RoutedExperts(c.n_routed_experts, c.hidden_size, c.moe_intermediate_size,
                                            quantization.expert_dense_min_rows, quantization.native)
            self.mlp = DeepseekMoE(c.hidden_size, c.n_routed_experts, c.moe_intermediate_size,
                                   c.n_shared_experts, router, dtype, experts)
        else:
            self.mlp = SwiGLUMLP(c.hidden_size, c.intermediate_size, dtype)

    def forward(self, x, residual, cos, sin, attn):
        if residual is None:
            residual, x = x, self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(x, cos, sin, attn)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class DeepseekV3Model(nn.Module):
    def __init__(self, config: DeepseekV3Config, dtype: torch.dtype,
                 quantization: QuantizationConfig | None = None):
        super().__init__()
        c = config
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size, dtype=dtype)
        self.embed_tokens.weight.requires_grad_(False)
        self.layers = nn.ModuleList(DeepseekV3DecoderLayer(c, i, dtype, quantization) for i in range(c.num_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps, dtype)
        factor = c.yarn_factor() if c.rope_scaling else None
        self.rotary_emb = DeepseekRotaryEmbedding(c.qk_rope_head_dim, c.rope_theta, c.rope_scaling, factor)

    def forward(self, input_ids, positions, attn):
        x = self.embed_tokens(input_ids)
        cos, sin = self.rotary_emb(positions, x.dtype)
        residual = None
        for layer in self.layers:
            x, residual = layer(x, residual, cos, sin, attn)
        x, _ = self.norm(x, residual)
        return x


class DeepseekV3ForCausalLM(nn.Module):
    def __init__(self, config: DeepseekV3Config, dtype: torch.dtype = torch.float32,
                 quantization: QuantizationConfig | None = None):
        """quantization: keep the routed experts 4-bit where the checkpoint's are (``load_weight``
        then takes ``PackedInt4Tensor``s for them; ``finish_loading`` packs); the rest stays
        dense in ``dtype``."""
        super().__init__()
        self.config = config
        self.model = DeepseekV3Model(config, dtype, quantization)
        self.lm_head = None if config.tie_word_embeddings else Linear(config.hidden_size, config.vocab_size, dtype)
        self._shapes = checkpoint_shapes(config)

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionContext) -> torch.Tensor:
        """input_ids, positions: [N] -> hidden states [N, hidden]."""
        return self.model(input_ids, positions, attn)

    def kv_cache_spec(self) -> KVCacheSpec:
        c = self.config
        return KVCacheSpec(c.num_layers, 1, c.latent_dim, c.kv_lora_rank, values_in_keys=True)

    @torch.no_grad()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[M, hidden] -> float32 logits [M, vocab]."""
        weight = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(hidden, weight).float()

    # ------------------------------------------------------------------ weights
    def checkpoint_weight_names(self) -> list[str]:
        """HF names of every tensor this model needs from a checkpoint."""
        return list(self._shapes)

    def finish_loading(self) -> None:
        """Pack the 4-bit experts once all their tensors are in (after the last ``load_weight``)."""
        for name, module in self.named_modules():
            if isinstance(module, Int4Linear):
                try:
                    module.finish_loading()
                except ValueError as e:
                    raise ValueError(f"{name}: {e}") from None

    def load_weight(self, name: str, tensor) -> None:
        """Copy one checkpoint tensor (HF name) into the model; ValueError naming it on mismatch.
        A 4-bit tensor (``PackedInt4Tensor``) stays 4-bit for a quantized expert, else is
        dequantized."""
        layer = _LAYER.fullmatch(name)
        if layer and int(layer.group(1)) >= self.config.num_layers:
            return  # multi-token-prediction layers: not used for decoding
        if name.endswith("rotary_emb.inv_freq") or (name == "lm_head.weight" and self.lm_head is None):
            return  # recomputed / tied to the embeddings
        expected = self._shapes.get(name)
        if expected is None:
            raise ValueError(f"unexpected tensor {name!r} for a DeepSeek-V3 model")
        if tuple(tensor.shape) != expected:
            raise ValueError(f"tensor {name!r}: expected shape {expected}, got {tuple(tensor.shape)}")
        expert = _EXPERT.fullmatch(layer.group(2)) if layer else None
        experts = self.model.layers[int(layer.group(1))].mlp.experts if expert else None
        if not isinstance(tensor, torch.Tensor) and not isinstance(experts, Int4RoutedExperts):
            tensor = tensor.dequantize()
        if layer is None:
            self.get_submodule(name.rpartition(".")[0]).weight.data.copy_(tensor)
            return
        block = self.model.layers[int(layer.group(1))]
        local = layer.group(2)
        if local == "self_attn.kv_b_proj.weight":
            block.self_attn.load_kv_b_proj(tensor)
        elif local in _FUSED:
            module, shard = _FUSED[local]
            block.get_submodule(module).load(tensor, shard)
        elif expert:
            experts.load_expert(int(expert.group(1)), expert.group(2), tensor)
        elif local == "mlp.gate.e_score_correction_bias":
            block.mlp.gate.e_score_correction_bias.copy_(tensor)
        else:
            block.get_submodule(local.rpartition(".")[0]).weight.data.copy_(tensor)
