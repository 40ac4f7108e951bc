"""Llama-architecture decoder (Llama 2/3, SmolLM, ...), inference only.

Tokens of every sequence in a step are flattened into one dimension N; attention (and
the KV cache behind it) lives in the ``AttentionContext`` passed to ``forward``.
Checkpoint tensors use HF names (``model.layers.0.self_attn.q_proj.weight``); the
loaders translate other formats to those names and ``load_weight`` maps them onto the
fused modules here.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from k2serve import native
from k2serve.models.config import ModelConfig
from k2serve.models.layers.attention import AttentionContext, KVCacheSpec, rotate_qkv
from k2serve.models.layers.gguf_blocks import QuantizedTensor
from k2serve.models.layers.int4_linear import Int4Linear
from k2serve.models.layers.linear import Linear, MergedLinear
from k2serve.models.layers.lm_head import QuantizedLMHead
from k2serve.models.layers.norm import RMSNorm
from k2serve.models.layers.quantization import QuantizationConfig
from k2serve.models.layers.rotary import RotaryEmbedding, apply_rotary

# checkpoint projection -> (our fused module, shard within it)
_STACKED = {
    "q_proj": ("qkv_proj", "q"),
    "k_proj": ("qkv_proj", "k"),
    "v_proj": ("qkv_proj", "v"),
    "gate_proj": ("gate_up_proj", "gate"),
    "up_proj": ("gate_up_proj", "up"),
}
ROPE_FREQ_FACTORS = "model.rotary_emb.freq_factors"  # GGUF rope_freqs.weight (Llama 3.1 scaling)


def _linear(in_features: int, out: int | dict[str, int], dtype: torch.dtype,
            quant: QuantizationConfig | None) -> nn.Module:
    """A (merged, when ``out`` maps shard names to rows) linear: float, or int4 when quantized."""
    if quant is not None:
        return Int4Linear(in_features, out, quant.dense_min_rows, quant.dense_copy, quant.dense_dtype,
                          quant.native)
    if isinstance(out, dict):
        return MergedLinear(in_features, out, dtype)
    return Linear(in_features, out, dtype)


class _FusedRMSNorm:
    """An RMSNorm in 4 ops instead of F.rms_norm's ~10 (CPU): x * rsqrt(mean(x^2) + eps) * w
    == x / hypot(||x||, sqrt(H eps)) * (w sqrt(H)). Built from a loaded ``RMSNorm``.

    ``add_norm`` also takes the residual add, in one native call where the kernels are built
    (the add and the 4 ops cost ~15 us a norm in dispatch alone, 60 norms a decode step)."""

    def __init__(self, norm: RMSNorm):
        hidden = norm.weight.shape[-1]
        self.weight = norm.weight.detach() * math.sqrt(hidden)
        self.eps = torch.tensor(math.sqrt(hidden * norm.eps), dtype=norm.weight.dtype)
        kernels = native.kernels() if norm.weight.dtype == torch.float32 else None
        self._native = kernels.add_rms_norm if kernels is not None else None
        self._native_weight, self._native_eps = norm.weight.detach().contiguous(), norm.eps

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x / torch.hypot(torch.linalg.vector_norm(x, dim=-1, keepdim=True), self.eps) * self.weight

    def add_norm(self, x: torch.Tensor, residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual); residual None: (norm(x), x)."""
        if self._native is not None:
            return self._native(x, residual, self._native_weight, self._native_eps)
        residual = x if residual is None else x + residual
        return self(residual), residual


def _silu_mul_op():
    """silu(gate) * up of a fused [N, 2I] gate/up projection output (float32 or bfloat16):
    one native call where the kernels are built. Chosen once, off the decode loop."""
    kernels = native.kernels()
    if kernels is not None:
        return kernels.silu_mul

    def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, -1)
        return F.silu(gate) * up

    return silu_mul


def _decode_stack(model: LlamaModel):
    """The native ``LlamaDecodeStack`` running ``model``'s layers for steps whose rows are all
    decode rows (its outputs bitwise those of ``forward_quantized``'s per-op path), or None
    where that path does not run our kernels throughout (torch's int4 kernel, no native
    build)."""
    kernels = native.kernels()
    layers = list(model.layers)
    if kernels is None or not layers:
        return None
    attention = layers[0].self_attn
    norms = [norm for layer in layers for norm in layer._fused_norms] + [model._fused_norm]
    linears = [[layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj]
               for layer in layers]
    if any(norm._native is None for norm in norms) or layers[0]._silu_mul is not kernels.silu_mul:
        return None
    if any(linear._native_path is None for row in linears for linear in row):
        return None
    final = model._fused_norm
    stack = kernels.LlamaDecodeStack(attention.num_heads, attention.num_kv_heads, attention.head_dim,
                                     attention.scale, final._native_weight, final._native_eps)
    for layer, row in zip(layers, linears):
        norm1, norm2 = layer._fused_norms
        stack.add_layer(norm1._native_weight, norm1._native_eps, norm2._native_weight, norm2._native_eps,
                        [(lin.packed, lin.scales, lin.mins, lin._native_path == "amx") for lin in row])
    return stack


class LlamaAttention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, dtype: torch.dtype,
                 quant: QuantizationConfig | None = None):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.scale = self.head_dim ** -0.5
        self.qkv_proj = _linear(
            config.hidden_size, {"q": self.q_size, "k": self.kv_size, "v": self.kv_size}, dtype, quant)
        self.o_proj = _linear(self.q_size, config.hidden_size, dtype, quant)

    def forward(self, x, cos, sin, attn: AttentionContext):
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = apply_rotary(q.view(-1, self.num_heads, self.head_dim), cos, sin)
        k = apply_rotary(k.view(-1, self.num_kv_heads, self.head_dim), cos, sin)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        out = attn.attend(self.layer_idx, q, k, v, self.scale)
        return self.o_proj(out.reshape(-1, self.q_size))


class LlamaMLP(nn.Module):
    def __init__(self, config: ModelConfig, dtype: torch.dtype, quant: QuantizationConfig | None = None):
        super().__init__()
        size = config.intermediate_size
        self.gate_up_proj = _linear(config.hidden_size, {"gate": size, "up": size}, dtype, quant)
        self.down_proj = _linear(size, config.hidden_size, dtype, quant)

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, dtype: torch.dtype,
                 quant: QuantizationConfig | None = None):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.self_attn = LlamaAttention(config, layer_idx, dtype, quant)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.mlp = LlamaMLP(config, dtype, quant)

    def forward(self, x, residual, cos, sin, attn):
        if residual is None:
            residual, x = x, self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(x, cos, sin, attn)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual

    def forward_quantized(self, x, residual, cos, sin_signed, attn):
        """``forward`` of a quantized model (Int4Linear), with fewer, fused ops: per-op
        overhead is a large share of its decode step. The linears follow the step's dense-row
        plan (``attn.dense_rows``). ``sin_signed``: sin with its first half negated, so that
        rotate_half(t) * sin == t.roll(half) * sin_signed. The int4 kernel
        takes and returns bfloat16: its outputs feed the next op without a conversion where
        that op promotes to float32 itself (residual adds, RoPE); silu(gate) * up stays
        bfloat16 for down_proj. With float32 weights (big steps) everything is float32 and
        the maths is ``forward``'s (up to float rounding: RMSNorm as ``_FusedRMSNorm``).
        Residual add + RMSNorm and silu * mul are one native call each where the kernels
        are built (``_FusedRMSNorm.add_norm``, ``_silu_mul_op``)."""
        norm1, norm2 = self._fused_norms
        attn_mod, mlp = self.self_attn, self.mlp
        dense_rows = attn.dense_rows
        n = x.shape[0]
        heads, head_dim = attn_mod.num_heads, attn_mod.head_dim
        normed, residual = norm1.add_norm(x, residual)
        qkv = attn_mod.qkv_proj.forward_raw(normed, dense_rows)
        if hasattr(attn, "attend_rotary"):  # the paged pool: decodes in one native call
            out = attn.attend_rotary(attn_mod.layer_idx, qkv, cos, sin_signed, heads,
                                     attn_mod.num_kv_heads, head_dim, attn_mod.scale)
        else:
            q, k, v = rotate_qkv(qkv, cos, sin_signed, heads, head_dim)
            out = attn.attend(attn_mod.layer_idx, q, k, v, attn_mod.scale)
        normed, residual = norm2.add_norm(
            attn_mod.o_proj.forward_raw(out.reshape(n, attn_mod.q_size), dense_rows), residual)
        gate_up = mlp.gate_up_proj.forward_raw(normed, dense_rows)
        return mlp.down_proj.forward_raw(self._silu_mul(gate_up), dense_rows), residual

    def prepare_quantized(self) -> None:
        """Derive what ``forward_quantized`` needs from the loaded weights."""
        self._fused_norms = (_FusedRMSNorm(self.input_layernorm), _FusedRMSNorm(self.post_attention_layernorm))
        self._silu_mul = _silu_mul_op()


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig, dtype: torch.dtype, quant: QuantizationConfig | None = None):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, dtype=dtype)
        self.embed_tokens.weight.requires_grad_(False)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, i, dtype, quant) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.rotary_emb = RotaryEmbedding(config.head_dim, config.rope_theta, config.rope_scaling)
        self.quantized = quant is not None  # layers run LlamaDecoderLayer.forward_quantized
        # a quantized model's steps of decode rows only (``attn.decode_only``: decodes, short
        # prompts) in one native call, when fewer than decode_stack_rows rows (set by
        # finish_loading; None: per-op forward_quantized)
        self.decode_stack = None
        self.decode_stack_rows = 0

    def forward(self, input_ids, positions, attn, inputs_embeds=None):
        """inputs_embeds: the rows' input embeddings when given (a vision model's image
        rows spliced into the tokens'), else the tokens' own."""
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        cos, sin = self.rotary_emb(positions, x.dtype)
        residual = None
        if self.quantized:
            half = sin.shape[-1] // 2
            sin = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
            if (self.decode_stack is not None and x.shape[0] < self.decode_stack_rows
                    and getattr(attn, "decode_only", False)):
                return self.decode_stack.forward(
                    x, cos[:, 0], sin[:, 0], attn.k_pool, attn.v_pool, attn.slot_mapping,
                    attn.decode_block_tables, attn.decode_lens, attn.block_size)
            for layer in self.layers:
                x, residual = layer.forward_quantized(x, residual, cos, sin, attn)
            return self._fused_norm.add_norm(x, residual)[0]
        for layer in self.layers:
            x, residual = layer(x, residual, cos, sin, attn)
        x, _ = self.norm(x, residual)
        return x


class LlamaForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig, dtype: torch.dtype = torch.float32,
                 quantization: QuantizationConfig | None = None):
        """quantization: None (every weight dense in ``dtype``) or keep GGUF 4-bit weights
        4-bit (``Int4Linear``) and run the LM head as ``QuantizedLMHead`` (float32 model)."""
        super().__init__()
        if quantization is not None and dtype != torch.float32:
            raise ValueError("a quantized model computes in float32 (dtype=torch.float32)")
        self.config = config
        self.quantization = quantization
        self.model = LlamaModel(config, dtype, quantization)
        if quantization is not None:
            # tied or not, the head is its own module (the tied one shares the embeddings'
            # dense float32 weight and adds a small-M kernel of its own)
            self.lm_head = QuantizedLMHead(config.hidden_size, config.vocab_size, quantization)
        else:
            self.lm_head = None if config.tie_word_embeddings else Linear(config.hidden_size, config.vocab_size, dtype)

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionContext) -> torch.Tensor:
        """input_ids, positions: [N] -> hidden states [N, hidden]."""
        return self.model(input_ids, positions, attn)

    def kv_cache_spec(self) -> KVCacheSpec:
        c = self.config
        return KVCacheSpec(c.num_layers, c.num_kv_heads, c.head_dim, c.head_dim)

    @property
    def kv_cache_dtype(self) -> torch.dtype:
        """The engine's KV pool dtype for this model: bfloat16 when quantized (its linears
        take bfloat16 activations, and k/v come out of them bfloat16), else its own dtype."""
        return torch.bfloat16 if self.quantization is not None else self.model.embed_tokens.weight.dtype

    @torch.no_grad()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[M, hidden] -> float32 logits [M, vocab]."""
        if self.quantization is not None:
            return self.lm_head(hidden)
        weight = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(hidden, weight).float()

    # ------------------------------------------------------------------ weights
    def checkpoint_weight_names(self) -> list[str]:
        """HF names of every tensor this model needs from a checkpoint."""
        names = ["model.embed_tokens.weight"]
        for i in range(self.config.num_layers):
            p = f"model.layers.{i}."
            names += [p + "input_layernorm.weight", p + "post_attention_layernorm.weight"]
            names += [p + f"self_attn.{proj}.weight" for proj in ("q_proj", "k_proj", "v_proj", "o_proj")]
            names += [p + f"mlp.{proj}.weight" for proj in ("gate_proj", "up_proj", "down_proj")]
        names.append("model.norm.weight")
        if not self.config.tie_word_embeddings:
            names.append("lm_head.weight")
        return names

    def finish_loading(self) -> None:
        """After every checkpoint tensor is loaded: pack quantized weights (no-op unquantized)."""
        if self.quantization is None:
            return
        for module in self.modules():
            if isinstance(module, Int4Linear) and module is not self.lm_head:
                module.finish_loading()
        shared = self.model.embed_tokens.weight if self.config.tie_word_embeddings else None
        self.lm_head.finish_loading(dense_weight=shared)
        for layer in self.model.layers:
            layer.prepare_quantized()
        self.model._fused_norm = _FusedRMSNorm(self.model.norm)
        self.model.decode_stack = _decode_stack(self.model)
        if self.model.decode_stack is not None:
            self.model.decode_stack_rows = min(
                linear._dense_from for linear in self.modules()
                if isinstance(linear, Int4Linear) and linear is not self.lm_head)

    def load_weight(self, name: str, tensor: torch.Tensor | QuantizedTensor) -> None:
        """Copy one checkpoint tensor (HF name) into the model; ValueError naming it on mismatch.

        A ``QuantizedTensor`` (raw GGUF blocks) is kept quantized by ``Int4Linear`` modules
        and dequantized to float32 for everything else."""
        if name == ROPE_FREQ_FACTORS:
            if isinstance(tensor, QuantizedTensor):
                tensor = tensor.dequantize()
            self.model.rotary_emb.set_freq_factors(tensor)
            return
        if name.endswith("rotary_emb.inv_freq") or (name == "lm_head.weight" and self.config.tie_word_embeddings):
            return  # recomputed / tied to the embeddings
        if self.quantization is not None and (
                name == "lm_head.weight" or (name == "model.embed_tokens.weight" and self.config.tie_word_embeddings)):
            try:
                self.lm_head.load(tensor)
            except ValueError as e:
                raise ValueError(f"tensor {name!r}: {e}") from None
            if name == "lm_head.weight":
                return
        module_path, _, leaf = name.rpartition(".")
        parent, _, proj = module_path.rpartition(".")
        shard = None
        if proj in _STACKED:
            fused, shard = _STACKED[proj]
            module_path = f"{parent}.{fused}"
        try:
            module = self.get_submodule(module_path)
        except AttributeError:
            module = None
        if leaf != "weight" or module is None or not hasattr(module, "weight"):
            raise ValueError(f"unexpected tensor {name!r} for a Llama model")
        try:
            if isinstance(tensor, QuantizedTensor) and not isinstance(module, Int4Linear):
                tensor = tensor.dequantize()  # norms, embeddings: float32
            if isinstance(module, (Linear, Int4Linear)):
                module.load(tensor, shard)
            elif tuple(tensor.shape) != tuple(module.weight.shape):
                raise ValueError(f"expected shape {tuple(module.weight.shape)}, got {tuple(tensor.shape)}")
            else:
                module.weight.data.copy_(tensor)
        except ValueError as e:
            raise ValueError(f"tensor {name!r}: {e}") from None
