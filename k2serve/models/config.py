"""Model hyper-parameters, read from an HF ``config.json`` or from GGUF metadata."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

SUPPORTED_ARCHITECTURES = ("llama",)


@dataclass
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # None, or an HF-style dict: {"rope_type": "linear" | "llama3", "factor": ..., ...}
    rope_scaling: dict | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    @property
    def context_length(self) -> int:
        return self.max_position_embeddings

    def validate(self) -> ModelConfig:
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"unsupported architecture {self.architecture!r} "
                f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) is not a multiple of num_kv_heads ({self.num_kv_heads})"
            )
        if self.rope_scaling is not None:
            rope_type = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            if rope_type not in ("default", "linear", "llama3"):
                raise ValueError(f"unsupported rope scaling type {rope_type!r}")
        return self

    # ------------------------------------------------------------------ HF config.json
    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> ModelConfig:
        arch = cfg.get("model_type", "")
        if arch != "llama":
            raise ValueError(
                f"unsupported architecture model_type={arch!r} architectures={cfg.get('architectures')}"
            )
        for flag in ("attention_bias", "mlp_bias"):
            if cfg.get(flag):
                raise ValueError(f"unsupported Llama variant: {flag}=true")
        if cfg.get("hidden_act", "silu") != "silu":
            raise ValueError(f"unsupported hidden_act {cfg['hidden_act']!r}")
        num_heads = cfg["num_attention_heads"]
        hidden = cfg["hidden_size"]
        # transformers >= 5 writes "rope_parameters" (holding rope_theta and the scaling);
        # older versions write "rope_theta" and "rope_scaling" at the top level.
        rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
        rope_theta = rope.pop("rope_theta", cfg.get("rope_theta", 10000.0))
        if "type" in rope and "rope_type" not in rope:
            rope["rope_type"] = rope.pop("type")
        rope_scaling = rope if rope.get("rope_type", "default") != "default" else None
        return cls(
            architecture=arch,
            vocab_size=cfg["vocab_size"],
            hidden_size=hidden,
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=cfg.get("num_key_value_heads") or num_heads,
            head_dim=cfg.get("head_dim") or hidden // num_heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta),
            rope_scaling=rope_scaling,
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            # LlamaConfig's default is False.
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_id=cfg.get("eos_token_id"),
        ).validate()

    # ------------------------------------------------------------------ GGUF metadata
    @classmethod
    def from_gguf(cls, reader) -> ModelConfig:
        """From a ``gguf.GGUFReader`` (metadata plus the tensor list, for tied embeddings)."""
        from k2serve.models.loaders.gguf import gguf_metadata

        return cls.from_gguf_metadata(gguf_metadata(reader), [t.name for t in reader.tensors])

    @classmethod
    def from_gguf_metadata(cls, meta: dict[str, Any], tensor_names: list[str]) -> ModelConfig:
        arch = meta.get("general.architecture")
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ValueError(f"unsupported GGUF architecture {arch!r}")

        def get(key, default=None, required=False):
            full = f"{arch}.{key}"
            if full not in meta:
                if required:
                    raise ValueError(f"GGUF metadata is missing {full!r}")
                return default
            return meta[full]

        hidden = get("embedding_length", required=True)
        num_heads = get("attention.head_count", required=True)
        head_dim = get("attention.key_length") or hidden // num_heads
        rope_dim = get("rope.dimension_count", head_dim)
        if rope_dim != head_dim:
            raise ValueError(f"partial rotary embeddings are unsupported ({rope_dim=} {head_dim=})")
        vocab = get("vocab_size") or len(meta.get("tokenizer.ggml.tokens", []))
        if not vocab:
            raise ValueError("GGUF metadata has neither vocab_size nor tokenizer.ggml.tokens")

        rope_scaling = None
        scaling_type = get("rope.scaling.type", "none")
        if scaling_type == "linear":
            rope_scaling = {"rope_type": "linear", "factor": float(get("rope.scaling.factor", 1.0))}
        elif scaling_type not in ("none", None):
            raise ValueError(f"unsupported GGUF rope scaling type {scaling_type!r}")
        # Llama 3.1-style scaling is stored by llama.cpp as a per-frequency divisor
        # tensor "rope_freqs.weight"; the loader applies it to the rotary embedding.

        return cls(
            architecture=arch,
            vocab_size=int(vocab),
            hidden_size=hidden,
            intermediate_size=get("feed_forward_length", required=True),
            num_layers=get("block_count", required=True),
            num_heads=num_heads,
            num_kv_heads=get("attention.head_count_kv") or num_heads,
            head_dim=head_dim,
            rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(get("rope.freq_base", 10000.0)),
            rope_scaling=rope_scaling,
            max_position_embeddings=get("context_length", 2048),
            tie_word_embeddings="output.weight" not in tensor_names,
            bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
            eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
        ).validate()
