"""POST /v1/embeddings and POST /v1/rerank requests (OpenAI's and Together's shapes).

`input`, `query`, `documents` and `rank_fields` are checked by the routes, after the model
(so a model sent to the wrong endpoint hears that first), naming the offending element
(`input[3]`); pydantic checks the scalar fields. Unknown fields are ignored.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt

# OpenAI's limits for one embeddings request: 2048 inputs, 300k tokens in all.
MAX_INPUTS = 2048
MAX_REQUEST_TOKENS = 300_000
MAX_DOCUMENTS = 1024  # rerank: documents per request


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    # a string, a list of strings, a list of token ids, or a list of token-id lists (ids of
    # the model's own vocabulary, without special tokens)
    input: Any = None
    encoding_format: Literal["float", "base64"] | None = None
    # For asymmetric models (multilingual-e5-small): embed as a search query (default, also
    # E5's choice for similarity) or as a passage / document to be found. Others ignore it.
    input_type: Literal["query", "passage", "document"] | None = None
    dimensions: StrictInt | None = None
    user: str | None = None


class RerankRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    query: str | None = None
    documents: list[Any] | None = None
    top_n: StrictInt | None = Field(default=None, ge=1)
    return_documents: StrictBool = False
    rank_fields: list[str] | None = None
