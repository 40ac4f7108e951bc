"""MPNet encoder (the architecture of all-mpnet-base-v2): BERT-like post-LayerNorm layers plus
a T5-style relative position bias shared by all layers (32 log-spaced buckets up to distance
128), learned absolute positions that start after the padding id, no token types. Weight names
are Hugging Face's `MPNetModel` ones."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from k2serve.embeddings.bert import key_padding_bias


@dataclass
class MPNetConfig:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int
    relative_attention_num_buckets: int = 32
    layer_norm_eps: float = 1e-5
    pad_token_id: int = 1

    @classmethod
    def from_hf(cls, cfg: dict) -> MPNetConfig:
        if cfg.get("hidden_act", "gelu") != "gelu":
            raise ValueError(f"unsupported hidden_act {cfg.get('hidden_act')!r}")
        return cls(**{k: cfg[k] for k in cls.__dataclass_fields__ if k in cfg})


class SelfAttention(nn.Module):
    def __init__(self, c: MPNetConfig):
        super().__init__()
        self.heads = c.num_attention_heads
        self.q = nn.Linear(c.hidden_size, c.hidden_size)
        self.k = nn.Linear(c.hidden_size, c.hidden_size)
        self.v = nn.Linear(c.hidden_size, c.hidden_size)
        self.o = nn.Linear(c.hidden_size, c.hidden_size)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = (proj(x).view(b, t, self.heads, -1).transpose(1, 2)
                   for proj in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.o(out.transpose(1, 2).reshape(b, t, d))


class Attention(nn.Module):
    def __init__(self, c: MPNetConfig):
        super().__init__()
        self.attn = SelfAttention(c)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.attn(x, bias) + x)


class Linear(nn.Module):
    """`dense` (+ LayerNorm of output + residual when eps is given), as the checkpoint names it."""

    def __init__(self, d_in: int, d_out: int, eps: float | None = None):
        super().__init__()
        self.dense = nn.Linear(d_in, d_out)
        if eps is not None:
            self.LayerNorm = nn.LayerNorm(d_out, eps=eps)


class Layer(nn.Module):
    def __init__(self, c: MPNetConfig):
        super().__init__()
        self.attention = Attention(c)
        self.intermediate = Linear(c.hidden_size, c.intermediate_size)
        self.output = Linear(c.intermediate_size, c.hidden_size, c.layer_norm_eps)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        x = self.attention(x, bias)
        h = self.output.dense(F.gelu(self.intermediate.dense(x)))
        return self.output.LayerNorm(h + x)


class Embeddings(nn.Module):
    def __init__(self, c: MPNetConfig):
        super().__init__()
        self.pad = c.pad_token_id
        self.word_embeddings = nn.Embedding(c.vocab_size, c.hidden_size)
        self.position_embeddings = nn.Embedding(c.max_position_embeddings, c.hidden_size)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        # fairseq's numbering: tokens count from pad+1, padding tokens sit at `pad`.
        not_pad = ids.ne(self.pad).long()
        positions = torch.cumsum(not_pad, dim=1) * not_pad + self.pad
        return self.LayerNorm(self.word_embeddings(ids) + self.position_embeddings(positions))


class Encoder(nn.Module):
    def __init__(self, c: MPNetConfig):
        super().__init__()
        self.layer = nn.ModuleList(Layer(c) for _ in range(c.num_hidden_layers))
        self.relative_attention_bias = nn.Embedding(c.relative_attention_num_buckets,
                                                    c.num_attention_heads)


def relative_position_bucket(relative: torch.Tensor, num_buckets: int = 32,
                             max_distance: int = 128) -> torch.Tensor:
    """T5's bucketing: half the buckets per direction; exact up to a quarter, then log-spaced
    up to max_distance; key after query (relative > 0) in the lower half."""
    half = num_buckets // 2
    n = -relative
    bucket = (n < 0).long() * half
    n = n.abs()
    exact = half // 2
    # clamp before the log: the small-distance branch is taken there anyway.
    far = exact + (torch.log(n.clamp(min=1).float() / exact) / math.log(max_distance / exact)
                   * (half - exact)).long()
    far = far.clamp(max=half - 1)
    return bucket + torch.where(n < exact, n, far)


class MPNetEncoder(nn.Module):
    """ids, mask (batch, time) -> last hidden states (batch, time, hidden)."""

    UNUSED = ("pooler.", "embeddings.position_ids")

    def __init__(self, config: MPNetConfig):
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config)
        self.encoder = Encoder(config)

    @property
    def max_positions(self) -> int:
        # positions start at pad_token_id + 1
        return self.config.max_position_embeddings - self.config.pad_token_id - 1

    def position_bias(self, t: int, device) -> torch.Tensor:
        pos = torch.arange(t, device=device)
        buckets = relative_position_bucket(pos[None, :] - pos[:, None],
                                           self.config.relative_attention_num_buckets)
        return self.encoder.relative_attention_bias(buckets).permute(2, 0, 1)[None]

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.embeddings(ids)
        bias = self.position_bias(ids.shape[1], ids.device) + key_padding_bias(mask, x.dtype)
        for layer in self.encoder.layer:
            x = layer(x, bias)
        return x
