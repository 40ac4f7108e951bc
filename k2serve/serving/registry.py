"""Model catalog: which model ids this server answers for, what they are and what they cost."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from k2serve.serving.backend import ModelBackend, check_backend

MODEL_TYPES = ("chat", "language", "code", "image", "embedding", "moderation", "rerank",
               "audio", "transcribe", "video")


@dataclass
class Pricing:
    """USD per 1M tokens (Together's `Pricing` object; every key is required by the SDKs)."""

    input: float = 0.0
    output: float = 0.0
    hourly: float = 0.0
    base: float = 0.0
    finetune: float = 0.0
    cached_input: float | None = None
    batch: float = 0.5  # the share of the price a batch line pays (Together: 50% off)
    # Image and video models (k2serve.diffusion), whose ledger rows count images (videos) as
    # prompt tokens and kilopixel-steps as completion tokens: USD per image (video) made and
    # per megapixel-step (width x height x steps [x frames] / 1e6).
    image: float = 0.0
    megapixel_step: float = 0.0

    def media_cost(self, count: int, kilopixel_steps: int) -> float:
        """USD for `count` images (videos) of `kilopixel_steps` in all."""
        return count * self.image + kilopixel_steps * self.megapixel_step / 1000

    def as_dict(self) -> dict[str, float]:
        d = {"hourly": self.hourly, "input": self.input, "output": self.output,
             "base": self.base, "finetune": self.finetune}
        if self.cached_input is not None:
            d["cached_input"] = self.cached_input
        if self.image or self.megapixel_step:
            d["per_image"] = self.image
            d["per_megapixel_step"] = self.megapixel_step
        return d


@dataclass
class ModelSpec:
    id: str
    type: str
    context_length: int | None = None
    pricing: Pricing = field(default_factory=Pricing)
    display_name: str | None = None
    organization: str | None = None
    license: str | None = None
    link: str | None = None
    created: int = field(default_factory=lambda: int(time.time()))
    # Anthropic's API: the sampling temperature is the request's times this (Moonshot maps
    # K2's by 0.6: Anthropic clients send 1.0 by default, K2's recommended is 0.6). None: the
    # model family's own (0.6 for K2's tool format, else 1).
    anthropic_temperature_scale: float | None = None
    vision: bool = False  # a chat model whose messages may hold images (image_url parts)

    def as_model_object(self) -> dict[str, Any]:
        obj: dict[str, Any] = {
            "id": self.id,
            "object": "model",
            "created": self.created,
            "type": self.type,
            "owned_by": self.organization or "k2serve",
            "display_name": self.display_name or self.id,
            "organization": self.organization,
            "link": self.link,
            "license": self.license,
            "context_length": self.context_length,
            "pricing": self.pricing.as_dict(),
            "running": True,
        }
        if self.type == "chat":
            obj["vision"] = self.vision
        return obj


class ServedModel(NamedTuple):
    """A model this server answers for: what it is and costs, and what runs it."""

    spec: ModelSpec
    backend: ModelBackend

    def serves(self, endpoint: str) -> bool:
        return endpoint in self.backend.endpoints


class ModelRegistry:
    """Model id -> ServedModel. Lookups are case-sensitive, as the hosted APIs are."""

    def __init__(self) -> None:
        self._entries: dict[str, ServedModel] = {}
        self._aliases: dict[str, str] = {}  # another id of a model (a dedicated endpoint's)

    def register(self, spec: ModelSpec, backend: ModelBackend) -> None:
        if spec.type not in MODEL_TYPES:
            raise ValueError(f"unknown model type {spec.type!r}")
        check_backend(backend)
        if spec.id in self._entries:
            raise ValueError(f"the model id {spec.id!r} is configured twice")
        self._entries[spec.id] = ServedModel(spec, backend)

    def get(self, model_id: str) -> ServedModel | None:
        entry = self._entries.get(model_id)
        if entry is None and model_id in self._aliases:
            entry = self._entries.get(self._aliases[model_id])
        return entry

    def alias(self, alias_id: str, model_id: str) -> None:
        """Answer `alias_id` with `model_id`'s model (not listed apart)."""
        if alias_id in self._entries or model_id not in self._entries:
            raise ValueError(f"cannot alias {alias_id!r} to {model_id!r}")
        self._aliases[alias_id] = model_id

    def unregister(self, model_id: str) -> None:
        """Forget a model (or an alias) registered while serving: a deleted endpoint."""
        self._aliases.pop(model_id, None)
        if self._entries.pop(model_id, None) is not None:
            self._aliases = {a: m for a, m in self._aliases.items() if m != model_id}

    def listed(self) -> list[ModelSpec]:
        """The models /v1/models lists: all but those whose backend says it is not
        serving now (`listed` False: a stopped dedicated endpoint)."""
        return [spec for spec, backend in self.models() if getattr(backend, "listed", True)]

    # Lists are copied in one C call: dedicated endpoints (k2serve.platform.endpoints) are
    # registered and removed from another thread while requests read the registry.
    def models(self) -> list[ServedModel]:
        return list(self._entries.values())

    def serving(self, endpoint: str) -> list[ServedModel]:
        """The models that serve `endpoint`, in registration order."""
        return [m for m in self.models() if m.serves(endpoint)]

    def specs(self) -> list[ModelSpec]:
        return [spec for spec, _ in self.models()]

    def backends(self) -> list[ModelBackend]:
        return [backend for _, backend in self.models()]
