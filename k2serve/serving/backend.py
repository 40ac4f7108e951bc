"""What a model backend offers the layers above it.

Every model the registry serves has a backend that implements `ModelBackend`: which API
endpoints it answers, whether its weights are loaded, its queue depths, how it shuts down.
The endpoint names the protocol a backend also implements, so a route that has looked a
model up for its endpoint (`ModelRegistry.lookup`) knows what it holds:

- `chat.completions`, `completions` -> `GenerationBackend`: token ids in, an async stream of
  text deltas (with their token usage) out. Our own engine implements it (TextBackend), and
  so does any engine put behind k2serve: the platform, the prompt builder
  (k2serve.api.prompts) and tool calls that always validate sit above this protocol.
- `embeddings`, `rerank`, `audio.speech`, `audio.transcribe`, `audio.translate` ->
  `MeteredBackend`: a bound on a request's tokens from its body alone, for rate limits.
- `moderations` -> k2serve.safety.serving.ModerationBackend (`classify`).
- `images`, `videos` -> k2serve.diffusion.serving.DiffusionBackend (a diffusers pipeline).

A model's price is the registry's (`ModelSpec.pricing`): it belongs to the model id a key is
billed for, not to whichever engine runs it.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from k2serve.engine.async_engine import Reservation
    from k2serve.engine.sampling_params import SamplingParams
    from k2serve.text.reasoning import ReasoningFormat
    from k2serve.text.tokenizer_base import TokenizerBase

GENERATION_ENDPOINTS = frozenset({"chat.completions", "completions"})

# True while a generation runs for a reply sent only once it has ended (a request without
# `stream`): a backend whose engine failed mid-way may then start it again from scratch,
# unseen by the client. A streamed reply cannot take back what it sent.
REPLY_BUFFERED: ContextVar[bool] = ContextVar("k2serve_reply_buffered", default=False)


# -- what a generation streams ---------------------------------------------------------
@dataclass
class LogprobEntry:
    """One token's log-probability, with the most likely alternatives at its position."""

    token: str
    token_id: int
    logprob: float
    bytes: list[int]
    top: list[tuple[str, int, float, list[int]]] = field(default_factory=list)  # token, id, lp, bytes


@dataclass
class TextDelta:
    """The next piece of one choice's output, with the request's token usage so far."""

    text: str
    token_ids: list[int]
    logprobs: list[LogprobEntry] | None
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int  # so far
    cached_tokens: int = 0
    prompt_logprobs: list[LogprobEntry | None] | None = None
    stop_sequence: str | None = None  # the stop string that ended the choice, if one did
    scheduled_ns: int | None = None  # our engine, first delta: when it joined the batch


@runtime_checkable
class ModelBackend(Protocol):
    """What every backend offers (see the module docstring for what each endpoint adds)."""

    @property
    def endpoints(self) -> frozenset[str]:
        """The API endpoints it serves, named as the usage ledger names them."""

    @property
    def load_state(self) -> str | None:
        """`loading`, `ready` or `failed` for a model that loads in the background (a request
        to a loading model waits for it); None for one loaded before the server started."""

    def stats(self) -> dict | None:
        """Its queue depths for /health (None: it queues nothing of its own)."""

    def healthy(self) -> bool:
        """False when it can no longer serve (its engine thread died): /health answers 503."""

    def shutdown(self) -> None:
        """Stop its threads; called once when the server stops."""


@runtime_checkable
class GenerationBackend(ModelBackend, Protocol):
    """A text-generation model: chat and text completions."""

    context_length: int
    tokenizer: TokenizerBase
    tool_format: str | None  # the model's native tool-call format ("kimi_k2"), or None
    reasoning: ReasoningFormat | None  # how it marks its thinking; None: it does not think

    def render_chat(self, messages: list[dict], tools: list[dict] | None = None,
                    **template_kwargs) -> str:
        """The chat prompt as text (raises ValueError without a chat template)."""

    def encode_chat_prompt(self, text: str) -> list[int]: ...

    def encode_text_prompt(self, text: str) -> list[int]: ...

    def check(self, params: SamplingParams) -> None:
        """Raise APIError (400) for sampling it cannot do, before anything is generated."""

    def reserve(self, num_requests: int, owner: str | None = None, priority: int = 0
                ) -> Reservation:
        """Admit `num_requests` choices now, or raise EngineOverloaded before any reply.
        `priority`: 0 interactive, 1 a batch job's line (queued after interactive work)."""

    def generate(self, prompt_ids: list[int], params: SamplingParams, stop: list[str],
                 reservation: Reservation | None = None) -> AsyncIterator[TextDelta]:
        """Stream one choice's text deltas; closing the iterator aborts the generation."""

    def logprob_entry(self, logprob) -> LogprobEntry: ...


@runtime_checkable
class MeteredBackend(ModelBackend, Protocol):
    """A backend whose requests' tokens are bounded from the body alone (no tokenizing)."""

    def usage_bound(self, body: dict) -> int | tuple[int, int]:
        """The most tokens the request may use, held against the key's TPM until it ends
        (an image or video model: (images, kilopixel-steps), k2serve.diffusion.serving)."""


_MODEL_BACKEND_MEMBERS = ("endpoints", "load_state", "stats", "healthy", "shutdown")


def check_backend(backend: object) -> None:
    """Raise TypeError unless `backend` has every ModelBackend member. Looked up statically:
    `isinstance` against the protocol would run `load_state` (a property) to find it."""
    absent = object()
    missing = [name for name in _MODEL_BACKEND_MEMBERS
               if inspect.getattr_static(backend, name, absent) is absent]
    if missing:
        raise TypeError(f"{type(backend).__name__} does not implement ModelBackend "
                        f"(k2serve.serving.backend): it lacks {', '.join(missing)}")


class QueuelessBackend:
    """Defaults for a backend without an engine of its own: nothing queued, always healthy,
    nothing to stop (its model loads on the background loader thread)."""

    def stats(self) -> dict | None:
        return None

    def healthy(self) -> bool:
        return True

    def shutdown(self) -> None:
        return None
