"""The `moderation` family: registers the safety model at once, loads it in the background."""

from __future__ import annotations

import asyncio
import functools
import sys
from concurrent.futures import ThreadPoolExecutor

from k2serve.safety.convert import PackageMissing, converted_dir, package_files
from k2serve.safety.model import TextScore, ToxicityClassifier
from k2serve.serving.backend import QueuelessBackend
from k2serve.serving.background import BackgroundModel
from k2serve.serving.catalog import SAFETY_MODEL_ID, model_spec
from k2serve.serving.registry import ModelRegistry

# One scoring thread: the classifier is small, and on a machine shared with the chat
# engine two concurrent scorers would only slow each other down.
_SCORER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="k2serve-safety")


class ModerationBackend(QueuelessBackend):
    """Scores texts with a moderation model; the event loop never runs the network."""

    endpoints = frozenset({"moderations"})

    def __init__(self, model: BackgroundModel[ToxicityClassifier]):
        self.model = model

    @property
    def load_state(self) -> str:
        return self.model.state

    async def classify(self, texts: list[str], *, tail: bool = False) -> list[TextScore]:
        classifier = await self.model.get()
        return await asyncio.get_running_loop().run_in_executor(
            _SCORER, functools.partial(classifier.score, texts, tail=tail))


def register(registry: ModelRegistry, options) -> None:
    try:
        package_files()  # cheap: finds the package's files without reading them
    except PackageMissing as exc:
        print(f"k2serve: not serving the moderation model: {exc}", file=sys.stderr)
        return
    model = BackgroundModel(SAFETY_MODEL_ID,
                            lambda: ToxicityClassifier(converted_dir(options.data_dir)),
                            announce=options.progress).start()
    registry.register(model_spec(SAFETY_MODEL_ID, context_length=None, type="moderation"),
                      ModerationBackend(model))
