"""POST /v1/audio/speech request: Together's AudioSpeechRequest plus OpenAI's `speed` and
`stream_format`. Unknown fields (`instructions`, `extra_params`, ...) are ignored."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, StrictBool, StrictInt


class SpeechRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    input: str
    voice: str
    response_format: str | None = None
    response_encoding: str | None = None
    sample_rate: StrictInt | None = None
    bit_rate: StrictInt | None = None
    speed: float | None = None
    language: str | None = None
    stream: StrictBool = False
    stream_format: Literal["audio", "sse"] | None = None  # OpenAI's
