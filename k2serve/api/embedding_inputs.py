"""Turn embeddings / rerank inputs into the token sequences an encoder reads, enforcing the
limits with 400s that name the offending element."""

from __future__ import annotations

import json

from starlette.concurrency import run_in_threadpool

from k2serve.api.schemas.embeddings import MAX_DOCUMENTS, MAX_INPUTS, MAX_REQUEST_TOKENS
from k2serve.errors import bad_request


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def parse_input(value) -> list:
    """`input` -> a list of strings, or a list of token-id lists."""
    if value is None:
        raise bad_request("Missing required parameter: 'input'.", param="input")
    if isinstance(value, str):
        items = [value]
    elif isinstance(value, list) and value and all(_is_int(v) for v in value):
        items = [value]  # one input given as token ids
    elif isinstance(value, list):
        items = value
    else:
        raise bad_request("'input' must be a string, a list of strings, a list of token ids "
                          "or a list of token-id lists.", param="input")
    if not items:
        raise bad_request("'input' must not be an empty list.", param="input")
    if len(items) > MAX_INPUTS:
        raise bad_request(f"'input' has {len(items)} items; at most {MAX_INPUTS} are allowed "
                          f"per request.", param="input")
    strings = all(isinstance(v, str) for v in items)
    id_lists = all(isinstance(v, list) and all(_is_int(t) for t in v) for v in items)
    if not (strings or id_lists):
        raise bad_request("'input' must be all strings or all token-id lists, not a mix "
                          "(nor other types).", param="input")
    for i, item in enumerate(items):
        if not item:
            raise bad_request(f"Invalid 'input[{i}]': empty inputs cannot be embedded.",
                              param="input")
    return items


async def input_sequences(encoder, items: list, model_id: str, role: str = "query") -> list:
    """Strings are tokenized (off the event loop); token ids are the model's own vocabulary
    ids without special tokens, which are added as for a text. Over-long inputs are refused,
    as OpenAI does, rather than silently truncated. `role` (query / passage) matters to
    asymmetric models (E5) only."""
    if isinstance(items[0], str):
        sequences = await run_in_threadpool(encoder.sequences, items, role)
    elif not encoder.accepts_token_ids:
        raise bad_request(f"The model '{model_id}' takes text only, not token ids.",
                          param="input")
    else:
        for i, ids in enumerate(items):
            bad = next((t for t in ids if not 0 <= t < encoder.vocab_size), None)
            if bad is not None:
                raise bad_request(f"Invalid 'input[{i}]': token id {bad} is outside the "
                                  f"vocabulary of {model_id} (0..{encoder.vocab_size - 1}).",
                                  param="input")
        sequences = [encoder.wrap(ids) for ids in items]
    for i, seq in enumerate(sequences):
        if len(seq) > encoder.max_tokens:
            raise bad_request(
                f"Invalid 'input[{i}]': {len(seq)} tokens, more than the {encoder.max_tokens} "
                f"that {model_id} reads per input (special tokens included). Shorten or split "
                f"the input.", param="input", code="context_length_exceeded")
    total = sum(len(s) for s in sequences)
    if total > MAX_REQUEST_TOKENS:
        raise bad_request(f"'input' has {total} tokens in all; at most {MAX_REQUEST_TOKENS} "
                          f"are allowed per request.", param="input")
    return sequences


def _field_text(value) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def document_texts(documents: list, rank_fields: list[str] | None) -> tuple[list[str], list[str]]:
    """Rerank documents -> (texts to rank, texts to return). Object documents rank on
    `key: value` lines of their rank_fields (default: all keys, in order) and come back as
    compact JSON, as Together returns them."""
    if documents is None:
        raise bad_request("Missing required parameter: 'documents'.", param="documents")
    if not documents:
        raise bad_request("'documents' must not be empty.", param="documents")
    if len(documents) > MAX_DOCUMENTS:
        raise bad_request(f"'documents' has {len(documents)} items; at most {MAX_DOCUMENTS} "
                          f"are allowed per request.", param="documents")
    if all(isinstance(d, str) for d in documents):
        if rank_fields is not None:
            raise bad_request("'rank_fields' applies to object documents only; these "
                              "documents are strings.", param="rank_fields")
        return list(documents), list(documents)
    if not all(isinstance(d, dict) for d in documents):
        raise bad_request("'documents' must be all strings or all objects.", param="documents")
    if rank_fields is not None and not rank_fields:
        raise bad_request("'rank_fields' must name at least one field.", param="rank_fields")
    ranked, returned = [], []
    for i, doc in enumerate(documents):
        fields = rank_fields if rank_fields is not None else list(doc)
        lines = [f"{k}: {_field_text(doc[k])}" for k in fields if k in doc]
        if not lines:
            what = f"any of the rank_fields {rank_fields}" if rank_fields else "any field"
            raise bad_request(f"Invalid 'documents[{i}]': it has no {what}.", param="documents")
        ranked.append("\n".join(lines))
        returned.append(json.dumps(doc, ensure_ascii=False, separators=(",", ":")))
    return ranked, returned
