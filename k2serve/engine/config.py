"""The engine's settings (``EngineConfig``), the one source of their defaults: the
scheduler's limits, the model loader's options and the command line's defaults derive from
it. Imports no torch, so that the command line starts without it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# The KV pool's size when none is given: this share of the memory available at start-up,
# at most DEFAULT_KV_MAX_BYTES.
DEFAULT_KV_FRACTION = 0.25
DEFAULT_KV_MAX_BYTES = 4 << 30


@dataclass
class EngineConfig:
    """How the engine batches, caches and bounds its work."""

    max_num_seqs: int = 32  # sequences decoding at once
    max_step_tokens: int = 512  # tokens per forward pass (decode tokens + prefill chunks)
    context_length: int = 2048
    block_size: int = 16  # tokens per KV block
    kv_cache_bytes: int | None = None  # None: see DEFAULT_KV_FRACTION
    num_kv_blocks: int | None = None  # overrides kv_cache_bytes (tests)
    max_waiting: int = 256  # queued requests beyond the running batch; more are refused
    # Whether lower-priority sequences (batch jobs) also compute in steps that serve
    # higher-priority ones. Off: they compute only in steps nothing more urgent needs, so
    # interactive latency stays as without them (on CPUs each extra sequence slows a step;
    # on an accelerator, where it is nearly free, turning it on gains throughput).
    mix_priorities: bool = False
    # The most tokens a step computes when only lower-priority sequences need one: an
    # interactive request arriving mid-step waits for at most such a step (its prompt's
    # chunks would make a long one; on CPUs, 8 tokens cost about a decode step).
    background_step_tokens: int = 8
    # Prompts of at least this many tokens are computed with the dense float32 weights of a
    # quantized model (compute-bound prefill: about twice the int4 kernel's speed); shorter
    # prompts and every generated token use the int4 kernel. A property of the sequence, so
    # a token's kernel never depends on what else is in the step. None: int4 throughout.
    dense_prompt_min_tokens: int | None = 64
    # The KV pool's dtype. None: the model's own choice (its ``kv_cache_dtype``, else float32):
    # bfloat16 for quantized models, whose activations are bfloat16 already (half the bytes
    # decode attention reads, twice the tokens a pool holds).
    kv_cache_dtype: torch.dtype | None = None
    # Speculative decoding: None (off), "ngram" (prompt lookup) or "draft" (a draft model the
    # engine is given); at most this many tokens proposed per sequence and step.
    speculative: str | None = None
    num_speculative_tokens: int = 4
    # Whether each sequence's proposals are sized by what pays (``spec_policy``): fewer or
    # none where they are seldom kept or the proposer is slow. Off: always the most.
    adaptive_speculation: bool = True


def parse_speculative(value: str | None) -> tuple[str | None, str | None]:
    """``--speculative`` -> (method, draft model path): None, "ngram" or "draft:PATH"."""
    if value is None or value == "" or value == "off":
        return None, None
    if value == "ngram":
        return "ngram", None
    if value.startswith("draft:") and value[len("draft:"):]:
        return "draft", value[len("draft:"):]
    raise ValueError(f"--speculative must be 'ngram' or 'draft:MODEL', not {value!r}")
