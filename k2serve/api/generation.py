"""Shared by chat and completions: request -> sampling params, and running n choices.

Both endpoints build their prompt token ids with k2serve.api.prompts, then hand them here.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field

import anyio
from fastapi import Request

from k2serve.api.request_scope import engine_priority, request_scope
from k2serve.api.schemas.common import SamplingFields
from k2serve.api.usage import UsageTracker
from k2serve.api.wire_json import json_line
from k2serve.engine.async_engine import Reservation
from k2serve.engine.foreground import FOREGROUND
from k2serve.engine.sampling_params import SamplingParams
from k2serve.errors import APIError, bad_request
from k2serve.serving.backend import (
    REPLY_BUFFERED,
    GenerationBackend,
    LogprobEntry,
    TextDelta,
)
from k2serve.structured import GrammarError, compiler_for
from k2serve.telemetry import tracing

DISCONNECT_POLL_S = 0.25


class RequestCapacity:
    """The engine capacity one HTTP request holds, from admission until its reply has ended.

    Routes get it from the `request_capacity` dependency, whose exit runs after the response
    has been sent or abandoned (a streamed body included). Then the request's generation is
    closed (aborting whatever still runs: a client gone mid-stream is not left to garbage
    collection) and its reservations released — on every path: a 4xx after admission, a
    flagged input, a client gone before the stream started, an engine error. Nothing is
    left to time out.
    """

    def __init__(self, owner: str | None, priority: int = 0):
        self.owner = owner  # the API key id: the engine shares itself fairly between keys
        self.priority = priority  # 0 interactive, 1 a batch line (after interactive work)
        self._reservations: list[Reservation] = []
        self._streams: list[AsyncIterator] = []
        # An interactive request pauses batch-only engine steps until it is admitted, and
        # new batch lines until its reply has ended (k2serve.engine.foreground).
        self._interactive = self._holding = priority == 0
        if self._interactive:
            FOREGROUND.enter()
            FOREGROUND.hold()

    def _stop_holding(self) -> None:
        if self._holding:
            self._holding = False
            FOREGROUND.release()

    def reserve(self, backend: GenerationBackend, num_requests: int) -> Reservation | None:
        """Admit `num_requests` choices now (before a streamed reply's 200), or raise
        EngineOverloaded (503) / ShareExceeded (429)."""
        try:
            reservation = backend.reserve(num_requests, self.owner, self.priority)
        finally:
            self._stop_holding()
        if reservation is not None:
            self._reservations.append(reservation)
        return reservation

    def owns(self, stream: AsyncIterator) -> AsyncIterator:
        """`stream` (the request's choices) is closed when the exchange ends."""
        self._streams.append(stream)
        return stream

    async def close(self) -> None:
        self._stop_holding()
        if self._interactive:
            self._interactive = False
            FOREGROUND.leave()
        try:
            with anyio.CancelScope(shield=True):  # the exchange may end by cancellation
                for stream in self._streams:
                    await stream.aclose()
        finally:
            for reservation in self._reservations:
                reservation.release()


async def request_capacity(request: Request) -> AsyncIterator[RequestCapacity]:
    """FastAPI dependency: the request's RequestCapacity, closed when the exchange ends."""
    capacity = RequestCapacity(request_scope(request).api_key_id,
                               engine_priority(request.scope))
    try:
        yield capacity
    finally:
        await capacity.close()


def sampling_params(req: SamplingFields, backend: GenerationBackend, max_tokens: int,
                    choice_index: int, grammar=None) -> SamplingParams:
    vocab = backend.tokenizer.vocab_size
    bias: dict[int, float] = {}
    for key, value in (req.logit_bias or {}).items():
        token = int(key)
        if not 0 <= token < vocab:
            raise bad_request(f"logit_bias refers to token id {token}, outside this model's "
                              f"vocabulary of {vocab} tokens.", param="logit_bias")
        bias[token] = value
    seed = req.seed + choice_index if req.seed is not None else None
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=req.top_k or 0,
        min_p=req.min_p or 0.0,
        repetition_penalty=req.repetition_penalty or 1.0,
        presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        logit_bias=bias,
        seed=seed,
        stop_token_ids=frozenset(backend.tokenizer.stop_token_ids),
        ignore_eos=req.ignore_eos,
        logprobs=req.num_top_logprobs,
        prompt_logprobs=bool(req.echo and req.num_top_logprobs is not None and choice_index == 0),
        grammar=grammar,
    )


async def compile_grammar(backend: GenerationBackend, grammar: str, what: str, param: str):
    """Compile (or take from the cache) on a worker thread, never on the engine's step;
    a grammar the library cannot build is the client's 400."""
    compiler = compiler_for(backend.tokenizer)
    try:
        with tracing.span("grammar compile", **{"k2serve.grammar.for": param}):
            return await anyio.to_thread.run_sync(
                lambda: compiler.compile(grammar, what=what, param=param))
    except GrammarError as exc:
        raise bad_request(str(exc), param=exc.param) from None


def merged_choices(backend: GenerationBackend, prompt_ids: list[int], req: SamplingFields,
                   max_tokens: int, tracker: UsageTracker | None = None, *,
                   grammar=None, stop: list[str] | None = None,
                   reservation: Reservation | None = None, cache_salt: str | None = None,
                   images: list | None = None) -> AsyncIterator[tuple[int, TextDelta]]:
    """Run req.n choices concurrently; yield (choice index, delta) as they come.

    `grammar` (compiled) constrains every choice; `stop` replaces req's stop strings;
    `reservation` (RequestCapacity.reserve) is the capacity the choices run in;
    `cache_salt` the prefix-cache namespace (k2serve.api.prefix_cache); `images` a vision
    model's prompt images (k2serve.engine.multimodal.ImageInput), shared by every choice.

    Closing this iterator cancels every choice, which aborts their engine requests. The
    tracker sees every delta and is finished here, however the request ends. Bad sampling
    fields are a 400 raised by this call itself, before a streamed reply's 200.
    """
    params = [sampling_params(req, backend, max_tokens, i, grammar) for i in range(req.n)]
    for p in params:
        p.cache_salt = cache_salt
        backend.check(p)
    stop_strings = req.stop_list if stop is None else stop
    return _run_choices(backend, prompt_ids, params, stop_strings, tracker, reservation,
                        buffered=not getattr(req, "stream", False), images=images)


async def _run_choices(backend: GenerationBackend, prompt_ids: list[int],
                       params: list[SamplingParams], stop_strings: list[str],
                       tracker: UsageTracker | None, reservation: Reservation | None,
                       buffered: bool = False, images: list | None = None
                       ) -> AsyncIterator[tuple[int, TextDelta]]:
    n = len(params)
    queue: asyncio.Queue = asyncio.Queue()
    done = object()
    # only a vision model's backend is handed images (the others' generate has no such field)
    extra = {"images": images} if images else {}

    async def pump(index: int) -> None:
        try:
            async for delta in backend.generate(prompt_ids, params[index], stop_strings,
                                                reservation=reservation, **extra):
                await queue.put((index, delta))
        except Exception as exc:  # delivered to the consumer, which raises it
            await queue.put((index, exc))
        finally:
            await queue.put((index, done))

    context = contextvars.copy_context()
    context.run(REPLY_BUFFERED.set, buffered)
    tasks = [asyncio.create_task(pump(i), context=context.copy()) for i in range(n)]
    remaining = n
    status, error = "client_closed", None
    try:
        while remaining:
            index, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, Exception):
                status, error = "error", str(item)
                raise item
            else:
                if tracker is not None:
                    tracker.on_delta(index, item)
                yield index, item
        status = "ok"
    finally:
        for task in tasks:
            task.cancel()
        # Report before awaiting anything: when the client drops a stream, Starlette cancels
        # this generator's scope, and an await here would be cancelled too.
        if tracker is not None:
            tracker.finish(status, error)
        with anyio.CancelScope(shield=True):
            await asyncio.gather(*tasks, return_exceptions=True)


async def until_disconnected(request: Request, work: Awaitable):
    """Await `work`, cancelling it if the HTTP client goes away first."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if done:
                return task.result()
            if await request.is_disconnected():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                raise APIError(499, "Client closed the request.")
    finally:
        if not task.done():
            task.cancel()


@dataclass
class ChoiceAccumulator:
    """Collects the deltas of one choice for a non-streaming reply."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[LogprobEntry] = field(default_factory=list)
    finish_reason: str | None = None
    completion_tokens: int = 0
    cached_tokens: int = 0
    prompt_logprobs: list[LogprobEntry | None] | None = None
    stop_sequence: str | None = None
    marks: list[tuple[int, int]] = field(default_factory=list)  # (text offset, tokens) per delta

    def add(self, delta: TextDelta) -> None:
        self.cached_tokens = delta.cached_tokens
        if delta.prompt_logprobs is not None:
            self.prompt_logprobs = delta.prompt_logprobs
        self.marks.append((len(self.text), len(delta.token_ids)))
        self.text += delta.text
        self.token_ids += delta.token_ids
        if delta.logprobs:
            self.logprobs += delta.logprobs
        self.completion_tokens = delta.completion_tokens
        if delta.finish_reason:
            self.finish_reason = delta.finish_reason
            self.stop_sequence = delta.stop_sequence


async def collect(choices: AsyncIterator[tuple[int, TextDelta]], n: int) -> list[ChoiceAccumulator]:
    acc = [ChoiceAccumulator() for _ in range(n)]
    async for index, delta in choices:
        acc[index].add(delta)
    return acc


# -- logprob formats -----------------------------------------------------------------------
def together_logprobs(entries: list[LogprobEntry | None]) -> dict:
    """Together's LogprobsPart: flat parallel arrays (top_logprobs: one map per position)."""
    return {
        "tokens": [e.token if e else "" for e in entries],
        "token_ids": [e.token_id if e else None for e in entries],
        "token_logprobs": [e.logprob if e else None for e in entries],
        "top_logprobs": [({t: lp for t, _, lp, _ in e.top} if e else None) for e in entries],
    }


def openai_chat_logprobs(entries: list[LogprobEntry]) -> dict:
    return {"content": [
        {"token": e.token, "logprob": e.logprob, "bytes": e.bytes,
         "top_logprobs": [{"token": t, "logprob": lp, "bytes": b} for t, _, lp, b in e.top]}
        for e in entries], "refusal": None}


def usage_dict(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0,
               reasoning_tokens: int | None = None) -> dict:
    """Chat usage; `reasoning_tokens` (a reasoning model's) as OpenAI details them."""
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
             "total_tokens": prompt_tokens + completion_tokens,
             "prompt_tokens_details": {"cached_tokens": cached_tokens}}
    if reasoning_tokens is not None:
        usage["completion_tokens_details"] = {"reasoning_tokens": reasoning_tokens}
    return usage


async def stream_deltas(choices: AsyncIterator[tuple[int, TextDelta]], n: int, prompt_tokens: int
                        ) -> AsyncIterator[tuple[int, TextDelta, dict | None]]:
    """(index, delta, usage) for each delta worth a chunk; usage only on the very last one.

    Together style: usage rides on the final chunk itself, not on an extra empty-choices chunk
    (which naive `chunk.choices[0]` client code crashes on).
    """
    completion_tokens = [0] * n
    cached_tokens = [0] * n
    finished = 0
    async for index, delta in choices:
        completion_tokens[index] = delta.completion_tokens
        cached_tokens[index] = delta.cached_tokens
        if not delta.text and not delta.finish_reason and not delta.logprobs:
            continue
        usage = None
        if delta.finish_reason:
            finished += 1
            if finished == n:
                # The prompt is counted once; its cache hits are those of the first choice.
                usage = usage_dict(prompt_tokens, sum(completion_tokens), cached_tokens[0])
        yield index, delta, usage


async def sse_stream(chunks: AsyncIterator[dict]) -> AsyncIterator[str]:
    """SSE framing: `data: {json}` per chunk, an in-band error if generation fails, `[DONE]`."""
    try:
        async for chunk in chunks:
            yield sse(chunk)
    except APIError as exc:
        yield sse(exc.body())
    except Exception as exc:  # Stainless SDKs raise APIError on an in-band error
        yield sse({"error": {"message": str(exc), "type": "server_error", "param": None,
                             "code": None}})
    yield SSE_DONE


def sse(payload: dict) -> str:
    return f"data: {json_line(payload)}\n\n"


SSE_DONE = "data: [DONE]\n\n"
