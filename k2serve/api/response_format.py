"""`response_format` (API_NOTES §4.4) -> grammar text for k2serve.structured.

Accepted: {"type": "text"}; {"type": "json_object"} with or without Together's top-level
"schema"; {"type": "json_schema", "json_schema": {"name", "schema", "strict"}} (OpenAI) or
{"type": "json_schema", "schema": {...}} (Together's shorthand); {"type": "regex", "pattern"}.
The schema is enforced whatever `strict` says (a model here never ignores it).
"""

from __future__ import annotations

import re
from typing import Any

from k2serve.errors import bad_request
from k2serve.structured.grammars import (
    check_json_schema,
    json_schema_grammar,
    regex_grammar,
)

ANY_OBJECT = {"type": "object"}
MAX_PATTERN_CHARS = 4096
TYPES = ("text", "json_object", "json_schema", "regex")


def response_format_grammar(response_format: dict[str, Any] | None) -> tuple[str, str] | None:
    """(grammar text, what it is for error messages), or None for plain text."""
    if response_format is None:
        return None
    kind = response_format.get("type")
    if kind in (None, "text"):
        return None
    if kind == "json_object":
        schema = response_format.get("schema")
        if schema is None:
            return json_schema_grammar(ANY_OBJECT), "The JSON object format"
        check_json_schema(schema, "response_format.schema")
        return json_schema_grammar(schema), "response_format.schema"
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if spec is not None:
            if not isinstance(spec, dict):
                raise bad_request("response_format.json_schema must be an object with 'name' "
                                  "and 'schema'.", param="response_format.json_schema")
            schema, param = spec.get("schema", ANY_OBJECT), "response_format.json_schema.schema"
        elif "schema" in response_format:
            schema, param = response_format["schema"], "response_format.schema"
        else:
            raise bad_request("response_format of type 'json_schema' needs a schema: "
                              "{\"json_schema\": {\"name\": ..., \"schema\": {...}}}.",
                              param="response_format.json_schema")
        check_json_schema(schema, param)
        return json_schema_grammar(schema), param
    if kind == "regex":
        pattern = response_format.get("pattern")
        if not isinstance(pattern, str) or not pattern:
            raise bad_request("response_format of type 'regex' needs a non-empty 'pattern'.",
                              param="response_format.pattern")
        if len(pattern) > MAX_PATTERN_CHARS:
            raise bad_request(f"response_format.pattern is limited to {MAX_PATTERN_CHARS} "
                              f"characters.", param="response_format.pattern")
        try:
            re.compile(pattern)
        except re.error as exc:
            raise bad_request(f"response_format.pattern is not a valid regular expression: "
                              f"{exc}.", param="response_format.pattern") from None
        return regex_grammar(pattern), "response_format.pattern"
    raise bad_request(f"response_format.type must be one of {', '.join(TYPES)}; got {kind!r}.",
                      param="response_format.type")


STRUCTURED_OUTPUT_KINDS = ("json", "regex", "grammar")
MAX_GRAMMAR_CHARS = 1_000_000


def structured_outputs_grammar(spec: Any) -> tuple[str, str, str]:
    """vLLM's `structured_outputs` on /v1/completions -> (grammar text, what, param): exactly
    one of {"json": schema}, {"regex": pattern}, {"grammar": Lark text (llguidance's dialect)}.
    What a platform in front of k2serve sends with a prompt it rendered itself."""
    if not isinstance(spec, dict):
        raise bad_request("structured_outputs must be an object.", param="structured_outputs")
    kinds = [k for k in STRUCTURED_OUTPUT_KINDS if spec.get(k) is not None]
    if len(kinds) != 1:
        raise bad_request(f"structured_outputs needs exactly one of "
                          f"{', '.join(STRUCTURED_OUTPUT_KINDS)}.", param="structured_outputs")
    kind = kinds[0]
    value, param = spec[kind], f"structured_outputs.{kind}"
    if kind == "json":
        return json_schema_grammar(check_json_schema(value, param)), param, param
    if not isinstance(value, str) or not value:
        raise bad_request(f"{param} must be a non-empty string.", param=param)
    if kind == "regex":
        return response_format_grammar({"type": "regex", "pattern": value})[0], param, param
    if len(value) > MAX_GRAMMAR_CHARS:
        raise bad_request(f"{param} is limited to {MAX_GRAMMAR_CHARS} characters.", param=param)
    return value, param, param
