"""An uploaded audio file to the 16 kHz mono float32 samples Whisper reads.

PyAV (FFmpeg) decodes the audio containers named in FORMATS — wav at any rate and sample
format, mp3, flac, ogg/opus, m4a/aac, webm — and resamples as it goes. The container is
found from the upload's first bytes and FFmpeg opens it with that one demuxer: never with
FFmpeg's own probe, which tries every demuxer it has, some of which open other files or URLs
named inside the upload (concat/ffconcat reads local files, hls fetches URLs, image2 globs).
Decoding stops as soon as the audio runs past the duration limit, so a small, highly
compressed upload cannot make the server hold hours of samples.
"""

from __future__ import annotations

import io

import av
import numpy as np

from k2serve.audio.errors import AudioRequestError

SAMPLE_RATE = 16000
FORMATS = "wav, mp3, flac, ogg/opus, webm, m4a/mp4/mov, aac, aiff or caf"


def _after_id3(data: bytes) -> bytes:
    """The bytes after a leading ID3v2 tag (mp3, and sometimes aac or flac, carry one)."""
    if data[:3] != b"ID3" or len(data) < 10:
        return data
    size = 10 + sum((b & 0x7F) << (7 * (3 - i)) for i, b in enumerate(data[6:10]))
    return data[size + (10 if data[5] & 0x10 else 0):]  # a footer, when flagged


def sniff_container(data: bytes) -> str | None:
    """The FFmpeg demuxer for an upload, from its magic bytes; None when it is not one of
    FORMATS."""
    head = data[:12]
    if head[:4] in (b"RIFF", b"RF64") and head[8:12] == b"WAVE":
        return "wav"
    if head[:4] == b"OggS":
        return "ogg"
    if head[:4] == b"\x1a\x45\xdf\xa3":  # EBML: webm, mka
        return "matroska"
    if head[4:8] in (b"ftyp", b"moov", b"mdat", b"free", b"wide"):  # ISO BMFF / QuickTime
        return "mov"  # (external data references stay off: FFmpeg's enable_drefs=0)
    if head[:4] == b"FORM" and head[8:12] in (b"AIFF", b"AIFC"):
        return "aiff"
    if head[:4] == b"caff":
        return "caf"
    head = _after_id3(data)[:4]
    if head == b"fLaC":
        return "flac"
    if len(head) >= 2 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0:  # MPEG audio sync
        return "aac" if head[1] & 0x06 == 0 else "mp3"  # layer 0: ADTS
    if data[:3] == b"ID3":
        return "mp3"  # ID3 then padding or junk: the mp3 demuxer resyncs
    return None


def decode_audio(data: bytes, max_seconds: float) -> np.ndarray:
    if not data:
        raise AudioRequestError("The uploaded file is empty.", param="file")
    container_format = sniff_container(data)
    if container_format is None:
        raise AudioRequestError(f"The uploaded file could not be decoded as audio: it is not "
                                f"{FORMATS} (judged by its first bytes).", param="file",
                                code="invalid_audio")
    limit = int(max_seconds * SAMPLE_RATE)
    chunks: list[np.ndarray] = []
    total = 0
    try:
        with av.open(io.BytesIO(data), mode="r", format=container_format,
                     metadata_errors="ignore") as container:
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
                                f"Send {FORMATS}.", param="file",
                                code="invalid_audio") from None
    if total == 0:
        raise AudioRequestError("The uploaded file contains no audio samples.", param="file",
                                code="invalid_audio")
    if total > limit:
        raise AudioRequestError(f"The audio is longer than this server's limit of "
                                f"{max_seconds:g} seconds.", param="file", code="audio_too_long")
    return np.concatenate(chunks).astype(np.float32, copy=False)
