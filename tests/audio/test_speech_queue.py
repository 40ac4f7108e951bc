"""The eSpeak worker's queue, in process: bounded (Busy past MAX_PENDING), each job's audio its
own, and a job nobody reads still runs to its end and frees its place."""

from __future__ import annotations

import asyncio

import pytest

from k2serve.audio import speech
from k2serve.audio.encoding import output_spec
from k2serve.audio.espeak import DEFAULT_RATE_WPM, espeak
from k2serve.audio.voices import find_voice

SPEC = output_spec("raw", "pcm_s16le", 8000, None, False)


def job(text: str) -> speech.SpeechJob:
    return speech.SpeechJob(espeak(), text, find_voice("en-us"), DEFAULT_RATE_WPM, SPEC)


async def read(j: speech.SpeechJob) -> bytes:
    return b"".join([chunk async for chunk in j.chunks()])


def test_bounded_queue(monkeypatch):
    monkeypatch.setattr(speech, "MAX_PENDING", 2)

    async def scenario():
        long_text = "A sentence long enough to keep the worker busy for a moment. " * 40
        first, second = job(long_text), job("Second.")
        with pytest.raises(speech.Busy):
            job("Third.")
        audio = await read(second)
        assert len(audio) > 8000  # half a second of 8 kHz 16-bit speech
        del first  # never read: it still ends and frees its place
        for _ in range(200):
            if speech._pending == 0:
                break
            await asyncio.sleep(0.05)
        assert speech._pending == 0
        assert len(await read(job("Fourth."))) > 4000

    asyncio.run(scenario())
