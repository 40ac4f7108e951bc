"""A GenerationBackend whose engine runs elsewhere: an OpenAI-compatible server (vLLM,
SGLang, another k2serve) reached over HTTP, on one or more replicas.

k2serve renders and tokenizes every prompt itself, with the model's own tokenizer and chat
template loaded here (a TextModel), and sends the token ids to the upstream's
`/v1/completions`, streamed with its usage. So the platform above (keys, limits, the ledger
at this model's price, safety, tool-call parsing) is the same as for our own engine, and the
prompt the upstream runs is exactly the one k2serve counted and reserved.

Replicas: a prompt of AFFINITY_MIN_TOKENS or more goes to the replica its first
AFFINITY_TOKENS tokens hash to (rendezvous hashing over the healthy replicas), so prompts that
share a long prefix (a system prompt, a conversation so far) find it in that replica's prefix
cache, unless that replica has IMBALANCE more requests in flight than the least busy one;
other prompts go to the least busy healthy replica. A replica
that cannot be reached, or answers 5xx, before the first token is marked down (exponential
back-off, from DOWN_BASE_S up to DOWN_MAX_S) and the choice is sent once to another replica;
after the first token a failure ends the choice with an error (a stream cannot be replayed).
Closing a choice's iterator closes its HTTP stream, which an upstream takes as an abort.

Structured output and tool calls: k2serve builds the grammar (a JSON schema, its tool-call
grammar for the model's own format) as one Lark text (llguidance's dialect) and sends it in
the field the upstream's engine reads: vLLM's `structured_outputs.grammar` (its `guidance`
backend), SGLang's `ebnf` (its `llguidance` grammar backend, which takes Lark there), or
k2serve's own (it reads vLLM's). The upstream enforces it token by token and k2serve parses
the output with its own parsers. An upstream configured as unable to (`constrains=False`)
gets no such request: a 400 says so, rather than an unchecked reply. Prompt logprobs (echo
with logprobs) are not relayed (400).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import httpx

from k2serve.engine.async_engine import Reservation
from k2serve.engine.sampling_params import SamplingParams
from k2serve.errors import APIError, bad_request, overloaded
from k2serve.serving.backend import GENERATION_ENDPOINTS, LogprobEntry, TextDelta
from k2serve.serving.sse import sse_lines
from k2serve.serving.text_model import TextModel
from k2serve.structured.grammars import as_lark
from k2serve.telemetry.metrics import UPSTREAM_FAILURES, UPSTREAM_LATENCY
from k2serve.text.chat_template import ChatTemplate
from k2serve.text.tokenizer_base import TokenizerBase

log = logging.getLogger("k2serve.upstream")

AFFINITY_TOKENS = 256
AFFINITY_MIN_TOKENS = 64
IMBALANCE = 8
DOWN_BASE_S = 1.0
DOWN_MAX_S = 30.0
CONNECT_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 600.0  # between two chunks: a long prefill on a loaded upstream
TOKEN_ID_PREFIX = "token_id:"  # vLLM's logprob tokens under return_tokens_as_token_ids
# The engines an upstream may run: they name a grammar's request field differently.
ENGINES = ("vllm", "sglang", "k2serve")


@dataclass
class Replica:
    url: str  # base URL, ending in /v1
    in_flight: int = 0
    failures: int = 0  # in a row, since its last success
    down_until: float = 0.0

    def up(self, now: float) -> bool:
        return now >= self.down_until

    def failed(self, now: float) -> None:
        self.failures += 1
        self.down_until = now + min(DOWN_MAX_S, DOWN_BASE_S * 2 ** (self.failures - 1))

    def succeeded(self) -> None:
        self.failures = 0
        self.down_until = 0.0


class UpstreamUnavailable(Exception):
    """The replica could not serve the request before its first token (try another)."""


@dataclass
class UpstreamConfig:
    model_id: str  # the id clients send
    urls: list[str]  # replica base URLs, each ending in /v1
    upstream_model: str | None = None  # the name the upstream serves it under (default: model_id)
    api_key: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    # Whether the upstream enforces a grammar in llguidance's Lark dialect (vLLM with its
    # `guidance` backend, SGLang with `--grammar-backend llguidance`, k2serve).
    constrains: bool = True
    engine: str = "vllm"  # one of ENGINES: which request fields it reads


class UpstreamBackend(TextModel):
    endpoints = GENERATION_ENDPOINTS
    load_state = None  # nothing loads here but the tokenizer, before the server starts

    def __init__(self, config: UpstreamConfig, tokenizer: TokenizerBase, *,
                 context_length: int, chat_template: ChatTemplate | None):
        super().__init__(tokenizer, context_length=context_length, chat_template=chat_template)
        self.config = config
        self.replicas = [Replica(url.rstrip("/")) for url in config.urls]
        self._client: httpx.AsyncClient | None = None

    # -- ModelBackend --------------------------------------------------------------------
    def stats(self) -> dict:
        now = time.monotonic()
        return {"in_flight": sum(r.in_flight for r in self.replicas),
                "replicas": [{"url": r.url, "in_flight": r.in_flight, "up": r.up(now),
                              "failures": r.failures} for r in self.replicas]}

    def healthy(self) -> bool:
        now = time.monotonic()
        return any(r.up(now) for r in self.replicas)

    def shutdown(self) -> None:
        self._client = None  # its connections close with the event loop

    def check(self, params: SamplingParams) -> None:
        if params.grammar is not None and not self.config.constrains:
            raise bad_request(f"The model '{self.config.model_id}' runs on an upstream engine "
                              f"that is not set up to enforce grammars, so response_format "
                              f"and tool calls are not available for it.",
                              code="unsupported_by_upstream")
        if params.prompt_logprobs:
            raise bad_request("Prompt logprobs (echo with logprobs) are not available for a "
                              "model on an upstream engine.", param="echo",
                              code="unsupported_by_upstream")

    def reserve(self, num_requests: int, owner: str | None = None, priority: int = 0
                ) -> Reservation:
        """The upstream queues and bounds its own work: nothing is held here."""
        return Reservation(None, owner, num_requests, priority)

    # -- generation ----------------------------------------------------------------------
    async def generate(self, prompt_ids: list[int], params: SamplingParams, stop: list[str],
                       reservation: Reservation | None = None) -> AsyncIterator[TextDelta]:
        self.check(params)
        if reservation is not None:
            reservation.start_one()
        body = self._body(prompt_ids, params, stop)
        tried: set[str] = set()
        while True:
            replica = self._pick(tried, prompt_ids)
            tried.add(replica.url)
            started = False
            try:
                async for delta in self._stream(replica, body, len(prompt_ids)):
                    started = True
                    yield delta
                return
            except UpstreamUnavailable as exc:
                if started or len(tried) >= min(2, len(self.replicas)):
                    raise APIError(502, f"The upstream engine for '{self.config.model_id}' "
                                        f"failed: {exc}", code="upstream_unavailable",
                                   type="server_error") from None
                log.warning("upstream %s failed before its first token (%s); retrying on "
                            "another replica", replica.url, exc)

    def _pick(self, tried: set[str], prompt_ids: list[int]) -> Replica:
        now = time.monotonic()
        candidates = [r for r in self.replicas if r.url not in tried and r.up(now)] or \
            [r for r in self.replicas if r.url not in tried] or self.replicas
        least = min(candidates, key=lambda r: (not r.up(now), r.in_flight))
        if len(prompt_ids) < AFFINITY_MIN_TOKENS or len(candidates) == 1:
            return least
        prefix = str(prompt_ids[:AFFINITY_TOKENS]).encode()
        preferred = max(candidates, key=lambda r: hashlib.blake2b(
            prefix + r.url.encode(), digest_size=8).digest())
        if preferred.in_flight - least.in_flight > IMBALANCE:
            return least
        return preferred

    def _body(self, prompt_ids: list[int], params: SamplingParams, stop: list[str]) -> dict:
        body = {
            "model": self.config.upstream_model or self.config.model_id,
            "prompt": prompt_ids, "max_tokens": params.max_tokens, "stream": True,
            "stream_options": {"include_usage": True},
            "temperature": params.temperature, "top_p": params.top_p,
            "presence_penalty": params.presence_penalty,
            "frequency_penalty": params.frequency_penalty,
        }
        # vLLM's (and k2serve's) extensions, sent only when they change something.
        if params.top_k:
            body["top_k"] = params.top_k
        if params.min_p:
            body["min_p"] = params.min_p
        if params.repetition_penalty != 1.0:
            body["repetition_penalty"] = params.repetition_penalty
        if params.ignore_eos:
            body["ignore_eos"] = True
        if params.cache_salt is not None:
            body["cache_salt"] = params.cache_salt
        if params.seed is not None:
            body["seed"] = params.seed
        if params.logit_bias:
            body["logit_bias"] = {str(k): v for k, v in params.logit_bias.items()}
        if stop:
            body["stop"] = stop
        sglang = self.config.engine == "sglang"
        if params.logprobs is not None:
            body["logprobs"] = max(params.logprobs, 1)  # OpenAI's completions: top n, >= 1
            if not sglang:
                body["return_tokens_as_token_ids"] = True  # vLLM: tokens as "token_id:N"
        if params.grammar is not None:  # the upstream enforces it (llguidance's Lark dialect)
            lark = as_lark(params.grammar.source)
            if sglang:  # its llguidance backend reads `ebnf` as Lark (or GBNF)
                body["ebnf"] = lark
            else:
                body["structured_outputs"] = {"grammar": lark}
        return body

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            headers = dict(self.config.headers)
            if self.config.api_key:
                headers["authorization"] = f"Bearer {self.config.api_key}"
            self._client = httpx.AsyncClient(
                headers=headers,
                timeout=httpx.Timeout(READ_TIMEOUT_S, connect=CONNECT_TIMEOUT_S))
        return self._client

    async def _stream(self, replica: Replica, body: dict, prompt_tokens: int
                      ) -> AsyncIterator[TextDelta]:
        replica.in_flight += 1
        completion = 0
        started = time.monotonic()
        outcome = "error"  # ok | error | aborted (the client or a stop string ended it)
        try:
            try:
                request = self._http().stream("POST", replica.url + "/completions", json=body)
                response = await request.__aenter__()
            except httpx.TransportError as exc:
                self._failed(replica)
                raise UpstreamUnavailable(f"{replica.url}: {exc!r}") from None
            try:
                if response.status_code >= 500:
                    self._failed(replica)
                    raise UpstreamUnavailable(f"{replica.url} answered {response.status_code}")
                if response.status_code != 200:
                    await response.aread()
                    raise self._refusal(response)
                replica.succeeded()
                finish: str | None = None
                matched: str | None = None
                async for line in sse_lines(response):
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    try:
                        chunk = json.loads(line[6:])
                    except ValueError:
                        raise APIError(502, f"The upstream engine sent a malformed event: "
                                            f"{line[:200]!r}", code="upstream_error",
                                       type="server_error") from None
                    if "error" in chunk:
                        raise APIError(502, f"The upstream engine failed: "
                                            f"{chunk['error'].get('message')}",
                                       code="upstream_error", type="server_error")
                    usage = chunk.get("usage")
                    for choice in chunk.get("choices") or ():
                        text = choice.get("text") or ""
                        logprobs = self._logprobs(choice.get("logprobs"))
                        completion += len(logprobs) if logprobs else (1 if text else 0)
                        finish = choice.get("finish_reason") or finish
                        # the stop string hit: vLLM's `stop_reason`, SGLang's `matched_stop`
                        for key in ("stop_reason", "matched_stop"):
                            if isinstance(choice.get(key), str):
                                matched = choice[key]
                        if text or logprobs:  # the finish itself rides on the usage delta
                            yield TextDelta(text=text, token_ids=[], logprobs=logprobs,
                                            finish_reason=None, prompt_tokens=prompt_tokens,
                                            completion_tokens=completion)
                    if usage is not None:
                        completion = _usage_int(usage, "completion_tokens", completion)
                        reported = _usage_int(usage, "prompt_tokens", prompt_tokens)
                        if reported != prompt_tokens:
                            log.warning("upstream %s counted %d prompt tokens, k2serve %d",
                                        replica.url, reported, prompt_tokens)
                        cached = _usage_int(usage.get("prompt_tokens_details") or {},
                                            "cached_tokens", 0)
                        outcome = "ok"  # before the yield: the consumer may stop at it
                        yield TextDelta(text="", token_ids=[], logprobs=None,
                                        finish_reason=finish or "stop",
                                        prompt_tokens=prompt_tokens,
                                        completion_tokens=completion, cached_tokens=cached,
                                        stop_sequence=matched)
                        return
                if finish is not None:  # an upstream that sends no usage
                    outcome = "ok"
                    yield TextDelta(text="", token_ids=[], logprobs=None, finish_reason=finish,
                                    prompt_tokens=prompt_tokens, completion_tokens=completion,
                                    stop_sequence=matched)
                    return
                raise UpstreamUnavailable(f"{replica.url} ended the stream before it finished")
            except httpx.TransportError as exc:
                self._failed(replica)
                raise UpstreamUnavailable(f"{replica.url}: {exc!r}") from None
            finally:
                await request.__aexit__(None, None, None)
        except GeneratorExit:
            if outcome != "ok":
                outcome = "aborted"
            raise
        finally:
            replica.in_flight -= 1
            UPSTREAM_LATENCY.labels(self.config.model_id, replica.url, outcome).observe(
                time.monotonic() - started)

    def _failed(self, replica: Replica) -> None:
        replica.failed(time.monotonic())
        UPSTREAM_FAILURES.labels(self.config.model_id, replica.url).inc()

    def _refusal(self, response: httpx.Response) -> APIError:
        """The upstream's own 4xx, passed on with its message."""
        try:
            error = response.json().get("error") or {}
        except ValueError:
            error = {}
        message = error.get("message") if isinstance(error, dict) else None
        if response.status_code == 429:
            return overloaded(f"the upstream engine is busy ({message or 'rate limited'})")
        return APIError(response.status_code, f"The upstream engine refused the request: "
                                              f"{message or response.text[:500]}",
                        param=error.get("param") if isinstance(error, dict) else None,
                        code=(error.get("code") if isinstance(error, dict) else None)
                        or "upstream_refused")

    def _logprobs(self, logprobs: dict | None) -> list[LogprobEntry] | None:
        """OpenAI completions logprobs (parallel arrays). The tokens are named by id where the
        upstream can (vLLM's `token_id:N` when asked, k2serve's `token_ids`), so the text and
        bytes relayed are this tokenizer's own, not an upstream's decoding of a lone token
        (which turns part of a UTF-8 character into U+FFFD)."""
        if not logprobs or not logprobs.get("tokens"):
            return None
        ids = logprobs.get("token_ids") or [None] * len(logprobs["tokens"])
        tops = logprobs.get("top_logprobs") or [None] * len(logprobs["tokens"])
        entries = []
        for token, token_id, lp, top in zip(logprobs["tokens"], ids,
                                             logprobs.get("token_logprobs") or (), tops):
            token, token_id, data = self._token(token, token_id)
            entries.append(LogprobEntry(
                token=token, token_id=token_id,
                logprob=lp if lp is not None else float("-inf"), bytes=data,
                top=[(*self._token(t)[:2], v, self._token(t)[2]) for t, v in (top or {}).items()]))
        return entries

    def _token(self, token: str, token_id: int | None = None) -> tuple[str, int, list[int]]:
        """(text, id, bytes) of an upstream's logprob token."""
        if token_id is None and token.startswith(TOKEN_ID_PREFIX):
            digits = token[len(TOKEN_ID_PREFIX):]
            token_id = int(digits) if digits.isdigit() else None
        if token_id is None:
            token_id = self.tokenizer.token_to_id(token)
        if token_id is None or token_id < 0:
            return token, -1, list(token.encode("utf-8"))
        data = self.tokenizer.token_bytes(token_id)
        return data.decode("utf-8", errors="replace"), token_id, list(data)


def _usage_int(usage: dict, key: str, default: int) -> int:
    value = usage.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else default
