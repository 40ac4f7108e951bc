"""Every backend the server registers implements the ModelBackend protocol, and the registry
refuses one that does not (a route would otherwise find out at request time)."""

from __future__ import annotations

import pytest

from k2serve.audio.serving import SpeechBackend, TranscriptionBackend
from k2serve.embeddings.backend import EmbeddingBackend
from k2serve.safety.serving import ModerationBackend
from k2serve.serving.backend import GENERATION_ENDPOINTS, check_backend
from k2serve.serving.registry import ModelRegistry, ModelSpec
from k2serve.serving.text_backend import TextBackend

BACKENDS = [TextBackend, EmbeddingBackend, ModerationBackend, SpeechBackend,
            TranscriptionBackend]
ENDPOINTS = {"chat.completions", "completions", "embeddings", "rerank", "moderations",
             "audio.speech", "audio.transcribe", "audio.translate"}


@pytest.mark.parametrize("cls", BACKENDS, ids=lambda c: c.__name__)
def test_every_backend_class_implements_the_protocol(cls):
    check_backend(cls)  # the members are looked up on the class, statically
    assert cls.endpoints and set(cls.endpoints) <= ENDPOINTS


def test_each_endpoint_has_one_kind_of_backend():
    served = [set(cls.endpoints) for cls in BACKENDS]
    assert set().union(*served) == ENDPOINTS
    assert sum(len(s) for s in served) == len(ENDPOINTS)  # no endpoint served by two kinds
    assert set(TextBackend.endpoints) == GENERATION_ENDPOINTS


def test_the_registry_refuses_an_object_that_is_no_backend():
    registry = ModelRegistry()
    with pytest.raises(TypeError, match="lacks endpoints, load_state"):
        registry.register(ModelSpec(id="m", type="moderation"), object())
    assert registry.get("m") is None


def test_lookup_by_endpoint():
    registry = ModelRegistry()
    guard = ModerationBackend(model=None)
    registry.register(ModelSpec(id="guard", type="moderation"), guard)
    served = registry.get("guard")
    assert served.backend is guard and served.serves("moderations")
    assert not served.serves("chat.completions")
    assert [m.spec.id for m in registry.serving("moderations")] == ["guard"]
    assert registry.serving("embeddings") == []
