"""An uploaded audio file to the 16 kHz mono float32 samples Whisper reads.

PyAV (FFmpeg) decodes whatever container and codec it knows — wav at any rate and sample
format, mp3, flac, ogg/opus, m4a/aac, webm — and resamples as it goes. Decoding stops as
soon as the audio runs past the duration limit, so a small, highly compressed upload cannot
make the server hold hours of samples.
"""

from __future__ import annotations

import io

import av
import numpy as np

from k2serve.audio.errors import AudioRequestError

SAMPLE_RATE = 16000


def decode_audio(data: bytes, max_seconds: float) -> np.ndarray:
    if not data:
        raise AudioRequestError("The uploaded file is empty.", param="file")
    limit = int(max_seconds * SAMPLE_RATE)
    chunks: list[np.ndarray] = []
    total = 0
    try:
        with av.open(io.BytesIO(data), mode="r", metadata_errors="ignore") as container:
            if not container.streams.audio:
                raise AudioRequestError("The uploaded file has no audio stream.", param="file",
                                        code="invalid_audio")
            resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
            for frame in container.decode(audio=0):
                for out in resampler.resample(frame):
                    chunks.append(out.to_ndarray().reshape(-1))
                    total += out.samples
                if total > limit:
                    raise AudioRequestError(
                        f"The audio is longer than this server's limit of {max_seconds:g} "
                        f"seconds.", param="file", code="audio_too_long")
            for out in resampler.resample(None):
                chunks.append(out.to_ndarray().reshape(-1))
                total += out.samples
    except AudioRequestError:
        raise
    except (av.FFmpegError, ValueError, OSError) as exc:
        raise AudioRequestError(f"The uploaded file could not be decoded as audio ({exc}). "
                                f"Send wav, mp3, flac, ogg/opus, m4a or webm.", param="file",
                                code="invalid_audio") from None
    if total == 0:
        raise AudioRequestError("The uploaded file contains no audio samples.", param="file",
                                code="invalid_audio")
    if total > limit:
        raise AudioRequestError(f"The audio is longer than this server's limit of "
                                f"{max_seconds:g} seconds.", param="file", code="audio_too_long")
    return np.concatenate(chunks).astype(np.float32, copy=False)
