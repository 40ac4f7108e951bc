"""Video jobs (Together's API): POST /v2/videos, GET /v2/videos/{id}, and
POST /v2/videos/{id}/cancel; the same under /v1 (the `together` 2.x SDK with a base URL).

A job is saved (k2serve.api.video_store) before its reply, runs on the model's worker
(k2serve.api.video_runner), and delivers an MP4 by an expiring signed link
(k2serve.api.media_links), made afresh on each GET. Statuses are Together's: `in_progress`
(queued or running), `completed`, `failed` (a cancelled job is `failed` with error code
`cancelled`). Up to K2SERVE_VIDEO_MAX_QUEUED jobs wait; past that, 503 with retry-after.
"""

from __future__ import annotations

import inspect
import io
import re
import secrets
import time
import uuid

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from k2serve.api.errors import ERROR_RESPONSES, json_body, validation_error
from k2serve.api.media_inputs import input_image
from k2serve.api.media_links import base_url, media_files
from k2serve.api.models_lookup import diffusion_backend_for, registry_of
from k2serve.api.request_scope import request_scope
from k2serve.api.routes.images import check_side, check_steps
from k2serve.api.schemas.videos import VideoRequest
from k2serve.api.usage import UsageTracker
from k2serve.api.video_store import CANCELLED, COMPLETED, VideoJob
from k2serve.diffusion.worker import Busy
from k2serve.errors import APIError, bad_request, overloaded

router = APIRouter(responses=ERROR_RESPONSES)

VIDEO_LINK_TTL_S = 3600.0
DEFAULT_FPS = 24  # Together's
RESOLUTIONS = {"360p": 360, "480p": 480, "540p": 544, "720p": 720, "1080p": 1088}
RATIO = re.compile(r"(\d{1,2}):(\d{1,2})")


def _public(job: VideoJob, request: Request) -> dict:
    """Together's VideoJob object."""
    p = job.params
    status = {"queued": "in_progress", CANCELLED: "failed"}.get(job.status, job.status)
    body = {"id": job.id, "object": "video", "model": job.model, "status": status,
            "created_at": job.created_at, "completed_at": job.completed_at,
            "size": f"{p['width']}x{p['height']}", "seconds": p["seconds"],
            "error": job.error}
    if job.status == COMPLETED and job.video:
        body["outputs"] = {"cost": job.cost_usd, "video_url": media_files(request).link(
            base_url(request), job.video, VIDEO_LINK_TTL_S)}
    progress = request.app.state.video_runner.progress(job.id)
    if progress is not None and progress[1]:
        body["progress"] = {"steps_done": progress[0], "steps": progress[1]}
    return body


def _defaults(model, configured: dict) -> dict:
    """What a request leaves out: the operator's defaults (K2SERVE_VIDEO_DEFAULT_*), else
    the pipeline's own."""
    params = inspect.signature(type(model.pipe).__call__).parameters
    defaults = {name: p.default for name, p in params.items()
                if p.default is not inspect.Parameter.empty}
    return {"width": defaults.get("width") or 512, "height": defaults.get("height") or 512,
            "frames": defaults.get("num_frames") or 49,
            "steps": defaults.get("num_inference_steps") or 50, **configured}


def _size(req: VideoRequest, defaults: dict, limits) -> tuple[int, int]:
    width, height = req.width, req.height
    if (width is None or height is None) and req.resolution:
        w, sep, h = req.resolution.partition("x")
        if sep and w.isdigit() and h.isdigit():
            width, height = width or int(w), height or int(h)
        elif req.resolution.lower() in RESOLUTIONS:
            short = RESOLUTIONS[req.resolution.lower()]
            match = RATIO.fullmatch(req.ratio or "16:9")
            if not match or not int(match[1]) or not int(match[2]):
                raise bad_request(f"'ratio' must be like 16:9; got '{(req.ratio or '')[:16]}'.",
                                  param="ratio")
            a, b = int(match[1]), int(match[2])
            long = round(short * max(a, b) / min(a, b) / 32) * 32
            landscape = (long, short) if a >= b else (short, long)
            width, height = width or landscape[0], height or landscape[1]
        else:
            raise bad_request(f"'resolution' must be one of {', '.join(RESOLUTIONS)} or "
                              f"WIDTHxHEIGHT; got '{req.resolution[:32]}'.", param="resolution")
    return (check_side("width", width or defaults["width"], limits),
            check_side("height", height or defaults["height"], limits))


def _frame_image(req: VideoRequest) -> str | None:
    media = req.media
    frames = list(req.frame_images or [])
    if media is not None:
        others = [k for k, v in (media.model_extra or {}).items() if v]
        if others:
            raise bad_request(f"'media.{others[0]}' is not supported by this server (only "
                              f"media.frame_images).", param=f"media.{others[0]}",
                              code="unsupported_parameter")
        frames += media.frame_images or []
    if not frames:
        return None
    if len(frames) > 1 or frames[0].frame not in (None, "first", 0, 0.0):
        raise bad_request("Only one frame image, the first frame, is supported (image-to-"
                          "video).", param="frame_images", code="unsupported_parameter")
    return frames[0].input_image


async def create_video(request: Request):
    body = await json_body(request)
    model_id, backend = diffusion_backend_for(request, body.get("model"), "videos")
    try:
        req = VideoRequest.model_validate(body)
    except ValidationError as exc:
        raise validation_error(exc) from None
    if req.generate_audio:
        raise bad_request("'generate_audio' is not supported by this server.",
                          param="generate_audio", code="unsupported_parameter")
    if req.output_format not in (None, "MP4", "mp4"):
        raise bad_request("'output_format' must be MP4 here.", param="output_format")
    image_url = _frame_image(req)
    if req.prompt is None and image_url is None:
        raise bad_request("Missing required parameter: 'prompt' (or an input frame in "
                          "media.frame_images).", param="prompt")
    model = await backend.model.get()
    limits = backend.limits
    defaults = _defaults(model, backend.defaults)
    width, height = _size(req, defaults, limits)
    steps = check_steps(req.steps if req.steps is not None else defaults["steps"], limits)
    fps = req.fps if req.fps is not None else DEFAULT_FPS
    if not 1 <= fps <= 120:
        raise bad_request(f"'fps' must be from 1 to 120; got {fps}.", param="fps")
    if req.seconds is not None:
        try:
            seconds = float(req.seconds)
        except ValueError:
            seconds = -1.0
        frames = round(seconds * fps) + 1
        if not 0 < seconds or not 2 <= frames <= limits.max_frames:
            raise bad_request(f"'seconds' must be a number of seconds that makes 2 to "
                              f"{limits.max_frames} frames at {fps} fps; got "
                              f"'{str(req.seconds)[:16]}'.", param="seconds")
    else:
        frames = min(defaults["frames"], limits.max_frames)
    image = None
    if image_url is not None:
        if not model.supports_image_input():
            raise bad_request(f"The model '{model_id}' ({model.class_name}) cannot start from "
                              f"an image.", param="frame_images", code="unsupported_parameter")
        image = await input_image(request, image_url, "frame_images")
    # Fail now, not in the job, on a parameter the pipeline does not take.
    for name in ("negative_prompt", "guidance_scale"):
        if getattr(req, name) is not None and name not in model.parameters(image is not None):
            raise bad_request(f"The model '{model_id}' ({model.class_name}) does not take "
                              f"'{name}'.", param=name, code="unsupported_parameter")
    params = {"prompt": req.prompt if req.prompt is not None else "", "width": width,
              "height": height, "frames": frames, "fps": fps, "steps": steps,
              "seconds": f"{(frames - 1) / fps:g}",
              "seed": req.seed if req.seed is not None else secrets.randbits(63),
              "negative_prompt": req.negative_prompt, "guidance_scale": req.guidance_scale,
              "crf": req.output_quality if req.output_quality is not None else 20,
              "image": None}
    try:
        backend.worker.admit()
    except Busy as exc:
        raise overloaded(str(exc)) from None
    scope = request_scope(request)
    job = VideoJob(id=str(uuid.uuid4()), owner=scope.api_key_id, model=model_id,
                   created_at=time.time(), params=params, request_id=scope.request_id)
    try:
        if image is not None:  # kept beside the videos: a job run after a restart needs it
            params["image"] = f"vin_{secrets.token_hex(16)}.png"
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            await run_in_threadpool(media_files(request).write, params["image"],
                                    buffer.getvalue())
        await run_in_threadpool(request.app.state.video_store.save, job)
    except BaseException:
        backend.worker.release()
        if params["image"]:
            media_files(request).delete(params["image"])
        raise
    tracker = UsageTracker(request, model_id, "videos", 0, 1)
    if scope.usage is not None:
        scope.usage.detached()  # its row is settled when the job ends
    spec = registry_of(request).get(model_id).spec
    request.app.state.video_runner.submit(job, spec.pricing, backend, tracker)
    return JSONResponse(_public(job, request))


async def _load(request: Request, video_id: str) -> VideoJob:
    job = await run_in_threadpool(request.app.state.video_store.load, video_id,
                                  request_scope(request).api_key_id)
    if job is None:
        raise APIError(404, f"No video job with id '{video_id[:128]}'.", param="id",
                       code="not_found")
    return job


async def retrieve_video(request: Request, video_id: str):
    return JSONResponse(_public(await _load(request, video_id), request))


async def cancel_video(request: Request, video_id: str):
    """Stop a job that is queued or running (a cancelled one is returned again)."""
    job = await _load(request, video_id)
    if job.status == CANCELLED:
        return JSONResponse(_public(job, request))
    if job.finished:
        raise bad_request(f"The video job has already finished ({job.status}); only a "
                          f"queued or in-progress job can be cancelled.", param="id")
    if not await request.app.state.video_runner.cancel(job.id):
        # No task runs it here (another server's, or one being resumed): mark it.
        job.status, job.completed_at = CANCELLED, time.time()
        job.error = {"code": "cancelled", "message": "The job was cancelled."}
        await run_in_threadpool(request.app.state.video_store.save, job)
    return JSONResponse(_public(await _load(request, video_id), request))


for _base in ("/v2/videos", "/v1/videos"):
    router.add_api_route(_base, create_video, methods=["POST"],
                         summary="Create a video generation job")
    router.add_api_route(_base + "/{video_id}", retrieve_video, methods=["GET"],
                         summary="A video job's status and, once completed, its video")
    router.add_api_route(_base + "/{video_id}/cancel", cancel_video, methods=["POST"],
                         summary="Cancel a video job")
