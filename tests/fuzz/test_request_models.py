"""Every request model, fuzzed with Hypothesis: a valid body with up to three of its fields
set to random JSON (or to random values of the field's own shape) gets a 200, or a 4xx in
the error shape whose `param` names one of the fields sent — never a 5xx, never a vague 400.
"""

from __future__ import annotations

import json
import re

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient

from k2serve.api.schemas.audio import SpeechRequest
from k2serve.api.schemas.chat import ChatCompletionRequest, ChatMessage
from k2serve.api.schemas.completions import CompletionRequest
from k2serve.api.schemas.embeddings import EmbeddingRequest, RerankRequest
from tests.fuzz.conftest import FUZZ_EXAMPLES

pytestmark = pytest.mark.fuzz

SCALARS = (st.none() | st.booleans() | st.integers(-(2**70), 2**70)
           | st.sampled_from([0, 1, -1, 2**63, 2**64, 10**30])
           | st.floats() | st.text(max_size=12))
JSON = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)

MESSAGE = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "developer", "user", "assistant", "tool", "function",
                              "wizard"]),
     "content": st.text(max_size=40) | JSON},
    optional={"name": JSON, "tool_calls": JSON, "tool_call_id": JSON})
SCHEMA = st.fixed_dictionaries({"type": st.sampled_from(["object", "string", "array", "x"])},
                               optional={"properties": st.dictionaries(st.text(max_size=5), JSON,
                                                                       max_size=2),
                                         "required": JSON, "pattern": st.text(max_size=8)})
# Fields whose own shape is more than random JSON finds in a few examples.
SHAPED = {
    "messages": st.lists(MESSAGE, min_size=0, max_size=3),
    "stop": st.text(max_size=5) | st.lists(st.text(max_size=5), max_size=20),
    "logit_bias": st.dictionaries(st.text(max_size=14) | st.integers(-5, 10**13).map(str),
                                  st.floats() | JSON, max_size=3),
    "tools": st.lists(st.fixed_dictionaries(
        {"type": st.sampled_from(["function", "x"]),
         "function": st.fixed_dictionaries({"name": st.text(max_size=10)},
                                           optional={"parameters": SCHEMA | JSON})}), max_size=2),
    "tool_choice": st.sampled_from(["auto", "none", "required", "x"]) | JSON,
    "response_format": st.fixed_dictionaries(
        {"type": st.sampled_from(["text", "json_object", "json_schema", "regex", "grammar",
                                  "x"])},
        optional={"json_schema": st.fixed_dictionaries({}, optional={"schema": SCHEMA | JSON,
                                                                     "name": JSON}),
                  "schema": SCHEMA | JSON, "pattern": st.text(max_size=8)}),
    "chat_template_kwargs": st.dictionaries(st.sampled_from(["enable_thinking", "tools",
                                                             "bos_token", "documents", "x"]),
                                            JSON, max_size=2),
    "input": st.text(max_size=30) | st.lists(st.text(max_size=20) | JSON, max_size=4) | JSON,
    "documents": st.lists(st.text(max_size=20) | JSON, max_size=4) | JSON,
}
# Generation-length fields: a random value up to the context would cost seconds per example.
LENGTH_FIELDS = ("max_tokens", "max_completion_tokens")


def _fields(model) -> list[str]:
    return sorted(model.model_fields)


CASES = {  # model -> (path, a valid body that costs milliseconds)
    "chat": (ChatCompletionRequest, "/v1/chat/completions",
             lambda app: {"model": app.chat, "messages": [{"role": "user", "content": "Hi"}],
                          "max_tokens": 2}),
    "completions": (CompletionRequest, "/v1/completions",
                    lambda app: {"model": app.chat, "prompt": "Hi", "max_tokens": 2}),
    "embeddings": (EmbeddingRequest, "/v1/embeddings",
                   lambda app: {"model": app.embedding, "input": "Hi"}),
    "rerank": (RerankRequest, "/v1/rerank",
               lambda app: {"model": app.embedding, "query": "Hi", "documents": ["a", "b"]}),
    "speech": (SpeechRequest, "/v1/audio/speech",
               lambda app: {"model": app.speech, "input": "Hi", "voice": "af_alloy"}),
    "moderations": (None, "/v1/moderations",
                    lambda app: {"model": app.moderation, "input": "Hi"}),
}
MODERATION_FIELDS = ["input", "model"]


@pytest.fixture(scope="module")
def client(fuzz_app):
    # a loopback Host: the app runs open (no key), and open mode answers loopback names only
    with TestClient(fuzz_app.app, base_url="http://127.0.0.1",
                    raise_server_exceptions=False) as c:
        yield c


def _root(param: str) -> str:
    return re.split(r"[.\[]", param, maxsplit=1)[0]


@pytest.mark.parametrize("name", list(CASES))
def test_random_fields_get_200_or_a_4xx_naming_the_field(fuzz_app, client, name):
    model, path, valid = CASES[name]
    fields = _fields(model) if model is not None else MODERATION_FIELDS
    if model is ChatCompletionRequest:
        assert "role" in ChatMessage.model_fields  # MESSAGE above follows this model

    @settings(max_examples=FUZZ_EXAMPLES * 2, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(data=st.data())
    def run(data):
        body = valid(fuzz_app)
        changed = data.draw(st.lists(st.sampled_from(fields), min_size=1, max_size=3,
                                     unique=True), label="fields")
        for field in changed:
            body[field] = data.draw(SHAPED.get(field, JSON) | JSON, label=field)
        for field in LENGTH_FIELDS:
            value = body.get(field, 0)
            assume(not isinstance(value, int) or isinstance(value, bool) or value <= 4
                   or value > 10_000)
            assume(field not in changed or value is not None)
        # json.dumps writes NaN and Infinity, as Python clients do (httpx would refuse them)
        r = client.post(path, content=json.dumps(body),
                        headers={"content-type": "application/json"})
        assert r.status_code == 200 or 400 <= r.status_code < 500, (body, r.status_code, r.text)
        if r.status_code == 200:
            return
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"], err
        assert err["param"] is not None and _root(err["param"]) in body, (body, err)

    run()
