"""What a request costs: its model's catalog price per 1M tokens (`ModelSpec.pricing`), or
per image and megapixel-step for an image or video model."""

from __future__ import annotations

from k2serve.serving.registry import ModelRegistry, Pricing


def cost_usd(pricing: Pricing | None, prompt_tokens: int, cached_tokens: int,
             completion_tokens: int, batch: bool = False) -> float:
    """Prompt tokens at the input price (cache hits at `cached_input` when the model has one),
    completion tokens at the output price; a batch line at the model's batch share of it."""
    if pricing is None:
        return 0.0
    cached = max(0, min(cached_tokens, prompt_tokens))
    cached_price = pricing.cached_input if pricing.cached_input is not None else pricing.input
    cost = ((prompt_tokens - cached) * pricing.input + cached * cached_price
            + completion_tokens * pricing.output) / 1_000_000
    # An image or video model's "tokens": images made and kilopixel-steps.
    cost += pricing.media_cost(prompt_tokens, completion_tokens)
    return cost * pricing.batch if batch else cost


def pricing_for(registry: ModelRegistry | None, model: str | None) -> Pricing | None:
    if registry is None or not model:
        return None
    entry = registry.get(model)
    return entry[0].pricing if entry is not None else None
