"""A model sent to an endpoint of another type answers what the model can do (and, for\nimage and video endpoints without such a model, the flag that serves one)."""

from __future__ import annotations

import pytest

from tests.conftest import EMBEDDED_ID


@pytest.mark.parametrize("path,action", [
    ("/v1/images/generations", "generate images"),
    ("/v2/videos", "generate videos"),
    ("/v1/embeddings", "compute embeddings"),
    ("/v1/rerank", "rerank documents"),
    ("/v1/audio/generations", "synthesize speech"),
    ("/v1/moderations", "classify content"),
])
def test_a_chat_model_sent_to_another_endpoint_says_what_it_is(http, path, action):
    r = http.post(path, json={"model": EMBEDDED_ID, "prompt": "Draw a cat", "input": "x"})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "model" and err["code"] == "model_not_supported"
    assert f"is a chat model and cannot {action}" in err["message"]
    assert EMBEDDED_ID in err["message"]


@pytest.mark.parametrize("path,flag", [("/v1/images/generations", "--image-model DIR"),
                                       ("/v2/videos", "--video-model DIR"),
                                       ("/v1/videos", "--video-model DIR")])
def test_without_an_image_or_video_model_the_error_names_the_flag(http, path, flag):
    """The seed's curl snippets name the chat model; with no such model configured, the
    answer says which `k2serve serve` flag serves one."""
    body = {"model": "moonshotai/Kimi-K2-Instruct-0905", "prompt": "Draw a cat"}
    for model, status in ((EMBEDDED_ID, 400), ("moonshotai/Kimi-K2-Instruct-0905", 404),
                          (None, 400)):
        r = http.post(path, json={**body, "model": model})
        assert r.status_code == status, r.text
        err = r.json()["error"]
        assert err["param"] == "model" and f"`k2serve serve {flag}`" in err["message"]


def test_unknown_model_and_missing_model(http):
    r = http.post("/v1/images/generations", json={"model": "nope", "prompt": "x"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = http.post("/v1/audio/transcriptions", files={"file": ("a.wav", b"RIFF")},
                  data={"model": EMBEDDED_ID})
    assert r.status_code == 400 and "cannot transcribe audio" in r.json()["error"]["message"]
    assert http.post("/v1/embeddings", json={"input": "x"}).status_code == 400


def test_moderation_on_a_server_without_a_moderation_model(http):
    r = http.post("/v1/moderations", json={"input": "x"})
    assert r.status_code == 400 and "serves no moderation model" in r.json()["error"]["message"]
    r = http.post("/v1/chat/completions", json={
        "model": EMBEDDED_ID, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
        "safety_model": "irfanalidv/toxic-comment-classifier"})
    err = r.json()["error"]
    assert r.status_code == 400 and err["param"] == "safety_model"
    assert "--families moderation" in err["message"]


def test_an_image_part_sent_to_the_text_only_chat_model_says_it_takes_text(http):
    r = http.post("/v1/chat/completions", json={"model": EMBEDDED_ID, "messages": [
        {"role": "user", "content": [
            {"type": "text", "text": "What is in this picture?"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}]}]})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == "unsupported_content_type" and err["param"] == "messages.0.content"
    assert "accepts text only" in err["message"] and "'image_url' part" in err["message"]
