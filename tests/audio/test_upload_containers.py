"""Uploads are opened with one demuxer chosen from their first bytes, from an allow-list of
audio containers: FFmpeg's probe would try every demuxer it has, and some read what the
upload names — an ffconcat script names local files (the server then transcribes a file of
its own disk), an HLS playlist URLs. Decoding needs no model, so most of this runs in-process;
one test goes through the live server."""

from __future__ import annotations

import io
import os
import uuid

import av
import numpy as np
import pytest

from k2serve.audio.decoding import SAMPLE_RATE, decode_audio, sniff_container
from k2serve.audio.errors import AudioRequestError
from tests.audio.conftest import transcribe, wav_file

TONE = (np.sin(np.arange(SAMPLE_RATE) * 2 * np.pi * 440 / SAMPLE_RATE) * 10000).astype(np.int16)


def encode(muxer: str, codec: str, rate: int = SAMPLE_RATE, **options) -> bytes:
    """One second of a 440 Hz tone in `muxer`/`codec`."""
    out = io.BytesIO()
    with av.open(out, "w", format=muxer, options=options) as container:
        stream = container.add_stream(codec, rate=rate)
        frame = av.AudioFrame.from_ndarray(TONE.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = SAMPLE_RATE
        resampler = av.AudioResampler(format=stream.codec_context.format.name, layout="mono",
                                      rate=rate)
        for f in [*resampler.resample(frame), *resampler.resample(None), None]:
            for packet in stream.encode(f):
                container.mux(packet)
    return out.getvalue()


@pytest.mark.parametrize("muxer,codec,rate,options,expected", [
    ("mp3", "libmp3lame", 16000, {}, "mp3"),
    ("mp3", "libmp3lame", 16000, {"write_id3v2": "0"}, "mp3"),  # bare MPEG frames
    ("flac", "flac", 16000, {}, "flac"),
    ("ogg", "libopus", 48000, {}, "ogg"),
    ("adts", "aac", 16000, {}, "aac"),
    ("ipod", "aac", 16000, {}, "mov"),  # .m4a
    ("mp4", "aac", 16000, {}, "mov"),
    ("mov", "pcm_s16le", 16000, {}, "mov"),
    ("webm", "libopus", 48000, {}, "matroska"),
    ("aiff", "pcm_s16be", 16000, {}, "aiff"),
    ("caf", "pcm_s16le", 16000, {}, "caf"),
])
def test_audio_containers_decode(muxer, codec, rate, options, expected):
    data = encode(muxer, codec, rate, **options)
    assert sniff_container(data) == expected
    audio = decode_audio(data, max_seconds=30)
    assert 0.9 * SAMPLE_RATE < len(audio) < 1.2 * SAMPLE_RATE


def test_wav_decodes():
    data = wav_file(TONE, SAMPLE_RATE)
    assert sniff_container(data) == "wav"
    assert len(decode_audio(data, max_seconds=30)) == SAMPLE_RATE


def ffconcat(name: str) -> bytes:
    return f"ffconcat version 1.0\nfile '{name}'\n".encode()


@pytest.mark.parametrize("script", [
    ffconcat("secret.wav"),
    b"#EXTM3U\n#EXT-X-TARGETDURATION:1\n#EXTINF:1,\nsecret.wav\n#EXT-X-ENDLIST\n",  # hls
    b"v=0\no=- 0 0 IN IP4 127.0.0.1\ns=x\nc=IN IP4 127.0.0.1\nm=audio 9 RTP/AVP 0\n",  # sdp
    b"<?xml version='1.0'?><MPD><Period><AdaptationSet/></Period></MPD>",  # dash
])
def test_playlists_and_scripts_are_refused(tmp_path, monkeypatch, script):
    """The ffconcat script names a wav in the server's working directory: FFmpeg's probe
    picked the concat demuxer and decoded that local file as if it had been uploaded."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "secret.wav").write_bytes(wav_file(TONE, SAMPLE_RATE))
    assert sniff_container(script) is None
    with pytest.raises(AudioRequestError) as caught:
        decode_audio(script, max_seconds=30)
    assert caught.value.param == "file" and caught.value.status == 400
    assert "could not be decoded as audio" in caught.value.message


def test_an_ffconcat_upload_is_400_on_the_server(http):
    """Through the live server: the script names a wav in the server's working directory
    (the tests' own), which the server transcribed before; now it is a 400 about `file`. A
    wav upload still transcribes."""
    name = f"k2serve-test-{uuid.uuid4().hex}.wav"
    with open(name, "wb") as f:  # the server was started from this working directory
        f.write(wav_file(TONE, SAMPLE_RATE))
    try:
        r = transcribe(http, ffconcat(name), filename="speech.wav")
    finally:
        os.remove(name)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "file" and error["code"] == "invalid_audio"
    r = transcribe(http, wav_file(TONE, SAMPLE_RATE))
    assert r.status_code == 200, r.text
    assert set(r.json()) >= {"text"}
