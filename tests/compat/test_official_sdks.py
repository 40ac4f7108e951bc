"""The official clients, unmodified, against a live k2serve: only the base URL is changed.

- `openai` (base .../v1), `together` 3.x (bare host), `together` 2.x (base .../v1, run from a
  side copy in a subprocess since one environment holds one version), and `curl`.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap

import pytest

from tests.conftest import EMBEDDED_ID

REPO = pathlib.Path(__file__).resolve().parents[2]
SDK2_PATH = REPO / ".sdk" / "together2"
MESSAGES = [{"role": "user", "content": "What are some fun things to do in New York?"}]


# -- openai ----------------------------------------------------------------------------
@pytest.fixture()
def openai_client(server):
    import openai
    return openai.OpenAI(base_url=server.base_v1, api_key="sk-local", max_retries=0)


def test_openai_chat_and_stream(openai_client):
    reply = openai_client.chat.completions.create(model=EMBEDDED_ID, messages=MESSAGES,
                                                  max_tokens=8, temperature=0)
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content
    assert reply.usage.completion_tokens >= 1
    assert reply.choices[0].finish_reason in ("stop", "length")

    stream = openai_client.chat.completions.create(model=EMBEDDED_ID, messages=MESSAGES,
                                                   max_tokens=8, temperature=0, stream=True,
                                                   stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == \
        reply.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == reply.usage.completion_tokens


def test_openai_completions_models_and_errors(openai_client):
    import openai
    reply = openai_client.completions.create(model=EMBEDDED_ID, prompt="A horse is a horse",
                                             max_tokens=6, temperature=0.1)
    assert reply.choices[0].text
    models = openai_client.models.list()
    assert [m.id for m in models.data] == [EMBEDDED_ID]
    with pytest.raises(openai.NotFoundError) as err:
        openai_client.chat.completions.create(model="no/such-model", messages=MESSAGES)
    assert err.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as err:
        openai_client.chat.completions.create(model=EMBEDDED_ID, messages=MESSAGES,
                                              temperature=5)
    assert err.value.param == "temperature"
    logprobs = openai_client.chat.completions.create(
        model=EMBEDDED_ID, messages=MESSAGES, max_tokens=3, logprobs=True, top_logprobs=2)
    assert len(logprobs.choices[0].logprobs.content) == logprobs.usage.completion_tokens


# -- together 3.x ----------------------------------------------------------------------
@pytest.fixture()
def together_client(server):
    import together
    assert together.__version__.startswith("3."), together.__version__
    return together.Together(base_url=server.root, api_key="local", max_retries=0)


def test_together3_seed_example_chat_and_stream(together_client):
    response = together_client.chat.completions.create(model=EMBEDDED_ID, messages=MESSAGES,
                                                       max_tokens=10, temperature=0)
    assert response.choices[0].message.content
    assert response.usage.total_tokens > 0
    stream = together_client.chat.completions.create(model=EMBEDDED_ID, messages=MESSAGES,
                                                     max_tokens=10, temperature=0, stream=True)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream)
    assert text == response.choices[0].message.content


def test_together3_completions_and_models(together_client):
    reply = together_client.completions.create(model=EMBEDDED_ID, prompt="A horse is a horse",
                                               max_tokens=8, temperature=0.1)
    assert reply.choices[0].text
    assert reply.usage.completion_tokens >= 1
    stream = together_client.completions.create(model=EMBEDDED_ID, prompt="A horse is a horse",
                                                max_tokens=4, temperature=0, stream=True,
                                                extra_body={"ignore_eos": True})
    assert len([c for c in stream if c.choices and c.choices[0].text]) >= 2
    models = together_client.get("/v1/models", cast_to=object)
    assert models[0]["id"] == EMBEDDED_ID and models[0]["pricing"]["input"] >= 0


def test_together3_errors_are_typed(together_client):
    import together
    with pytest.raises(together.NotFoundError):
        together_client.chat.completions.create(model="nope", messages=MESSAGES)
    with pytest.raises(together.BadRequestError):
        together_client.chat.completions.create(model=EMBEDDED_ID, messages=[])


# -- together 2.x (subprocess on the side copy) -----------------------------------------
SDK2_SCRIPT = textwrap.dedent("""
    import json, sys
    import together
    assert together.__version__.startswith("2."), together.__version__
    client = together.Together(base_url=sys.argv[1], api_key="local", max_retries=0)
    messages = [{"role": "user", "content": "What are some fun things to do in New York?"}]
    chat = client.chat.completions.create(model=sys.argv[2], messages=messages, max_tokens=8,
                                          temperature=0)
    stream = client.chat.completions.create(model=sys.argv[2], messages=messages, max_tokens=8,
                                            temperature=0, stream=True)
    streamed = "".join(c.choices[0].delta.content or "" for c in stream)
    completion = client.completions.create(model=sys.argv[2], prompt="A horse is a horse",
                                           max_tokens=4, temperature=0.1)
    models = client.models.list()
    print(json.dumps({"chat": chat.choices[0].message.content, "streamed": streamed,
                      "usage": chat.usage.total_tokens, "completion": completion.choices[0].text,
                      "models": [m.id for m in models], "finish": chat.choices[0].finish_reason}))
""")


def test_together2_with_v1_base_url(server):
    if not (SDK2_PATH / "together").is_dir():
        pytest.fail(f"together 2.x side copy missing: run scripts/install-sdk-2x ({SDK2_PATH})")
    env = dict(os.environ, PYTHONPATH=str(SDK2_PATH))
    out = subprocess.run([sys.executable, "-c", SDK2_SCRIPT, server.base_v1, EMBEDDED_ID],
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["chat"] and result["chat"] == result["streamed"]
    assert result["usage"] > 0
    assert result["completion"]
    assert result["models"] == [EMBEDDED_ID]
    assert result["finish"] in ("stop", "length")


# -- curl ------------------------------------------------------------------------------
@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_seed_example(server):
    body = json.dumps({"model": EMBEDDED_ID, "messages": MESSAGES, "max_tokens": 8})
    out = subprocess.run(
        ["curl", "-sS", "-X", "POST", f"{server.base_v1}/chat/completions",
         "-H", "Authorization: Bearer local", "-H", "Content-Type: application/json",
         "-d", body], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    reply = json.loads(out.stdout)
    assert reply["choices"][0]["message"]["content"]

    out = subprocess.run(["curl", "-sSN", "-X", "POST", f"{server.base_v1}/chat/completions",
                          "-H", "Content-Type: application/json",
                          "-d", json.dumps({"model": EMBEDDED_ID, "messages": MESSAGES,
                                            "max_tokens": 4, "stream": True})],
                         capture_output=True, text=True, timeout=120)
    assert out.stdout.rstrip().endswith("data: [DONE]")
