"""POST /v1/messages and /v1/messages/count_tokens requests (Anthropic's Messages API).

Fields k2serve does not implement are refused by name (extra="forbid"), never dropped:
a client that asks for server tools, a container or citations learns at once that it
will not get them.
"""

from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

from k2serve.api.schemas.chat import MAX_MESSAGES
from k2serve.api.schemas.common import MAX_STOP_LENGTH, MAX_STOP_SEQUENCES


class AnthropicMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # "system": Claude Code puts later instructions between the turns
    role: Literal["user", "assistant", "system"]
    content: Union[str, list[dict[str, Any]]]


class AnthropicTool(BaseModel):
    # cache_control: prompt prefixes are cached without being asked (k2serve.api.prefix_cache)
    model_config = ConfigDict(extra="forbid")

    name: str
    description: str | None = None
    input_schema: dict[str, Any]
    type: Literal["custom"] | None = None
    cache_control: dict[str, Any] | None = None
    strict: bool | None = None  # tool inputs are always grammar-constrained to the schema


class AnthropicToolChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool | None = None


class ThinkingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["enabled", "disabled", "adaptive"]
    budget_tokens: int | None = Field(default=None, ge=0)


class OutputFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["json_schema"]
    schema_: dict[str, Any] = Field(alias="schema")


class OutputConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format: OutputFormat | None = None
    # How hard the model should think: a hint that a model without reasoning has no use for.
    effort: Literal["low", "medium", "high", "xhigh", "max"] | None = None


class ContextEdit(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: str


class ContextManagement(BaseModel):
    """Anthropic's server-side context edits: `clear_thinking_*` (earlier turns' thinking
    dropped before the chat template sees it, k2serve.api.anthropic_messages)."""

    model_config = ConfigDict(extra="forbid")

    edits: list[ContextEdit] = Field(default_factory=list)

    @field_validator("edits")
    @classmethod
    def _only_clear_thinking(cls, value):
        for edit in value:
            if not edit.type.startswith("clear_thinking_"):
                raise ValueError(f"the context edit {edit.type!r} is not supported here "
                                 f"(clear_thinking edits are)")
        return value


class CountTokensRequest(BaseModel):
    """What /v1/messages/count_tokens takes: a Messages request without max_tokens."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    model: str
    messages: list[AnthropicMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    system: Union[str, list[dict[str, Any]], None] = None
    tools: list[AnthropicTool] | None = None
    tool_choice: AnthropicToolChoice | None = None
    thinking: ThinkingConfig | None = None
    output_config: OutputConfig | None = None
    context_management: ContextManagement | None = None


class MessagesRequest(CountTokensRequest):
    max_tokens: int = Field(ge=1)  # required, as Anthropic requires it
    stop_sequences: list[str] | None = Field(default=None, max_length=MAX_STOP_SEQUENCES)
    temperature: float | None = Field(default=None, ge=0.0, le=1.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0)
    metadata: dict[str, Any] | None = None  # user_id: for the caller's own records
    stream: bool = False
    service_tier: Literal["auto", "standard_only"] | None = None  # one tier here
    speed: Literal["standard"] | None = None
    cache_control: dict[str, Any] | None = None  # prefixes are cached without being asked

    @field_validator("stop_sequences")
    @classmethod
    def _check_stop(cls, value):
        for s in value or ():
            if not s or len(s) > MAX_STOP_LENGTH:
                raise ValueError(f"stop sequences must be 1-{MAX_STOP_LENGTH} characters")
        return value
