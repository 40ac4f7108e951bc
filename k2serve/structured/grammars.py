"""Grammar text (llguidance's JSON-schema and Lark forms) for structured outputs and tool calls.

User-supplied schemas and patterns are checked here; a problem raises `GrammarError` with a
message that names it (the API answers 400). llguidance reports the keywords it does not
implement (e.g. `uniqueItems`, `if`/`then`, `not`) instead of silently ignoring them, and we
pass that on rather than promise a constraint we cannot enforce.
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass
from typing import Any

import jsonschema
import llguidance

# JSON is written with fixed separators (", " and ": ", as json.dumps and K2's template
# write arguments) and no free whitespace: a model cannot pad a reply with endless blanks.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}

# OpenAI's rule for function names; it also keeps names safe inside grammars and K2's ids.
TOOL_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")

# The JSON call format of models without a native one (see README "Tool calls").
JSON_CALL_OPEN, JSON_CALL_CLOSE = "<tool_call>", "</tool_call>"


class GrammarError(ValueError):
    """A schema, pattern or tool declaration that cannot be enforced; `param` names the field."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class ToolSpec:
    name: str
    parameters: dict


EMPTY_PARAMETERS = {"type": "object", "properties": {}, "additionalProperties": False}


# -- checks ---------------------------------------------------------------------------------
def check_json_schema(schema: Any, param: str) -> dict:
    """A JSON schema that is valid against its meta-schema (draft 2020-12 unless `$schema`
    says otherwise); returns it."""
    if not isinstance(schema, dict):
        raise GrammarError(f"{param} must be a JSON schema object.", param)
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as exc:
        where = "/".join(str(p) for p in exc.path)
        raise GrammarError(f"{param} is not a valid JSON schema: {exc.message}"
                           + (f" (at '{where}')" if where else "") + ".", param) from None
    return schema


def library_error(grammar: str, tokenizer: llguidance.LLTokenizer | None, what: str,
                  param: str) -> None:
    """Raise GrammarError if llguidance cannot build `grammar` (unsupported keyword, bad regex)."""
    error = llguidance.LLMatcher.validate_grammar(grammar, tokenizer)
    if error:
        error = error.strip()
        if error.startswith("Unimplemented keys"):
            error = (f"{error}; this server cannot enforce these JSON schema keywords while "
                     f"generating. Remove them, or describe the constraint in the prompt")
        raise GrammarError(f"{what} cannot be used: {error}.", param)


# -- keywords that constrain nothing --------------------------------------------------------
# Where a schema's subschemas sit: one schema, a list of them, or a map of names to them.
_SUBSCHEMA = ("items", "additionalProperties", "not", "if", "then", "else", "contains",
              "unevaluatedProperties", "unevaluatedItems", "additionalItems")
_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SUBSCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions",
                   "dependentSchemas")
_ANNOTATIONS = {"title", "description", "$comment"}


def without_vacuous_keywords(schema: Any) -> Any:
    """`schema` less the keywords that allow every instance, which llguidance would refuse as
    unimplemented: `propertyNames` of `{"type": "string"}` (every JSON key is a string; zod
    and Claude Code's tools write it for records). The same instances validate."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    names = out.get("propertyNames")
    if names is True or (isinstance(names, dict)
                         and set(names) - _ANNOTATIONS <= {"type"}
                         and names.get("type", "string") == "string"):
        del out["propertyNames"]
    for key in _SUBSCHEMA:
        if key in out:
            out[key] = without_vacuous_keywords(out[key])
    for key in _SUBSCHEMA_LISTS:
        if isinstance(out.get(key), list):
            out[key] = [without_vacuous_keywords(s) for s in out[key]]
    for key in _SUBSCHEMA_MAPS:
        if isinstance(out.get(key), dict):
            out[key] = {name: without_vacuous_keywords(s) for name, s in out[key].items()}
    return out


# -- response_format ------------------------------------------------------------------------
def json_schema_grammar(schema: dict) -> str:
    return llguidance.LLMatcher.grammar_from_json_schema(without_vacuous_keywords(schema),
                                                         overrides=JSON_OPTIONS)


def regex_grammar(pattern: str) -> str:
    return llguidance.LLMatcher.grammar_from_regex(pattern)


# -- tools ----------------------------------------------------------------------------------
def _json_lark(schema: dict) -> str:
    schema = {**copy.deepcopy(without_vacuous_keywords(schema)), "x-guidance": JSON_OPTIONS}
    return "%json " + json.dumps(schema, ensure_ascii=False)


@dataclass(frozen=True)
class ThinkingSyntax:
    """A reasoning model's thinking block, for a grammar that must let it think first.

    `special`: the markers are tokens the grammar names as such (K2's reserved ids), else
    text. `opened`: the prompt already opened the block, so the reply starts inside it.
    """

    start: str = "<think>"
    end: str = "</think>"
    special: bool = False
    opened: bool = False

    def rules(self) -> tuple[str, str, list[str]]:
        """(closed block, block left open, Lark lines): the open one is for K2's call
        section, which may follow thinking without its end marker (K2-Thinking)."""
        # A special token is named as is (llguidance's <...>), text is a quoted string.
        start = "" if self.opened else (self.start if self.special else json.dumps(self.start))
        if self.special:
            return (f"{start} THINK? {self.end}", f"{start} THINK?", ["THINK: /(?s:.+)/"])
        end = _regex_text(self.end)
        # A lexeme that ends at the first end marker (text markers could hide in free text).
        return (f"{start} THINK_CLOSED", f"{start} THINK_OPEN?",
                [f"THINK_CLOSED: /(?s:.*){end}/ & ~/(?s:.*){end}(?s:.+)/",
                 f"THINK_OPEN: /(?s:.+)/ & ~/(?s:.*){end}(?s:.*)/"])


def _regex_text(text: str) -> str:
    """`text` as a literal inside a Lark /regex/."""
    return "".join("\\" + c if c in _REGEX_META else c for c in text)


_REGEX_META = frozenset("\\.+*?()|[]{}^$/&~-#")


def _with_thinking(reply: str, text: str, thinking: ThinkingSyntax | None,
                   unclosed: str | None, after: str | None = None) -> list[str]:
    """The start rule and its lexemes: `reply` (whose free text is the lexeme TEXT, the
    regex `text`), or (when the model reasons) the thinking block then `after` (default
    `reply`); only the latter when the prompt opened the block. `unclosed`: what may follow a
    block left open."""
    if thinking is None:
        return [f"start: {reply}", f"TEXT: {text}"]
    closed, open_, lines = thinking.rules()
    after = after or reply
    options = [f"{closed} {after}"]
    if not thinking.opened:
        if thinking.special:
            options.insert(0, reply)
        else:  # the lexer is greedy: free text must not take the start marker for its own
            options.insert(0, reply.replace("TEXT", "FIRST_TEXT"))
            lines.append(f"FIRST_TEXT: {text} & ~/{_regex_text(thinking.start)}(?s:.*)/")
    if unclosed is not None:
        options.append(f"{open_} {unclosed}")
    return ["start: " + " | ".join(f"({o.strip()})" for o in options), f"TEXT: {text}",
            *lines]


def k2_tool_grammar(tools: list[ToolSpec], choice: str | None, parallel: bool,
                    with_text: bool, thinking: ThinkingSyntax | None = None) -> str:
    """Kimi K2's native format. `choice` None: any declared tool; else only that one.

    with_text (tool_choice auto): free text first, then the model may open the section (its
    own special token); once it does, every call names a declared tool and its arguments follow
    that tool's schema. Otherwise the reply is the section alone, with at least one call.
    `thinking`: a reasoning model thinks first; the section may follow its block closed or
    not (K2-Thinking opens it without `</think>`).
    """
    chosen = [t for t in tools if choice is None or t.name == choice]
    lines = _with_thinking("TEXT? section?" if with_text else "section", "/(?s:.+)/",
                           thinking, "section")
    lines += ["section: <|tool_calls_section_begin|> " + ("call+" if parallel and choice is None
                                                           else "call")
              + " <|tool_calls_section_end|>",
              "call: " + " | ".join(f"call_{i}" for i in range(len(chosen))),
              "IDX: /[0-9]{1,6}/"]
    for i, tool in enumerate(chosen):
        lines.append(f'call_{i}: <|tool_call_begin|> "functions.{tool.name}:" IDX '
                     f"<|tool_call_argument_begin|> args_{i} <|tool_call_end|>")
        lines.append(f"args_{i}: {_json_lark(tool.parameters)}")
    return "\n".join(lines) + "\n"


def json_calls_schema(tools: list[ToolSpec], choice: str | None, parallel: bool) -> dict:
    """The JSON array inside <tool_call>…</tool_call>: [{"name": N, "arguments": {...}}, ...]."""
    items = [{"type": "object",
              "properties": {"name": {"const": t.name}, "arguments": t.parameters},
              "required": ["name", "arguments"], "additionalProperties": False}
             for t in tools if choice is None or t.name == choice]
    schema: dict = {"type": "array", "items": items[0] if len(items) == 1 else {"anyOf": items},
                    "minItems": 1}
    if not parallel or choice is not None:
        schema["maxItems"] = 1
    return schema


def json_tool_grammar(tools: list[ToolSpec], choice: str | None, parallel: bool,
                      with_text: bool, thinking: ThinkingSyntax | None = None) -> str:
    """Our JSON call format: `<tool_call>[{"name": ..., "arguments": {...}}]</tool_call>`.

    with_text (auto): the reply is either plain text that never contains "<tool_call>", or the
    call block alone; the first characters decide, so a call is never half-free text.
    `thinking`: a reasoning model's closed thinking block first; a line break or two may
    follow it (one lexeme with the call's opening, so the lexer never has to choose early).
    """
    reply = "(TEXT | calls)" if with_text else "calls"
    lines = _with_thinking(reply, r"/(?s:.*)/ & ~/(?s:.*)<tool_call>(?s:.*)/", thinking, None,
                           after="(TEXT | gap_calls)" if with_text else "gap_calls")
    if thinking is not None:
        lines += [f'gap_calls: GAP_OPEN call_list "{JSON_CALL_CLOSE}"',
                  f"GAP_OPEN: /\\n{{0,2}}{_regex_text(JSON_CALL_OPEN)}/"]
    lines += [f'calls: "{JSON_CALL_OPEN}" call_list "{JSON_CALL_CLOSE}"',
              f"call_list: {_json_lark(json_calls_schema(tools, choice, parallel))}"]
    return "\n".join(lines) + "\n"


# -- for an upstream engine -----------------------------------------------------------------
def as_lark(grammar: str) -> str:
    """The grammar as one Lark text (llguidance's dialect, `%json` for a JSON schema), the
    form vLLM's `structured_outputs.grammar` takes: vLLM passes that field to llguidance as
    Lark (or GBNF), not as the JSON `{"grammars": [...]}` that json_schema_grammar and
    regex_grammar return."""
    if not grammar.lstrip().startswith("{"):
        return grammar  # already Lark (the tool-call grammars)
    grammars = json.loads(grammar).get("grammars") or []
    if len(grammars) != 1:
        raise GrammarError(f"a grammar of {len(grammars)} parts cannot be sent as one Lark text")
    (part,) = grammars
    if part.get("lark_grammar"):
        return part["lark_grammar"]
    if part.get("json_schema") is not None:  # its x-guidance options travel inside it
        return "start: %json " + json.dumps(part["json_schema"], ensure_ascii=False) + "\n"
    raise GrammarError(f"grammar part {sorted(k for k, v in part.items() if v)} has no Lark form")
