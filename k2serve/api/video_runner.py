"""Runs video jobs (k2serve.api.video_store) on their model's worker, one at a time.

A job made by POST /v2/videos runs in a task of its own; its request's ledger row is settled
when it ends (the request is `detached`). At start-up the runner takes up the jobs a stopped
server left queued or in progress and runs them again from the start, with the seed chosen
when the job was made; their usage gets a ledger row of its own (`app.state.bill_detached`,
the platform's), since their request's row was closed as interrupted. Cancelling stops the
pipeline between two steps.
"""

from __future__ import annotations

import asyncio
import logging
import time

import anyio
from starlette.concurrency import run_in_threadpool

from k2serve.api.media_links import media_files
from k2serve.api.usage import UsageRecord, UsageTracker
from k2serve.api.video_store import (
    CANCELLED,
    COMPLETED,
    FAILED,
    IN_PROGRESS,
    VideoJob,
)
from k2serve.diffusion.calls import pipeline_call
from k2serve.diffusion.encoding import mp4_bytes
from k2serve.diffusion.pipelines import Stopped
from k2serve.diffusion.serving import DiffusionBackend, kilopixel_steps
from k2serve.diffusion.worker import StepLog
from k2serve.errors import APIError

log = logging.getLogger("k2serve.videos")


class VideoRunner:
    def __init__(self, app):
        self.app = app
        self._running: dict[str, tuple[asyncio.Task, StepLog]] = {}
        self._cancelled: set[str] = set()
        self._stopping = False

    @property
    def store(self):
        return self.app.state.video_store

    async def start(self) -> None:
        """Take up the jobs a stopped server left unfinished."""
        self._stopping = False
        for job in await run_in_threadpool(self.store.unfinished):
            served = self.app.state.registry.get(job.model)
            if served is None or not served.serves("videos"):
                job.status, job.completed_at = FAILED, time.time()
                job.error = {"code": "model_not_served",
                             "message": f"The model '{job.model}' is no longer served here."}
                await run_in_threadpool(self.store.save, job)
                continue
            served.backend.worker.admit(force=True)
            log.info("resuming video job %s", job.id)
            self.submit(job, served.spec.pricing, served.backend, tracker=None)

    async def stop(self) -> None:
        """Stop the running jobs without finishing them: the next server runs them again."""
        self._stopping = True
        for task, steps in list(self._running.values()):
            steps.stop.set()
            task.cancel()
        await asyncio.gather(*(t for t, _ in list(self._running.values())),
                             return_exceptions=True)

    def submit(self, job: VideoJob, pricing, backend: DiffusionBackend,
               tracker: UsageTracker | None) -> None:
        """Run `job` (its worker place already taken)."""
        steps = StepLog(f"video job {job.id} ({job.model})")
        task = asyncio.create_task(self._run(job, pricing, backend, tracker, steps))
        self._running[job.id] = (task, steps)

    async def cancel(self, job_id: str) -> bool:
        """Stop this process's run of a job and wait until it has saved its final state;
        False when it does not run here."""
        running = self._running.get(job_id)
        if running is None:
            return False
        task, steps = running
        self._cancelled.add(job_id)
        steps.stop.set()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return True

    def progress(self, job_id: str) -> tuple[int, int] | None:
        running = self._running.get(job_id)
        return (running[1].done, running[1].total) if running is not None else None

    async def _run(self, job: VideoJob, pricing, backend: DiffusionBackend,
                   tracker: UsageTracker | None, steps: StepLog) -> None:
        started = time.time()
        p = job.params
        usage = (0, 0)
        try:
            model = await backend.model.get(wait_s=24 * 3600.0)  # a big model loads slowly
            image = await run_in_threadpool(self._input_image, p.get("image"))
            optional = {"negative_prompt": ("negative_prompt", p.get("negative_prompt")),
                        "guidance_scale": ("guidance_scale", p.get("guidance_scale")),
                        "num_frames": ("seconds", p["frames"]),
                        "frame_rate": ("fps", p["fps"] if "frame_rate" in model.parameters(
                            image is not None) else None)}
            call = pipeline_call(model, job.model, prompt=p.get("prompt"), width=p["width"],
                                 height=p["height"], steps=p["steps"], seed=p["seed"],
                                 image=image, optional=optional)
            call.on_step = steps
            job.status = IN_PROGRESS
            await run_in_threadpool(self.store.save, job)
            frames = await backend.worker.run(model, call, steps=steps)
            data = await run_in_threadpool(mp4_bytes, frames, p["fps"], p.get("crf", 20))
            files = media_files(self.app)
            job.video = files.new_name("vid", "mp4")
            await run_in_threadpool(files.prune, "vid")
            await run_in_threadpool(files.write, job.video, data)
            usage = (1, kilopixel_steps(p["width"], p["height"], p["steps"], 1, len(frames)))
            job.cost_usd = pricing.media_cost(*usage)
            job.status, job.completed_at, job.steps_done = COMPLETED, time.time(), p["steps"]
            outcome = ("ok", None)
        except (asyncio.CancelledError, Stopped):
            if self._stopping and job.id not in self._cancelled:
                raise  # the server stops: the job stays unfinished, for the next one
            job.status, job.completed_at = CANCELLED, time.time()
            job.error = {"code": "cancelled", "message": "The job was cancelled."}
            outcome = ("client_closed", "cancelled")
        except APIError as exc:
            job.status, job.completed_at = FAILED, time.time()
            job.error = {"code": exc.code or "invalid_request", "message": exc.message}
            outcome = ("error", exc.code)
        except ValueError as exc:  # diffusers' check of its inputs (a size it cannot make)
            job.status, job.completed_at = FAILED, time.time()
            job.error = {"code": "invalid_request",
                         "message": f"The model '{job.model}' refused the job: {exc}"}
            outcome = ("error", "invalid_request")
        except Exception as exc:  # the pipeline failed: the job says why
            log.exception("video job %s failed", job.id)
            job.status, job.completed_at = FAILED, time.time()
            job.error = {"code": "generation_failed", "message": f"{type(exc).__name__}: {exc}"}
            outcome = ("error", "generation_failed")
        finally:
            backend.worker.release()
            self._running.pop(job.id, None)
            self._cancelled.discard(job.id)
        with anyio.CancelScope(shield=True):
            await run_in_threadpool(self.store.save, job)
            if p.get("image"):
                media_files(self.app).delete(p["image"])
        self._bill(job, tracker, usage, outcome, started)

    def _input_image(self, name: str | None):
        if not name:
            return None
        from PIL import Image

        path = media_files(self.app).directory / name
        with Image.open(path) as image:
            return image.convert("RGB")

    def _bill(self, job: VideoJob, tracker: UsageTracker | None, usage: tuple[int, int],
              outcome: tuple[str, str | None], started: float) -> None:
        if tracker is not None:  # its request's own row
            tracker.set_usage(*usage)
            tracker.finish(*outcome)
            return
        record = UsageRecord(request_id=job.request_id, model=job.model, endpoint="videos",
                             prompt_tokens=usage[0], completion_tokens=usage[1],
                             status=outcome[0], error=outcome[1], started_at=started,
                             duration_s=time.time() - started, api_key_id=job.owner)
        for sink in self.app.state.usage_sinks:
            try:
                sink(record)
            except Exception:
                log.exception("usage sink failed")
        bill = getattr(self.app.state, "bill_detached", None)
        if bill is not None:
            bill(record, job.owner)
