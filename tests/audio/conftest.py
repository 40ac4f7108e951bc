"""One `k2serve serve --families audio` process for the audio tests, with an API key (so the
ledger rows they cause can be read back) and small limits that the tests reach cheaply."""

from __future__ import annotations

import io
import shutil
import tempfile
import wave
from dataclasses import dataclass

import httpx
import numpy as np
import pytest

from tests.conftest import EMBEDDED_ID, LiveServer, start_server, stop_server

SPEECH_MODEL = "espeak-ng/espeak-ng"
WHISPER_MODEL = "openai/whisper-tiny.en"
MAX_AUDIO_SECONDS = 20
MAX_AUDIO_BYTES = 3_000_000
AUDIO_ENV = {
    "HF_HUB_OFFLINE": "1",  # nothing may come from a model hub
    "K2SERVE_AUDIO_THREADS": "1",  # the test machine's cores are shared
    "K2SERVE_MAX_AUDIO_SECONDS": str(MAX_AUDIO_SECONDS),
    "K2SERVE_MAX_AUDIO_BYTES": str(MAX_AUDIO_BYTES),
}


@dataclass
class AudioStack:
    server: LiveServer
    home: str
    key: str
    key_id: str
    chat_only_key: str
    tpm_key: str  # 30 tokens per minute

    @property
    def db_url(self) -> str:
        return f"sqlite:///{self.home}/k2serve.db"


@pytest.fixture(scope="session")
def audio_stack():
    from k2serve.platform.db import Database
    from k2serve.platform.keys import KeyStore

    home = tempfile.mkdtemp(prefix="k2serve-audio-")
    db = Database(f"sqlite:///{home}/k2serve.db")
    try:
        store = KeyStore(db)
        info, key = store.create("audio-tests")
        _, chat_only = store.create("chat-only", models=[EMBEDDED_ID])
        _, tpm_key = store.create("tpm-30", tpm=30)
    finally:
        db.close()
    server = start_server("--families", "audio", env={"K2SERVE_HOME": home, **AUDIO_ENV})
    yield AudioStack(server, home, key, info.id, chat_only, tpm_key)
    stop_server(server)
    shutil.rmtree(home, ignore_errors=True)


@pytest.fixture()
def http(audio_stack):
    with httpx.Client(base_url=audio_stack.server.root, timeout=120,
                      headers={"Authorization": f"Bearer {audio_stack.key}"}) as client:
        yield client


def speak(http: httpx.Client, text: str, **fields) -> bytes:
    body = {"model": SPEECH_MODEL, "input": text, "voice": "en-us", **fields}
    r = http.post("/v1/audio/speech", json=body)
    assert r.status_code == 200, r.text
    return r.content


def transcribe(http: httpx.Client, audio: bytes, filename: str = "speech.wav",
               path: str = "/v1/audio/transcriptions", **fields) -> httpx.Response:
    data = {"model": WHISPER_MODEL, **fields}
    return http.post(path, files={"file": (filename, audio)}, data=data)


def read_wav(data: bytes) -> tuple[np.ndarray, int]:
    with wave.open(io.BytesIO(data)) as w:
        assert w.getnchannels() == 1 and w.getsampwidth() == 2
        return np.frombuffer(w.readframes(w.getnframes()), np.int16), w.getframerate()


def wav_file(pcm: np.ndarray, rate: int) -> bytes:
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(np.asarray(pcm, np.int16).tobytes())
    return out.getvalue()
