"""Admission: whether a request may run now, and what it holds while it does.

The key's model allow-list, its budget (the request's worst-case cost held against it), the
retry identity (k2serve.platform.retries) and the rate limits, with the request's tokens
reserved against TPM: a generation's prompt as the route will build it (k2serve.api.prompts)
plus n x the most it may generate; other endpoints' bound from their backend.
"""

from __future__ import annotations

import logging
import time

from starlette.concurrency import run_in_threadpool

from k2serve.api.request_scope import RequestScope
from k2serve.api.surfaces import GENERATING_ENDPOINTS, served_endpoint
from k2serve.api.surfaces import usage_bound as generation_usage_bound
from k2serve.errors import APIError
from k2serve.platform.context import RequestContext
from k2serve.platform.keys import KeyInfo, KeyStore
from k2serve.platform.pricing import cost_usd, pricing_for
from k2serve.platform.ratelimit import (
    BudgetHolds,
    Decision,
    RateLimiter,
    run_soon,
)
from k2serve.platform.retries import RetryGuard
from k2serve.serving.registry import ModelRegistry

log = logging.getLogger("k2serve.platform")

# Endpoints whose request names no model when the server has one obvious choice.
_DEFAULT_MODEL_ENDPOINTS = ("moderations", "audio.speech", "audio.transcribe", "audio.translate")


class Admission:
    def __init__(self, keys: KeyStore, limiter: RateLimiter,
                 budgets: BudgetHolds, retries: RetryGuard):
        self.keys = keys
        self.limiter = limiter
        self.budgets = budgets
        self.retries = retries
        self.registry: ModelRegistry | None = None  # the app's, once installed

    async def admit(self, ctx: RequestContext, body: dict, raw: bytes, headers) -> None:
        """Model allow-list, budget, retry identity, reservation and rate limits.

        Raises APIError (403 / 409 / 422 / 429); otherwise the request holds its reservation,
        or `ctx.replay` is the stored reply of the same request, to send instead."""
        key = ctx.key
        body = self._check_models(ctx, body)
        await self.retries.identify(ctx, raw, headers)
        if ctx.replay is not None:
            return  # nothing generated, nothing reserved: a spent budget does not matter
        try:
            if key is not None and key.budget_usd is not None and key.spent_usd >= key.budget_usd:
                raise self._over_budget(key, key.spent_usd, 0.0)
            limited = key is not None and key.has_limits and ctx.batch_id is None
            budgeted = key is not None and key.budget_usd is not None
            if limited or budgeted:  # only these need the request's tokens counted first
                # Tokenizing a long prompt takes a while: not on the event loop.
                prompt, completion = await run_in_threadpool(self.usage_bound, ctx.endpoint,
                                                             body, raw, ctx.scope)
                ctx.reserved = prompt + completion
            if budgeted:
                await self._hold_budget(ctx, key, prompt, completion)
            if limited:
                decision = await self.limiter.acquire(key.id, key.rpm_limit, key.tpm_limit,
                                                      ctx.reserved)
                ctx.decision = decision
                if not decision.allowed:
                    raise self._limited(key, decision, ctx.reserved, ctx.endpoint)
                ctx.admitted_at = decision.admitted_at
            else:
                ctx.admitted_at = time.time()
        except Exception:  # refused: give back the claim and the hold now
            await self.retries.close_slot(ctx, None)
            await self.release_hold(ctx)
            raise
        except BaseException:  # cancelled (client gone): the same, outside the cancel scope
            run_soon(self.retries.close_slot(ctx, None))
            run_soon(self.release_hold(ctx))
            raise

    def _check_models(self, ctx: RequestContext, body: dict) -> dict:
        """The key's allow-list, for every model the request would use: `model` (or, when it
        names none, the one the route would pick) and `safety_model`. Returns the body with
        that model filled in, for the reservation."""
        model = body.get("model")
        if model is None or (model == "" and (ctx.endpoint or "").startswith("audio.")):
            default = self._default_model(ctx.endpoint)
            if default is not None:
                ctx.model = default
                body = dict(body, model=default)
                model = default
        key = ctx.key
        if key is None or key.allowed_models is None:
            return body
        for param, name in (("model", model), ("safety_model", body.get("safety_model"))):
            if isinstance(name, str) and not key.allows_model(name):
                raise APIError(403, f"The API key '{key.name}' may not use the model "
                                    f"'{name[:256]}'. Allowed: {', '.join(key.allowed_models)}.",
                               param=param, code="model_not_allowed")
        return body

    @staticmethod
    def _over_budget(key: KeyInfo, spent: float, held: float) -> APIError:
        if spent >= key.budget_usd:  # spent: retrying will not help
            return APIError(429, f"The API key '{key.name}' has used its budget of "
                                 f"${key.budget_usd:.6g} (spent ${spent:.6g}).",
                            type="insufficient_quota", code="insufficient_quota",
                            headers={"x-should-retry": "false"})
        return APIError(429, f"The API key '{key.name}' has reached its budget of "
                             f"${key.budget_usd:.6g}: spent ${spent:.6g}, and ${held:.6g} is "
                             f"held by its requests in progress (their worst-case cost). "
                             f"Retry when they have finished.",
                        type="insufficient_quota", code="insufficient_quota",
                        headers={"retry-after": "1"})

    async def _hold_budget(self, ctx: RequestContext, key: KeyInfo, prompt: int,
                           completion: int) -> None:
        """Hold the request's worst-case cost (prompt + n x max_tokens at the model's prices)
        until its ledger row is written, and admit it only if the key's spend plus the holds
        of its other requests leave some budget. So at most one request (the last admitted)
        can take the key past its budget, by at most its own cost.

        The spend is read AFTER the holds: a request that finishes in between is counted in
        the holds (released only once its row is written) or in the spend, never neither."""
        worst = cost_usd(pricing_for(self.registry, ctx.model), prompt, 0, completion,
                         batch=ctx.batch_id is not None)
        ctx.budget_hold, held = await self.budgets.hold(key.id, worst)
        spent = await run_in_threadpool(self.keys.spent_usd, key.id)
        if spent + held >= key.budget_usd:
            raise self._over_budget(key, spent, held)

    async def release_hold(self, ctx: RequestContext) -> None:
        hold, ctx.budget_hold = ctx.budget_hold, None
        if hold is not None and ctx.key is not None:
            try:
                await self.budgets.release(ctx.key.id, hold)
            except Exception:
                log.exception("releasing a budget hold failed (it expires by itself)")

    @staticmethod
    def _limited(key: KeyInfo, d: Decision, reserved: int, endpoint: str | None) -> APIError:
        headers = d.headers()
        generates = endpoint in GENERATING_ENDPOINTS
        counted = "prompt + n x max_tokens" if generates else "its input"
        if d.reason == "too_large":
            headers["x-should-retry"] = "false"
            advice = "Lower max_tokens." if generates else "Send a smaller input."
            return APIError(429, f"This request reserves {reserved} tokens ({counted}), more "
                                 f"than the API key '{key.name}' may use in a minute ({d.tpm}). "
                                 f"{advice}", param="max_tokens" if generates else "input",
                            code="request_exceeds_token_limit", headers=headers)
        wait = headers.get("retry-after", "1")
        if d.reason == "requests":
            what = f"{d.rpm} requests per minute"
        else:
            what = (f"{d.tpm} tokens per minute; this request reserves {reserved} tokens "
                    f"({counted}) and {d.remaining_tokens} remain")
        return APIError(429, f"Rate limit reached for the API key '{key.name}': {what}. "
                             f"Retry in {wait} s.", code="rate_limit_exceeded", headers=headers)

    def usage_bound(self, endpoint: str | None, body: dict, raw: bytes,
                    scope: RequestScope | None = None) -> tuple[int, int]:
        """(prompt tokens, n x the most the request may generate), for TPM and budgets.

        A generation's prompt is tokenized with the model's own tokenizer (and chat
        template), so the reservation bounds what the request can really use; the encoded
        prompt stays on the request's `scope` for its route."""
        try:
            return self._usage_bound(endpoint, body, scope)
        except (APIError, ValueError):  # an invalid request: the route will refuse it too
            log.debug("reservation of an invalid request: using an upper bound", exc_info=True)
            return self._upper_bound(body, raw)
        except Exception:  # a bug here must not hide behind the upper bound (it did once)
            log.warning("reservation estimate failed; using an upper bound", exc_info=True)
            return self._upper_bound(body, raw)

    def _usage_bound(self, endpoint: str | None, body: dict,
                     scope: RequestScope | None) -> tuple[int, int]:
        model = body.get("model")
        served = self.registry.get(model) if isinstance(model, str) else None
        if served is None or endpoint is None or not served.serves(served_endpoint(endpoint)):
            return 0, 0  # the route answers 404 / 400
        if endpoint in GENERATING_ENDPOINTS:
            return generation_usage_bound(endpoint, served.backend, body, scope)
        bound = served.backend.usage_bound(body)
        # An image/video model bounds (images, kilopixel-steps); the others their input.
        return bound if isinstance(bound, tuple) else (bound, 0)

    def _upper_bound(self, body: dict, raw: bytes) -> tuple[int, int]:
        """A reservation without tokenizing: no prompt has more tokens than bytes (+ a
        template's worth), nor may it generate more than the model's context."""
        model = body.get("model")
        served = self.registry.get(model) if isinstance(model, str) else None
        generates = served is not None and served.serves("completions")
        context = served.backend.context_length if generates else None
        n = body.get("n", 1)
        n = n if isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= 16 else 1
        requested = body.get("max_completion_tokens",
                             body.get("max_output_tokens", body.get("max_tokens")))
        if not isinstance(requested, int) or isinstance(requested, bool) or requested < 0:
            requested = context or 4096
        if context:
            requested = min(requested, context)
        return len(raw) + 1024, n * requested

    def _default_model(self, endpoint: str | None) -> str | None:
        """The model a route uses when the request names none (so the allow-list checks it):
        moderations, the first moderation model; audio, the one model of that kind, if one."""
        if endpoint not in _DEFAULT_MODEL_ENDPOINTS:
            return None
        found = [spec.id for spec, _ in self.registry.serving(endpoint)]
        if endpoint == "moderations":
            return found[0] if found else None
        return found[0] if len(found) == 1 else None
