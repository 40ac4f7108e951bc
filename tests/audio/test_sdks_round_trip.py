"""The official SDKs against a live server, and the round trip: our speech, transcribed back
by our Whisper, with a low word error rate."""

from __future__ import annotations

import base64
import warnings

import numpy as np
import pytest

from tests.audio.conftest import SPEECH_MODEL, WHISPER_MODEL, wav_file
from tests.audio.wer import word_error_rate, words

# Ordinary sentences: numbers, names, a question. WER is measured over all of them together.
SENTENCES = (
    "Today is a wonderful day to build something people love!",
    "Please send the report to the team before noon on Friday.",
    "The meeting starts at ten o'clock in the large conference room.",
    "Could you tell me where the nearest train station is?",
)
MAX_WER = 0.25


@pytest.fixture(scope="module")
def openai_client(audio_stack):
    from openai import OpenAI

    return OpenAI(base_url=audio_stack.server.base_v1, api_key=audio_stack.key, max_retries=0)


@pytest.fixture(scope="module")
def together_client(audio_stack):
    from together import Together

    return Together(base_url=audio_stack.server.root, api_key=audio_stack.key, max_retries=0)


def test_round_trip_word_error_rate(openai_client):
    """Speak each sentence (wav) and transcribe it back; WER over all the words."""
    errors = 0.0
    total = 0
    heard = []
    for sentence in SENTENCES:
        audio = openai_client.audio.speech.create(model=SPEECH_MODEL, voice="en-us",
                                                  input=sentence, response_format="wav").content
        text = openai_client.audio.transcriptions.create(
            model=WHISPER_MODEL, file=("speech.wav", audio), response_format="text")
        heard.append(text.strip())
        errors += word_error_rate(sentence, text) * len(words(sentence))
        total += len(words(sentence))
    wer = errors / total
    print(f"\nround-trip WER {wer:.3f} over {total} words: {heard}")
    assert wer <= MAX_WER, heard


def test_openai_sdk(openai_client):
    speech = openai_client.audio.speech.create(model=SPEECH_MODEL, voice="american female",
                                               input=SENTENCES[1], response_format="mp3",
                                               speed=1.2)
    mp3 = speech.content
    assert mp3[:3] == b"ID3" or mp3[:2] == b"\xff\xfb"
    result = openai_client.audio.transcriptions.create(model=WHISPER_MODEL,
                                                       file=("speech.mp3", mp3))
    assert word_error_rate(SENTENCES[1], result.text) <= MAX_WER, result.text
    verbose = openai_client.audio.transcriptions.create(
        model=WHISPER_MODEL, file=("speech.mp3", mp3), response_format="verbose_json",
        timestamp_granularities=["word", "segment"])
    assert verbose.text == result.text and verbose.language == "english"
    assert verbose.duration > 1.0 and verbose.segments[0].end > verbose.segments[0].start
    assert len(verbose.words) == len(words(verbose.text))
    with warnings.catch_warnings():  # the SDK marks translations deprecated; still served
        warnings.simplefilter("ignore", DeprecationWarning)
        translated = openai_client.audio.translations.create(model=WHISPER_MODEL,
                                                             file=("speech.mp3", mp3))
    assert translated.text == result.text
    from openai import BadRequestError

    with pytest.raises(BadRequestError) as exc:
        openai_client.audio.speech.create(model=SPEECH_MODEL, voice="alloy", input="Hi")
    assert "Unknown voice 'alloy'" in str(exc.value)


def test_together_sdk(together_client):
    voices = together_client.audio.voices.list()
    (entry,) = voices.data
    assert entry.model == SPEECH_MODEL and any(v.id == "en-us" for v in entry.voices)

    response = together_client.audio.speech.create(model=SPEECH_MODEL, voice="en-us",
                                                   input=SENTENCES[0], response_format="wav")
    audio = response.read()
    assert audio[:4] == b"RIFF"

    stream = together_client.audio.speech.create(model=SPEECH_MODEL, voice="en-us",
                                                 input=SENTENCES[0], stream=True,
                                                 response_format="raw",
                                                 response_encoding="pcm_s16le",
                                                 sample_rate=16000)
    chunks = [chunk for chunk in stream]
    assert len(chunks) > 1 and all(c.object == "audio.tts.chunk" for c in chunks)
    pcm = np.frombuffer(b"".join(base64.b64decode(c.b64) for c in chunks), np.int16)

    result = together_client.audio.transcriptions.create(
        model=WHISPER_MODEL, file=("stream.wav", wav_file(pcm, 16000)),
        response_format="verbose_json", timestamp_granularities="word", language="en")
    assert word_error_rate(SENTENCES[0], result.text) <= MAX_WER, result.text
    assert result.segments and result.words
    translated = together_client.audio.translations.create(
        model=WHISPER_MODEL, file=("speech.wav", audio), language="en")
    assert word_error_rate(SENTENCES[0], translated.text) <= MAX_WER


SDK2_SCRIPT = """
import io, json, sys
from together import Together
client = Together(base_url=sys.argv[1], api_key=sys.argv[2], max_retries=0)
voices = client.audio.voices.list()
speech = client.audio.speech.create(model=sys.argv[3], voice="en-us", input=sys.argv[5],
                                    response_format="wav")
audio = speech.read()
result = client.audio.transcriptions.create(model=sys.argv[4], file=("speech.wav", audio),
                                            response_format="verbose_json",
                                            timestamp_granularities=["word", "segment"])
print(json.dumps({"voices": [v.id for v in voices.data[0].voices], "riff": audio[:4].decode(),
                  "text": result.text, "words": len(result.words or [])}))
"""


def test_together2_with_v1_base_url(audio_stack):
    """together 2.x (the side copy scripts/install-sdk-2x makes) with a base URL ending /v1."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    sdk2 = Path(__file__).resolve().parents[2] / ".sdk" / "together2"
    if not (sdk2 / "together").is_dir():
        pytest.fail(f"together 2.x side copy missing: run scripts/install-sdk-2x ({sdk2})")
    out = subprocess.run([sys.executable, "-c", SDK2_SCRIPT, audio_stack.server.base_v1,
                          audio_stack.key, SPEECH_MODEL, WHISPER_MODEL, SENTENCES[1]],
                         env=dict(os.environ, PYTHONPATH=str(sdk2)), capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert "en-us" in result["voices"] and result["riff"] == "RIFF"
    assert word_error_rate(SENTENCES[1], result["text"]) <= MAX_WER, result["text"]
    assert result["words"] == len(words(result["text"]))


def test_curl_seed_speech_example(audio_stack, tmp_path):
    """The seed's curl for /v1/audio/generations (its voice, Together's "helpful woman",
    included), with this server's speech model."""
    import json
    import shutil
    import subprocess

    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    target = tmp_path / "speech.mp3"
    body = {"input": SENTENCES[0], "voice": "helpful woman", "response_format": "mp3",
            "sample_rate": 44100, "stream": False, "model": SPEECH_MODEL}
    out = subprocess.run(["curl", "-sS", "--location", f"{audio_stack.server.base_v1}/audio/"
                          "generations", "--header", "Content-Type: application/json",
                          "--header", f"Authorization: Bearer {audio_stack.key}",
                          "--output", str(target), "--data", json.dumps(body)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    import av

    with av.open(str(target)) as container:
        stream = container.streams.audio[0]
        assert stream.codec_context.name.startswith("mp3") and stream.rate == 44100
