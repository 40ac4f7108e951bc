"""Request fields shared by /v1/chat/completions and /v1/completions.

Unknown fields are ignored (the SDKs send fields the spec does not model, e.g.
`stream_options`, `user`, `store`). Ranges follow OpenAI's and Together's documented ones;
the server's own limits (n, stop list, logprobs) are explicit constants below.
"""

from __future__ import annotations

import re
from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, field_validator

MAX_N = 16  # choices per request; each is a full generation on this machine
MAX_STOP_SEQUENCES = 16
MAX_STOP_LENGTH = 512  # characters per stop string
MAX_LOGPROBS = 20  # Together's and OpenAI's limit on top logprobs
# OpenAI's documented seed range (int64); choice i samples with seed + i, which torch's
# generators take up to 2^64 - 1.
MIN_SEED, MAX_SEED = -(2**63), 2**63 - 1
# ASCII digits only (str.isdigit() also accepts "²"), and short enough for int()
_TOKEN_ID = re.compile(r"^-?[0-9]{1,12}$")


class SamplingFields(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(default=None, ge=0)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=-1)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(default=None, gt=0.0, le=10.0)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = Field(
        default=None, json_schema_extra={"propertyNames": {"pattern": _TOKEN_ID.pattern}})
    seed: int | None = Field(default=None, ge=MIN_SEED, le=MAX_SEED)
    stop: Union[str, list[str], None] = None
    n: int = Field(default=1, ge=1, le=MAX_N)
    stream: bool = False
    # Together: int 0..20 (number of top logprobs). OpenAI: bool (+ top_logprobs).
    logprobs: Union[StrictBool, int, None] = None
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    context_length_exceeded_behavior: Literal["truncate", "error"] = "error"
    ignore_eos: bool = False  # vLLM's benchmark extension
    safety_model: str | None = None
    # vLLM's field: only requests with the same salt (and, unless the server shares its prefix
    # cache, the same API key) reuse each other's cached prompt prefixes.
    cache_salt: str | None = Field(default=None, min_length=1, max_length=256)

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, value):
        stops = [value] if isinstance(value, str) else (value or [])
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences are allowed")
        for s in stops:
            if not s:
                raise ValueError("stop sequences must be non-empty strings")
            if len(s) > MAX_STOP_LENGTH:
                raise ValueError(f"stop sequences are limited to {MAX_STOP_LENGTH} characters")
        return value

    @field_validator("logprobs")
    @classmethod
    def _check_logprobs(cls, value):
        if isinstance(value, int) and not isinstance(value, bool):
            if not 0 <= value <= MAX_LOGPROBS:
                raise ValueError(f"must be between 0 and {MAX_LOGPROBS}")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _check_logit_bias(cls, value):
        for key, bias in (value or {}).items():
            if not _TOKEN_ID.fullmatch(key):
                raise ValueError(f"keys must be token ids, got {key!r}")
            if not -100.0 <= bias <= 100.0:
                raise ValueError(f"bias for token {key} must be between -100 and 100")
        return value

    # -- derived -------------------------------------------------------------------------
    @property
    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def openai_logprobs(self) -> bool:
        """True when logprobs were asked OpenAI-style (bool), False for Together's int form."""
        return isinstance(self.logprobs, bool)

    @property
    def num_top_logprobs(self) -> int | None:
        """None: no logprobs; k: sampled token's logprob plus k alternatives."""
        if self.logprobs is None or self.logprobs is False:
            return None
        if self.logprobs is True:
            return self.top_logprobs or 0
        return int(self.logprobs)
