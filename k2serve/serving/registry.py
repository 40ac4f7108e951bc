"""Model catalog: which model ids this server answers for, what they are and what they cost."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

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

    def as_dict(self) -> dict[str, float]:
        d = {"hourly": self.hourly, "input": self.input, "output": self.output,
             "base": self.base, "finetune": self.finetune}
        if self.cached_input is not None:
            d["cached_input"] = self.cached_input
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
        return obj


class ModelRegistry:
    """Model id -> (spec, backend). Lookups are case-sensitive, as the hosted APIs are."""

    def __init__(self) -> None:
        self._entries: dict[str, tuple[ModelSpec, Any]] = {}

    def register(self, spec: ModelSpec, backend: Any) -> None:
        if spec.type not in MODEL_TYPES:
            raise ValueError(f"unknown model type {spec.type!r}")
        self._entries[spec.id] = (spec, backend)

    def get(self, model_id: str) -> tuple[ModelSpec, Any] | None:
        return self._entries.get(model_id)

    def specs(self) -> list[ModelSpec]:
        return [spec for spec, _ in self._entries.values()]

    def backends(self) -> list[Any]:
        return [backend for _, backend in self._entries.values()]
