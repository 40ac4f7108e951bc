"""`k2serve serve --models-file models.toml`: the models this server answers for, each served
by our engine (`kind = "local"`) or by an OpenAI-compatible engine elsewhere
(`kind = "openai"`), with its price and context.

    [[models]]
    id = "moonshotai/Kimi-K2-Instruct-0905"
    kind = "openai"
    urls = ["http://h1:8000/v1", "http://h2:8000/v1"]   # replicas
    upstream_model = "kimi-k2"          # the name the upstream serves it under (default: id)
    api_key_env = "K2_UPSTREAM_KEY"     # the environment variable holding its API key
    tokenizer = "/models/Kimi-K2-Instruct-0905"   # checkpoint dir or .gguf: tokenizer, template
    context_length = 131072             # default: what the upstream reports
    price_input = 0.6                   # USD per 1M tokens (default: the catalog's, else 0)
    price_output = 2.5
    batch_price = 0.5                   # the share of these a batch job's line pays (default)
    engine = "vllm"                     # vllm | sglang | k2serve: how it takes a grammar
    constrains = true                   # it enforces grammars (default; SGLang: started with
                                        # --grammar-backend llguidance)
    anthropic_temperature_scale = 0.6   # /v1/messages temperature x this (default: K2's 0.6)

    [[models]]
    id = "HuggingFaceTB/SmolLM2-135M-Instruct"
    kind = "local"
    path = "/models/smollm2.gguf"       # default: the embedded model
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

import tomllib

from k2serve.models.embedded import embedded_smollm2_gguf_path
from k2serve.serving.backend import ModelBackend
from k2serve.serving.catalog import EMBEDDED_CHAT_MODEL_ID
from k2serve.serving.loader import LoadOptions, load_text_model
from k2serve.serving.registry import ModelSpec, Pricing
from k2serve.serving.upstream import ENGINES
from k2serve.serving.upstream_loader import load_upstream_model

KINDS = ("local", "openai")
_KEYS = {"id", "kind", "urls", "upstream_model", "api_key_env", "tokenizer", "context_length",
         "price_input", "price_output", "batch_price", "path", "constrains", "engine",
         "anthropic_temperature_scale"}


@dataclass
class ModelEntry:
    id: str
    kind: str
    urls: list[str] = field(default_factory=list)
    upstream_model: str | None = None
    api_key_env: str | None = None
    tokenizer: str | None = None
    context_length: int | None = None
    price_input: float | None = None
    price_output: float | None = None
    batch_price: float | None = None  # share of the price a batch line pays (None: 0.5)
    path: str | None = None
    constrains: bool = True
    engine: str = "vllm"  # an upstream's engine (k2serve.serving.upstream.ENGINES)
    anthropic_temperature_scale: float | None = None


def read_models_file(path: str) -> list[ModelEntry]:
    """The file's entries; ValueError naming the entry and the key that is wrong."""
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(f"cannot read the models file {path}: {exc}") from None
    entries = doc.get("models")
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{path}: no [[models]] entries")
    out, seen = [], set()
    for index, raw in enumerate(entries):
        where = f"{path}: models[{index}]"
        if not isinstance(raw, dict):
            raise ValueError(f"{where} is not a table")
        unknown = sorted(set(raw) - _KEYS)
        if unknown:
            raise ValueError(f"{where}: unknown keys {', '.join(unknown)}")
        entry = _entry(raw, where)
        if entry.id in seen:
            raise ValueError(f"{where}: the id {entry.id!r} is listed twice")
        seen.add(entry.id)
        out.append(entry)
    if sum(e.kind == "local" for e in out) > 1:
        raise ValueError(f"{path}: at most one model of kind 'local' (this machine's engine)")
    return out


def _entry(raw: dict[str, Any], where: str) -> ModelEntry:
    def typed(key: str, kind: type | tuple, required: bool = False):
        value = raw.get(key)
        if value is None:
            if required:
                raise ValueError(f"{where}: '{key}' is required")
            return None
        if isinstance(value, bool) and kind is not bool or not isinstance(value, kind):
            raise ValueError(f"{where}: '{key}' has the wrong type ({type(value).__name__})")
        return value

    model_id = typed("id", str, required=True)
    kind = typed("kind", str, required=True)
    if kind not in KINDS:
        raise ValueError(f"{where}: kind must be one of {', '.join(KINDS)}, not {kind!r}")
    urls = typed("urls", list) or []
    if kind == "openai":
        if not urls or not all(isinstance(u, str) and u.startswith(("http://", "https://"))
                               for u in urls):
            raise ValueError(f"{where}: an 'openai' model needs 'urls', a list of http(s) "
                             f"base URLs ending in /v1")
    elif urls:
        raise ValueError(f"{where}: 'urls' is for kind 'openai'")
    engine = typed("engine", str)
    if engine is not None and (kind != "openai" or engine not in ENGINES):
        raise ValueError(f"{where}: 'engine' names an 'openai' model's engine, one of "
                         f"{', '.join(ENGINES)}, not {engine!r}")
    context = typed("context_length", int)
    if context is not None and context <= 0:
        raise ValueError(f"{where}: 'context_length' must be positive")
    prices = {key: typed(key, (int, float)) for key in ("price_input", "price_output")}
    for key, value in prices.items():
        if value is not None and value < 0:
            raise ValueError(f"{where}: '{key}' must not be negative")
    batch_price = typed("batch_price", (int, float))
    if batch_price is not None and not 0 <= batch_price <= 1:
        raise ValueError(f"{where}: 'batch_price' is the share of the price a batch line "
                         f"pays, from 0 to 1 (0.5: half price), not {batch_price}")
    constrains = typed("constrains", bool)
    scale = typed("anthropic_temperature_scale", (int, float))
    if scale is not None and not 0 < scale <= 2:
        raise ValueError(f"{where}: 'anthropic_temperature_scale' must be in (0, 2]")
    return ModelEntry(id=model_id, kind=kind, urls=urls,
                      upstream_model=typed("upstream_model", str),
                      api_key_env=typed("api_key_env", str), tokenizer=typed("tokenizer", str),
                      context_length=context, price_input=prices["price_input"],
                      price_output=prices["price_output"], batch_price=batch_price,
                      path=typed("path", str),
                      constrains=True if constrains is None else constrains,
                      engine=engine or "vllm", anthropic_temperature_scale=scale)


def load_model_entry(entry: ModelEntry, options: LoadOptions) -> tuple[ModelSpec, ModelBackend]:
    """The entry's spec (its prices, when the file names them) and backend. `options`: the
    engine's settings for a local model (its path and id come from the entry)."""
    if entry.kind == "local":
        spec, backend = load_text_model(dataclasses.replace(
            options, model_path=entry.path, served_model_name=entry.id,
            max_context_length=entry.context_length or options.max_context_length))
    else:
        tokenizer = entry.tokenizer
        if tokenizer is None and entry.id == EMBEDDED_CHAT_MODEL_ID:
            tokenizer = embedded_smollm2_gguf_path()
        if tokenizer is None:
            raise ValueError(f"the models file's {entry.id}: 'tokenizer' is required (its "
                             f"checkpoint directory or a .gguf), so k2serve renders its prompts")
        api_key = None
        if entry.api_key_env is not None:
            api_key = os.environ.get(entry.api_key_env)
            if not api_key:
                raise ValueError(f"the models file's {entry.id}: the environment variable "
                                 f"{entry.api_key_env} (its API key) is not set")
        spec, backend = load_upstream_model(
            entry.id, entry.urls, tokenizer, upstream_model=entry.upstream_model,
            api_key=api_key, context_length=entry.context_length, constrains=entry.constrains,
            engine=entry.engine)
    pricing = entry_pricing(spec.pricing, entry)
    if entry.anthropic_temperature_scale is not None:
        spec = dataclasses.replace(
            spec, anthropic_temperature_scale=float(entry.anthropic_temperature_scale))
    return dataclasses.replace(spec, pricing=pricing), backend


def entry_pricing(pricing: Pricing, entry: ModelEntry) -> Pricing:
    """`pricing` (the catalog's) with what the entry names replaced."""
    if entry.price_input is not None:
        pricing = dataclasses.replace(pricing, input=float(entry.price_input))
    if entry.price_output is not None:
        pricing = dataclasses.replace(pricing, output=float(entry.price_output))
    if entry.batch_price is not None:
        pricing = dataclasses.replace(pricing, batch=float(entry.batch_price))
    return pricing
