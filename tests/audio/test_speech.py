"""POST /v1/audio/speech (and /v1/audio/generations), GET /v1/voices against a live server:
the audio a client receives, in each format, and the 4xx answers to what eSpeak NG cannot do."""

from __future__ import annotations

import base64
import io
import json

import av
import numpy as np
import pytest

from tests.audio.conftest import (SPEECH_MODEL, WHISPER_MODEL, read_wav, speak, transcribe,
                                  wav_file)
from tests.audio.wer import word_error_rate

TEXT = "Today is a wonderful day to build something people love!"


def decoded(data: bytes) -> tuple[int, float]:
    """(sample rate, seconds) of an encoded file, as FFmpeg reads it."""
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.audio[0]
        samples = sum(frame.samples for frame in container.decode(stream))
        return stream.rate, samples / stream.rate


def test_wav_is_speech_at_the_requested_rate(http):
    pcm, rate = read_wav(speak(http, TEXT))
    assert rate == 44100  # Together's default
    seconds = len(pcm) / rate
    assert 2.0 < seconds < 5.0, seconds  # ten words at 175 words per minute
    assert np.abs(pcm.astype(np.float32)).max() > 3000  # not silence
    pcm16k, rate16k = read_wav(speak(http, TEXT, sample_rate=16000))
    assert rate16k == 16000 and abs(len(pcm16k) / 16000 - seconds) < 0.02


def test_the_seed_path_and_mp3(http):
    r = http.post("/v1/audio/generations", json={
        "model": SPEECH_MODEL, "input": TEXT, "voice": "american female",
        "response_format": "mp3", "sample_rate": 44100, "stream": False})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "audio/mpeg"
    rate, seconds = decoded(r.content)
    assert rate == 44100 and 2.0 < seconds < 5.0


@pytest.mark.parametrize("fmt,mime", [("flac", "audio/flac"), ("opus", "audio/ogg"),
                                      ("aac", "audio/aac")])
def test_openai_formats_decode(http, fmt, mime):
    r = http.post("/v1/audio/speech", json={"model": SPEECH_MODEL, "input": TEXT,
                                            "voice": "en-us", "response_format": fmt})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == mime
    _, seconds = decoded(r.content)
    assert 2.0 < seconds < 5.0


def close(a: float, b: float, rel: float = 0.01) -> bool:
    """eSpeak NG's output varies by a few milliseconds from one call to the next (state it
    carries between utterances), so lengths are compared within 1%."""
    return abs(a - b) <= rel * max(a, b)


def test_raw_encodings(http):
    wav, _ = read_wav(speak(http, TEXT, sample_rate=24000))
    s16 = np.frombuffer(speak(http, TEXT, response_format="raw", response_encoding="pcm_s16le",
                              sample_rate=24000), np.int16)
    f32 = np.frombuffer(speak(http, TEXT, response_format="raw", sample_rate=24000), np.float32)
    pcm = np.frombuffer(speak(http, TEXT, response_format="pcm"), np.int16)  # OpenAI: 24 kHz
    assert close(len(s16), len(wav)) and close(len(pcm), len(wav)) and close(len(f32), len(wav))
    assert 0.1 < np.abs(f32).max() <= 1.0 and np.abs(s16).max() > 3000
    mulaw = speak(http, TEXT, response_format="raw", response_encoding="pcm_mulaw",
                  sample_rate=8000)
    assert close(len(mulaw) * 3, len(wav))  # one byte per sample at a third of the rate


def test_speed_changes_the_duration(http):
    normal = len(read_wav(speak(http, TEXT))[0])
    fast = len(read_wav(speak(http, TEXT, speed=2.0))[0])
    slow = len(read_wav(speak(http, TEXT, speed=0.6))[0])
    assert fast < 0.7 * normal and slow > 1.3 * normal


def _events(http, body):
    with http.stream("POST", "/v1/audio/speech", json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line[6:]) for line in lines[:-1]]


def test_together_stream_is_the_raw_audio_in_chunks(http):
    body = {"model": SPEECH_MODEL, "input": TEXT, "voice": "en-us", "stream": True,
            "response_encoding": "pcm_s16le", "sample_rate": 22050}
    events = _events(http, body)
    assert len(events) > 5  # streamed as eSpeak produces it, not one blob
    assert all(e["object"] == "audio.tts.chunk" and e["model"] == SPEECH_MODEL for e in events)
    streamed = b"".join(base64.b64decode(e["b64"]) for e in events)
    whole = speak(http, TEXT, response_format="raw", response_encoding="pcm_s16le",
                  sample_rate=22050)
    assert close(len(streamed), len(whole))
    # The chunks put together are the sentence: Whisper reads it back word for word.
    r = transcribe(http, wav_file(np.frombuffer(streamed, np.int16), 22050))
    assert r.status_code == 200, r.text
    assert word_error_rate(TEXT, r.json()["text"]) == 0.0, r.json()["text"]


def test_openai_sse_stream_format(http):
    events = _events(http, {"model": SPEECH_MODEL, "input": "Hello there.", "voice": "en-us",
                            "response_format": "pcm", "stream_format": "sse"})
    assert {e["type"] for e in events[:-1]} == {"speech.audio.delta"}
    assert events[-1]["type"] == "speech.audio.done"
    assert events[-1]["usage"]["input_tokens"] == len("Hello there.")
    audio = b"".join(base64.b64decode(e["audio"]) for e in events[:-1])
    assert close(len(audio), len(speak(http, "Hello there.", response_format="pcm")))


def test_voices_are_listed_and_each_one_speaks(http):
    r = http.get("/v1/voices")
    assert r.status_code == 200
    (entry,) = r.json()["data"]
    assert entry["model"] == SPEECH_MODEL
    voices = entry["voices"]
    assert len(voices) >= 10 and {"id": "en-us", "name": "american male"} in voices
    assert len({v["id"] for v in voices}) == len(voices)
    outputs = set()
    for v in voices:
        pcm, _ = read_wav(speak(http, "One two three.", voice=v["id"], sample_rate=8000))
        assert len(pcm) > 4000, v  # half a second or more of speech
        outputs.add(pcm.tobytes())
    assert len(outputs) == len(voices)  # every voice sounds different
    assert http.get("/v1/voices", params={"model": WHISPER_MODEL}).json()["data"] == []


def test_together_voice_names_speak_as_their_espeak_voice(http):
    """Together's documented voice names (cartesia/sonic, orpheus, kokoro) are accepted and
    read by the eSpeak voice the table maps them to; unknown names stay a 400."""
    from k2serve.audio.voices import TOGETHER_VOICES, find_voice

    assert find_voice("Helpful Woman").id == "en-us+f3" == TOGETHER_VOICES["helpful woman"]
    assert all(find_voice(alias).id == voice for alias, voice in TOGETHER_VOICES.items())
    for alias in ("helpful woman", "tara", "af_heart", "bm_george", "french narrator lady"):
        pcm, _ = read_wav(speak(http, "One two three.", voice=alias, sample_rate=8000))
        assert len(pcm) > 4000, alias


@pytest.mark.parametrize("fields,param,fragment", [
    ({"voice": "alloy"}, "voice", "Unknown voice 'alloy'"),
    ({"voice": None}, "voice", "Missing required parameter: 'voice'"),
    ({"input": "   "}, "input", "input must contain text"),
    ({"input": "a" * 4097}, "input", "the limit is 4096"),
    ({"response_format": "ogg"}, "response_format", "choose one of wav, mp3"),
    ({"response_format": "mp3", "stream": True}, "response_format", "must be 'raw'"),
    ({"response_format": "raw", "response_encoding": "pcm_u8"}, "response_encoding",
     "choose one of pcm_s16le"),
    ({"sample_rate": 12345}, "sample_rate", "Unsupported sample_rate 12345"),
    ({"response_format": "mp3", "bit_rate": 1000}, "bit_rate", "Unsupported bit_rate"),
    ({"speed": 4.0}, "speed", "speed must be between 0.46 and 2.57"),
    ({"voice": "de", "language": "en"}, "language", "speaks 'de', not 'en'"),
    ({"stream": "yes"}, "stream", "Invalid value for 'stream'"),
])
def test_what_espeak_cannot_do_is_a_clear_400(http, fields, param, fragment):
    body = {"model": SPEECH_MODEL, "input": TEXT, "voice": "en-us", **fields}
    body = {k: v for k, v in body.items() if v is not None}
    r = http.post("/v1/audio/speech", json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and fragment in err["message"], err


def test_model_errors(http):
    r = http.post("/v1/audio/speech", json={"model": WHISPER_MODEL, "input": "x",
                                            "voice": "en-us"})
    assert r.status_code == 400
    assert ("is a transcribe model and cannot synthesize speech; use espeak-ng/espeak-ng"
            in r.json()["error"]["message"])
    r = http.post("/v1/audio/speech", json={"model": "cartesia/sonic", "input": "x",
                                            "voice": "en-us"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = http.post("/v1/audio/speech", content=b"{not json",
                  headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]


def test_concurrent_requests_do_not_mix_their_audio(audio_stack, http):
    """eSpeak NG is one global state per process: requests are serialized, so each reply is
    its own sentence, as long as when it is spoken alone."""
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    texts = [f"Request number {n} says {word}." for n, word in
             enumerate(["apple", "banana", "cherry", "dates", "elderberry", "figs"])]
    alone = [len(read_wav(speak(http, t, sample_rate=8000))[0]) for t in texts]

    def one(text):
        with httpx.Client(base_url=audio_stack.server.root, timeout=120,
                          headers={"Authorization": f"Bearer {audio_stack.key}"}) as c:
            return len(read_wav(speak(c, text, sample_rate=8000))[0])

    with ThreadPoolExecutor(len(texts)) as pool:
        together = list(pool.map(one, texts))
    assert all(close(a, b) for a, b in zip(alone, together)), (alone, together)


def test_models_list_types_and_prices(http):
    listed = {m["id"]: m for m in http.get("/v1/models").json()}  # Together: a bare array
    assert listed[SPEECH_MODEL]["type"] == "audio"
    assert listed[WHISPER_MODEL]["type"] == "transcribe"
    assert listed[WHISPER_MODEL]["pricing"]["input"] == 25.0  # per 1M audio seconds
    assert listed[SPEECH_MODEL]["pricing"]["input"] == 1.0  # per 1M characters
    for m in listed.values():
        assert m["object"] == "model" and set(m["pricing"]) >= {"hourly", "input", "output",
                                                                  "base", "finetune"}
