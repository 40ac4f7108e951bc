"""The eSpeak NG voices served, with stable ids.

A useful subset of what `espeakng-loader` ships: each id is the eSpeak voice name (a
language voice, `+variant` for eSpeak's voice variants), so it is stable across releases and
means the same to anyone who knows eSpeak; `name` is what a person reads. A request's `voice`
may be either. The language voices speak their own language; `language` tells which.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Voice:
    id: str  # the eSpeak voice name, e.g. "en-us+f3"
    name: str
    language: str  # ISO 639-1 of the text it reads


VOICES: tuple[Voice, ...] = (
    Voice("en-us", "american male", "en"),
    Voice("en-us+f3", "american female", "en"),
    Voice("en-us+m3", "american male 2", "en"),
    Voice("en-us+f2", "american female 2", "en"),
    Voice("en", "british male", "en"),
    Voice("en+f3", "british female", "en"),
    Voice("en-gb-scotland", "scottish male", "en"),
    Voice("de", "german male", "de"),
    Voice("de+f3", "german female", "de"),
    Voice("fr", "french male", "fr"),
    Voice("fr+f3", "french female", "fr"),
    Voice("es", "spanish male", "es"),
    Voice("es+f3", "spanish female", "es"),
    Voice("it", "italian male", "it"),
    Voice("pt-br", "brazilian portuguese male", "pt"),
    Voice("nl", "dutch male", "nl"),
    Voice("pl", "polish male", "pl"),
    Voice("ru", "russian male", "ru"),
    Voice("sv", "swedish male", "sv"),
    Voice("tr", "turkish male", "tr"),
    Voice("hi", "hindi male", "hi"),
    Voice("cmn", "mandarin chinese male", "zh"),
)
DEFAULT_VOICE = VOICES[0]

_BY_KEY = {key.lower(): v for v in VOICES for key in (v.id, v.name)}


def find_voice(value: str) -> Voice | None:
    """A voice by id or by name, case-insensitively."""
    return _BY_KEY.get(value.strip().lower())


def voice_list() -> list[dict[str, str]]:
    """Together's `/v1/voices` entries for one model: [{id, name}]."""
    return [{"id": v.id, "name": v.name} for v in VOICES]
