"""A transcript in the `response_format` asked for: OpenAI's json / text / verbose_json / srt /
vtt (Together's json and verbose_json are the same shapes)."""

from __future__ import annotations

import math

from k2serve.audio.errors import AudioRequestError
from k2serve.audio.transcription import Transcript

RESPONSE_FORMATS = ("json", "text", "verbose_json", "srt", "vtt")
GRANULARITIES = ("segment", "word")


def check_response_format(value: str | None) -> str:
    fmt = (value or "json").lower()
    if fmt not in RESPONSE_FORMATS:
        raise AudioRequestError(f"Unsupported response_format '{value}'; choose one of "
                                f"{', '.join(RESPONSE_FORMATS)}.", param="response_format")
    return fmt


def check_granularities(values: list[str]) -> set[str]:
    """`timestamp_granularities` as sent by any client: repeated fields, `[]` fields, a
    comma-separated or JSON-array string."""
    found: set[str] = set()
    for value in values:
        for part in value.replace("[", " ").replace("]", " ").replace('"', " ").split(","):
            part = part.strip().lower()
            if not part:
                continue
            if part not in GRANULARITIES:
                raise AudioRequestError(f"Unsupported timestamp granularity '{part}'; choose "
                                        f"from {', '.join(GRANULARITIES)}.",
                                        param="timestamp_granularities")
            found.add(part)
    return found or {"segment"}


def billed_seconds(duration: float) -> int:
    """Started seconds of audio: what usage reports and the ledger bills."""
    return max(1, math.ceil(duration - 1e-9))


def render(transcript: Transcript, fmt: str, granularities: set[str],
           task: str) -> tuple[object, str]:
    """(body, media type): a dict for the JSON formats, else text."""
    usage = {"type": "duration", "seconds": billed_seconds(transcript.duration)}
    if fmt == "json":
        return {"text": transcript.text, "usage": usage}, "application/json"
    if fmt == "verbose_json":
        body = {"task": task, "language": transcript.language,
                "duration": transcript.duration, "text": transcript.text,
                "segments": transcript.segments}
        if "word" in granularities:
            body["words"] = transcript.words
        body["usage"] = usage
        return body, "application/json"
    if fmt == "text":
        return transcript.text + "\n", "text/plain; charset=utf-8"
    if fmt == "srt":
        blocks = [f"{i + 1}\n{_stamp(s['start'], ',')} --> {_stamp(s['end'], ',')}\n"
                  f"{s['text'].strip()}\n" for i, s in enumerate(transcript.segments)]
        return "\n".join(blocks), "text/plain; charset=utf-8"
    blocks = [f"{_stamp(s['start'], '.')} --> {_stamp(s['end'], '.')}\n{s['text'].strip()}\n"
              for s in transcript.segments]
    return "WEBVTT\n\n" + "\n".join(blocks), "text/vtt; charset=utf-8"


def _stamp(seconds: float, decimal: str) -> str:
    ms = int(round(seconds * 1000))
    hours, ms = divmod(ms, 3_600_000)
    minutes, ms = divmod(ms, 60_000)
    secs, ms = divmod(ms, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{decimal}{ms:03d}"
