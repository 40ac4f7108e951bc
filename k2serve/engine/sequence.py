"""One generation request as the engine tracks it."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

import torch

from k2serve.engine.multimodal import ImageInput
from k2serve.engine.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class GenerationRequest:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    owner: str | None = None  # who asked (API key id): waiting requests are admitted fairly
    # Images whose embeddings replace some prompt positions' (a vision model's prompt)
    images: list[ImageInput] = field(default_factory=list)
    # Lower runs first: 0 interactive (the default), 1 a batch job's line (idle capacity).
    priority: int = 0


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class RequestOutput:
    """What one engine step produced for one request."""

    request_id: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None
    finish_reason: str | None  # "stop" (stop token) | "length" | "abort" | None
    num_prompt_tokens: int
    num_cached_tokens: int = 0
    prompt_logprobs: list[TokenLogprob | None] | None = None  # first call only
    error: str | None = None
    scheduled_ns: int | None = None  # first output only: when it first joined the batch


@dataclass
class Sequence:
    request: GenerationRequest
    status: SequenceStatus = SequenceStatus.WAITING
    output_ids: list[int] = field(default_factory=list)
    num_computed: int = 0  # leading tokens whose KV is in the cache
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache (first admission)
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)  # of its full, computed blocks
    in_flight_hashes: list[bytes] = field(default_factory=list)
    num_preemptions: int = 0
    first_scheduled_ns: int | None = None  # time.time_ns() of its first admission (queue time)
    generator: torch.Generator | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None
    finish_reason: str | None = None
    # Where this sequence stands in params.grammar (a k2serve.structured.GrammarMatcher). It
    # follows output_ids, which preemption by recompute keeps, so it survives preemption as is.
    matcher: Any = None
    # Speculative decoding: tokens proposed for this step, verified after the forward pass
    # (never part of all_ids until accepted); their probabilities under the proposer, one
    # [V] row each, or None when the proposal was deterministic (n-gram, greedy draft).
    spec_ids: list[int] = field(default_factory=list)
    spec_probs: Any = None
    # How its proposals fared (``spec_policy``): tokens kept and proposals cut short, both
    # decayed per verification; steps left to decode plainly, that wait's length, and
    # whether the next proposal is the one-token probe after a wait.
    spec_kept: float = 0.0
    spec_refused: float = 0.0
    spec_wait: int = 0
    spec_backoff: int = 0
    spec_probing: bool = False
    # Images: the keys its block hashes mix in (block index -> key; multimodal.block_keys),
    # and the embeddings of images encoded but not yet wholly placed (image index -> rows).
    block_keys: dict[int, bytes] = field(default_factory=dict)
    image_embeds: dict[int, Any] = field(default_factory=dict)

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def owner(self) -> str | None:
        return self.request.owner

    @property
    def priority(self) -> int:
        return self.request.priority

    @property
    def params(self) -> SamplingParams:
        return self.request.params

    @property
    def cache_salt(self) -> str | None:
        return self.request.params.cache_salt

    @property
    def prompt_ids(self) -> list[int]:
        return self.request.prompt_ids

    @property
    def all_ids(self) -> list[int]:
        return self.request.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.request.prompt_ids) + len(self.output_ids)

    @property
    def is_decoding(self) -> bool:
        """Only the last sampled token is left to compute (otherwise it is prefilling)."""
        return bool(self.output_ids) and self.num_tokens - self.num_computed == 1
