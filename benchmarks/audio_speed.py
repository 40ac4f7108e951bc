"""Audio speed and accuracy, in process (no server): eSpeak NG synthesis and Whisper tiny.en
transcription times as multiples of real time, and the speak-then-transcribe word error rate.

    python benchmarks/audio_speed.py [--threads 1] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests' WER

import numpy as np  # noqa: E402

from k2serve.audio.decoding import SAMPLE_RATE  # noqa: E402
from k2serve.audio.encoding import Encoder, output_spec  # noqa: E402
from k2serve.audio.espeak import DEFAULT_RATE_WPM, espeak  # noqa: E402
from k2serve.audio.transcription import Whisper, whisper_model_dir  # noqa: E402
from tests.audio.wer import word_error_rate, words  # noqa: E402

PARAGRAPH = (
    "Please send the report to the team before noon on Friday. The meeting starts at ten "
    "o'clock in the large conference room. Could you tell me where the nearest train station "
    "is? Today is a wonderful day to build something people love. We will review the budget, "
    "the hiring plan and the schedule for the next quarter, and then open the floor for "
    "questions from everyone who joined the call.")


def speak_16k(engine, text: str, voice: str) -> np.ndarray:
    """int16 at eSpeak's rate -> float32 at 16 kHz, through the server's own encoder path."""
    encoder = Encoder(output_spec("raw", "pcm_f32le", 16000, None, False), engine.sample_rate)
    out = bytearray()
    engine.synthesize(text, voice, DEFAULT_RATE_WPM, lambda s: out.extend(encoder.feed(s)) or True)
    out.extend(encoder.finish())
    return np.frombuffer(bytes(out), np.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--voice", default="en-us")
    args = parser.parse_args()

    engine = espeak()
    started = time.perf_counter()
    for _ in range(args.repeat):
        audio = speak_16k(engine, PARAGRAPH, args.voice)
    synth_s = (time.perf_counter() - started) / args.repeat
    seconds = len(audio) / SAMPLE_RATE
    print(f"speech: {len(PARAGRAPH)} characters -> {seconds:.1f} s of audio in "
          f"{synth_s * 1000:.0f} ms ({seconds / synth_s:.0f}x real time, 16 kHz f32 encode "
          f"included)")

    started = time.perf_counter()
    whisper = Whisper(whisper_model_dir(), cpu_threads=args.threads)
    print(f"whisper tiny.en load: {time.perf_counter() - started:.2f} s "
          f"({args.threads} thread(s), int8)")
    for word_timestamps in (False, True):
        times = []
        for _ in range(args.repeat):
            started = time.perf_counter()
            transcript = whisper.transcribe(audio, word_timestamps=word_timestamps)
            times.append(time.perf_counter() - started)
        best = min(times)
        print(f"transcription{' + word timestamps' if word_timestamps else ''}: "
              f"{seconds:.1f} s of audio in {best:.2f} s (best of {args.repeat}; "
              f"{seconds / best:.1f}x real time)")
    wer = word_error_rate(PARAGRAPH, transcript.text)
    print(f"round trip ({args.voice}): WER {wer:.3f} over {len(words(PARAGRAPH))} words")
    print(f"heard: {transcript.text}")


if __name__ == "__main__":
    main()
