"""What the layers around the routes tell them about a request, on one explicit object.

The outermost middleware puts a `RequestScope` on the request (`request.state.k2serve`, an
entry of the ASGI scope's state); the body read stores the body on it, and the platform (when
there is one) sets who is calling and who observes the request's usage. Routes read it with
`request_scope(request)`; without a platform the caller and the observer stay None.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from starlette.requests import Request

    from k2serve.api.usage import UsageRecord, UsageTracker

STATE_KEY = "k2serve"
# ASGI scope key of a batch job's line, run in-process by k2serve.api.batch_runner:
# {"key_id": ..., "batch_id": ...}. No HTTP client can set it.
BATCH_SCOPE = "k2serve.batch"
BATCH_PRIORITY = 1  # a batch line's engine priority (interactive requests: 0, first)


class Caller(Protocol):
    """The API key a request authenticated with (k2serve.platform.keys.KeyInfo)."""

    id: str
    name: str

    def allows_model(self, model: str) -> bool: ...


class UsageObserver(Protocol):
    """Told of a request's generation as it runs: the platform writes the ledger from it."""

    def started(self, tracker: UsageTracker) -> None:
        """A generation began; its tracker can report the tokens so far at any time."""

    def progress(self, snapshot: UsageRecord) -> None:
        """The tokens so far (status `in_progress`), every few seconds while it runs."""

    def finished(self, record: UsageRecord) -> None:
        """The generation ended: its final usage, once."""

    def detached(self) -> None:
        """The generation goes on after the reply has ended (a background response): its
        usage is final when `finished` comes, not when the reply ends."""


@dataclass(eq=False)
class RequestScope:
    request_id: str
    body: bytes | None = None  # the whole body, once read (k2serve.api.middleware.read_body)
    caller: Caller | None = None  # None: no platform, or open mode
    usage: UsageObserver | None = None
    # A prompt admission already tokenized to count it, ((kind, text), ids): the route
    # reuses the ids when it builds the same text (k2serve.api.prompts), not tokenizing twice.
    encoded_prompt: tuple[tuple[str, str], list[int]] | None = None
    model: str | None = None  # the model it asked for, once known (metrics label it by this)

    @property
    def api_key_id(self) -> str | None:
        return self.caller.id if self.caller is not None else None


def scope_state(scope: dict) -> RequestScope:
    """The RequestScope of an ASGI scope, made on first use."""
    state = scope.setdefault("state", {})
    rs = state.get(STATE_KEY)
    if rs is None:
        rs = state[STATE_KEY] = RequestScope(request_id="")
    return rs


def request_scope(request: Request) -> RequestScope:
    return scope_state(request.scope)


def engine_priority(scope: dict) -> int:
    """The priority of the request's generations in the engine: a batch line's comes after
    every interactive request's."""
    return BATCH_PRIORITY if scope.get(BATCH_SCOPE) is not None else 0
