"""Text to encoded speech: eSpeak NG makes int16 samples on its one worker thread, the encoder
turns them into the requested format there too, and the event loop receives bytes as they
come. At most MAX_PENDING syntheses wait for the worker; past that, `Busy`."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

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


class Busy(Exception):
    """More speech requests are waiting for eSpeak NG than the server queues."""


MAX_PENDING = 64  # syntheses queued for the one eSpeak worker; more get 503
_worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="espeak")  # one: a global lock
_pending = 0
_pending_lock = threading.Lock()


class SpeechJob:
    """One synthesis, queued on the eSpeak worker as soon as it is made (so it always runs
    to its end and frees its place, whether or not anyone reads it); `chunks()` yields the
    encoded audio as it comes, and leaving it early stops the synthesis."""

    def __init__(self, engine: Espeak, text: str, voice: Voice, rate_wpm: int,
                 spec: OutputSpec) -> None:
        global _pending
        with _pending_lock:
            if _pending >= MAX_PENDING:
                raise Busy(f"{_pending} speech requests are queued")
            _pending += 1
        self._loop = asyncio.get_running_loop()
        # Unbounded on purpose: eSpeak runs hundreds of times faster than real time, so a
        # synthesis ends and frees the worker at once, whatever its client's pace;
        # MAX_INPUT_CHARS bounds what waits here (4096 characters: ~40 MB of 48 kHz float32).
        self._queue: asyncio.Queue = asyncio.Queue()
        self._stop = threading.Event()
        _worker.submit(self._work, engine, text, voice, rate_wpm, spec)

    def _put(self, item) -> None:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the event loop is gone (shutdown): nobody is listening
            self._stop.set()

    def _work(self, engine: Espeak, text: str, voice: Voice, rate_wpm: int,
              spec: OutputSpec) -> None:
        global _pending
        try:
            encoder = Encoder(spec, engine.sample_rate)

            def sink(samples) -> bool:
                if self._stop.is_set():
                    return False
                data = encoder.feed(samples)
                if data:
                    self._put(data)
                return True

            if not self._stop.is_set():
                engine.synthesize(text, voice.id, rate_wpm, sink)
            if not self._stop.is_set():
                self._put(encoder.finish())
            self._put(_DONE)
        except BaseException as exc:  # noqa: BLE001 - handed to the reader
            self._put(exc)
        finally:
            with _pending_lock:
                _pending -= 1

    async def chunks(self) -> AsyncIterator[bytes]:
        try:
            while True:
                item = await self._queue.get()
                if item is _DONE:
                    return
                if isinstance(item, BaseException):
                    raise item
                if item:
                    yield item
        finally:
            self._stop.set()
