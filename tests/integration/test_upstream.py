"""k2serve in front of another engine (`--upstream`): a second k2serve process serving the
embedded model is the upstream here, reached over loopback HTTP. The front renders and
tokenizes each prompt itself and sends the token ids to the upstream's /v1/completions."""

from __future__ import annotations

import json
import time

import httpx
import jsonschema
import openai
import pytest

from tests.conftest import EMBEDDED_ID, free_port, start_server, stop_server

MESSAGES = [{"role": "user", "content": "Name three colours."}]


@pytest.fixture(scope="module")
def upstream():
    server = start_server()
    yield server
    stop_server(server)


@pytest.fixture(scope="module")
def front(upstream):
    # Two replicas: one with nothing listening, which the front must route around.
    dead = f"http://127.0.0.1:{free_port()}/v1"
    server = start_server("--upstream", f"{EMBEDDED_ID}={dead},{upstream.base_v1}")
    yield server
    stop_server(server)


def chat(base: str, **fields) -> httpx.Response:
    body = {"model": EMBEDDED_ID, "messages": MESSAGES, "max_tokens": 12, "temperature": 0}
    body.update(fields)
    return httpx.post(base + "/chat/completions", json=body, timeout=120)


def test_the_front_lists_the_upstream_model_with_its_context(front, upstream):
    ours = {m["id"]: m for m in httpx.get(front.base_v1 + "/models").json()}
    theirs = {m["id"]: m for m in httpx.get(upstream.base_v1 + "/models").json()}
    assert set(ours) == {EMBEDDED_ID}  # the local model is not loaded: the upstream serves it
    assert ours[EMBEDDED_ID]["context_length"] == theirs[EMBEDDED_ID]["context_length"]
    assert ours[EMBEDDED_ID]["pricing"] == theirs[EMBEDDED_ID]["pricing"]


def test_greedy_chat_through_the_front_is_the_upstreams_own(front, upstream):
    direct, through = chat(upstream.base_v1), chat(front.base_v1)
    assert through.status_code == 200, through.text
    assert through.json()["choices"][0]["message"]["content"] == \
        direct.json()["choices"][0]["message"]["content"]
    ours, theirs = through.json()["usage"], direct.json()["usage"]
    for field in ("prompt_tokens", "completion_tokens", "total_tokens"):
        assert ours[field] == theirs[field]
    # The same prompt ids a second time: the upstream's prefix cache, reported as it reports it.
    assert ours["prompt_tokens_details"]["cached_tokens"] > 0
    assert through.json()["choices"][0]["finish_reason"] == "length"


def test_streaming_n_stop_and_seed_through_the_front(front, upstream):
    client = openai.OpenAI(base_url=front.base_v1, api_key="local")
    whole = chat(front.base_v1).json()["choices"][0]["message"]["content"]
    stream = client.chat.completions.create(model=EMBEDDED_ID, messages=MESSAGES, max_tokens=12,
                                            temperature=0, stream=True)
    pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert "".join(pieces) == whole and len([p for p in pieces if p]) > 1
    sampled = dict(temperature=1.0, seed=7, n=2, max_tokens=10)
    direct = chat(upstream.base_v1, **sampled).json()["choices"]
    through = chat(front.base_v1, **sampled).json()["choices"]
    assert [c["message"]["content"] for c in through] == [c["message"]["content"] for c in direct]
    stop_at = whole.split()[1]
    stopped = chat(front.base_v1, stop=[stop_at]).json()["choices"][0]
    assert stopped["finish_reason"] == "stop" and stop_at not in stopped["message"]["content"]


def test_a_completion_with_logprobs_through_the_front(front, upstream):
    body = {"model": EMBEDDED_ID, "prompt": "The capital of France is", "max_tokens": 4,
            "temperature": 0, "logprobs": 2}
    direct = httpx.post(upstream.base_v1 + "/completions", json=body, timeout=60).json()
    through = httpx.post(front.base_v1 + "/completions", json=body, timeout=60).json()
    assert through["choices"][0]["text"] == direct["choices"][0]["text"]
    ours, theirs = through["choices"][0]["logprobs"], direct["choices"][0]["logprobs"]
    assert ours["tokens"] == theirs["tokens"] and ours["token_ids"] == theirs["token_ids"]
    assert ours["token_logprobs"] == pytest.approx(theirs["token_logprobs"])


def test_a_client_that_leaves_cancels_the_upstream_request(front, upstream):
    body = {"model": EMBEDDED_ID, "prompt": "Once upon a time", "max_tokens": 2000,
            "ignore_eos": True, "stream": True}
    with httpx.stream("POST", front.base_v1 + "/completions", json=body, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                break  # one chunk, then leave
    running = None
    deadline = time.time() + 10
    while time.time() < deadline:
        engines = httpx.get(upstream.root + "/health").json()["engines"]
        running = engines[EMBEDDED_ID]["in_flight"]
        if running == 0:
            break
        time.sleep(0.2)
    assert running == 0


def test_the_dead_replica_is_marked_down(front):
    # Its back-off (1 s at first) may run out while a slow machine generates, so "up" is
    # read right after a request that met it; its failures in a row are there either way.
    body = {"model": EMBEDDED_ID, "prompt": "Hello", "max_tokens": 1}
    seen_down = False
    for _ in range(5):
        assert httpx.post(front.base_v1 + "/completions", json=body, timeout=60).status_code == 200
        health = httpx.get(front.root + "/health")
        assert health.status_code == 200  # one replica serves
        dead, live = sorted(health.json()["engines"][EMBEDDED_ID]["replicas"],
                            key=lambda r: r["failures"], reverse=True)
        assert dead["failures"] >= 1 and live["failures"] == 0 and live["up"]
        seen_down |= not dead["up"]
        if seen_down:
            break
    assert seen_down


def test_json_schema_output_through_the_front_follows_the_schema(front):
    schema = {"type": "object", "properties": {"colour": {"enum": ["red", "green", "blue"]},
                                              "count": {"type": "integer"}},
              "required": ["colour", "count"], "additionalProperties": False}
    r = chat(front.base_v1, max_tokens=60, response_format={
        "type": "json_schema", "json_schema": {"name": "pick", "schema": schema}})
    assert r.status_code == 200, r.text
    jsonschema.validate(json.loads(r.json()["choices"][0]["message"]["content"]), schema)


def test_a_required_tool_call_through_the_front_is_valid(front):
    parameters = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                   "days": {"type": "integer", "minimum": 1}},
                  "required": ["city", "days"], "additionalProperties": False}
    tools = [{"type": "function", "function": {"name": "forecast", "parameters": parameters}}]
    r = chat(front.base_v1, max_tokens=80, tools=tools, tool_choice="required",
             messages=[{"role": "user", "content": "Weather in Paris for 3 days?"}])
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    (call,) = choice["message"]["tool_calls"]
    assert call["function"]["name"] == "forecast"
    jsonschema.validate(json.loads(call["function"]["arguments"]), parameters)


def test_structured_outputs_on_completions_is_enforced(upstream):
    """The vLLM field the front sends: k2serve as an upstream enforces it too."""
    body = {"model": EMBEDDED_ID, "prompt": "Pick a colour:", "max_tokens": 20, "temperature": 0,
            "structured_outputs": {"regex": "(red|green|blue)"}}
    r = httpx.post(upstream.base_v1 + "/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] in ("red", "green", "blue")
    bad = httpx.post(upstream.base_v1 + "/completions", timeout=60,
                     json={**body, "structured_outputs": {"regex": "a", "grammar": "b"}})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "structured_outputs"


# -- Kimi K2 behind the front: its own template and tool-call format ------------------------
K2_ID = "moonshotai/Kimi-K2-Instruct-0905"


@pytest.fixture(scope="module")
def k2_pair(k2_tool_checkpoint, k2_tool_server):
    """A tiny K2 checkpoint trained to call a tool, served by one k2serve; a second k2serve
    with no model of its own fronts it, with the checkpoint's tokenizer and template."""
    front = start_server("--families", "", "--upstream", f"{K2_ID}={k2_tool_server.base_v1}",
                         "--upstream-tokenizer", f"{K2_ID}={k2_tool_checkpoint}")
    yield front, k2_tool_server
    stop_server(front)


def test_k2_tool_calls_through_the_front_match_the_engine_serving_it(k2_pair):
    from tests.k2_trained import MESSAGES as K2_MESSAGES
    from tests.k2_trained import TOOLS as K2_TOOLS

    front, upstream = k2_pair
    body = {"model": K2_ID, "messages": K2_MESSAGES, "tools": K2_TOOLS, "temperature": 0}
    direct = httpx.post(upstream.base_v1 + "/chat/completions", json=body, timeout=120).json()
    through = httpx.post(front.base_v1 + "/chat/completions", json=body, timeout=120).json()
    assert through["choices"][0]["finish_reason"] == "tool_calls"
    assert through["choices"][0]["message"] == direct["choices"][0]["message"]
    client = openai.OpenAI(base_url=front.base_v1, api_key="local", max_retries=0)
    stream = client.chat.completions.create(model=K2_ID, messages=K2_MESSAGES, tools=K2_TOOLS,
                                            temperature=0, stream=True)
    names, arguments, finish = [], "", None
    for chunk in stream:
        for tc in chunk.choices[0].delta.tool_calls or []:
            if tc.function.name:
                names.append(tc.function.name)
            arguments += tc.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    (call,) = direct["choices"][0]["message"]["tool_calls"]
    assert names == [call["function"]["name"]] and finish == "tool_calls"
    assert json.loads(arguments) == json.loads(call["function"]["arguments"])


def test_a_models_file_sets_the_upstream_models_price_and_context(upstream, tmp_path):
    """The price and context named in the file are what /v1/models shows and what a key's
    ledger is billed at."""
    from k2serve.platform.db import Database
    from k2serve.platform.keys import KeyStore
    from k2serve.platform.ledger import ledger_rows

    path = tmp_path / "models.toml"
    path.write_text(f'''
[[models]]
id = "{EMBEDDED_ID}"
kind = "openai"
urls = ["{upstream.base_v1}"]
context_length = 1024
price_input = 2.0
price_output = 10.0
''')
    home = tmp_path / "home"
    front = start_server("--families", "", "--models-file", str(path),
                         env={"K2SERVE_HOME": str(home)})
    try:
        (model,) = httpx.get(front.base_v1 + "/models").json()
        assert model["context_length"] == 1024
        assert model["pricing"]["input"] == 2.0 and model["pricing"]["output"] == 10.0
        db = Database(f"sqlite:///{home}/k2serve.db", migrate=False)
        _, key = KeyStore(db).create("billed")
        r = httpx.post(front.base_v1 + "/completions", timeout=60,
                       headers={"Authorization": f"Bearer {key}"},
                       json={"model": EMBEDDED_ID, "prompt": "Hello", "max_tokens": 3})
        assert r.status_code == 200, r.text
        usage = r.json()["usage"]
        deadline = time.time() + 10
        rows = []
        while time.time() < deadline and not rows:
            rows = [row for row in ledger_rows(db) if row.status == "ok"]
            time.sleep(0.2)
        (row,) = rows
        assert row.prompt_tokens == usage["prompt_tokens"]
        assert row.ttft_s is not None and row.ttft_s > 0  # the first text counts as a token
        assert row.cost_usd == pytest.approx((usage["prompt_tokens"] * 2.0
                                              + usage["completion_tokens"] * 10.0) / 1e6)
        db.close()
    finally:
        stop_server(front)


def test_a_replica_that_dies_mid_run():
    """Its stream ends with an error event (a stream cannot be replayed); later requests,
    streamed or not, are served by the replica left, and /health shows it down."""
    replicas = [start_server("--threads", "1"), start_server("--threads", "1")]
    front = None
    try:
        urls = ",".join(r.base_v1 for r in replicas)
        front = start_server("--families", "", "--upstream", f"{EMBEDDED_ID}={urls}")
        body = {"model": EMBEDDED_ID, "prompt": "Once upon a time", "max_tokens": 3000,
                "ignore_eos": True, "stream": True}
        with httpx.stream("POST", front.base_v1 + "/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            next(line for line in lines if line.startswith("data: {"))
            running = [rep for rep in replicas if httpx.get(rep.root + "/health").json()
                       ["engines"][EMBEDDED_ID]["in_flight"] == 1]
            (victim,) = running
            victim.process.kill()
            rest = [line for line in lines if line.startswith("data: ")]
        assert rest[-1] == "data: [DONE]"
        errors = [json.loads(line[6:])["error"] for line in rest[:-1] if '"error"' in line]
        assert errors and errors[0]["code"] == "upstream_unavailable"
        for i in range(4):  # whichever replica each prompt prefers, the survivor answers
            r = httpx.post(front.base_v1 + "/completions", timeout=60,
                           json={"model": EMBEDDED_ID, "prompt": f"Count to {i}:",
                                 "max_tokens": 3})
            assert r.status_code == 200, r.text
        state = httpx.get(front.root + "/health").json()["engines"][EMBEDDED_ID]["replicas"]
        assert {s["url"]: s["failures"] for s in state}[victim.base_v1] >= 1
    finally:
        for server in [front, *replicas]:
            if server is not None:
                stop_server(server)


def test_the_agent_apis_through_the_front(front, upstream):
    """Anthropic's Messages API and OpenAI's Responses API run on the upstream too; the stop
    string that ended a reply is relayed (vLLM's `stop_reason`)."""
    import anthropic

    def messages(base: str, **fields):
        client = anthropic.Anthropic(base_url=base, api_key="local", max_retries=0)
        return client.messages.create(model=EMBEDDED_ID, max_tokens=12, messages=MESSAGES,
                                      extra_body={"temperature": 0}, **fields)

    direct, through = messages(upstream.root), messages(front.root)
    assert through.content[0].text == direct.content[0].text
    assert through.usage.output_tokens == direct.usage.output_tokens == 12
    stop_at = direct.content[0].text.split()[1]
    stopped = messages(front.root, stop_sequences=[stop_at])
    assert stopped.stop_reason == "stop_sequence" and stopped.stop_sequence == stop_at

    client = openai.OpenAI(base_url=front.base_v1, api_key="local", max_retries=0)
    response = client.responses.create(model=EMBEDDED_ID, input=MESSAGES[0]["content"],
                                       max_output_tokens=12, temperature=0)
    assert response.output_text == direct.content[0].text
