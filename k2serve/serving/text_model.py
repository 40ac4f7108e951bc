"""What a text model is without its engine: its tokenizer, chat template and context length,
and how prompts become token ids. Shared by every GenerationBackend that renders and
tokenizes prompts itself: our engine's (text_backend.py) and an upstream engine's
(upstream.py)."""

from __future__ import annotations

from k2serve.engine.sequence import TokenLogprob
from k2serve.serving.backend import LogprobEntry
from k2serve.text.chat_template import ChatTemplate
from k2serve.text.reasoning import reasoning_format
from k2serve.text.tokenizer import encode_prompt
from k2serve.text.tokenizer_base import TokenizerBase
from k2serve.text.tool_parsers.kimi_k2 import SECTION_BEGIN as K2_SECTION_BEGIN


class TextModel:
    def __init__(self, tokenizer: TokenizerBase, *, context_length: int,
                 chat_template: ChatTemplate | None):
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.chat_template = chat_template
        # The model's native tool-call format, recognised by its marker tokens.
        self.tool_format = ("kimi_k2" if tokenizer.token_to_id(K2_SECTION_BEGIN) is not None
                            else None)
        # Whether (and how) the model writes its reasoning apart from its answer.
        self.reasoning = reasoning_format(chat_template)

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
