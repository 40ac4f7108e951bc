"""DeepSeek-V3 / Kimi K2 hyper-parameters, read from an HF ``config.json``.

Kimi K2 ships ``model_type: "kimi_k2"`` with ``architectures: ["DeepseekV3ForCausalLM"]``;
DeepSeek-V3 itself is ``deepseek_v3``. Keys missing from a config.json take the defaults of
transformers' ``DeepseekV3Config``, so a file means the same thing to both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

MODEL_TYPES = ("kimi_k2", "deepseek_v3")
ARCHITECTURE_NAME = "DeepseekV3ForCausalLM"


def is_deepseek_v3(hf_config: dict[str, Any]) -> bool:
    return (hf_config.get("model_type") in MODEL_TYPES
            or ARCHITECTURE_NAME in (hf_config.get("architectures") or []))


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


@dataclass
class DeepseekV3Config:
    vocab_size: int
    hidden_size: int
    intermediate_size: int  # dense MLP of the first `first_k_dense_replace` layers
    moe_intermediate_size: int  # one routed expert; shared experts are n_shared_experts times it
    num_layers: int
    num_heads: int
    q_lora_rank: int | None  # None: a direct q_proj
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    n_routed_experts: int
    n_shared_experts: int
    num_experts_per_tok: int
    n_group: int
    topk_group: int
    routed_scaling_factor: float
    norm_topk_prob: bool
    first_k_dense_replace: int
    moe_layer_freq: int = 1
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # None, or {"rope_type": "yarn", "factor", "original_max_position_embeddings", "beta_fast",
    # "beta_slow", "mscale", "mscale_all_dim", ...}
    rope_scaling: dict | None = None
    rope_interleave: bool = True  # rope dims stored as pairs (0,1),(2,3)... (DeepSeek's layout)
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    num_nextn_predict_layers: int = 0  # MTP layers after the last one; not used for decoding
    quantization_config: dict | None = None
    model_type: str = "deepseek_v3"
    architecture: str = "deepseek_v3"  # what load_model dispatches on

    @property
    def context_length(self) -> int:
        return self.max_position_embeddings

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def latent_dim(self) -> int:
        """Cached values per token per layer: normalised c_kv then the roped k_pe."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    def is_moe_layer(self, layer_idx: int) -> bool:
        # DeepSeek's rule; transformers ignores moe_layer_freq (always 1 in released configs).
        return (self.n_routed_experts > 0 and layer_idx >= self.first_k_dense_replace
                and layer_idx % self.moe_layer_freq == 0)

    def softmax_scale(self) -> float:
        """qk_head_dim^-0.5, times mscale(factor, mscale_all_dim)^2 under YaRN (as transformers)."""
        scale = self.qk_head_dim ** -0.5
        rope = self.rope_scaling
        if rope and rope.get("mscale_all_dim"):
            m = yarn_mscale(self.yarn_factor(), rope["mscale_all_dim"])
            scale *= m * m
        return scale

    def yarn_factor(self) -> float:
        factor = self.rope_scaling.get("factor")
        if factor is None:  # transformers: the ratio of the context lengths
            factor = self.max_position_embeddings / self.rope_scaling["original_max_position_embeddings"]
        return float(factor)

    def validate(self) -> DeepseekV3Config:
        if self.n_routed_experts:
            if self.n_routed_experts % self.n_group:
                raise ValueError(f"n_routed_experts ({self.n_routed_experts}) is not a multiple of "
                                 f"n_group ({self.n_group})")
            per_group = self.n_routed_experts // self.n_group
            if per_group < 2 or self.topk_group > self.n_group:
                raise ValueError(f"bad expert grouping: {self.n_group=} {self.topk_group=} {per_group=}")
            if self.num_experts_per_tok > self.topk_group * per_group:
                raise ValueError(f"num_experts_per_tok ({self.num_experts_per_tok}) exceeds the experts "
                                 f"of the {self.topk_group} selectable groups")
        if self.rope_scaling is not None:
            rope_type = self.rope_scaling.get("rope_type")
            if rope_type != "yarn":
                raise ValueError(f"unsupported rope scaling type {rope_type!r} for DeepSeek-V3 (yarn only)")
            if "original_max_position_embeddings" not in self.rope_scaling:
                raise ValueError("yarn rope scaling needs original_max_position_embeddings")
        if self.qk_rope_head_dim % 2:
            raise ValueError(f"qk_rope_head_dim must be even, got {self.qk_rope_head_dim}")
        return self

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> DeepseekV3Config:
        if not is_deepseek_v3(cfg):
            raise ValueError(f"not a DeepSeek-V3 config: model_type={cfg.get('model_type')!r} "
                             f"architectures={cfg.get('architectures')}")
        if cfg.get("hidden_act", "silu") != "silu":
            raise ValueError(f"unsupported hidden_act {cfg['hidden_act']!r}")
        if cfg.get("attention_bias"):
            raise ValueError("unsupported DeepSeek-V3 variant: attention_bias=true")
        if cfg.get("scoring_func", "sigmoid") != "sigmoid" or cfg.get("topk_method", "noaux_tc") != "noaux_tc":
            raise ValueError(f"unsupported MoE routing scoring_func={cfg.get('scoring_func')!r} "
                             f"topk_method={cfg.get('topk_method')!r} (sigmoid + noaux_tc only)")
        # transformers >= 5 writes "rope_parameters" (holding rope_theta); K2's own config.json
        # has "rope_theta" and "rope_scaling" (with "type") at the top level.
        rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
        rope_theta = rope.pop("rope_theta", cfg.get("rope_theta", 10000.0))
        if "type" in rope:
            rope.setdefault("rope_type", rope.pop("type"))
        rope_scaling = rope if rope.get("rope_type", "default") != "default" else None
        quant = cfg.get("quantization_config")
        return cls(
            vocab_size=cfg.get("vocab_size", 129280),
            hidden_size=cfg.get("hidden_size", 7168),
            intermediate_size=cfg.get("intermediate_size", 18432),
            moe_intermediate_size=cfg.get("moe_intermediate_size", 2048),
            num_layers=cfg.get("num_hidden_layers", 61),
            num_heads=cfg.get("num_attention_heads", 128),
            q_lora_rank=cfg.get("q_lora_rank", 1536),
            kv_lora_rank=cfg.get("kv_lora_rank", 512),
            qk_nope_head_dim=cfg.get("qk_nope_head_dim", 128),
            qk_rope_head_dim=cfg.get("qk_rope_head_dim", 64),
            v_head_dim=cfg.get("v_head_dim", 128),
            n_routed_experts=cfg.get("n_routed_experts") or 0,
            n_shared_experts=cfg.get("n_shared_experts") or 0,
            num_experts_per_tok=cfg.get("num_experts_per_tok", 8),
            n_group=cfg.get("n_group", 8),
            topk_group=cfg.get("topk_group", 4),
            routed_scaling_factor=float(cfg.get("routed_scaling_factor", 2.5)),
            norm_topk_prob=bool(cfg.get("norm_topk_prob", True)),
            first_k_dense_replace=cfg.get("first_k_dense_replace", 3),
            moe_layer_freq=cfg.get("moe_layer_freq", 1),
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta),
            rope_scaling=rope_scaling,
            rope_interleave=bool(cfg.get("rope_interleave", True)),
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_id=cfg.get("eos_token_id"),
            num_nextn_predict_layers=cfg.get("num_nextn_predict_layers", 0) or 0,
            quantization_config=dict(quant) if quant else None,
            model_type=cfg.get("model_type", "deepseek_v3"),
        ).validate()
