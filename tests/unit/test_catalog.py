"""Catalog facts: a served model's context is capped at the model's own."""

from k2serve.serving.catalog import (
    KIMI_K2_MODEL_ID,
    KIMI_K2_THINKING_MODEL_ID,
    model_spec,
)


def test_k2_thinking_entry_caps_the_served_context_at_256k():
    assert model_spec(KIMI_K2_THINKING_MODEL_ID, context_length=1_000_000).context_length == 262144
    small = model_spec(KIMI_K2_THINKING_MODEL_ID, context_length=8192)
    assert small.context_length == 8192
    assert (small.pricing.input, small.pricing.output) == (0.60, 2.50)
    assert model_spec(KIMI_K2_MODEL_ID, context_length=1_000_000).context_length == 1_000_000
    assert model_spec("other/model", context_length=None).context_length is None
