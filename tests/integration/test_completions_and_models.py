"""/v1/completions and /v1/models over real HTTP."""

from __future__ import annotations

import json

from tests.conftest import EMBEDDED_ID


def complete(http, **fields):
    body = {"model": EMBEDDED_ID, "prompt": "The capital of France is", "max_tokens": 5,
            "temperature": 0}
    body.update(fields)
    return http.post("/v1/completions", json=body)


def test_completion_reply_shape(http):
    r = complete(http)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text.completion"
    assert body["prompt"] == []
    (choice,) = body["choices"]
    assert choice["index"] == 0 and isinstance(choice["text"], str) and choice["text"]
    assert choice["finish_reason"] in ("stop", "length")
    assert body["usage"]["total_tokens"] == (body["usage"]["prompt_tokens"]
                                             + body["usage"]["completion_tokens"])


def test_default_max_tokens_is_16(http):
    body = complete(http, max_tokens=None, ignore_eos=True).json()
    assert body["usage"]["completion_tokens"] == 16


def test_echo_with_logprobs_scores_the_prompt(http):
    body = complete(http, echo=True, logprobs=1, max_tokens=2).json()
    (choice,) = body["choices"]
    assert choice["text"].startswith("The capital of France is")
    prompt_lp = body["prompt"][0]["logprobs"]
    n_prompt = body["usage"]["prompt_tokens"]
    assert len(prompt_lp["token_ids"]) == n_prompt
    assert prompt_lp["token_logprobs"][0] is None  # nothing predicts the first token
    assert all(lp <= 0 for lp in prompt_lp["token_logprobs"][1:])
    # The choice's logprobs cover the echoed prompt and then the completion.
    assert len(choice["logprobs"]["token_ids"]) == n_prompt + body["usage"]["completion_tokens"]

    only_prompt = complete(http, echo=True, logprobs=0, max_tokens=0).json()
    assert only_prompt["choices"][0]["text"] == "The capital of France is"
    assert only_prompt["usage"]["completion_tokens"] == 0
    assert only_prompt["prompt"][0]["logprobs"]["token_logprobs"][1:] == \
        prompt_lp["token_logprobs"][1:]


def test_a_prompt_of_token_ids_completes_as_its_text_does(http):
    """OpenAI's (and vLLM's) token-id prompt: how a platform in front of an engine sends
    the prompt it rendered itself. The same ids give the same greedy completion."""
    from k2serve.models.embedded import embedded_smollm2_gguf_path
    from k2serve.text.loading import load_tokenizer

    ids = load_tokenizer(embedded_smollm2_gguf_path()).encode("The capital of France is")
    by_text = complete(http, echo=True, max_tokens=6).json()
    r = complete(http, prompt=ids, max_tokens=6, echo=True)
    assert r.status_code == 200, r.text
    by_ids = r.json()
    assert by_ids["usage"]["prompt_tokens"] == len(ids) == by_text["usage"]["prompt_tokens"]
    assert by_ids["choices"][0]["text"] == by_text["choices"][0]["text"]  # echo + completion
    assert by_ids["prompt"][0]["text"] == "The capital of France is"


def test_a_token_id_outside_the_vocabulary_is_a_400(http):
    r = complete(http, prompt=[1, 2, 10**9])
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "prompt" and "prompt[2]" in r.json()["error"]["message"]
    assert complete(http, prompt=[]).status_code == 400
    assert complete(http, prompt=[1, -5]).status_code == 400


def test_completion_stream(http):
    with http.stream("POST", "/v1/completions",
                     json={"model": EMBEDDED_ID, "prompt": "Once upon a time", "max_tokens": 8,
                           "temperature": 0, "stream": True, "ignore_eos": True}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [l for l in r.iter_lines() if l]
    assert all(l.startswith("data: ") for l in lines)
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(l[6:]) for l in lines[:-1]]
    text = "".join(c["choices"][0]["text"] for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["usage"]["completion_tokens"] == 8
    whole = complete(http, prompt="Once upon a time", max_tokens=8, ignore_eos=True).json()
    assert text == whole["choices"][0]["text"]


def test_models_shape_depends_on_client(http):
    bare = http.get("/v1/models", headers={"user-agent": "Together/Python 3.1.1"}).json()
    assert isinstance(bare, list)
    wrapped = http.get("/v1/models", headers={"user-agent": "OpenAI/Python 3.57.0"}).json()
    assert wrapped["object"] == "list" and wrapped["data"] == bare
    (model,) = bare
    assert model["id"] == EMBEDDED_ID
    assert model["object"] == "model"
    assert model["type"] == "chat"
    assert model["context_length"] == 8192
    assert set(model["pricing"]) >= {"hourly", "input", "output", "base", "finetune"}
    assert isinstance(model["created"], int)
    one = http.get(f"/v1/models/{EMBEDDED_ID}").json()
    assert one["id"] == EMBEDDED_ID
