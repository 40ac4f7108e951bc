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

# The voice names Together documents for its speech models, each read by the eSpeak voice
# closest in language, accent and gender, so that code written for Together (the seed's own
# snippets send "helpful woman") runs unchanged. The README lists this table.
TOGETHER_VOICES: dict[str, str] = {
    # cartesia/sonic
    "helpful woman": "en-us+f3", "laidback woman": "en-us+f2", "calm lady": "en-us+f2",
    "reading lady": "en-us+f3", "meditation lady": "en-us+f2", "customer support lady": "en-us+f3",
    "newslady": "en-us+f3", "sweet lady": "en-us+f2", "teacher lady": "en-us+f3",
    "southern woman": "en-us+f2", "midwestern woman": "en-us+f3", "wise lady": "en-us+f2",
    "storyteller lady": "en-us+f3", "princess": "en-us+f2", "commercial lady": "en-us+f3",
    "british reading lady": "en+f3", "british narration lady": "en+f3", "british lady": "en+f3",
    "australian woman": "en+f3", "indian lady": "en+f3",
    "friendly sidekick": "en-us+m3", "newsman": "en-us", "nonfiction man": "en-us",
    "sportsman": "en-us+m3", "salesman": "en-us+m3", "wise man": "en-us",
    "pilot over intercom": "en-us", "doctor mischief": "en-us+m3", "barbershop man": "en-us+m3",
    "midwestern man": "en-us", "commercial man": "en-us", "movieman": "en-us",
    "yogaman": "en-us+m3", "child": "en-us+f2", "classy british man": "en",
    "australian man": "en", "german conversational woman": "de+f3",
    "german reporter woman": "de+f3", "french conversational lady": "fr+f3",
    "french narrator lady": "fr+f3", "spanish narrator lady": "es+f3",
    "spanish narrator man": "es",
    # canopylabs/orpheus-3b-0.1-ft
    "tara": "en-us+f3", "leah": "en-us+f2", "jess": "en-us+f3", "mia": "en-us+f2",
    "zoe": "en-us+f3", "leo": "en-us", "dan": "en-us+m3", "zac": "en-us",
    # hexgrad/Kokoro-82M (a = American, b = British; f / m)
    "af_heart": "en-us+f3", "af_alloy": "en-us+f2", "af_bella": "en-us+f3",
    "af_nova": "en-us+f2", "af_sarah": "en-us+f3", "af_sky": "en-us+f2",
    "am_adam": "en-us", "am_echo": "en-us+m3", "am_michael": "en-us", "am_onyx": "en-us+m3",
    "bf_emma": "en+f3", "bf_isabella": "en+f3", "bm_george": "en", "bm_lewis": "en",
}

_BY_KEY = {key.lower(): v for v in VOICES for key in (v.id, v.name)}
_BY_KEY.update({alias: _BY_KEY[voice_id] for alias, voice_id in TOGETHER_VOICES.items()})


def find_voice(value: str) -> Voice | None:
    """A voice by id, by name or by one of Together's voice names, case-insensitively."""
    return _BY_KEY.get(value.strip().lower())


def voice_list() -> list[dict[str, str]]:
    """Together's `/v1/voices` entries for one model: [{id, name}]."""
    return [{"id": v.id, "name": v.name} for v in VOICES]
