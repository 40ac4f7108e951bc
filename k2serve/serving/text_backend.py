"""Our engine's text-generation backend (a GenerationBackend): a TextModel (tokenizer +
chat template) + our engine.

It turns engine outputs into text deltas (incremental detokenization, stop strings, logprob
entries). It knows nothing about HTTP.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator

from k2serve.engine.async_engine import AsyncEngine, Reservation
from k2serve.engine.multimodal import ImageInput
from k2serve.engine.sampling_params import SamplingParams
from k2serve.engine.sequence import GenerationRequest
from k2serve.serving.backend import GENERATION_ENDPOINTS, TextDelta
from k2serve.serving.text_model import TextModel
from k2serve.serving.vision import VisionPrompter
from k2serve.text.chat_template import ChatTemplate
from k2serve.text.detokenizer import IncrementalDetokenizer
from k2serve.text.stop import StopMatcher
from k2serve.text.tokenizer_base import TokenizerBase


class TextBackend(TextModel):
    endpoints = GENERATION_ENDPOINTS
    load_state = None  # its weights load before the server starts

    def __init__(self, tokenizer: TokenizerBase, engine: AsyncEngine, *, context_length: int,
                 chat_template: ChatTemplate | None, vision: VisionPrompter | None = None):
        """vision: a vision model's prompter (its chat takes images); None for text only."""
        super().__init__(tokenizer, context_length=context_length, chat_template=chat_template)
        self.engine = engine
        self.vision = vision
        self._ids = itertools.count()

    def stats(self) -> dict:
        return self.engine.stats()

    def healthy(self) -> bool:
        return self.engine.health()

    def shutdown(self) -> None:
        self.engine.shutdown()

    def check(self, params: SamplingParams) -> None:
        """Our engine does everything SamplingParams can say."""

    def reserve(self, num_requests: int, owner: str | None = None, priority: int = 0
                ) -> Reservation:
        """Admit the request's choices now, or raise EngineOverloaded before any reply.
        The caller releases the reservation however the request ends."""
        return self.engine.reserve(num_requests, owner, priority)

    # -- generation -------------------------------------------------------------------
    async def generate(self, prompt_ids: list[int], params: SamplingParams,
                       stop: list[str], reservation: Reservation | None = None,
                       images: list[ImageInput] | None = None) -> AsyncIterator[TextDelta]:
        """Stream text deltas for one choice. Closing the iterator aborts the generation.
        `reservation`: from `reserve`; it starts one of its slots. `images`: a vision
        model's prompt images (VisionPrompter.image_inputs).

        Tool-call markers are not special tokens (K2), so they survive detokenization for
        the tool parser while control tokens are skipped.
        """
        request_id = f"gen-{next(self._ids)}"
        detok = IncrementalDetokenizer(self.tokenizer, prompt_ids=prompt_ids)
        matcher = StopMatcher(stop) if stop else None
        completion_tokens = 0
        owner = reservation.owner if reservation is not None else None
        priority = reservation.priority if reservation is not None else 0
        request = GenerationRequest(request_id, prompt_ids, params, owner=owner,
                                    images=list(images or ()), priority=priority)
        stream = self.engine.generate(request, reservation)
        try:
            async for out in stream:
                completion_tokens += len(out.token_ids)
                text = "".join(detok.add(t) for t in out.token_ids)
                finish = out.finish_reason
                if finish:  # a character left incomplete at the end is emitted as U+FFFD
                    text += detok.flush()
                if matcher is not None:
                    text, hit = matcher.feed(text)
                    if hit:
                        finish = "stop"
                    elif finish:
                        text += matcher.flush()
                prompt_lps = None
                if out.prompt_logprobs is not None:
                    prompt_lps = [self.logprob_entry(lp) if lp else None
                                  for lp in out.prompt_logprobs]
                yield TextDelta(
                    text=text,
                    token_ids=out.token_ids,
                    logprobs=[self.logprob_entry(lp) for lp in out.logprobs] if out.logprobs else None,
                    finish_reason=finish,
                    prompt_tokens=out.num_prompt_tokens,
                    completion_tokens=completion_tokens,
                    cached_tokens=out.num_cached_tokens,
                    prompt_logprobs=prompt_lps,
                    stop_sequence=matcher.matched if matcher is not None else None,
                    scheduled_ns=out.scheduled_ns,
                )
                if finish:
                    return
        finally:
            await stream.aclose()
