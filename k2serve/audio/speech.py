"""Text to encoded speech: eSpeak NG makes int16 samples on a worker thread, the encoder turns
them into the requested format there too, and the event loop receives bytes as they come."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator

from k2serve.audio.encoding import Encoder, OutputSpec
from k2serve.audio.errors import AudioRequestError
from k2serve.audio.espeak import DEFAULT_RATE_WPM, MAX_RATE_WPM, MIN_RATE_WPM, Espeak
from k2serve.audio.voices import Voice

MAX_INPUT_CHARS = 4096  # OpenAI's limit for one speech request
MIN_SPEED = MIN_RATE_WPM / DEFAULT_RATE_WPM  # eSpeak NG speaks 80..450 words per minute
MAX_SPEED = MAX_RATE_WPM / DEFAULT_RATE_WPM
_DONE = object()


def rate_for_speed(speed: float | None) -> int:
    """OpenAI's `speed` (1.0 = normal) as eSpeak's words per minute."""
    if speed is None:
        return DEFAULT_RATE_WPM
    if not MIN_SPEED <= speed <= MAX_SPEED:
        raise AudioRequestError(f"speed must be between {MIN_SPEED:.2f} and {MAX_SPEED:.2f} "
                                f"for eSpeak NG ({MIN_RATE_WPM}-{MAX_RATE_WPM} words per "
                                f"minute; 1.0 is {DEFAULT_RATE_WPM}).", param="speed")
    return round(DEFAULT_RATE_WPM * speed)


def check_input(text: str) -> str:
    if not text.strip():
        raise AudioRequestError("input must contain text to speak.", param="input")
    if len(text) > MAX_INPUT_CHARS:
        raise AudioRequestError(f"input is {len(text)} characters; the limit is "
                                f"{MAX_INPUT_CHARS}.", param="input",
                                code="string_above_max_length")
    return text


async def speak(engine: Espeak, text: str, voice: Voice, rate_wpm: int,
                spec: OutputSpec) -> AsyncIterator[bytes]:
    """Encoded audio, chunk by chunk. Closing the iterator early stops the synthesis."""
    loop = asyncio.get_running_loop()
    # Unbounded on purpose: eSpeak runs hundreds of times faster than real time, so the
    # synthesis finishes and frees the process-wide lock at once, whatever the client's pace;
    # MAX_INPUT_CHARS bounds what waits here (4096 characters: ~40 MB of 48 kHz float32).
    queue: asyncio.Queue = asyncio.Queue()
    stop = threading.Event()

    def put(item) -> None:
        loop.call_soon_threadsafe(queue.put_nowait, item)

    def work() -> None:
        try:
            encoder = Encoder(spec, engine.sample_rate)

            def sink(samples) -> bool:
                if stop.is_set():
                    return False
                data = encoder.feed(samples)
                if data:
                    put(data)
                return True

            engine.synthesize(text, voice.id, rate_wpm, sink)
            if not stop.is_set():
                put(encoder.finish())
            put(_DONE)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            put(exc)

    worker = threading.Thread(target=work, name="espeak-synth", daemon=True)
    worker.start()
    try:
        while True:
            item = await queue.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            if item:
                yield item
    finally:
        stop.set()
