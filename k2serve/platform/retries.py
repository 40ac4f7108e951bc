"""Retries: which logical request an attempt belongs to, and the stored reply a retry gets
instead of generating again (README: "Retries")."""

from __future__ import annotations

import base64
import hashlib
import logging
import uuid

from k2serve.errors import APIError
from k2serve.platform.context import RequestContext
from k2serve.platform.ratelimit import (
    IDEMPOTENCY_TTL_S,
    RETRY_GROUP_TTL_S,
    RateLimiter,
    RetryStore,
)

log = logging.getLogger("k2serve.platform")

MAX_RETRY_COUNT = 1000
MAX_IDEMPOTENCY_KEY = 255  # characters, as Stripe
MAX_REPLAY_BYTES = 1 << 20  # a larger reply is not stored: its retry generates again
# Reply headers not stored for a replay (the replay gets its own).
_NOT_REPLAYED = frozenset({b"content-length", b"x-request-id", b"date", b"server",
                           b"set-cookie", b"transfer-encoding"})


class RetryGuard:
    def __init__(self, store: RetryStore,
                 limiter: RateLimiter):
        self.store = store
        self.limiter = limiter  # a replay carries the key's rate-limit headers too

    async def identify(self, ctx: RequestContext, raw: bytes, headers) -> None:
        """Which logical request this attempt belongs to (README: "Retries").

        - `Idempotency-Key: K`: the request of this key (or of open mode) that first sent K.
          The same body on the same endpoint again: its stored reply is replayed once it has
          completed (409 while it runs); another body: 422. A first attempt that ended
          without a reply to replay (an error, a stream, a drop) lets the next one generate.
        - else `x-stainless-retry-count: N` (N >= 1), as the OpenAI / Together SDKs send on
          their retries: the latest request of this key with a byte-identical body that
          itself carried the header (the SDK's first attempt sends 0), within 15 min: its
          stored reply is replayed if it completed; if not, the retry generates again.
        - else: a request of its own. Identical bodies sent without these headers are
          separate requests (sampling twice is legitimate).
        Every attempt that generates is billed for what it generated; a replay for nothing.
        """
        count = headers.get("x-stainless-retry-count")
        try:
            ctx.retry_count = max(0, min(int(count), MAX_RETRY_COUNT)) if count is not None else 0
        except ValueError:
            ctx.retry_count = 0
        scope_id = ctx.key.id if ctx.key is not None else "-"
        idem = headers.get("idempotency-key")
        if not idem and count is None:
            ctx.retry_group = uuid.uuid4().hex
            return
        body_hash = _body_hash(ctx.endpoint, raw, headers.get("content-type", ""))
        if idem:
            if len(idem) > MAX_IDEMPOTENCY_KEY:
                raise APIError(400, f"The Idempotency-Key header has {len(idem)} characters; at "
                                    f"most {MAX_IDEMPOTENCY_KEY} are allowed.",
                               code="invalid_idempotency_key")
            slot = "i" + _digest(f"{scope_id}\0{idem}".encode("utf-8", "surrogateescape"))
            mode, group, ttl = "idem", slot, IDEMPOTENCY_TTL_S
        else:
            slot = "f" + _digest(f"{scope_id}\0{body_hash}".encode())
            mode = "retry" if ctx.retry_count > 0 else "first"
            group, ttl = uuid.uuid4().hex, RETRY_GROUP_TTL_S
        claim = await self.store.claim(slot, body_hash, mode, group, ttl)
        if claim.outcome == "mismatch":
            raise APIError(422, "This Idempotency-Key was already used with a different request "
                                "(another body or endpoint). Use a new key for a new request.",
                           code="idempotency_key_reused")
        if claim.outcome == "conflict":
            raise APIError(409, "A request with this Idempotency-Key is still in progress. Retry "
                                "when it has finished: its reply is then replayed.",
                           code="idempotency_key_in_use", type="invalid_request_error",
                           headers={"retry-after": "1"})
        ctx.retry_group = claim.group
        if claim.outcome == "replay":
            ctx.replay = claim.response
            return
        ctx.slot, ctx.slot_token, ctx.slot_ttl = slot, claim.token, ttl

    def recording_sender(self, ctx: RequestContext, send):
        """Wraps the reply's `send` for a request with a claim: before its final byte, store a
        complete 200 reply that is not a stream (up to MAX_REPLAY_BYTES) for replay, or free
        the claim, so that a retry sent once the client has the reply finds it settled."""
        state = {"keep": False, "buf": bytearray(), "status": 200, "headers": []}

        async def sender(message):
            if message["type"] == "http.response.start":
                headers = message.get("headers", [])
                ctype = next((v for k, v in headers if k.lower() == b"content-type"), b"")
                state["status"] = message["status"]
                state["keep"] = (message["status"] == 200
                                 and not ctype.startswith(b"text/event-stream"))
                state["headers"] = [(k.decode("latin-1"), v.decode("latin-1"))
                                    for k, v in headers if k.lower() not in _NOT_REPLAYED]
            elif message["type"] == "http.response.body":
                chunk = message.get("body", b"")
                if state["keep"]:
                    if len(state["buf"]) + len(chunk) > MAX_REPLAY_BYTES:
                        state["keep"], state["buf"] = False, bytearray()
                    else:
                        state["buf"] += chunk
                if not message.get("more_body", False):
                    stored = None
                    if state["keep"]:
                        stored = {"status": state["status"], "headers": state["headers"],
                                  "body": base64.b64encode(bytes(state["buf"])).decode(),
                                  "request_id": ctx.request_id}
                    await self.close_slot(ctx, stored)
            await send(message)

        return sender

    async def send_replay(self, ctx: RequestContext, send) -> None:
        """Send a stored reply (marked `idempotent-replayed: true`, with the request id of the
        request that generated it); its ledger row has no tokens and status `replayed`."""
        stored = ctx.replay
        headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in stored["headers"]]
        body = base64.b64decode(stored["body"])
        headers += [(b"content-length", str(len(body)).encode()),
                    (b"idempotent-replayed", b"true"),
                    (b"original-request-id", str(stored.get("request_id", "")).encode("latin-1"))]
        key = ctx.key
        if key is not None and key.has_limits:  # as on every reply to a limited key
            peek = await self.limiter.peek(key.id, key.rpm_limit, key.tpm_limit)
            headers += [(k.encode(), v.encode()) for k, v in peek.headers().items()]
        ctx.status = stored["status"]
        await send({"type": "http.response.start", "status": stored["status"], "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})

    async def close_slot(self, ctx: RequestContext, stored: dict | None) -> None:
        slot, ctx.slot = ctx.slot, None
        if slot is None:
            return
        try:
            await self.store.finish(slot, ctx.slot_token, stored, ctx.slot_ttl)
        except Exception:
            log.exception("closing a retry claim failed (it expires by itself)")


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:31]


def _body_hash(endpoint: str | None, raw: bytes, content_type: str) -> str:
    """What makes two attempts the same request: the endpoint and the body's bytes. A
    multipart body's boundary is random per attempt (an SDK's retry draws a new one), so it
    is left out."""
    if content_type.startswith("multipart/"):
        boundary = content_type.partition("boundary=")[2].split(";")[0].strip().strip('"')
        if boundary:
            raw = raw.replace(boundary.encode("latin-1", "replace"), b"")
    return hashlib.sha256(f"{endpoint}\0".encode() + raw).hexdigest()

