"""POST /v2/videos (and /v1/videos): Together's CreateVideoBody. Unknown fields are ignored;
inputs this server cannot honour (audio, reference media, WEBM) are a 400 naming them
(k2serve.api.routes.videos)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, StrictInt


class FrameImage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    input_image: str
    frame: float | str | None = None


class VideoMedia(BaseModel):
    model_config = ConfigDict(extra="allow")  # the other inputs: refused by name

    frame_images: list[FrameImage] | None = None


class VideoRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    prompt: str | None = Field(default=None, min_length=1, max_length=32000)
    negative_prompt: str | None = None
    width: StrictInt | None = None
    height: StrictInt | None = None
    resolution: str | None = None  # "480p", "720p", "1080p" or "WIDTHxHEIGHT"
    ratio: str | None = None  # "16:9" (with resolution)
    seconds: str | float | None = None
    fps: StrictInt | None = None
    steps: StrictInt | None = None
    seed: StrictInt | None = Field(default=None, ge=0, le=2**63 - 1)
    guidance_scale: float | None = Field(default=None, ge=0, le=100)
    output_format: str | None = None
    output_quality: StrictInt | None = Field(default=None, ge=0, le=51)
    generate_audio: bool | None = None
    media: VideoMedia | None = None
    frame_images: list[FrameImage] | None = None  # deprecated: media.frame_images
