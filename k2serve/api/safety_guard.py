"""The `safety_model` field of chat and completions: the input is checked before
generation, the output while it is generated, with a moderation model of this server.

How a guarded generation behaves (README, "Safety model"):
- The input (each message's text, or the prompt) is scored first. If it is flagged,
  nothing is generated: every choice ends at once with `finish_reason: "content_filter"`
  and empty content.
- Output text is held back and released in checked pieces: a piece is checked when it
  ends a sentence (and holds at least MIN_WORDS words), reaches MAX_PENDING_WORDS words,
  or the choice ends. A check scores the trailing window of the choice's text so far
  (the classifier's 100 words), so each check costs one fixed-size forward pass. A flagged
  piece is never sent: the choice ends with `finish_reason: "content_filter"`, its
  generation is stopped, and the text released before it stays.
- Streaming and non-streaming replies go through the same checks, so they agree.
- A flagged request is recorded with status `content_filter` in the usage ledger (its
  error column names the stage and labels) and logged on `k2serve.safety`.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fastapi import Request

from k2serve.api.models_lookup import what_it_serves
from k2serve.api.request_scope import request_scope
from k2serve.errors import APIError
from k2serve.safety.labels import LABELS, THRESHOLD, openai_scores
from k2serve.safety.model import TextScore
from k2serve.safety.serving import ModerationBackend
from k2serve.serving.backend import TextDelta
from k2serve.telemetry import tracing

log = logging.getLogger("k2serve.safety")

FINISH_REASON = "content_filter"
# Together's legacy Python SDK (1.x, `Together/v1 PythonBindings`) validates finish_reason
# against stop|eos|length|tool_calls|error and fails on content_filter: it gets "error".
LEGACY_FINISH_REASON = "error"
MIN_WORDS = 4  # a sentence end releases a piece only past this many words
MAX_PENDING_WORDS = 16  # ... and a piece never waits for more than this many
TAIL_CHARS = 4096  # what an output check tokenizes (its last 100 words are scored)
INPUT_CHECK_CHARS = 1_000_000  # input checked: the last this-many characters of the messages
_SENTENCE_END = re.compile(r"[.!?;:\n]")


# -- which model -----------------------------------------------------------------------
def moderation_models(request: Request) -> list[str]:
    registry = request.app.state.registry
    return [spec.id for spec in registry.specs() if spec.type == "moderation"]


def moderation_backend(request: Request, model_id: str, param: str) -> ModerationBackend:
    """The moderation model `model_id`, or a 4xx naming `param` and what is served."""
    served = moderation_models(request)
    listing = ", ".join(served) if served else "none (start the server with --families moderation)"
    entry = request.app.state.registry.get(model_id)
    if entry is None:
        status, code = (400, "invalid_safety_model") if param == "safety_model" else \
            (404, "model_not_found")
        raise APIError(status, f"The {param} '{model_id}' is not served here. Moderation "
                               f"models served: {listing}.", param=param, code=code)
    spec, backend = entry
    if spec.type != "moderation" or not entry.serves("moderations"):
        raise APIError(400, f"The model '{model_id}' is a {spec.type} model and cannot classify "
                            f"content; it serves {what_it_serves(spec.type)}. Moderation "
                            f"models served: {listing}.", param=param,
                       code="model_not_supported")
    return backend


def safety_guard(request: Request, safety_model: str | None) -> SafetyGuard | None:
    """The guard a request asked for with `safety_model`, or None. Raises 400."""
    if safety_model is None:
        return None
    return SafetyGuard(safety_model, moderation_backend(request, safety_model, "safety_model"))


# -- verdicts --------------------------------------------------------------------------
@dataclass
class Verdict:
    stage: str  # input | output
    labels: list[str] = field(default_factory=list)  # flagged labels, strongest first
    categories: list[str] = field(default_factory=list)  # OpenAI categories flagged

    @property
    def flagged(self) -> bool:
        return bool(self.labels)

    def summary(self) -> str:
        return f"{self.stage}: {','.join(self.labels)}"[:64]


def verdict_of(stage: str, scores: list[TextScore]) -> Verdict:
    """Flagged when any label of any scored text reaches the threshold."""
    top = {label: max((s.scores[label] for s in scores), default=0.0) for label in LABELS}
    labels = sorted((label for label in LABELS if top[label] >= THRESHOLD), key=top.get,
                    reverse=True)
    categories = [c for c, score in openai_scores(top).items() if score >= THRESHOLD]
    return Verdict(stage, labels, categories)


def finish_reason_for(request: Request) -> str:
    headers = getattr(request, "headers", None) or {}
    return LEGACY_FINISH_REASON if "PythonBindings" in headers.get("user-agent", "") \
        else FINISH_REASON


def chat_input_texts(messages) -> list[str]:
    """Every message's text: string content, or the text parts of a parts list."""
    texts = []
    for m in messages:
        content = m.content
        if isinstance(content, str):
            texts.append(content)
        elif isinstance(content, list):
            texts += [p.get("text", "") for p in content
                      if isinstance(p, dict) and isinstance(p.get("text"), str)]
    return texts


def _bounded(texts: list[str]) -> list[str]:
    """The last INPUT_CHECK_CHARS characters of the texts (what a truncated prompt keeps)."""
    out, budget = [], INPUT_CHECK_CHARS
    for text in reversed(texts):
        if budget <= 0:
            break
        out.append(text[-budget:])
        budget -= len(text)
    return out[::-1]


# -- the guard -------------------------------------------------------------------------
class SafetyGuard:
    def __init__(self, model_id: str, backend: ModerationBackend):
        self.model_id = model_id
        self.backend = backend
        self.verdicts: list[Verdict] = []  # flagged ones, for the reply's `safety` field

    def report(self) -> dict:
        """The reply's `safety` field: which model checked, and what it flagged."""
        return {"model": self.model_id, "flagged": bool(self.verdicts),
                "flags": [{"stage": v.stage, "labels": v.labels, "categories": v.categories}
                          for v in self.verdicts]}

    async def _check(self, stage: str, texts: list[str], *, tail: bool = False) -> Verdict:
        with tracing.span("safety check", **{"k2serve.safety.stage": stage,
                                             "k2serve.safety.model": self.model_id}):
            verdict = verdict_of(stage, await self.backend.classify(texts, tail=tail))
        if verdict.flagged:
            self.verdicts.append(verdict)
        return verdict

    def _record(self, request: Request, tracker, verdict: Verdict) -> None:
        """The ledger row's status and error, and a log line with the labels."""
        if tracker is not None:
            tracker.mark(FINISH_REASON, verdict.summary())
        log.warning(json.dumps({
            "request_id": request_scope(request).request_id,
            "safety_model": self.model_id, "stage": verdict.stage, "labels": verdict.labels,
            "categories": verdict.categories}, separators=(",", ":")))

    async def guarded(self, request: Request, choices: AsyncIterator[tuple[int, TextDelta]],
                      input_texts: list[str], n: int, prompt_tokens: int, tracker=None
                      ) -> AsyncIterator[tuple[int, TextDelta]]:
        """`choices` (merged_choices' output) with the input checked first and each choice's
        output released in checked pieces (module docstring). Closing it closes `choices`.
        With n > 1, a flagged choice ends while the others go on."""
        finish = finish_reason_for(request)
        try:
            verdict = await self._check("input", _bounded(input_texts))
            if verdict.flagged:  # nothing is generated
                self._record(request, tracker, verdict)
                if tracker is not None:
                    tracker.finish("ok")
                for index in range(n):
                    yield index, TextDelta("", [], None, finish, prompt_tokens, 0)
                return
            pieces = [_Piece() for _ in range(n)]
            stopped = [False] * n
            async for index, delta in choices:
                if stopped[index]:
                    continue
                piece = pieces[index]
                piece.add(delta)
                if not piece.due(delta):
                    continue
                verdict = await self._check("output", [piece.checked_tail()], tail=True)
                if not verdict.flagged:
                    yield index, piece.release()
                    continue
                stopped[index] = True
                self._record(request, tracker, verdict)
                yield index, piece.cut(finish)
                if all(stopped):
                    return
        finally:
            await choices.aclose()


class _Piece:
    """One choice's text held back since its last release, merged into one delta."""

    def __init__(self):
        self.released = ""
        self.delta: TextDelta | None = None

    def add(self, delta: TextDelta) -> None:
        held = self.delta
        if held is None:
            self.delta = TextDelta(delta.text, list(delta.token_ids),
                                   list(delta.logprobs) if delta.logprobs else None,
                                   delta.finish_reason, delta.prompt_tokens,
                                   delta.completion_tokens, delta.cached_tokens,
                                   delta.prompt_logprobs)
            return
        held.text += delta.text
        held.token_ids += delta.token_ids
        if delta.logprobs:
            held.logprobs = (held.logprobs or []) + list(delta.logprobs)
        held.finish_reason = delta.finish_reason
        held.completion_tokens = delta.completion_tokens
        held.cached_tokens = delta.cached_tokens
        if delta.prompt_logprobs is not None:
            held.prompt_logprobs = delta.prompt_logprobs

    def due(self, last: TextDelta) -> bool:
        if last.finish_reason:
            return True
        words = len(self.delta.text.split())
        return words >= MAX_PENDING_WORDS or (
            words >= MIN_WORDS and _SENTENCE_END.search(last.text) is not None)

    def checked_tail(self) -> str:
        return (self.released + self.delta.text)[-TAIL_CHARS:]

    def release(self) -> TextDelta:
        delta, self.delta = self.delta, None
        self.released = (self.released + delta.text)[-TAIL_CHARS:]
        return delta

    def cut(self, finish_reason: str) -> TextDelta:
        """The flagged piece: its text withheld, the choice finished as filtered."""
        delta, self.delta = self.delta, None
        return TextDelta("", [], None, finish_reason, delta.prompt_tokens,
                         delta.completion_tokens, delta.cached_tokens, delta.prompt_logprobs)
