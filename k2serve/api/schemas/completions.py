"""POST /v1/completions request (legacy text completion)."""

from __future__ import annotations

from pydantic import Field

from k2serve.api.schemas.common import SamplingFields


class CompletionRequest(SamplingFields):
    # Together types `prompt` as a string only; OpenAI also allows token-id lists and
    # batches, which this server does not accept (400 names the field).
    prompt: str = Field(max_length=4_000_000)

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_tokens
