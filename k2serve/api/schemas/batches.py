"""POST /v1/batches: Together's fields and OpenAI's in one body."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class BatchCreateRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    input_file_id: str = Field(max_length=128)
    endpoint: str = Field(max_length=128)
    completion_window: str = Field(default="24h", max_length=16)
    priority: int | None = None  # Together's; batches here all run below interactive requests
    model_id: str | None = Field(default=None, max_length=256)  # Together's: informational
    metadata: dict[str, str] | None = None  # OpenAI's
