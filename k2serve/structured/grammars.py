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


# -- response_format ------------------------------------------------------------------------
def json_schema_grammar(schema: dict) -> str:
    return llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=JSON_OPTIONS)


def regex_grammar(pattern: str) -> str:
    return llguidance.LLMatcher.grammar_from_regex(pattern)


# -- tools ----------------------------------------------------------------------------------
def _json_lark(schema: dict) -> str:
    schema = {**copy.deepcopy(schema), "x-guidance": JSON_OPTIONS}
    return "%json " + json.dumps(schema, ensure_ascii=False)


def k2_tool_grammar(tools: list[ToolSpec], choice: str | None, parallel: bool,
                    with_text: bool) -> str:
    """Kimi K2's native format. `choice` None: any declared tool; else only that one.

    with_text (tool_choice auto): free text first, then the model may open the section (its
    own special token); once it does, every call names a declared tool and its arguments follow
    that tool's schema. Otherwise the reply is the section alone, with at least one call.
    """
    chosen = [t for t in tools if choice is None or t.name == choice]
    lines = ["start: " + ("TEXT? section?" if with_text else "section"),
             "TEXT: /(?s:.+)/",
             "section: <|tool_calls_section_begin|> " + ("call+" if parallel and choice is None
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
                      with_text: bool) -> str:
    """Our JSON call format: `<tool_call>[{"name": ..., "arguments": {...}}]</tool_call>`.

    with_text (auto): the reply is either plain text that never contains "<tool_call>", or the
    call block alone; the first characters decide, so a call is never half-free text.
    """
    lines = ["start: " + ("TEXT | calls" if with_text else "calls"),
             r"TEXT: /(?s:.*)/ & ~/(?s:.*)<tool_call>(?s:.*)/",
             f'calls: "{JSON_CALL_OPEN}" call_list "{JSON_CALL_CLOSE}"',
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
