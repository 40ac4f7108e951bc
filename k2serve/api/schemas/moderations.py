"""POST /v1/moderations request (OpenAI's shape), for the OpenAPI schema: the route reads
the body itself, checking `model` before `input` and naming the offending element."""

from __future__ import annotations

from typing import Any, Union

from pydantic import BaseModel, ConfigDict


class ModerationRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None  # default: the first moderation model served
    input: Union[str, list[Union[str, dict[str, Any]]]]  # strings or {"type": "text", ...}
