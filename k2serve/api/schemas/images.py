"""POST /v1/images/generations: Together's ImageRequest and OpenAI's (`size`,
`response_format: b64_json`). Unknown fields are ignored; fields this server cannot honour
(LoRAs, reference images) are a 400 naming them (k2serve.api.routes.images)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt


class ImageRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    prompt: str = Field(min_length=1, max_length=32000)
    negative_prompt: str | None = None
    width: StrictInt | None = None
    height: StrictInt | None = None
    size: str | None = None  # OpenAI: "WIDTHxHEIGHT" (or "auto")
    steps: StrictInt | None = None
    seed: StrictInt | None = Field(default=None, ge=0, le=2**63 - 1)
    n: StrictInt = 1
    guidance_scale: float | None = Field(default=None, ge=0, le=100)
    response_format: Literal["url", "base64", "b64_json"] | None = None
    output_format: Literal["jpeg", "png", "webp"] | None = None
    image_url: str | None = None
    strength: float | None = Field(default=None, gt=0, le=1)  # image-to-image
    image_loras: list | None = None
    reference_images: list | None = None
    disable_safety_checker: bool | None = None  # no checker runs here
