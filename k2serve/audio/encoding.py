"""Speech output formats, encoded with PyAV (FFmpeg's encoders: LAME for mp3, FLAC, Opus,
AAC, raw PCM / mu-law / A-law) as the samples arrive, so raw output can stream.

`output_spec` turns a request's format fields into one `OutputSpec` or an
`AudioRequestError` that says what is possible.
"""

from __future__ import annotations

import io
import wave
from dataclasses import dataclass

import av
import numpy as np

from k2serve.audio.errors import AudioRequestError

SAMPLE_RATES = (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000)
OPUS_RATES = (8000, 12000, 16000, 24000, 48000)
BIT_RATES = (32000, 64000, 96000, 128000, 192000)  # Together's enum for mp3
DEFAULT_BIT_RATE = 128000

# Together's `response_encoding` for raw output -> (av muxer, av codec)
RAW_ENCODINGS = {
    "pcm_s16le": ("s16le", "pcm_s16le"),
    "pcm_f32le": ("f32le", "pcm_f32le"),
    "pcm_mulaw": ("mulaw", "pcm_mulaw"),
    "pcm_alaw": ("alaw", "pcm_alaw"),
}

# response_format -> (av muxer, av codec, media type, default sample rate)
FORMATS = {
    "wav": ("s16le", "pcm_s16le", "audio/wav", 44100),  # a RIFF header is added at the end
    "mp3": ("mp3", "libmp3lame", "audio/mpeg", 44100),
    "flac": ("flac", "flac", "audio/flac", 44100),
    "opus": ("ogg", "libopus", "audio/ogg", 48000),
    "aac": ("adts", "aac", "audio/aac", 44100),
    "pcm": ("s16le", "pcm_s16le", "audio/pcm", 24000),  # OpenAI: 24 kHz s16le, no header
    "raw": (None, None, "application/octet-stream", 44100),  # Together: by response_encoding
}
STREAMABLE = ("raw", "pcm")


@dataclass(frozen=True)
class OutputSpec:
    format: str
    muxer: str
    codec: str
    media_type: str
    sample_rate: int
    encoding: str  # what the bytes are: pcm_s16le, pcm_f32le, ..., mp3, flac
    bit_rate: int | None = None


def output_spec(response_format: str | None, response_encoding: str | None,
                sample_rate: int | None, bit_rate: int | None, stream: bool) -> OutputSpec:
    fmt = (response_format or ("raw" if stream else "wav")).lower()
    if fmt not in FORMATS:
        raise AudioRequestError(f"Unsupported response_format '{response_format}'; choose one "
                                f"of {', '.join(FORMATS)}.", param="response_format")
    if stream and fmt not in STREAMABLE:
        raise AudioRequestError(f"stream=true sends raw audio chunks: response_format must be "
                                f"'raw' (or 'pcm'), not '{fmt}'.", param="response_format")
    muxer, codec, media_type, default_rate = FORMATS[fmt]
    encoding = codec
    if fmt == "raw":
        encoding = (response_encoding or "pcm_f32le").lower()
        if encoding not in RAW_ENCODINGS:
            raise AudioRequestError(f"Unsupported response_encoding '{response_encoding}'; "
                                    f"choose one of {', '.join(RAW_ENCODINGS)}.",
                                    param="response_encoding")
        muxer, codec = RAW_ENCODINGS[encoding]
    elif fmt in ("mp3", "flac", "opus", "aac"):
        encoding = fmt
    rate = default_rate if sample_rate is None else sample_rate
    allowed = OPUS_RATES if fmt == "opus" else SAMPLE_RATES
    if rate not in allowed:
        raise AudioRequestError(f"Unsupported sample_rate {sample_rate} for {fmt}; choose one "
                                f"of {', '.join(map(str, allowed))}.", param="sample_rate")
    if bit_rate is not None and bit_rate not in BIT_RATES:
        raise AudioRequestError(f"Unsupported bit_rate {bit_rate}; choose one of "
                                f"{', '.join(map(str, BIT_RATES))}.", param="bit_rate")
    compressed = fmt in ("mp3", "opus", "aac")
    return OutputSpec(fmt, muxer, codec, media_type, rate, encoding,
                      (bit_rate or DEFAULT_BIT_RATE) if compressed else None)


class _Sink(io.RawIOBase):
    """A write-only file the muxer writes to; `take()` hands over what it has so far."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self._buf += data
        return len(data)

    def take(self) -> bytes:
        out = bytes(self._buf)
        self._buf.clear()
        return out


class Encoder:
    """int16 mono samples at `source_rate` in, encoded bytes out as soon as the muxer has
    them. WAV is buffered: its header needs the length."""

    def __init__(self, spec: OutputSpec, source_rate: int) -> None:
        self.spec = spec
        self._source_rate = source_rate
        self._sink = _Sink()
        self._container = av.open(self._sink, "w", format=spec.muxer)
        self._stream = self._container.add_stream(spec.codec, rate=spec.sample_rate,
                                                  layout="mono")
        if spec.bit_rate:
            self._stream.bit_rate = spec.bit_rate
        self._resampler = av.AudioResampler(format=self._stream.codec_context.format.name,
                                            layout="mono", rate=spec.sample_rate)
        self._wav = bytearray() if spec.format == "wav" else None
        self.samples_in = 0

    def _encode(self, frame: av.AudioFrame | None) -> bytes:
        for resampled in self._resampler.resample(frame):
            for packet in self._stream.encode(resampled):
                self._container.mux(packet)
        return self._pass(self._sink.take())

    def _pass(self, data: bytes) -> bytes:
        if self._wav is None:
            return data
        self._wav += data
        return b""

    def feed(self, samples: np.ndarray) -> bytes:
        if samples.size == 0:
            return b""
        self.samples_in += samples.size
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(samples, np.int16)[None, :],
                                           format="s16", layout="mono")
        frame.sample_rate = self._source_rate
        return self._encode(frame)

    def finish(self) -> bytes:
        tail = self._encode(None)
        for packet in self._stream.encode(None):
            self._container.mux(packet)
        self._container.close()
        tail += self._pass(self._sink.take())
        if self._wav is None:
            return tail
        out = io.BytesIO()
        with wave.open(out, "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(self.spec.sample_rate)
            w.writeframes(bytes(self._wav))
        return out.getvalue()
