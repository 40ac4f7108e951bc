"""POST /v1/completions request (legacy text completion)."""

from __future__ import annotations

from typing import Annotated, Any, Union

from pydantic import Field

from k2serve.api.schemas.common import SamplingFields

MAX_PROMPT_CHARS = 4_000_000
MAX_PROMPT_TOKEN_IDS = 1_000_000


class CompletionRequest(SamplingFields):
    # Together types `prompt` as a string; OpenAI (and vLLM) also take one prompt as a list
    # of token ids, which is how a platform in front of an engine sends the prompt it has
    # rendered and tokenized itself. Batches of prompts are not accepted (400 names the field).
    prompt: Union[Annotated[str, Field(max_length=MAX_PROMPT_CHARS)],
                  Annotated[list[Annotated[int, Field(ge=0)]],
                            Field(min_length=1, max_length=MAX_PROMPT_TOKEN_IDS)]]
    # vLLM's constraint on the output: {"json": schema} | {"regex": ...} | {"grammar": Lark}.
    structured_outputs: dict[str, Any] | None = None

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_tokens
