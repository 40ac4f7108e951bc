"""Image and video models: registering a pipeline directory, and what its backend offers.

A directory registers at once (so /v1/models lists it within seconds) and loads on the
background loader thread. Its id is `--image-model-name` / `--video-model-name`, else the
catalog id whose last part is the directory's name (`.../FLUX.1-schnell` serves
`black-forest-labs/FLUX.1-schnell` at its catalog price), else the directory's name.

Usage, for the ledger and rate limits: `prompt_tokens` counts the images (videos) made,
`completion_tokens` their kilopixel-steps (width x height x steps [x frames] / 1000, rounded
up): the catalog prices them per image and per megapixel-step (k2serve.platform.pricing).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from k2serve.diffusion.pipelines import DiffusionModel, pipeline_class_name
from k2serve.diffusion.worker import PipelineWorker
from k2serve.serving.backend import QueuelessBackend
from k2serve.serving.background import BackgroundModel
from k2serve.serving.catalog import CATALOG, model_spec
from k2serve.serving.registry import ModelRegistry

DEFAULT_MAX_WAITING_IMAGES = 8
DEFAULT_MAX_WAITING_VIDEOS = 32


@dataclass(frozen=True)
class SizeLimits:
    """What a request may ask of the model (environment: K2SERVE_IMAGE_MAX_SIDE, ...)."""

    min_side: int = 64
    max_side: int = 2048
    max_steps: int = 100
    max_n: int = 4
    max_frames: int = 257  # videos


def kilopixel_steps(width: int, height: int, steps: int, count: int, frames: int = 1) -> int:
    return math.ceil(width * height * steps * count * frames / 1000)


@dataclass
class DiffusionBackend(QueuelessBackend):
    model: BackgroundModel[DiffusionModel]
    worker: PipelineWorker
    limits: SizeLimits
    kind: str  # image | video
    # What a video request leaves out, where the operator sets it (else the pipeline's own
    # defaults): width, height, frames, steps.
    defaults: dict = field(default_factory=dict)

    @property
    def endpoints(self) -> frozenset[str]:
        return frozenset({"images" if self.kind == "image" else "videos"})

    @property
    def load_state(self) -> str:
        return self.model.state

    def stats(self) -> dict | None:
        return self.worker.stats()

    def shutdown(self) -> None:
        self.worker.shutdown()

    def usage_bound(self, body: dict) -> tuple[int, int]:
        """(images, kilopixel-steps) the request may use, from its body (defaults where a
        field is missing or invalid: the route refuses an invalid one anyway)."""
        def number(name, default, top):
            value = body.get(name)
            ok = isinstance(value, int) and not isinstance(value, bool) and 0 < value <= top
            return value if ok else default

        limits = self.limits
        n = number("n", 1, limits.max_n) if self.kind == "image" else 1
        width = number("width", 1024, limits.max_side)
        height = number("height", 1024, limits.max_side)
        steps = number("steps", 20 if self.kind == "image" else 50, limits.max_steps)
        frames = limits.max_frames if self.kind == "video" else 1
        return n, kilopixel_steps(width, height, steps, n, frames)


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value else default


def limits_from_env() -> SizeLimits:
    d = SizeLimits()
    return SizeLimits(min_side=_env_int("K2SERVE_IMAGE_MIN_SIDE", d.min_side),
                      max_side=_env_int("K2SERVE_IMAGE_MAX_SIDE", d.max_side),
                      max_steps=_env_int("K2SERVE_IMAGE_MAX_STEPS", d.max_steps),
                      max_n=_env_int("K2SERVE_IMAGE_MAX_N", d.max_n),
                      max_frames=_env_int("K2SERVE_VIDEO_MAX_FRAMES", d.max_frames))


def video_defaults_from_env() -> dict:
    """K2SERVE_VIDEO_DEFAULT_WIDTH, _HEIGHT, _FRAMES, _STEPS: a request's defaults."""
    found = {}
    for name in ("width", "height", "frames", "steps"):
        value = os.environ.get(f"K2SERVE_VIDEO_DEFAULT_{name.upper()}")
        if value:
            found[name] = int(value)
    return found


def model_id_for(directory: str | Path, name: str | None, model_type: str) -> str:
    if name:
        return name
    base = Path(directory).resolve().name
    for known, facts in CATALOG.items():
        if facts.get("type") == model_type and known.rsplit("/", 1)[-1] == base:
            return known
    return base


def register_diffusion_model(registry: ModelRegistry, directory: str, kind: str, *,
                             name: str | None = None, max_waiting: int | None = None) -> str:
    """Register a pipeline directory as an `image` or `video` model; returns its id.
    FileNotFoundError / ValueError for a directory that is no diffusers pipeline."""
    pipeline_class_name(directory)  # fails now, not in the background
    model_id = model_id_for(directory, name, kind)
    if max_waiting is None:
        max_waiting = (_env_int("K2SERVE_IMAGE_MAX_WAITING", DEFAULT_MAX_WAITING_IMAGES)
                       if kind == "image" else
                       _env_int("K2SERVE_VIDEO_MAX_QUEUED", DEFAULT_MAX_WAITING_VIDEOS))
    model = BackgroundModel(model_id, lambda: DiffusionModel(directory, kind))
    backend = DiffusionBackend(model.start(), PipelineWorker(f"{kind}-{model_id}", max_waiting),
                               limits_from_env(), kind,
                               video_defaults_from_env() if kind == "video" else {})
    registry.register(model_spec(model_id, context_length=None, type=kind), backend)
    return model_id
