"""Loading a diffusers pipeline directory and calling it.

One directory serves text-to-image and image-to-image (diffusers' AutoPipeline picks the
classes from its model_index.json: Stable Diffusion 1.x/2.x/XL and their Turbo versions,
FLUX.1), or text-to-video and image-to-video (the video pipeline's image-to-video sibling,
built from the same components). Calls run on the model's worker thread
(k2serve.diffusion.worker); each step reports to a callback, which may stop the call.
"""

from __future__ import annotations

import inspect
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger("k2serve.diffusion")

EXTRA_HINT = "pip install 'k2serve[images]' (diffusers and Pillow)"

# A video pipeline class -> its image-to-video sibling (same components, an image added).
IMAGE_TO_VIDEO = {
    "LTXPipeline": "LTXImageToVideoPipeline",
    "LTXConditionPipeline": "LTXConditionPipeline",
    "CogVideoXPipeline": "CogVideoXImageToVideoPipeline",
    "WanPipeline": "WanImageToVideoPipeline",
    "HunyuanVideoPipeline": "HunyuanVideoImageToVideoPipeline",
    "LTXImageToVideoPipeline": "LTXImageToVideoPipeline",
    "WanImageToVideoPipeline": "WanImageToVideoPipeline",
    "CogVideoXImageToVideoPipeline": "CogVideoXImageToVideoPipeline",
}


class Stopped(Exception):
    """The call was stopped between two steps (its request was cancelled)."""


def diffusers_module():
    try:
        import diffusers
    except ImportError as exc:
        raise RuntimeError(f"serving image and video models needs diffusers: {EXTRA_HINT} "
                           f"({exc})") from None
    return diffusers


def pipeline_class_name(directory: str | Path) -> str:
    """The pipeline class a directory's model_index.json names (FileNotFoundError /
    ValueError when it is not a diffusers pipeline directory)."""
    index = Path(directory) / "model_index.json"
    if not index.is_file():
        raise FileNotFoundError(f"{directory} is not a diffusers pipeline directory (it has no "
                                f"model_index.json)")
    name = json.loads(index.read_text()).get("_class_name")
    if not isinstance(name, str):
        raise ValueError(f"{index} names no pipeline class (_class_name)")
    return name


def _device():
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _dtype(device: str):
    """K2SERVE_DIFFUSION_DTYPE (float32, float16, bfloat16); default bfloat16 on a GPU (the
    dtype FLUX.1 and LTX-Video ship in), float32 on the CPU (diffusers' own default)."""
    import os

    import torch

    name = os.environ.get("K2SERVE_DIFFUSION_DTYPE") or (
        "bfloat16" if device != "cpu" else "float32")
    if name not in ("float32", "float16", "bfloat16"):
        raise ValueError(f"K2SERVE_DIFFUSION_DTYPE must be float32, float16 or bfloat16, "
                         f"not {name!r}")
    return getattr(torch, name)


@dataclass
class Call:
    """One pipeline call: the keyword arguments it takes, and the step callback."""

    kwargs: dict[str, Any]
    steps: int
    on_step: Callable[[int, int], None] | None = None  # (step done, steps); may raise Stopped
    image: Any = None  # a PIL image: image-to-image / image-to-video
    seed: int = 0  # the noise: torch.Generator("cpu").manual_seed(seed), on any device


@dataclass
class _Loaded:
    pipe: Any
    with_image: Any = None  # the image-conditioned pipeline, built on first use
    accepted: dict[int, set[str]] = field(default_factory=dict)


class DiffusionModel:
    """A loaded pipeline directory. `kind` is "image" or "video"."""

    def __init__(self, directory: str | Path, kind: str):
        diffusers = diffusers_module()
        import torch

        self.directory = str(directory)
        self.kind = kind
        self.class_name = pipeline_class_name(directory)
        device = _device()
        dtype = _dtype(device)
        if kind == "image":
            pipe = diffusers.AutoPipelineForText2Image.from_pretrained(self.directory,
                                                                      torch_dtype=dtype)
        else:
            pipe = diffusers.DiffusionPipeline.from_pretrained(self.directory, torch_dtype=dtype)
        if device != "cpu":
            pipe = pipe.to(device)
        pipe.set_progress_bar_config(disable=True)
        self._loaded = _Loaded(pipe)
        self._torch = torch
        self._diffusers = diffusers

    @property
    def pipe(self):
        return self._loaded.pipe

    def parameters(self, with_image: bool) -> set[str]:
        """The keyword arguments the (image-conditioned) pipeline's __call__ takes."""
        pipe = self._image_pipe() if with_image else self.pipe
        return set(inspect.signature(type(pipe).__call__).parameters)

    def supports_image_input(self) -> bool:
        try:
            self._image_pipe()
        except ValueError:
            return False
        return True

    def _image_pipe(self):
        loaded = self._loaded
        if loaded.with_image is None:
            if self.kind == "image":
                try:
                    loaded.with_image = self._diffusers.AutoPipelineForImage2Image.from_pipe(
                        loaded.pipe)
                except Exception as exc:
                    raise ValueError(f"{self.class_name} has no image-to-image pipeline "
                                     f"({exc})") from None
            else:
                name = IMAGE_TO_VIDEO.get(type(loaded.pipe).__name__)
                cls = getattr(self._diffusers, name, None) if name else None
                if cls is None:
                    raise ValueError(f"{self.class_name} has no image-to-video pipeline")
                try:
                    loaded.with_image = (loaded.pipe if cls is type(loaded.pipe)
                                         else cls.from_pipe(loaded.pipe))
                except Exception as exc:
                    raise ValueError(f"{self.class_name} cannot condition on an image: "
                                     f"{exc}") from None
                loaded.with_image.set_progress_bar_config(disable=True)
        return loaded.with_image

    def __call__(self, call: Call):
        """The pipeline's output (images: PIL images; video: frames, float [0, 1])."""
        pipe = self._image_pipe() if call.image is not None else self.pipe
        kwargs = dict(call.kwargs)
        kwargs["generator"] = self._torch.Generator("cpu").manual_seed(call.seed)
        if call.image is not None:
            kwargs["image"] = call.image
        if call.on_step is not None:
            def step_end(_pipe, step, _timestep, callback_kwargs):
                call.on_step(step + 1, call.steps)
                return callback_kwargs

            kwargs["callback_on_step_end"] = step_end
        with self._torch.inference_mode():
            if self.kind == "image":
                return pipe(**kwargs, output_type="pil").images
            return pipe(**kwargs, output_type="np").frames[0]
