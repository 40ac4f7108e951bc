"""POST /v1/chat/completions request (Together's ChatCompletionRequest + OpenAI's extras)."""

from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

from k2serve.api.schemas.common import SamplingFields

MAX_MESSAGES = 2048
# Template variables the server sets itself; chat_template_kwargs may not override them.
RESERVED_TEMPLATE_KWARGS = frozenset({"messages", "tools", "add_generation_prompt", "self"})


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # templates may read extra keys (name, ...)

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: Union[str, list[dict[str, Any]], None] = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None


class ChatCompletionRequest(SamplingFields):
    model_config = ConfigDict(extra="ignore")

    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: int | None = Field(default=None, ge=0)
    tools: list[dict[str, Any]] | None = None
    tool_choice: Union[str, dict[str, Any], None] = None
    parallel_tool_calls: bool | None = None  # False: at most one call per reply
    response_format: dict[str, Any] | None = None
    chat_template_kwargs: dict[str, Any] | None = None

    @field_validator("messages", mode="before")
    @classmethod
    def _messages_not_empty(cls, value):
        if isinstance(value, list) and not value:
            raise ValueError("messages must contain at least one message")
        return value

    @field_validator("chat_template_kwargs")
    @classmethod
    def _template_kwargs_not_reserved(cls, value):
        taken = sorted(RESERVED_TEMPLATE_KWARGS & set(value or {}))
        if taken:
            raise ValueError(f"{', '.join(taken)} cannot be set here; they come from the "
                             f"request itself (use the top-level field)")
        return value

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
