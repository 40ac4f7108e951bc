"""POST /v1/images/generations: text-to-image and image-to-image (`image_url` + `strength`)
on a diffusers pipeline (k2serve.diffusion), in Together's and OpenAI's shapes.

One worker runs the model's calls one at a time; a request past its queue's bound gets 503
with retry-after. Usage: one ledger row per request, its images and kilopixel-steps
(k2serve.diffusion.serving), billed once the images are made.
"""

from __future__ import annotations

import asyncio
import base64
import secrets
import time

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from k2serve.api.errors import ERROR_RESPONSES, json_body, validation_error
from k2serve.api.media_inputs import input_image
from k2serve.api.media_links import IMAGE_LINK_TTL_S, base_url, media_files
from k2serve.api.models_lookup import diffusion_backend_for
from k2serve.api.request_scope import request_scope
from k2serve.api.schemas.images import ImageRequest
from k2serve.api.usage import UsageTracker
from k2serve.diffusion.calls import pipeline_call
from k2serve.diffusion.encoding import image_bytes
from k2serve.diffusion.pipelines import Stopped
from k2serve.diffusion.serving import SizeLimits, kilopixel_steps
from k2serve.diffusion.worker import Busy, StepLog
from k2serve.errors import APIError, bad_request, overloaded

router = APIRouter(responses=ERROR_RESPONSES)

DEFAULT_STEPS = 20  # Together's
DEFAULT_SIDE = 1024
DEFAULT_STRENGTH = 0.8  # diffusers' image-to-image default


def check_side(name: str, value: int, limits: SizeLimits) -> int:
    if not limits.min_side <= value <= limits.max_side or value % 8:
        raise bad_request(f"'{name}' must be a multiple of 8 from {limits.min_side} to "
                          f"{limits.max_side}; got {value}.", param=name)
    return value


def check_steps(steps: int, limits: SizeLimits) -> int:
    if not 1 <= steps <= limits.max_steps:
        raise bad_request(f"'steps' must be from 1 to {limits.max_steps}; got {steps}.",
                          param="steps")
    return steps


def _size(req: ImageRequest, limits: SizeLimits) -> tuple[int, int]:
    width, height = req.width, req.height
    if req.size not in (None, "auto"):
        w, sep, h = req.size.partition("x")
        if not sep or not w.isdigit() or not h.isdigit():
            raise bad_request(f"'size' must be WIDTHxHEIGHT (e.g. 1024x1024); got "
                              f"'{req.size[:32]}'.", param="size")
        if (width is not None and width != int(w)) or (height is not None and height != int(h)):
            raise bad_request("'size' disagrees with 'width'/'height'; send one of them.",
                              param="size")
        width, height = int(w), int(h)
    return (check_side("width", width or DEFAULT_SIDE, limits),
            check_side("height", height or DEFAULT_SIDE, limits))


@router.post("/v1/images/generations", summary="Generate images (diffusers pipeline)")
async def generate_images(request: Request):
    body = await json_body(request)
    model_id, backend = diffusion_backend_for(request, body.get("model"), "images")
    try:
        req = ImageRequest.model_validate(body)
    except ValidationError as exc:
        raise validation_error(exc) from None
    for unsupported in ("image_loras", "reference_images"):
        if getattr(req, unsupported):
            raise bad_request(f"'{unsupported}' is not supported by this server.",
                              param=unsupported, code="unsupported_parameter")
    limits = backend.limits
    width, height = _size(req, limits)
    steps = check_steps(req.steps if req.steps is not None else DEFAULT_STEPS, limits)
    if not 1 <= req.n <= limits.max_n:
        raise bad_request(f"'n' must be from 1 to {limits.max_n}; got {req.n}.", param="n")
    if req.strength is not None and req.image_url is None:
        raise bad_request("'strength' applies to image-to-image only: send 'image_url' too.",
                          param="strength")
    openai_shape = req.size is not None or req.response_format == "b64_json"
    response_format = req.response_format or "url"
    output_format = req.output_format or ("png" if openai_shape else "jpeg")
    image = (await input_image(request, req.image_url, "image_url")
             if req.image_url is not None else None)

    model = await backend.model.get()
    seed = req.seed if req.seed is not None else secrets.randbits(63)
    call = pipeline_call(
        model, model_id, prompt=req.prompt, width=width, height=height, steps=steps,
        seed=seed, image=image,
        optional={"negative_prompt": ("negative_prompt", req.negative_prompt),
                  "guidance_scale": ("guidance_scale", req.guidance_scale),
                  "strength": ("strength", None if image is None
                               else (req.strength or DEFAULT_STRENGTH))},
        fixed={"num_images_per_prompt": req.n})
    try:
        backend.worker.admit()
    except Busy as exc:
        raise overloaded(str(exc)) from None
    request_id = request_scope(request).request_id
    call.on_step = progress = StepLog(f"image request {request_id} ({model_id})")
    tracker = UsageTracker(request, model_id, "images", 0, 1)
    try:
        images = await backend.worker.run(model, call, steps=progress)
    except BaseException as exc:
        backend.worker.release()
        gone = isinstance(exc, (asyncio.CancelledError, Stopped))
        tracker.finish("client_closed" if gone else "error", str(exc) or type(exc).__name__)
        if isinstance(exc, ValueError):  # diffusers' check of its inputs
            raise bad_request(f"The model '{model_id}' refused the request: {exc}") from None
        if isinstance(exc, Exception) and not gone:
            raise APIError(500, f"Image generation failed: {exc}", type="server_error",
                           code="generation_failed") from None
        raise
    backend.worker.release()
    tracker.set_usage(len(images), kilopixel_steps(width, height, steps, len(images)))
    tracker.finish("ok")
    encoded = await run_in_threadpool(lambda: [image_bytes(i, output_format) for i in images])
    data = []
    if response_format == "url":
        files = media_files(request)
        base = base_url(request)

        def store() -> list[str]:
            files.prune("img")
            links = []
            for blob in encoded:
                name = files.new_name("img", output_format)
                files.write(name, blob)
                links.append(files.link(base, name, IMAGE_LINK_TTL_S))
            return links

        for index, link in enumerate(await run_in_threadpool(store)):
            data.append({"index": index, "type": "url", "url": link})
    else:
        for index, blob in enumerate(encoded):
            data.append({"index": index, "type": "b64_json",
                         "b64_json": base64.b64encode(blob).decode()})
    return JSONResponse({"id": f"img-{request_id}", "object": "list", "model": model_id,
                         "created": int(time.time()), "output_format": output_format,
                         "seed": seed, "data": data})
