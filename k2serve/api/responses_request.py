"""OpenAI Responses API requests (`POST /v1/responses`) -> the ChatCompletionRequest a ChatRun
runs (k2serve.api.chat_run).

`input` (a string or items: messages, `function_call`, `function_call_output`, `reasoning`)
becomes chat messages, `instructions` a system message first; flat function `tools` become
chat's nested ones, `text.format` chat's `response_format`, `max_output_tokens` its
`max_completion_tokens`. A field this server does not implement (built-in tools, `include`,
`conversation`, reasoning effort, ...) is a 400 naming it, never dropped; `reasoning.effort`
"none" turns a reasoning model's thinking off where its chat template can.

`previous_response_id` is resolved by the caller, who has the stored response:
`with_history` puts its conversation in front of the new input; `responses_to_chat` then
translates a self-contained body.
"""

from __future__ import annotations

import uuid
from typing import Any

from pydantic import ValidationError

from k2serve.api.schemas.chat import ChatCompletionRequest
from k2serve.errors import APIError, bad_request
from k2serve.text.reasoning import ReasoningFormat

# Fields that change nothing here: OpenAI's hints for its own prompt cache and abuse checks,
# and a client's own tags (Codex CLI sends its session ids as client_metadata).
IGNORED = frozenset({"user", "safety_identifier", "prompt_cache_key", "client_metadata"})
ACCEPTED = frozenset({
    "model", "input", "instructions", "tools", "tool_choice", "parallel_tool_calls", "text",
    "max_output_tokens", "temperature", "top_p", "stream", "store", "previous_response_id",
    "metadata", "background", "reasoning", "truncation", "include", "service_tier",
    "stream_options", "top_logprobs", "max_tool_calls"}) | IGNORED
# Accepted only at the value that means "as usual" (what the SDKs may send by default).
NEUTRAL = {"truncation": ("disabled",), "service_tier": ("auto", "default"),
           "top_logprobs": (0,)}
# effort "none" turns thinking off (responses_to_chat); a summary "auto" means one if the model
# gives one, and it gives none (Codex CLI always asks).
REASONING_SETTINGS = {("effort", "none"), ("summary", "auto")}
# Reasoning items already carry their text, and come back as input (Codex CLI asks for the
# encrypted form to send its reasoning back with store=false): nothing more to include.
INCLUDABLE = {"reasoning.encrypted_content"}
MESSAGE_ROLES = ("user", "system", "developer", "assistant")
TEXT_PARTS = ("input_text", "output_text")
MAX_METADATA = 16


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def check_fields(body: dict) -> None:
    """400 for a field this server does not implement, naming it."""
    for name, value in body.items():
        if name not in ACCEPTED:
            raise bad_request(f"'{name}' is not supported by this server's Responses API.",
                              param=name, code="unsupported_parameter")
        if value is None or name in IGNORED:
            continue
        if name in NEUTRAL and value not in NEUTRAL[name]:
            raise bad_request(f"{name}={value!r} is not supported here (only "
                              f"{' or '.join(map(repr, NEUTRAL[name]))}).", param=name,
                              code="unsupported_parameter")
    reasoning = body.get("reasoning")
    if reasoning is not None:
        if not isinstance(reasoning, dict):
            raise bad_request("reasoning must be an object.", param="reasoning")
        for key, value in reasoning.items():
            if value is not None and (key, value) not in REASONING_SETTINGS:
                raise bad_request(f"reasoning.{key}={value!r} is not supported here: the "
                                  f"model's reasoning cannot be configured so.",
                                  param=f"reasoning.{key}", code="unsupported_parameter")
    include = body.get("include")
    if include is not None and not isinstance(include, list):
        raise bad_request("include must be a list.", param="include")
    for value in include or ():
        if value not in INCLUDABLE:
            raise bad_request(f"include {value!r} is not supported here: replies carry no "
                              f"extra data to include.", param="include",
                              code="unsupported_parameter")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise bad_request("stream_options must be an object.", param="stream_options")
    for key in options or {}:
        if key != "include_obfuscation":  # padding against side channels: nothing to pad here
            raise bad_request(f"stream_options.{key} is not supported here.",
                              param=f"stream_options.{key}", code="unsupported_parameter")
    if body.get("max_tool_calls") is not None:
        raise bad_request("max_tool_calls is not supported here (it limits built-in tools, "
                          "which this server does not run).", param="max_tool_calls",
                          code="unsupported_parameter")
    for name in ("store", "background", "stream", "parallel_tool_calls"):
        if body.get(name) is not None and not isinstance(body[name], bool):
            raise bad_request(f"{name} must be a boolean.", param=name)
    for name in ("instructions", "previous_response_id"):
        if body.get(name) is not None and not isinstance(body[name], str):
            raise bad_request(f"{name} must be a string.", param=name)
    check_metadata(body.get("metadata"))


def check_metadata(metadata: Any) -> None:
    if metadata is None:
        return
    if not isinstance(metadata, dict) or len(metadata) > MAX_METADATA:
        raise bad_request(f"metadata must be an object of at most {MAX_METADATA} pairs.",
                          param="metadata")
    for key, value in metadata.items():
        if len(key) > 64 or not isinstance(value, str) or len(value) > 512:
            raise bad_request("metadata keys are at most 64 characters and values strings of "
                              "at most 512.", param=f"metadata.{key[:64]}")


# -- input items ------------------------------------------------------------------------------
def input_items(value: Any) -> list[dict]:
    """`input` as stored items (each with an id and a status), validated."""
    if value is None:
        return []
    if isinstance(value, str):
        return [{"id": new_id("msg"), "type": "message", "role": "user", "status": "completed",
                 "content": [{"type": "input_text", "text": value}]}]
    if not isinstance(value, list):
        raise bad_request("input must be a string or a list of items.", param="input")
    return [_item(item, i) for i, item in enumerate(value)]


def _item(item: Any, i: int) -> dict:
    where = f"input[{i}]"
    if not isinstance(item, dict):
        raise bad_request(f"{where} must be an object.", param=where)
    kind = item.get("type", "message" if "role" in item else None)
    if kind == "message":
        return _message_item(item, where)
    if kind == "function_call":
        for key in ("call_id", "name", "arguments"):
            if not isinstance(item.get(key), str):
                raise bad_request(f"{where}.{key} must be a string.", param=f"{where}.{key}")
        namespace = item.get("namespace")
        if namespace is not None and not isinstance(namespace, str):
            raise bad_request(f"{where}.namespace must be a string.", param=f"{where}.namespace")
        stored = {"id": item.get("id") or new_id("fc"), "type": "function_call",
                  "status": "completed", "call_id": item["call_id"], "name": item["name"],
                  "arguments": item["arguments"]}
        if namespace is not None:
            stored["namespace"] = namespace
        return stored
    if kind == "function_call_output":
        if not isinstance(item.get("call_id"), str):
            raise bad_request(f"{where}.call_id must be a string.", param=f"{where}.call_id")
        output = item.get("output")
        if not isinstance(output, str):
            output = _text_of(output, f"{where}.output", ("input_text",), "\n")
        return {"id": item.get("id") or new_id("fco"), "type": "function_call_output",
                "status": "completed", "call_id": item["call_id"], "output": output}
    if kind == "reasoning":  # an earlier reply's reasoning, sent back by agent loops
        return {"id": item.get("id") or new_id("rs"), "type": "reasoning",
                "summary": item.get("summary") or [], "content": item.get("content") or []}
    raise bad_request(f"{where}.type {kind!r} is not supported here: input items are "
                      f"messages, function_call, function_call_output and reasoning.",
                      param=f"{where}.type", code="unsupported_parameter")


def _message_item(item: dict, where: str) -> dict:
    role = item.get("role")
    if role not in MESSAGE_ROLES:
        raise bad_request(f"{where}.role must be one of {', '.join(MESSAGE_ROLES)}.",
                          param=f"{where}.role")
    part = "output_text" if role == "assistant" else "input_text"
    content = item.get("content")
    if isinstance(content, str):
        parts = [{"type": part, "text": content}]
    else:
        images = role != "assistant" and isinstance(content, list)
        _text_of([p for p in content if not (images and _is_image(p))] if images else content,
                 f"{where}.content", TEXT_PARTS + ("refusal",), "")  # validates
        for j, p in enumerate(content if images else []):
            if _is_image(p) and not isinstance(p.get("image_url"), str):
                raise bad_request("An input_image part needs image_url (a data: URL, or "
                                  "http(s) where the server allows it); file_id images are "
                                  "not stored here.", param=f"{where}.content[{j}].image_url",
                                  code="unsupported_content_type")
        parts = [dict(p) for p in content]
    if role == "assistant":
        for p in parts:
            if p.get("type") == "output_text":
                p.setdefault("annotations", [])
    return {"id": item.get("id") or new_id("msg"), "type": "message", "role": role,
            "status": "completed", "content": parts}


def _is_image(part: Any) -> bool:
    return isinstance(part, dict) and part.get("type") == "input_image"


def _text_of(parts: Any, where: str, kinds: tuple[str, ...], sep: str) -> str:
    if not isinstance(parts, list):
        raise bad_request(f"{where} must be a string or a list of content parts.", param=where)
    texts = []
    for j, part in enumerate(parts):
        kind = part.get("type") if isinstance(part, dict) else None
        key = "refusal" if kind == "refusal" else "text"
        if kind not in kinds or not isinstance(part.get(key), str):
            raise bad_request(f"{where}[{j}] of type {kind!r} is not supported here: this "
                              f"model reads text ({', '.join(kinds)}) only.",
                              param=f"{where}[{j}]", code="unsupported_content_type")
        texts.append(part[key])
    return sep.join(texts)


def with_history(body: dict, items: list[dict], output: list[dict]) -> dict:
    """`body` continuing a stored response: its conversation (`items`, then its `output`)
    before this request's own input. The result names no previous response."""
    new = input_items(body.get("input"))
    return {**{k: v for k, v in body.items() if k != "previous_response_id"},
            "input": [*items, *output, *new]}


def chat_messages(items: list[dict], instructions: str | None) -> list[dict]:
    """Stored items -> chat messages. A function call joins the assistant message before it
    (chat puts a turn's text and calls in one message); a reasoning item goes on the next
    assistant message as `reasoning_content`, for templates that read it."""
    messages: list[dict] = []
    if instructions:
        messages.append({"role": "system", "content": instructions})
    reasoning: list[str] = []
    for item in items:
        kind = item["type"]
        if kind == "reasoning":
            reasoning += [p.get("text", "") for p in item["content"] + item["summary"]
                          if isinstance(p, dict)]
        elif kind == "function_call_output":
            messages.append({"role": "tool", "tool_call_id": item["call_id"],
                             "content": item["output"]})
        elif kind == "function_call":
            call = {"id": item["call_id"], "type": "function",
                    "function": {"name": flat_tool_name(item.get("namespace"), item["name"]),
                                 "arguments": item["arguments"]}}
            last = messages[-1] if messages else None
            if last is None or last["role"] != "assistant":
                last = {"role": "assistant", "content": None}
                messages.append(last)
            last.setdefault("tool_calls", []).append(call)
        else:
            role = item["role"]
            sep = "" if role == "assistant" else "\n"
            if any(_is_image(p) for p in item["content"]):  # chat parts: the route fetches them
                content: Any = [{"type": "image_url", "image_url": {"url": p["image_url"]}}
                                if _is_image(p) else {"type": "text", "text": p.get("text", "")}
                                for p in item["content"]]
            else:
                content = sep.join(p.get("text", p.get("refusal", "")) for p in item["content"])
            messages.append({"role": role, "content": content})
        if kind in ("message", "function_call") and messages[-1]["role"] == "assistant" \
                and reasoning:
            messages[-1]["reasoning_content"] = "\n".join(reasoning)
            reasoning = []
    return messages


# -- tools and formats --------------------------------------------------------------------------
def flat_tool_name(namespace: str | None, name: str) -> str:
    """The name the model calls a namespaced function by (k2serve.api.responses_reply splits
    it back into `namespace` and `name`)."""
    return name if namespace is None else f"{namespace}.{name}"


def chat_tools(tools: Any) -> list[dict] | None:
    """Responses' flat function tools -> chat's {"type": "function", "function": {...}}; the
    functions of a `namespace` tool (Codex CLI groups its sub-agent tools so) are named
    `namespace.name`. `strict` needs nothing: a call's arguments always follow the schema (a
    grammar holds them to it)."""
    if tools is None:
        return None
    if not isinstance(tools, list):
        raise bad_request("tools must be a list.", param="tools")
    out = []
    for i, tool in enumerate(tools):
        kind = tool.get("type") if isinstance(tool, dict) else None
        if kind == "namespace":
            out += _namespace_functions(tool, f"tools[{i}]")
        elif kind == "function":
            out.append(_function(tool, f"tools[{i}]"))
        else:
            raise bad_request(f"tools[{i}].type {kind!r} is not supported here: this server "
                              f"runs function tools only (built-in tools such as web_search "
                              f"and file_search are OpenAI's).", param=f"tools[{i}].type",
                              code="unsupported_parameter")
    return out


def _function(tool: dict, where: str, namespace: str | None = None) -> dict:
    for key in tool:
        if key not in ("type", "name", "description", "parameters", "strict"):
            raise bad_request(f"{where}.{key} is not supported here.", param=f"{where}.{key}",
                              code="unsupported_parameter")
    function = {k: tool[k] for k in ("name", "description", "parameters")
                if tool.get(k) is not None}
    if namespace is not None and isinstance(function.get("name"), str):
        function["name"] = flat_tool_name(namespace, function["name"])
    return {"type": "function", "function": function}


def _namespace_functions(tool: dict, where: str) -> list[dict]:
    for key in tool:
        if key not in ("type", "name", "description", "tools"):
            raise bad_request(f"{where}.{key} is not supported here.", param=f"{where}.{key}",
                              code="unsupported_parameter")
    namespace, inner = tool.get("name"), tool.get("tools")
    if not isinstance(namespace, str) or not namespace or "." in namespace:
        raise bad_request(f"{where}.name must be a non-empty name without '.'.",
                          param=f"{where}.name")
    if not isinstance(inner, list) or not inner:
        raise bad_request(f"{where}.tools must list the namespace's functions.",
                          param=f"{where}.tools")
    out = []
    for j, function in enumerate(inner):
        kind = function.get("type") if isinstance(function, dict) else None
        if kind != "function":
            raise bad_request(f"{where}.tools[{j}].type {kind!r} is not supported here: a "
                              f"namespace holds function tools.",
                              param=f"{where}.tools[{j}].type", code="unsupported_parameter")
        out.append(_function(function, f"{where}.tools[{j}]", namespace))
    return out


def chat_tool_choice(choice: Any) -> Any:
    if choice is None or choice in ("auto", "none", "required"):
        return choice
    if isinstance(choice, dict) and choice.get("type") == "function":
        if not isinstance(choice.get("name"), str):
            raise bad_request("tool_choice {\"type\": \"function\"} needs a \"name\".",
                              param="tool_choice.name")
        return {"type": "function", "function": {"name": choice["name"]}}
    raise bad_request("tool_choice must be 'auto', 'none', 'required' or {\"type\": "
                      "\"function\", \"name\": ...}; other kinds name built-in tools, which "
                      "this server does not run.", param="tool_choice",
                      code="unsupported_parameter")


def chat_response_format(text: Any) -> dict | None:
    """`text.format` -> chat's `response_format`."""
    if text is None:
        return None
    if not isinstance(text, dict):
        raise bad_request("text must be an object.", param="text")
    for key, value in text.items():
        if key != "format" and value is not None:
            raise bad_request(f"text.{key} is not supported here.", param=f"text.{key}",
                              code="unsupported_parameter")
    fmt = text.get("format")
    if fmt is None:
        return None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema":
        if not isinstance(fmt.get("schema"), dict):
            raise bad_request("text.format of type 'json_schema' needs a 'schema' object.",
                              param="text.format.schema")
        spec = {k: fmt[k] for k in ("name", "schema", "strict", "description") if k in fmt}
        return {"type": "json_schema", "json_schema": spec}
    raise bad_request("text.format.type must be 'text', 'json_schema' or 'json_object'.",
                      param="text.format.type")


# -- the whole request ------------------------------------------------------------------------
def responses_to_chat(body: dict, reasoning: ReasoningFormat | None = None
                      ) -> ChatCompletionRequest:
    """A Responses body (its history already in `input`) as the chat request it runs;
    `reasoning`: how the model thinks (None: it does not)."""
    if not isinstance(body, dict):
        raise bad_request("The request body must be a JSON object.")
    check_fields(body)
    if not isinstance(body.get("model"), str):
        raise bad_request("Missing required parameter: 'model'.", param="model")
    messages = chat_messages(input_items(body.get("input")), body.get("instructions"))
    if not messages:
        raise bad_request("input must not be empty.", param="input")
    chat: dict[str, Any] = {"model": body["model"], "messages": messages, "n": 1,
                            "stream": bool(body.get("stream"))}
    tools = chat_tools(body.get("tools"))
    fields = {"tools": tools, "tool_choice": chat_tool_choice(body.get("tool_choice")),
              "parallel_tool_calls": body.get("parallel_tool_calls"),
              "response_format": chat_response_format(body.get("text")),
              "max_completion_tokens": body.get("max_output_tokens"),
              "temperature": body.get("temperature"), "top_p": body.get("top_p")}
    chat.update({k: v for k, v in fields.items() if v is not None})
    if reasoning is not None and (body.get("reasoning") or {}).get("effort") == "none":
        if reasoning.switch is None:
            raise bad_request(f"reasoning.effort 'none': the model '{body['model']}' always "
                              f"thinks (its chat template has no switch to turn thinking "
                              f"off); leave out reasoning.", param="reasoning.effort",
                              code="unsupported_parameter")
        chat["chat_template_kwargs"] = {reasoning.switch: False}
    try:
        return ChatCompletionRequest.model_validate(chat)
    except ValidationError as exc:
        err = exc.errors()[0]
        param = responses_param(".".join(str(p) for p in err.get("loc", ())))
        raise bad_request(f"Invalid value for '{param}': {err.get('msg', 'invalid')}.",
                          param=param) from None


# chat's names for the fields a Responses request sent under its own names
_RENAMED = (("max_completion_tokens", "max_output_tokens"), ("max_tokens", "max_output_tokens"),
            ("response_format.json_schema", "text.format"), ("response_format", "text.format"),
            ("messages", "input"))


def responses_param(param: str | None) -> str | None:
    """A chat parameter name (from a ChatRun's 400) as the Responses field it came from."""
    if not param:
        return param
    for chat_name, name in _RENAMED:
        if param == chat_name or param.startswith(chat_name + "."):
            return name + param[len(chat_name):]
    if param.startswith("tools."):  # tools.0.function.parameters -> tools[0].parameters
        parts = param.split(".")
        if len(parts) > 1 and parts[1].isdigit():
            rest = [p for p in parts[2:] if p != "function"]
            return f"tools[{parts[1]}]" + "".join(f".{p}" for p in rest)
    return param


def as_responses_error(exc: APIError) -> APIError:
    """A ChatRun's APIError with its parameter (and the name in its message) as Responses
    calls it."""
    param = responses_param(exc.param)
    if param == exc.param:
        return exc
    message = exc.message
    for chat_name, name in _RENAMED[:2]:
        message = message.replace(chat_name, name)
    message = message.replace("response_format", "text.format")
    return APIError(exc.status, message, param=param, code=exc.code, type=exc.type,
                    headers=exc.headers)
