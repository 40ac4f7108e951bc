"""POST /v1/embeddings (OpenAI's and Together's shape)."""

from __future__ import annotations

import base64
import json

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from k2serve.api.embedding_inputs import input_sequences, parse_input
from k2serve.api.errors import ERROR_RESPONSES
from k2serve.api.models_lookup import embedding_backend_for
from k2serve.api.request_scope import engine_priority
from k2serve.api.schemas.embeddings import EmbeddingRequest
from k2serve.api.usage import UsageTracker
from k2serve.errors import bad_request

router = APIRouter(responses=ERROR_RESPONSES)


async def embed_billed(request: Request, backend, model: str, endpoint: str,
                       sequences: list) -> np.ndarray:
    """Run the forward passes under a UsageTracker, so the ledger and rate limits see the
    tokens; a request is billed only when its vectors are computed."""
    tracker = UsageTracker(request, model, endpoint, sum(len(s) for s in sequences), 1)
    status = "error"
    try:
        vectors = await backend.embed(sequences, engine_priority(request.scope))
        status = "ok"
        return vectors
    except BaseException as exc:
        tracker.record.prompt_tokens = 0
        if not isinstance(exc, Exception):  # cancelled: the client went away
            status = "client_closed"
        raise
    finally:
        tracker.finish(status)


def encode_vector(vector: np.ndarray, encoding_format: str):
    if encoding_format == "base64":  # what the OpenAI SDK asks for: little-endian float32
        return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
    return vector.tolist()


@router.post("/v1/embeddings")
async def create_embeddings(req: EmbeddingRequest, request: Request):
    backend = embedding_backend_for(request, req.model, "embeddings", "compute embeddings")
    items = parse_input(req.input)
    encoder = await backend.encoder()
    native = encoder.dimensions
    if req.dimensions is not None and req.dimensions != native:
        # Truncating would be wrong for these models (not Matryoshka-trained).
        raise bad_request(f"The model '{req.model}' produces {native}-dimensional embeddings "
                          f"and cannot change that: 'dimensions' must be omitted or {native}.",
                          param="dimensions")
    role = "passage" if req.input_type in ("passage", "document") else "query"
    sequences = await input_sequences(encoder, items, req.model, role)
    vectors = await embed_billed(request, backend, req.model, "embeddings", sequences)
    fmt = req.encoding_format or "float"
    tokens = sum(len(s) for s in sequences)

    def body() -> bytes:  # 2048 x 768 floats take a second to write: not on the event loop
        return json.dumps({
            "object": "list",
            "model": req.model,
            "data": [{"object": "embedding", "index": i, "embedding": encode_vector(v, fmt)}
                     for i, v in enumerate(vectors)],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }, ensure_ascii=False, separators=(",", ":")).encode("utf-8")

    return Response(await run_in_threadpool(body), media_type="application/json")
