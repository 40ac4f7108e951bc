"""Idefics3 (SmolVLM) vision-language model, inference only: a SigLIP vision encoder, a
pixel-shuffle connector into the text model's embedding space, and a Llama decoder (ours,
`LlamaForCausalLM`, with its paged attention and KV cache).

The engine calls `embed_images` once per image at prefill (the image's frames: its tiles and
the downscaled whole, as `idefics3_images` prepares them), then passes the embeddings with the
batch rows they replace to `forward`: each `<image>` placeholder token's input embedding is
one row of the connector's output. Checkpoint names are transformers' (`model.vision_model.*`,
`model.connector.*`, `model.text_model.*`, `lm_head.weight`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from k2serve.models.config import ModelConfig
from k2serve.models.layers.attention import AttentionContext, KVCacheSpec
from k2serve.models.llama import LlamaForCausalLM

_ACTIVATIONS = {"gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
                "gelu": F.gelu, "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x)}


@dataclass
class VisionConfig:
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    image_size: int
    patch_size: int
    num_channels: int = 3
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu_pytorch_tanh"

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> VisionConfig:
        act = cfg.get("hidden_act", "gelu_pytorch_tanh")
        if act not in _ACTIVATIONS:
            raise ValueError(f"unsupported vision hidden_act {act!r}")
        return cls(hidden_size=cfg.get("hidden_size", 1152),
                   intermediate_size=cfg.get("intermediate_size", 3072),
                   num_layers=cfg.get("num_hidden_layers", 12),
                   num_heads=cfg.get("num_attention_heads", 16),
                   image_size=cfg.get("image_size", 224), patch_size=cfg.get("patch_size", 32),
                   num_channels=cfg.get("num_channels", 3),
                   layer_norm_eps=cfg.get("layer_norm_eps", 1e-6), hidden_act=act)


@dataclass
class Idefics3Config:
    text: ModelConfig
    vision: VisionConfig
    scale_factor: int
    image_token_id: int
    architecture: str = "idefics3"

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> Idefics3Config:
        text_cfg = dict(cfg.get("text_config") or {})
        text_cfg.setdefault("model_type", "llama")
        # transformers ties lm_head to the embeddings by the top-level flag
        text_cfg["tie_word_embeddings"] = bool(cfg.get("tie_word_embeddings", False))
        text = ModelConfig.from_hf_config(text_cfg)
        vision = VisionConfig.from_hf_config(cfg.get("vision_config") or {})
        config = cls(text, vision, int(cfg.get("scale_factor", 2)),
                     int(cfg.get("image_token_id", 128257)))
        side = vision.image_size // vision.patch_size
        if side % config.scale_factor:
            raise ValueError(f"the vision grid ({side} patches a side) is not a multiple of "
                             f"scale_factor {config.scale_factor}")
        return config

    @property
    def image_seq_len(self) -> int:
        """Embeddings (placeholder tokens) per frame."""
        side = self.vision.image_size // self.vision.patch_size
        return side * side // self.scale_factor ** 2

    # what the engine reads of a text model's config
    @property
    def context_length(self) -> int:
        return self.text.context_length

    @property
    def vocab_size(self) -> int:
        return self.text.vocab_size

    @property
    def eos_token_id(self):
        return self.text.eos_token_id


class VisionEmbeddings(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.patch_size = c.patch_size
        self.patch_embedding = nn.Conv2d(c.num_channels, c.hidden_size, c.patch_size,
                                         stride=c.patch_size)
        self.num_patches_per_side = c.image_size // c.patch_size
        self.position_embedding = nn.Embedding(self.num_patches_per_side ** 2, c.hidden_size)

    def position_ids(self, patches_h: int, patches_w: int) -> torch.Tensor:
        """Each patch's position on the trained grid, for a frame of patches_h x patches_w
        patches: fractional coordinates bucketed into the grid, computed as transformers does
        (the same float32 steps, so the buckets agree to the last bit)."""
        side = self.num_patches_per_side
        boundaries = torch.arange(1 / side, 1.0, 1 / side)
        coords = []
        for count in (patches_h, patches_w):
            step = 1.0 / torch.tensor([count])
            fractional = torch.arange(count, dtype=torch.float32)[None, :] * step[:, None]
            fractional = torch.clamp(fractional, max=(1.0 - 1e-6))
            coords.append(torch.bucketize(fractional, boundaries, right=True)[0])
        return (coords[0][:, None] * side + coords[1][None, :]).reshape(-1)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embedding(pixel_values).flatten(2).transpose(1, 2)
        h, w = (s // self.patch_size for s in pixel_values.shape[-2:])
        return patches + self.position_embedding(self.position_ids(h, w))[None]


class VisionLayer(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        d = c.hidden_size
        self.num_heads, self.head_dim = c.num_heads, d // c.num_heads
        self.layer_norm1 = nn.LayerNorm(d, eps=c.layer_norm_eps)
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(d, d) for _ in range(4))
        self.layer_norm2 = nn.LayerNorm(d, eps=c.layer_norm_eps)
        self.fc1 = nn.Linear(d, c.intermediate_size)
        self.fc2 = nn.Linear(c.intermediate_size, d)
        self.act = _ACTIVATIONS[c.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        h = self.layer_norm1(x)
        q, k, v = (proj(h).view(b, n, self.num_heads, self.head_dim).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        # every patch sees every patch: frames are whole (never padded), so no mask
        attn = F.scaled_dot_product_attention(q, k, v)
        x = x + self.out_proj(attn.transpose(1, 2).reshape(b, n, d))
        return x + self.fc2(self.act(self.fc1(self.layer_norm2(x))))


class VisionTransformer(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.embeddings = VisionEmbeddings(c)
        self.layers = nn.ModuleList(VisionLayer(c) for _ in range(c.num_layers))
        self.post_layernorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.embeddings(pixel_values)
        for layer in self.layers:
            x = layer(x)
        return self.post_layernorm(x)


def pixel_shuffle(x: torch.Tensor, scale: int) -> torch.Tensor:
    """[B, S, D] -> [B, S / scale^2, D * scale^2]: each scale x scale block of neighbouring
    patches becomes one token (Idefics3's connector, in transformers' exact layout)."""
    b, seq, d = x.shape
    side = int(seq ** 0.5)
    x = x.view(b, side, side // scale, d * scale).permute(0, 2, 1, 3)
    x = x.reshape(b, side // scale, side // scale, d * scale * scale).permute(0, 2, 1, 3)
    return x.reshape(b, seq // (scale * scale), d * scale * scale)


class Idefics3ForConditionalGeneration(nn.Module):
    def __init__(self, config: Idefics3Config, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.config = config
        self.language = LlamaForCausalLM(config.text, dtype)
        self.vision = VisionTransformer(config.vision).to(dtype)
        v = config.vision
        self.connector = nn.Linear(v.hidden_size * config.scale_factor ** 2,
                                   config.text.hidden_size, bias=False, dtype=dtype)
        for p in (*self.vision.parameters(), *self.connector.parameters()):
            p.requires_grad_(False)

    @property
    def image_token_id(self) -> int:
        return self.config.image_token_id

    @torch.no_grad()
    def embed_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """One image's frames [F, C, H, W] -> its placeholder embeddings
        [F * image_seq_len, text hidden], frame by frame in order."""
        dtype = self.connector.weight.dtype
        features = self.vision(pixel_values.to(dtype))
        tokens = self.connector(pixel_shuffle(features, self.config.scale_factor))
        return tokens.reshape(-1, tokens.shape[-1])

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionContext,
                image_rows: torch.Tensor | None = None,
                image_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids, positions: [N]; image_rows [M] of them take image_embeds [M, hidden]
        as their input embedding instead of the token's -> hidden states [N, hidden]."""
        embeds = None
        if image_rows is not None and len(image_rows):
            embeds = self.language.model.embed_tokens(input_ids)
            embeds[image_rows] = image_embeds.to(embeds.dtype)
        return self.language.model(input_ids, positions, attn, inputs_embeds=embeds)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.language.compute_logits(hidden)

    def kv_cache_spec(self) -> KVCacheSpec:
        return self.language.kv_cache_spec()

    @property
    def kv_cache_dtype(self) -> torch.dtype:
        return self.language.kv_cache_dtype

    # ------------------------------------------------------------------ weights
    def checkpoint_weight_names(self) -> list[str]:
        names = [_TEXT_PREFIX + n.removeprefix("model.") if n.startswith("model.") else n
                 for n in self.language.checkpoint_weight_names()]
        names += [_VISION_PREFIX + n for n in _vision_names(self.config.vision)]
        names.append(_CONNECTOR)
        return names

    def load_weight(self, name: str, tensor: torch.Tensor) -> None:
        if name.startswith(_TEXT_PREFIX):
            self.language.load_weight("model." + name.removeprefix(_TEXT_PREFIX), tensor)
        elif name == "lm_head.weight":
            self.language.load_weight(name, tensor)
        elif name == _CONNECTOR:
            _copy(self.connector.weight, tensor, name)
        elif name.startswith(_VISION_PREFIX):
            target = _vision_target(self.vision, name.removeprefix(_VISION_PREFIX))
            if target is None:
                raise ValueError(f"unexpected tensor {name!r} for an Idefics3 model")
            _copy(target, tensor, name)
        else:
            raise ValueError(f"unexpected tensor {name!r} for an Idefics3 model")


_TEXT_PREFIX = "model.text_model."
_VISION_PREFIX = "model.vision_model."
_CONNECTOR = "model.connector.modality_projection.proj.weight"
_LAYER_PARTS = ("layer_norm1", "layer_norm2", "self_attn.q_proj", "self_attn.k_proj",
                "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")


def _vision_names(c: VisionConfig) -> list[str]:
    names = ["embeddings.patch_embedding.weight", "embeddings.patch_embedding.bias",
             "embeddings.position_embedding.weight", "post_layernorm.weight",
             "post_layernorm.bias"]
    for i in range(c.num_layers):
        names += [f"encoder.layers.{i}.{part}.{leaf}" for part in _LAYER_PARTS
                  for leaf in ("weight", "bias")]
    return names


def _vision_target(vision: VisionTransformer, name: str) -> torch.Tensor | None:
    """Our parameter for a checkpoint name below model.vision_model."""
    if name.startswith("encoder.layers."):
        index, _, rest = name.removeprefix("encoder.layers.").partition(".")
        rest = rest.removeprefix("self_attn.").removeprefix("mlp.")
        name = f"layers.{index}.{rest}"
    try:
        return vision.get_parameter(name)
    except AttributeError:
        return None


def _copy(target: torch.Tensor, tensor: torch.Tensor, name: str) -> None:
    if tuple(tensor.shape) != tuple(target.shape):
        raise ValueError(f"tensor {name!r}: expected shape {tuple(target.shape)}, "
                         f"got {tuple(tensor.shape)}")
    target.data.copy_(tensor)
