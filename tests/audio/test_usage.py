"""Audio requests are billed through the same ledger as text: one row per request, audio
seconds (transcription) or characters (speech) at the catalog price, and the API key's model
allow-list applies to multipart uploads too."""

from __future__ import annotations

import time

import httpx
import pytest

from k2serve.serving.catalog import CATALOG
from tests.audio.conftest import (
    MAX_AUDIO_SECONDS,
    SPEECH_MODEL,
    WHISPER_MODEL,
    speak,
    transcribe,
)


def _rows(audio_stack, request_id: str, timeout: float = 15.0):
    from k2serve.platform.db import Database
    from k2serve.platform.ledger import ledger_rows

    deadline = time.time() + timeout
    while time.time() < deadline:
        db = Database(audio_stack.db_url, migrate=False)
        try:
            rows = [r for r in ledger_rows(db, key_id=audio_stack.key_id)
                    if r.request_id == request_id]
        finally:
            db.close()
        if rows and all(r.status != "in_progress" for r in rows):  # rows exist from admission
            return rows
        time.sleep(0.2)
    raise AssertionError(f"no ledger row for request {request_id}")


def test_transcription_and_speech_are_billed(audio_stack, http):
    text = "Bill me for every second."
    audio = speak(http, text)
    r = http.post("/v1/audio/speech", json={"model": SPEECH_MODEL, "input": text,
                                            "voice": "en-us"})
    (row,) = _rows(audio_stack, r.headers["x-request-id"])
    assert (row.model, row.endpoint, row.status) == (SPEECH_MODEL, "audio.speech", "ok")
    assert row.prompt_tokens == len(text) and row.completion_tokens == 0
    price = CATALOG[SPEECH_MODEL]["pricing"].input
    assert row.cost_usd == pytest.approx(len(text) * price / 1e6)

    r = transcribe(http, audio, response_format="json")
    seconds = r.json()["usage"]["seconds"]
    assert seconds >= 1
    (row,) = _rows(audio_stack, r.headers["x-request-id"])
    assert (row.model, row.endpoint, row.status) == (WHISPER_MODEL, "audio.transcribe", "ok")
    assert row.prompt_tokens == seconds
    price = CATALOG[WHISPER_MODEL]["pricing"].input  # $ per 1M audio seconds
    assert row.cost_usd == pytest.approx(seconds * price / 1e6)
    assert price * 60 / 1e6 == pytest.approx(0.0015)  # $0.0015 per audio minute

    r = transcribe(http, b"not audio at all")
    assert r.status_code == 400
    (row,) = _rows(audio_stack, r.headers["x-request-id"])
    assert row.status == "rejected" and row.cost_usd == 0 and row.model == WHISPER_MODEL


def test_model_allow_list_applies_to_uploads(audio_stack):
    headers = {"Authorization": f"Bearer {audio_stack.chat_only_key}"}
    with httpx.Client(base_url=audio_stack.server.root, timeout=60, headers=headers) as c:
        r = transcribe(c, b"RIFF")
        assert r.status_code == 403 and r.json()["error"]["code"] == "model_not_allowed"
        r = c.post("/v1/audio/transcriptions", files={"file": ("a.wav", b"RIFF")})
        assert r.status_code == 403 and r.json()["error"]["code"] == "model_not_allowed"
        r = c.post("/v1/audio/speech", json={"model": SPEECH_MODEL, "input": "x",
                                             "voice": "en-us"})
        assert r.status_code == 403
    r = httpx.post(audio_stack.server.root + "/v1/audio/speech", timeout=60,
                   json={"model": SPEECH_MODEL, "input": "x", "voice": "en-us"})
    assert r.status_code == 401  # keys exist: no key, no audio


def test_a_dropped_speech_stream_is_billed(audio_stack):
    text = "A long text to speak, read only in part by its client. " * 70  # ~4000 characters
    headers = {"Authorization": f"Bearer {audio_stack.key}"}
    with httpx.Client(base_url=audio_stack.server.root, timeout=60, headers=headers) as c:
        with c.stream("POST", "/v1/audio/speech", json={
                "model": SPEECH_MODEL, "input": text, "voice": "en-us", "stream": True,
                "sample_rate": 48000}) as r:
            assert r.status_code == 200
            request_id = r.headers["x-request-id"]
            next(r.iter_lines())  # one chunk, then the client leaves
    (row,) = _rows(audio_stack, request_id)
    assert row.status == "client_closed" and row.prompt_tokens == len(text)
    assert row.cost_usd == pytest.approx(len(text) * CATALOG[SPEECH_MODEL]["pricing"].input / 1e6)


def test_token_limits_reserve_what_audio_may_use(audio_stack, http):
    """A transcription holds the longest audio it may send (MAX_AUDIO_SECONDS) against the
    key's tokens per minute until it ends; speech holds its characters."""
    audio = speak(http, "Short.")
    headers = {"Authorization": f"Bearer {audio_stack.tpm_key}"}
    with httpx.Client(base_url=audio_stack.server.root, timeout=60, headers=headers) as c:
        r = transcribe(c, audio)
        assert r.status_code == 200, r.text
        assert r.headers["x-tokenlimit-limit"] == "30"
        assert r.headers["x-tokenlimit-remaining"] == str(30 - MAX_AUDIO_SECONDS)
        r = c.post("/v1/audio/speech", json={"model": SPEECH_MODEL, "input": "x" * 31,
                                             "voice": "en-us"})
        assert r.status_code == 429
        assert r.json()["error"]["code"] == "request_exceeds_token_limit"
