"""The app under fuzzing: the real routes, platform (open mode) and models, in-process.

Every family is served (SmolLM2 for chat, the small embedding, moderation and audio models),
so generated requests reach real backends. The chat model's context is cut to 128 tokens,
which bounds any generation a fuzzed request can ask for (the fuzzers also ask for at most a
few tokens): a case costs milliseconds.

`K2SERVE_FUZZ_EXAMPLES` sets the examples per operation and generation mode (default: the
bounded set CI runs, about two minutes for the whole folder on a loaded 2-core machine).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass

import pytest
import torch

FUZZ_EXAMPLES = int(os.environ.get("K2SERVE_FUZZ_EXAMPLES", "50"))
FUZZ_CONTEXT = 128


@dataclass
class FuzzApp:
    app: object
    chat: str
    embedding: str
    moderation: str
    speech: str
    transcription: str


class _OwnLifespan:
    """The app without its lifespan: schemathesis's pytest plugin ends an ASGI app's lifespan
    after every test, and ours shuts the engines down. The fixture ends them itself."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                kind = message["type"].rsplit(".", 1)[1]  # startup / shutdown
                await send({"type": f"lifespan.{kind}.complete"})
                if kind == "shutdown":
                    return
        await self.app(scope, receive, send)

    def openapi(self):
        return self.app.openapi()


@pytest.fixture(scope="session")
def fuzz_app():
    from k2serve.app import create_app
    from k2serve.platform import open_platform
    from k2serve.serving.families import FamilyOptions, register_families
    from k2serve.serving.loader import LoadOptions, load_text_model
    from k2serve.serving.registry import ModelRegistry

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    home = tempfile.mkdtemp(prefix="k2serve-fuzz-")
    platform = open_platform(database_url=None, data_dir=home, redis_url=None,
                             host="127.0.0.1")
    registry = ModelRegistry()
    spec, backend = load_text_model(LoadOptions(progress=False,
                                                max_context_length=FUZZ_CONTEXT))
    registry.register(spec, backend)
    register_families(registry, {"embedding", "moderation", "audio"},
                      FamilyOptions(data_dir=home, progress=False))
    by_type = {}
    for s in registry.specs():
        by_type.setdefault(s.type, []).append(s.id)
    yield FuzzApp(
        app=_OwnLifespan(create_app(registry, platform=platform)), chat=spec.id,
        embedding="sentence-transformers/all-MiniLM-L6-v2",  # the fastest of the three
        moderation=by_type["moderation"][0],
        speech="espeak-ng/espeak-ng", transcription="openai/whisper-tiny.en")
    for backend in registry.backends():  # what the app's lifespan does at its end
        engine = getattr(backend, "engine", None)
        if engine is not None:
            engine.shutdown()
    platform.close()
    torch.set_num_threads(previous)
