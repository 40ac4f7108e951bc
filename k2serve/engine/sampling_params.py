"""Per-request sampling parameters, as the engine sees them (token ids, no text)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or negative: disabled
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # multiplicative (CTRL / HF style), over prompt + output
    presence_penalty: float = 0.0  # additive (OpenAI style), over output tokens
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    seed: int | None = None
    stop_token_ids: frozenset[int] = frozenset()
    ignore_eos: bool = False  # vLLM's benchmark extension: run to max_tokens
    logprobs: int | None = None  # None: none; k >= 0: sampled token's logprob + top-k alternatives
    prompt_logprobs: bool = False  # logprobs of the prompt tokens (for echo + logprobs)
    # A compiled grammar (k2serve.structured.CompiledGrammar): every sampled token must keep
    # the output inside it (structured outputs, tool calls). Compiled before the request is
    # added; each sequence gets its own matcher from it.
    grammar: Any = None
    # Prefix-cache namespace: only sequences with equal salts share cached KV blocks (the server
    # salts with the API key; see BlockManager).
    cache_salt: str | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0

    @property
    def needs_penalties(self) -> bool:
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0
                or self.frequency_penalty != 0.0)
