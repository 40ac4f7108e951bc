"""Our engine's text-generation backend (a GenerationBackend): tokenizer + chat template +
engine.

It turns prompts into token ids and engine outputs into text deltas (incremental
detokenization, stop strings, logprob entries). It knows nothing about HTTP.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator

from k2serve.engine.async_engine import AsyncEngine, Reservation
from k2serve.engine.sampling_params import SamplingParams
from k2serve.engine.sequence import GenerationRequest, TokenLogprob
from k2serve.serving.backend import GENERATION_ENDPOINTS, LogprobEntry, TextDelta
from k2serve.text.chat_template import ChatTemplate
from k2serve.text.detokenizer import IncrementalDetokenizer
from k2serve.text.stop import StopMatcher
from k2serve.text.tokenizer import encode_prompt
from k2serve.text.tokenizer_base import TokenizerBase
from k2serve.text.tool_parsers.kimi_k2 import SECTION_BEGIN as K2_SECTION_BEGIN


class TextBackend:
    endpoints = GENERATION_ENDPOINTS
    load_state = None  # its weights load before the server starts

    def __init__(self, tokenizer: TokenizerBase, engine: AsyncEngine, *, context_length: int,
                 chat_template: ChatTemplate | None):
        self.tokenizer = tokenizer
        self.engine = engine
        self.context_length = context_length
        self.chat_template = chat_template
        # The model's native tool-call format, recognised by its marker tokens.
        self.tool_format = ("kimi_k2" if tokenizer.token_to_id(K2_SECTION_BEGIN) is not None
                            else None)
        self._ids = itertools.count()

    def stats(self) -> dict:
        return self.engine.stats()

    def healthy(self) -> bool:
        return self.engine.health()

    def shutdown(self) -> None:
        self.engine.shutdown()

    def reserve(self, num_requests: int, owner: str | None = None) -> Reservation:
        """Admit the request's choices now, or raise EngineOverloaded before any reply.
        The caller releases the reservation however the request ends."""
        return self.engine.reserve(num_requests, owner)

    # -- prompts ----------------------------------------------------------------------
    def render_chat(self, messages: list[dict], tools: list[dict] | None = None,
                    **template_kwargs) -> str:
        if self.chat_template is None:
            raise ValueError("this model has no chat template; use /v1/completions")
        return self.chat_template.render(messages, tools=tools, add_generation_prompt=True,
                                         **template_kwargs)

    def encode_chat_prompt(self, text: str) -> list[int]:
        # Control-token text a user wrote stays plain text (see ChatPrompt).
        return encode_prompt(self.tokenizer, text)

    def encode_text_prompt(self, text: str) -> list[int]:
        # A raw prompt is plain text too, as in OpenAI's API: "<|im_end|>" in it is not a control
        # token (an app that puts user text into a completions prompt cannot be subverted).
        ids = self.tokenizer.encode(text, add_special_tokens=True, allow_special_tokens=False)
        if not ids and self.tokenizer.bos_token_id is not None:
            ids = [self.tokenizer.bos_token_id]  # an empty completion prompt starts at BOS
        return ids

    def logprob_entry(self, lp: TokenLogprob) -> LogprobEntry:
        tok = self.tokenizer
        return LogprobEntry(
            token=self._token_text(lp.token_id), token_id=lp.token_id, logprob=lp.logprob,
            bytes=list(tok.token_bytes(lp.token_id)),
            top=[(self._token_text(i), i, v, list(tok.token_bytes(i))) for i, v in lp.top])

    def _token_text(self, token_id: int) -> str:
        return self.tokenizer.token_bytes(token_id).decode("utf-8", errors="replace")

    # -- generation -------------------------------------------------------------------
    async def generate(self, prompt_ids: list[int], params: SamplingParams,
                       stop: list[str], reservation: Reservation | None = None
                       ) -> AsyncIterator[TextDelta]:
        """Stream text deltas for one choice. Closing the iterator aborts the generation.
        `reservation`: from `reserve`; it starts one of its slots.

        Tool-call markers are not special tokens (K2), so they survive detokenization for
        the tool parser while control tokens are skipped.
        """
        request_id = f"gen-{next(self._ids)}"
        detok = IncrementalDetokenizer(self.tokenizer, prompt_ids=prompt_ids)
        matcher = StopMatcher(stop) if stop else None
        completion_tokens = 0
        owner = reservation.owner if reservation is not None else None
        request = GenerationRequest(request_id, prompt_ids, params, owner=owner)
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
                )
                if finish:
                    return
        finally:
            await stream.aclose()
