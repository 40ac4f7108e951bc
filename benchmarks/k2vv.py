"""Tool-call verifier: K2-Vendor-Verifier's metrics against any OpenAI-compatible server.

Reads request files in K2VV's format (one chat.completions body per line; role `_input` is
sent as `system`, as K2VV does), sends them with the `openai` SDK (streaming when the body says
`stream`, assembling tool calls from the deltas), and reports what K2VV's tool_calls_eval.py
reports:

- finish_reason counts (stop / tool_calls / others, with the others' reasons);
- schema accuracy = responses with finish_reason "tool_calls" whose every call names a declared
  tool and has arguments that `jsonschema.validate` against that tool's parameters, over all
  responses with finish_reason "tool_calls" (an empty tool_calls list there is an error too);
- and, stricter, every tool call in every reply that ended on its own (any finish_reason but
  "length"), checked the same way; calls a stream began before max_tokens cut it are counted
  apart (finish_reason "length" tells the client the reply is incomplete);
- with --ground-truth (a results file of another run, matched by data_index), the
  tool-call-trigger F1 K2VV compares vendors by (K2-Thinking's bar: F1 >= 73%).

Thinking models (K2-Thinking): the reply's reasoning (`reasoning_content`, or vLLM's
`reasoning`) is recorded apart from its content, and the F1 is the same trigger F1 over the
reply as the client sees it. K2-Thinking often opens its tool-call section inside an unclosed
`<think>` block; a server that misses those calls returns them as reasoning or content text
with finish_reason "stop", which costs recall. `calls left as text` counts the replies whose
reasoning or content still holds K2's tool-call markers, the usual cause of a low F1.
`--thinking` applies K2VV's K2-Thinking settings (temperature 1.0, max_tokens 64000) unless
given.

    python benchmarks/k2vv.py requests.jsonl --base-url http://127.0.0.1:8000/v1 \
        --model NAME --concurrency 4 [--max-tokens 256] [--temperature 0.6] [--repeat 5] \
        [--thinking] [--output results.jsonl] [--summary summary.json] \
        [--ground-truth other.jsonl]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections import Counter

import jsonschema
import openai

# K2's tool-call markers: in a reply's text they mean a call the server did not parse.
CALL_MARKERS = ("<|tool_calls_section_begin|>", "<|tool_call_begin|>")
THINKING_DEFAULTS = {"temperature": 1.0, "max_tokens": 64000}  # K2VV's K2-Thinking run


def load_requests(paths: list[str], repeat: int) -> list[dict]:
    requests = []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            requests.extend(json.loads(line) for line in f if line.strip())
    return [dict(r) for _ in range(repeat) for r in requests]


def prepare(body: dict, args) -> dict:
    body = json.loads(json.dumps(body))
    for message in body.get("messages", []):
        if message.get("role") == "_input":
            message["role"] = "system"
    body["model"] = args.model
    if args.max_tokens is not None:
        body["max_tokens"] = args.max_tokens
    if args.temperature is not None:
        body["temperature"] = args.temperature
    body.update(json.loads(args.extra_body))
    return body


def validate_tool_calls(tool_calls: list[dict], tools: list[dict]) -> list[str]:
    """K2VV's rule per call: the name is declared and the arguments validate. Errors, or []."""
    schemas = {t["function"]["name"]: t["function"].get("parameters") or {}
               for t in tools or [] if t.get("type", "function") == "function"}
    errors = []
    for call in tool_calls:
        name = call["function"]["name"]
        if name not in schemas:
            errors.append(f"undeclared tool {name!r}")
            continue
        try:
            jsonschema.validate(json.loads(call["function"]["arguments"]), schemas[name])
        except (ValueError, jsonschema.ValidationError) as exc:
            errors.append(f"{name}: {str(exc).splitlines()[0]}")
    return errors


async def send(client: openai.AsyncOpenAI, body: dict) -> dict:
    body = dict(body)
    stream = body.pop("stream", False)
    extra = {k: body.pop(k) for k in list(body) if k not in (
        "model", "messages", "tools", "tool_choice", "max_tokens", "temperature", "top_p",
        "parallel_tool_calls", "seed", "stop", "n", "response_format", "user")}
    if not stream:
        reply = await client.chat.completions.create(**body, extra_body=extra or None)
        choice = reply.choices[0]
        calls = [{"id": c.id, "function": {"name": c.function.name,
                                           "arguments": c.function.arguments}}
                 for c in choice.message.tool_calls or []]
        return {"finish_reason": choice.finish_reason, "content": choice.message.content,
                "reasoning": _reasoning(choice.message) or None,
                "tool_calls": calls, "usage": reply.usage.model_dump() if reply.usage else None}
    calls: dict[int, dict] = {}
    content, reasoning, finish, usage = "", "", None, None
    async for chunk in await client.chat.completions.create(**body, stream=True,
                                                            extra_body=extra or None):
        if chunk.usage:
            usage = chunk.usage.model_dump()
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        content += delta.content or ""
        reasoning += _reasoning(delta)
        for tc in delta.tool_calls or []:
            call = calls.setdefault(tc.index, {"id": None, "function": {"name": "",
                                                                        "arguments": ""}})
            call["id"] = tc.id or call["id"]
            if tc.function and tc.function.name:
                call["function"]["name"] += tc.function.name
            if tc.function and tc.function.arguments:
                call["function"]["arguments"] += tc.function.arguments
        finish = chunk.choices[0].finish_reason or finish
    return {"finish_reason": finish, "content": content or None, "reasoning": reasoning or None,
            "tool_calls": [calls[i] for i in sorted(calls)], "usage": usage}


def _reasoning(message) -> str:
    """A message's or delta's reasoning: DeepSeek's `reasoning_content`, else vLLM's `reasoning`
    (servers that send both send the same text)."""
    extra = message.model_extra or {}
    return extra.get("reasoning_content") or extra.get("reasoning") or ""


def calls_left_as_text(response: dict) -> bool:
    text = (response.get("reasoning") or "") + (response.get("content") or "")
    return any(marker in text for marker in CALL_MARKERS)


async def run_all(requests: list[dict], args) -> list[dict]:
    client = openai.AsyncOpenAI(base_url=args.base_url, api_key=args.api_key,
                                timeout=args.timeout, max_retries=args.retries)
    gate = asyncio.Semaphore(args.concurrency)
    results: list[dict] = []

    async def one(index: int, raw: dict) -> None:
        body = prepare(raw, args)
        async with gate:
            started = time.perf_counter()
            try:
                response = await send(client, body)
                status, error = "success", None
            except Exception as exc:  # a failed request is counted, not fatal
                response, status, error = None, "failed", f"{type(exc).__name__}: {exc}"
        result = {"data_index": index, "status": status, "error": error,
                  "duration_ms": round((time.perf_counter() - started) * 1000)}
        if response is not None:
            errors = validate_tool_calls(response["tool_calls"], body.get("tools"))
            result.update(response=response, finish_reason=response["finish_reason"],
                          tool_call_errors=errors,
                          tool_calls_valid=(not errors) if response["tool_calls"] else None)
        results.append(result)

    await asyncio.gather(*(one(i, r) for i, r in enumerate(requests)))
    await client.close()
    return sorted(results, key=lambda r: r["data_index"])


def summarize(results: list[dict], model: str) -> dict:
    ok = [r for r in results if r["status"] == "success"]
    finish = Counter(r["finish_reason"] for r in ok)
    others = Counter(f for f in finish.elements() if f not in ("stop", "tool_calls"))
    tool_finish = [r for r in ok if r["finish_reason"] == "tool_calls"]
    schema_errors = sum(1 for r in tool_finish
                        if not r["response"]["tool_calls"] or r["tool_call_errors"])
    successful = len(tool_finish) - schema_errors
    # Every call in a reply that ended on its own (a stream cut by max_tokens may end inside a
    # call it already announced; finish_reason "length" says so, and those are counted apart).
    ended = [r for r in ok if r["finish_reason"] != "length"]
    emitted = sum(len(r["response"]["tool_calls"]) for r in ended)
    emitted_bad = sum(len(r["tool_call_errors"]) for r in ended)
    cut = sum(len(r["response"]["tool_calls"]) for r in ok if r["finish_reason"] == "length")
    reasoned = sum(1 for r in ok if r["response"].get("reasoning"))
    leaked = sum(1 for r in ok if calls_left_as_text(r["response"]))
    return {
        "model": model, "success_count": len(ok), "failure_count": len(results) - len(ok),
        "finish_stop": finish.get("stop", 0), "finish_tool_calls": len(tool_finish),
        "finish_others": sum(others.values()), "finish_others_detail": dict(others),
        "schema_validation_error_count": schema_errors,
        "successful_tool_call_count": successful,
        "schema_accuracy": successful / len(tool_finish) if tool_finish else None,
        "tool_calls_emitted": emitted, "tool_calls_emitted_invalid": emitted_bad,
        "tool_calls_in_length_replies": cut,
        "tool_call_accuracy_all_emitted": (emitted - emitted_bad) / emitted if emitted else None,
        "replies_with_reasoning": reasoned, "calls_left_as_text": leaked,
    }


def trigger_f1(results: list[dict], truth: list[dict]) -> dict:
    """K2VV's f1_score.py: tool_calls vs anything else, matched by data_index."""
    theirs = {r["data_index"]: r.get("finish_reason") == "tool_calls" for r in truth}
    tp = fp = fn = 0
    for r in results:
        if r["data_index"] not in theirs or r["status"] != "success":
            continue
        ours = r["finish_reason"] == "tool_calls"
        tp += ours and theirs[r["data_index"]]
        fp += ours and not theirs[r["data_index"]]
        fn += (not ours) and theirs[r["data_index"]]
    p = tp / (tp + fp) if tp + fp else 0.0
    r_ = tp / (tp + fn) if tp + fn else 0.0
    return {"tool_call_precision": p, "tool_call_recall": r_,
            "tool_call_f1": 2 * p * r_ / (p + r_) if p + r_ else 0.0}


def print_table(summary: dict) -> None:
    acc = summary["schema_accuracy"]
    all_acc = summary["tool_call_accuracy_all_emitted"]
    rows = [
        ("requests ok / failed", f"{summary['success_count']} / {summary['failure_count']}"),
        ("finish stop / tool_calls / others",
         f"{summary['finish_stop']} / {summary['finish_tool_calls']} / "
         f"{summary['finish_others']} {summary['finish_others_detail'] or ''}"),
        ("schema errors", summary["schema_validation_error_count"]),
        ("successful tool-call responses", summary["successful_tool_call_count"]),
        ("schema accuracy (K2VV)", "n/a" if acc is None else f"{acc:.2%}"),
        ("calls in replies that ended / invalid",
         f"{summary['tool_calls_emitted']} / {summary['tool_calls_emitted_invalid']}"),
        ("accuracy over every such call", "n/a" if all_acc is None else f"{all_acc:.2%}"),
        ("calls streamed in replies cut by max_tokens", summary["tool_calls_in_length_replies"]),
        ("replies with reasoning", summary["replies_with_reasoning"]),
        ("calls left as text (unparsed markers)", summary["calls_left_as_text"]),
    ]
    if "tool_call_f1" in summary:
        rows.append(("tool-call trigger precision / recall",
                     f"{summary['tool_call_precision']:.2%} / {summary['tool_call_recall']:.2%}"))
        rows.append(("tool-call trigger F1", f"{summary['tool_call_f1']:.2%}"))
    width = max(len(k) for k, _ in rows)
    print(f"model: {summary['model']}")
    for key, value in rows:
        print(f"  {key:<{width}}  {value}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+")
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--api-key", default="local")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--max-tokens", type=int)
    parser.add_argument("--temperature", type=float)
    parser.add_argument("--thinking", action="store_true",
                        help="a thinking model: K2VV's K2-Thinking temperature 1.0 and "
                             "max_tokens 64000 unless given")
    parser.add_argument("--extra-body", default="{}", help="JSON merged into every request")
    parser.add_argument("--repeat", type=int, default=1, help="send each request N times")
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--retries", type=int, default=0)
    parser.add_argument("--output", help="per-request results (JSONL)")
    parser.add_argument("--summary", help="summary (JSON)")
    parser.add_argument("--ground-truth", help="results JSONL of a reference run, for F1")
    args = parser.parse_args(argv)
    if args.thinking:
        for key, value in THINKING_DEFAULTS.items():
            if getattr(args, key) is None:
                setattr(args, key, value)

    results = asyncio.run(run_all(load_requests(args.files, args.repeat), args))
    summary = summarize(results, args.model)
    if args.ground_truth:
        with open(args.ground_truth, encoding="utf-8") as f:
            summary.update(trigger_f1(results, [json.loads(line) for line in f if line.strip()]))
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            for r in results:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
    if args.summary:
        with open(args.summary, "w", encoding="utf-8") as f:
            json.dump(summary, f, ensure_ascii=False, indent=2)
    print_table(summary)
    return 0 if summary["failure_count"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
