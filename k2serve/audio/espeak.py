"""eSpeak NG through ctypes: the library and its voice data ship in the PyPI package
`espeakng-loader`.

libespeak-ng keeps one global state per process (the voice, the rate, the callback), so one
`Espeak` exists per process and every synthesis holds its lock from setting the voice to the
last sample. Synthesis is synchronous: the library calls back with each block of 16-bit mono
samples as it produces them, which is what lets a reply stream while speech is still made.
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Callable

import numpy as np

# speak_lib.h
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_POS_CHARACTER = 1
_CHARS_UTF8 = 1  # plain UTF-8 text: no SSML, no [[phoneme]] input
_EE_OK = 0
_RATE, _VOLUME, _PITCH = 1, 2, 3

MIN_RATE_WPM, DEFAULT_RATE_WPM, MAX_RATE_WPM = 80, 175, 450

_Callback = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int,
                             ctypes.c_void_p)


class Espeak:
    """The process's eSpeak NG; get it with `espeak()`."""

    def __init__(self) -> None:
        import espeakng_loader

        lib = ctypes.CDLL(espeakng_loader.get_library_path())
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p,
                                          ctypes.c_int]
        lib.espeak_Initialize.restype = ctypes.c_int
        lib.espeak_SetSynthCallback.argtypes = [_Callback]
        lib.espeak_SetSynthCallback.restype = None
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_Synth.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint,
                                     ctypes.c_int, ctypes.c_uint, ctypes.c_uint,
                                     ctypes.c_void_p, ctypes.c_void_p]
        rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0,
                                     espeakng_loader.get_data_path().encode(), 0)
        if rate <= 0:
            raise RuntimeError("espeak_Initialize failed (voice data not found?)")
        self.sample_rate = rate
        self._lib = lib
        self._lock = threading.Lock()
        self._sink: Callable[[np.ndarray], bool] | None = None
        self._callback = _Callback(self._on_samples)  # kept alive as long as the library
        lib.espeak_SetSynthCallback(self._callback)

    def _on_samples(self, wav, count, _events) -> int:
        if count > 0 and wav and self._sink is not None:
            if not self._sink(np.ctypeslib.as_array(wav, shape=(count,)).copy()):
                return 1  # abort: the consumer went away
        return 0

    def has_voice(self, name: str) -> bool:
        with self._lock:
            return self._lib.espeak_SetVoiceByName(name.encode()) == _EE_OK

    def synthesize(self, text: str, voice: str, rate_wpm: int,
                   sink: Callable[[np.ndarray], bool]) -> None:
        """Speak `text`, handing each block of int16 samples (at `sample_rate`) to `sink`,
        which returns False to stop. Blocks until done."""
        if not MIN_RATE_WPM <= rate_wpm <= MAX_RATE_WPM:
            raise ValueError(f"rate {rate_wpm} wpm outside [{MIN_RATE_WPM}, {MAX_RATE_WPM}]")
        data = text.replace("\0", " ").encode("utf-8")
        with self._lock:
            if self._lib.espeak_SetVoiceByName(voice.encode()) != _EE_OK:
                raise ValueError(f"eSpeak NG has no voice {voice!r}")
            self._lib.espeak_SetParameter(_RATE, rate_wpm, 0)
            self._sink = sink
            try:
                status = self._lib.espeak_Synth(data, len(data) + 1, 0, _POS_CHARACTER, 0,
                                                _CHARS_UTF8, None, None)
            finally:
                self._sink = None
        # EE_OK also when the sink asked to stop; anything else is the library's failure.
        if status != _EE_OK:
            raise RuntimeError(f"espeak_Synth failed with status {status}")


_instance: Espeak | None = None
_instance_lock = threading.Lock()


def espeak() -> Espeak:
    global _instance
    with _instance_lock:
        if _instance is None:
            _instance = Espeak()
        return _instance
