"""Which requests may share cached prompt prefixes.

A reply reports `cached_tokens`, and a cached prefix also answers faster, so a shared prefix
cache tells one client whether another sent a given prompt prefix. The cache is therefore
split per API key by default: the key id salts the engine's block hashes (like vLLM's
`cache_salt`). `k2serve serve --shared-prefix-cache` lets all keys share it (one tenant, or
long common system prompts worth the leak). A request's own `cache_salt` narrows its namespace
further. Open mode has no keys: its requests share one namespace.
"""

from __future__ import annotations

import json

from fastapi import Request

from k2serve.api.request_scope import request_scope
from k2serve.api.schemas.common import SamplingFields


def cache_salt(request: Request, req: SamplingFields) -> str | None:
    """The engine's cache salt for this request; None is the one shared namespace."""
    key_id = None if request.app.state.shared_prefix_cache else request_scope(request).api_key_id
    if key_id is None and req.cache_salt is None:
        return None
    return json.dumps([key_id, req.cache_salt])
