"""A dedicated endpoint as a GenerationBackend: its replicas are a Ray Serve application.

k2serve renders and tokenizes prompts here (the model's tokenizer and chat template, a
TextModel), so keys, limits, the ledger and safety hold as for any model; the token ids go
to a replica through the application's deployment handle, whose router picks the replica
and queues a request while none is running (scale from zero: the request waits for one, at
most `start_timeout_s`, then gets 503 with retry-after).

A replica that dies (its actor killed) before the first delta is replaced by Serve and the
request is sent once more. After that, a streamed reply ends with a 502 error naming the
failure (it cannot take back what it sent); a reply sent only when the generation has ended
(REPLY_BUFFERED) collects the deltas here and is started once more from scratch, unseen.

`state` is the endpoint's (k2serve.platform.endpoints): a request to an endpoint that is not
STARTED gets a 400 naming its state, before anything runs.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Callable

from k2serve.engine.async_engine import Reservation
from k2serve.engine.sampling_params import SamplingParams
from k2serve.errors import APIError, bad_request
from k2serve.models.embedded import embedded_smollm2_gguf_path
from k2serve.models.loader import open_checkpoint
from k2serve.serving.backend import GENERATION_ENDPOINTS, REPLY_BUFFERED, TextDelta
from k2serve.serving.dedicated_config import DedicatedModel, Scaling
from k2serve.serving.text_model import TextModel
from k2serve.text.chat_template import ChatTemplate
from k2serve.text.loading import load_tokenizer
from k2serve.text.tokenizer_base import TokenizerBase

log = logging.getLogger("k2serve.ray")

ATTEMPTS = 2  # the first try and one retry


class ReplicaLost(Exception):
    """The replica serving a request died (or Serve could not reach it)."""


class RayEndpointBackend(TextModel):
    endpoints = GENERATION_ENDPOINTS
    load_state = None

    def __init__(self, endpoint_name: str, handle_factory: Callable[[], object],
                 tokenizer: TokenizerBase, *, context_length: int,
                 chat_template: ChatTemplate | None, start_timeout_s: float):
        super().__init__(tokenizer, context_length=context_length, chat_template=chat_template)
        self.endpoint_name = endpoint_name
        self._handle_factory = handle_factory
        self._handle = None
        self.start_timeout_s = start_timeout_s
        self.state = "PENDING"
        self.state_hint = ""  # how to start it, for the refusal
        self.last_request_at = time.time()
        self.on_request: Callable[[], None] | None = None  # wakes a scaled-to-zero endpoint
        self.in_flight = 0

    @property
    def listed(self) -> bool:
        """/v1/models lists running endpoints only."""
        return self.state == "STARTED"

    # -- ModelBackend ------------------------------------------------------------------------
    def stats(self) -> dict:
        return {"state": self.state, "in_flight": self.in_flight}

    def healthy(self) -> bool:
        return True  # a stopped or failed endpoint answers its own 4xx; the server is fine

    def shutdown(self) -> None:
        self._handle = None

    def unavailable(self) -> APIError | None:
        """Why it cannot serve now (its endpoint is not STARTED), or None."""
        if self.state == "STARTED":
            return None
        return bad_request(
            f"The endpoint '{self.endpoint_name}' is {self.state}, so it cannot serve "
            f"requests{self.state_hint}.", param="model", code="endpoint_not_running")

    def check(self, params: SamplingParams) -> None:
        error = self.unavailable()
        if error is not None:
            raise error
        if params.prompt_logprobs:
            raise bad_request("Prompt logprobs (echo with logprobs) are not available on a "
                              "dedicated endpoint.", param="echo", code="unsupported")

    def reserve(self, num_requests: int, owner: str | None = None, priority: int = 0
                ) -> Reservation:
        """The replicas queue and bound their own work (Serve's max_ongoing_requests)."""
        return Reservation(None, owner, num_requests, priority)

    # -- generation ----------------------------------------------------------------------
    async def generate(self, prompt_ids: list[int], params: SamplingParams, stop: list[str],
                       reservation: Reservation | None = None) -> AsyncIterator[TextDelta]:
        self.check(params)
        if reservation is not None:
            reservation.start_one()
        self.last_request_at = time.time()
        if self.on_request is not None:
            self.on_request()
        grammar = params.grammar.source if params.grammar is not None else None
        args = (prompt_ids, dataclasses.replace(params, grammar=None), grammar, stop)
        buffered = REPLY_BUFFERED.get()
        self.in_flight += 1
        try:
            for attempt in range(1, ATTEMPTS + 1):
                sent = False
                kept: list[TextDelta] = []
                try:
                    async for delta in self._stream(args):
                        if buffered:
                            kept.append(delta)
                        else:
                            sent = True
                            yield delta
                    for delta in kept:
                        yield delta
                    return
                except ReplicaLost as exc:
                    if sent or attempt == ATTEMPTS:
                        raise APIError(502, f"The replica of endpoint '{self.endpoint_name}' "
                                            f"serving this request failed: {exc}",
                                       code="replica_failed", type="server_error") from None
                    log.warning("endpoint %s: replica lost (%s); sending the request again",
                                self.endpoint_name, exc)
        finally:
            self.in_flight -= 1
            self.last_request_at = time.time()

    async def _stream(self, args) -> AsyncIterator[TextDelta]:
        import ray.exceptions
        from ray.serve.exceptions import RayServeException

        if self._handle is None:
            self._handle = self._handle_factory()
        response = self._handle.generate.options(stream=True).remote(*args)
        first = True
        try:
            while True:
                try:
                    if first:  # waits for a replica, when none is running yet
                        delta = await asyncio.wait_for(response.__anext__(),
                                                       self.start_timeout_s)
                        first = False
                    else:
                        delta = await response.__anext__()
                except StopAsyncIteration:
                    return
                except asyncio.TimeoutError:
                    raise APIError(503, f"No replica of endpoint '{self.endpoint_name}' "
                                        f"could start within {self.start_timeout_s:g} s. "
                                        f"Retry shortly.", code="endpoint_starting",
                                   type="service_unavailable",
                                   headers={"retry-after": "10"}) from None
                except ray.exceptions.RayTaskError as exc:
                    cause = getattr(exc, "cause", None)
                    if isinstance(cause, APIError):
                        raise cause from None
                    if isinstance(cause, ray.exceptions.RayError):
                        raise ReplicaLost(type(cause).__name__) from None
                    raise APIError(502, f"The replica of endpoint '{self.endpoint_name}' "
                                        f"failed: {cause or exc}", code="replica_error",
                                   type="server_error") from None
                except ray.exceptions.RayError as exc:
                    raise ReplicaLost(type(exc).__name__) from None
                except RayServeException as exc:  # the application is gone (deleted, failed)
                    raise APIError(503, f"The endpoint '{self.endpoint_name}' has no replicas "
                                        f"to serve it: {exc}", code="endpoint_unavailable",
                                   type="service_unavailable",
                                   headers={"retry-after": "10"}) from None
                yield delta
        finally:
            response.cancel()  # closed early (client gone, stop hit): abort it on the replica


def load_endpoint_backend(endpoint_name: str, model: DedicatedModel, cluster, app_name: str,
                          scaling: Scaling, tokenizers: dict) -> RayEndpointBackend:
    """The front of an endpoint: its model's tokenizer and chat template (loaded once per
    model, `tokenizers` its cache), its context length, a handle to its application."""
    key = (model.tokenizer, model.path, model.context_length)  # what the load depends on
    cached = tokenizers.get(key)
    if cached is None:
        path = model.tokenizer or model.path or embedded_smollm2_gguf_path()
        tokenizer = load_tokenizer(path)
        template = ChatTemplate.from_tokenizer(tokenizer) if tokenizer.chat_template else None
        context = model.context_length or \
            open_checkpoint(model.path or embedded_smollm2_gguf_path()).config.context_length
        cached = tokenizers[key] = (tokenizer, template, context)
    tokenizer, template, context = cached
    return RayEndpointBackend(endpoint_name, lambda: cluster.handle(app_name), tokenizer,
                              context_length=context, chat_template=template,
                              start_timeout_s=scaling.start_timeout_s)
