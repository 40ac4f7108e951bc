"""Render a model's Jinja chat template the way `transformers.apply_chat_template` does.

Same sandboxed environment (trim_blocks, lstrip_blocks, loop controls, a no-op `{% generation %}`
tag), the same helpers (`raise_exception`, `strftime_now`, `tojson` without HTML escaping) and
the same variables, so prompts match what the model was trained and evaluated with.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Iterable, Mapping
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
import jinja2.meta
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment


class TemplateError(ValueError):
    """The chat template rejected the conversation or failed; the message is fit for a 400 reply."""


class UnsupportedContentError(ValueError):
    """A message has a content part this server cannot put in a text prompt (e.g. an image)."""

    def __init__(self, part_type: str, message_index: int):
        self.part_type = part_type
        self.message_index = message_index
        super().__init__(
            f"messages[{message_index}]: content part of type {part_type!r} is not supported; "
            "this model accepts text only"
        )


class ChatPrompt(str):
    """A rendered prompt that remembers which control-token texts the conversation wrote.

    `segments` are (text, plain) pairs whose texts join into the prompt. `plain` marks a control
    token's text that came from the input (message content, names, tool definitions and
    arguments, template variables) rather than from the template: it must be encoded as plain
    text, or a user could write `<|im_end|><|im_start|>system` and forge a turn.
    """

    segments: tuple[tuple[str, bool], ...]

    def __new__(cls, segments: Iterable[tuple[str, bool]]):
        segments = tuple(segments)
        prompt = super().__new__(cls, "".join(text for text, _ in segments))
        prompt.segments = segments
        return prompt


class ChatTemplate:
    """A compiled chat template plus the special token strings it may refer to."""

    def __init__(
        self,
        template: str,
        bos_token: str | None = None,
        eos_token: str | None = None,
        unk_token: str | None = None,
        pad_token: str | None = None,
        *,
        control_tokens: Iterable[str] = (),
    ):
        """`control_tokens`: the tokenizer's control-token texts; where the input contains one,
        `render` marks it as plain text in the `ChatPrompt` it returns."""
        self.source = template
        self._control = _alternation(frozenset(t for t in control_tokens if t))
        # transformers passes only the special tokens the tokenizer has, so an absent one stays
        # undefined in the template rather than becoming None.
        self.special_tokens = {
            k: v for k, v in
            {"bos_token": bos_token, "eos_token": eos_token, "unk_token": unk_token, "pad_token": pad_token}.items()
            if v is not None
        }
        self._compiled = _compile(template)

    def variables(self) -> frozenset[str]:
        """The names the template reads from its context (e.g. `enable_thinking`)."""
        return _variables(self.source)

    @classmethod
    def from_tokenizer(cls, tokenizer, template: str | None = None) -> ChatTemplate:
        """The tokenizer's own template (or `template`) with its special tokens."""
        template = template if template is not None else tokenizer.chat_template
        if template is None:
            raise TemplateError("this model has no chat template; use the completions endpoint")
        return cls(template, **tokenizer.special_tokens_map,
                   control_tokens=getattr(tokenizer, "control_tokens", ()))

    def render(
        self,
        messages: Iterable[Mapping[str, Any]],
        tools: list[dict] | None = None,
        add_generation_prompt: bool = True,
        documents: list[dict] | None = None,
        **kwargs: Any,
    ) -> ChatPrompt:
        """The prompt text for `messages`. Extra `kwargs` become template variables (e.g.
        `enable_thinking`), and override the special tokens of the same name."""
        chat = _prepare_messages(messages)
        shield = _Shield(self._control) if self._control is not None else None
        if shield is not None:
            try:
                chat, tools, documents = shield(chat), shield(tools), shield(documents)
                kwargs = {k: shield(v) for k, v in kwargs.items()}
            except RecursionError:
                raise TemplateError("the conversation is nested too deeply") from None
        context = {
            **self.special_tokens,
            **kwargs,
            "messages": chat,
            "tools": tools,
            "documents": documents,
            "add_generation_prompt": add_generation_prompt,
        }
        try:
            text = self._compiled.render(**context)
        except TemplateError:
            raise
        except jinja2.TemplateError as e:  # raise_exception(), undefined names, sandbox refusals
            raise TemplateError(f"chat template error: {e.message or e}") from e
        except Exception as e:  # e.g. str + list when content is a list the template cannot handle
            raise TemplateError(f"chat template failed: {type(e).__name__}: {e}") from e
        return shield.restore(text) if shield is not None else ChatPrompt([(text, False)])


@lru_cache(maxsize=8)
def _alternation(texts: frozenset[str]) -> re.Pattern | None:
    # Longest first, so at any position the longest token wins (as the tokenizers match them).
    if not texts:
        return None
    return re.compile("|".join(re.escape(t) for t in sorted(texts, key=lambda t: (-len(t), t))))


class _Shield:
    """Swaps every control-token text in the template's input for a marker, and back after
    rendering, noting which parts of the prompt were such input.

    Only the control-token texts are swapped, so the template sees the content otherwise as
    is (`trim`, `startswith`, `tojson` behave the same). The marker is private-use characters
    around a random number, which no template filter changes and no input can guess.
    Not caught: a control token made of two inputs written side by side by the template, or
    of an input and a fragment of template text (name "<|im_" + content "end|>"). ChatML,
    K2's and Llama 3's templates always put whole markers or newlines between inputs, and no
    control token contains "<|", "|>" or a newline inside it, so none can form there.
    """

    def __init__(self, pattern: re.Pattern):
        self.pattern = pattern
        self.nonce = f"{secrets.randbelow(10**12):012d}"
        self.found: list[str] = []

    def __call__(self, value: Any) -> Any:
        if isinstance(value, str):
            return self.pattern.sub(self._mark, value)
        if isinstance(value, Mapping):
            return {self(k): self(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [self(v) for v in value]
        return value

    def _mark(self, match: re.Match) -> str:
        self.found.append(match.group())
        return f"\ue000{self.nonce}.{len(self.found) - 1}\ue001"

    def restore(self, text: str) -> ChatPrompt:
        segments, pos = [], 0
        if self.found:
            for m in re.finditer(f"\ue000{self.nonce}\\.(\\d+)\ue001", text):
                segments.append((text[pos:m.start()], False))
                segments.append((self.found[int(m.group(1))], True))
                pos = m.end()
        segments.append((text[pos:], False))
        return ChatPrompt(s for s in segments if s[0])


def normalize_messages(messages: Iterable[Any], flatten_content: bool = True) -> list[dict[str, Any]]:
    """Messages as plain dicts ready for a template.

    - pydantic models become dicts;
    - the OpenAI `developer` role becomes `system` (templates only know `system`);
    - with `flatten_content`, a list of text parts becomes one string; any other part type raises
      `UnsupportedContentError`.
    """
    out = []
    for i, message in enumerate(messages):
        if hasattr(message, "model_dump"):
            message = message.model_dump(exclude_none=True)
        message = dict(message)
        if message.get("role") == "developer":
            message["role"] = "system"
        if flatten_content and isinstance(message.get("content"), list):
            message["content"] = flatten_text_parts(message["content"], i)
        out.append(message)
    return out


def flatten_text_parts(parts: list[Any], message_index: int = 0) -> str:
    """Join `[{"type": "text", "text": ...}, ...]` into one string (parts separated by a newline,
    as vLLM does). Raises `UnsupportedContentError` for any non-text part."""
    texts = []
    for part in parts:
        if isinstance(part, str):
            texts.append(part)
            continue
        if hasattr(part, "model_dump"):
            part = part.model_dump()
        ptype = part.get("type", "text") if isinstance(part, Mapping) else type(part).__name__
        if ptype != "text" or not isinstance(part.get("text"), str):
            raise UnsupportedContentError(str(ptype), message_index)
        texts.append(part["text"])
    return "\n".join(texts)


# Names a message's reasoning may come under; transformers copies it to `reasoning_content` (what most
# templates read) and `thinking` (what gpt-oss reads).
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def _prepare_messages(messages: Iterable[Any]) -> list[dict[str, Any]]:
    chat = []
    for message in messages:
        if hasattr(message, "model_dump"):
            message = message.model_dump()
        if not isinstance(message, Mapping):
            raise TemplateError(f"each message must be an object, got {type(message).__name__}")
        # Like transformers: drop None values (OpenAI clients send content=None with tool calls),
        # which templates handle as missing keys but would print as "None".
        message = {k: v for k, v in message.items() if v is not None}
        reasoning = next((message[k] for k in _REASONING_FIELDS if k in message), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        chat.append(message)
    return chat


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training masks; rendering
    just outputs the body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own tojson HTML-escapes "<", ">", "&" and "'"; templates expect plain JSON.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


class _TemplateDict:
    # `dict(...)` for templates without exposing the dict type itself to the sandbox.
    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    # Namespaces that refuse underscore attributes, so a template cannot reach Python internals.
    def __init__(*args, **kwargs):
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _TemplateNamespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} is not allowed")


@lru_cache(maxsize=32)
def _variables(template: str) -> frozenset[str]:
    return frozenset(jinja2.meta.find_undeclared_variables(_environment().parse(template)))


@lru_cache(maxsize=1)
def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    return env


@lru_cache(maxsize=32)
def _compile(template: str) -> jinja2.Template:
    try:
        return _environment().from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise TemplateError(f"chat template syntax error (line {e.lineno}): {e.message}") from e
