"""POST /tokenize and /detokenize (vLLM's shapes; also under /v1/)."""

from __future__ import annotations

from typing import Any, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

from k2serve.api.schemas.chat import MAX_MESSAGES, ChatMessage


class TokenizeRequest(BaseModel):
    """Either a completions `prompt` or chat `messages` (rendered with the model's template,
    tools included), as the generation endpoints would build it."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None  # the one chat model, when the server has exactly one
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(default=None, min_length=1,
                                               max_length=MAX_MESSAGES)
    tools: list[dict[str, Any]] | None = None
    tool_choice: Union[str, dict[str, Any], None] = None
    chat_template_kwargs: dict[str, Any] | None = None
    # vLLM's defaults: a raw prompt gets the tokenizer's BOS, a chat prompt its template's.
    add_special_tokens: bool | None = None
    add_generation_prompt: bool = True
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _one_form(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("send either 'prompt' or 'messages'")
        if self.prompt is not None and (self.tools or self.chat_template_kwargs):
            raise ValueError("'tools' and 'chat_template_kwargs' go with 'messages'")
        if not self.add_generation_prompt:
            raise ValueError("add_generation_prompt false is not supported: prompts are "
                             "tokenized as the chat endpoints send them")
        return self


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    tokens: list[int] = Field(max_length=1 << 20)
