"""Video generation jobs, per owner (the API key; None in open mode).

The routes and the runner use a `VideoStore` from `app.state.video_store`: this module's
in-memory one when the app has no platform, the platform's database-backed one otherwise
(k2serve.platform.video_store), so a restarted server finds its unfinished jobs and runs
them again (with the seed chosen when the job was made: the same video). Calls are
synchronous (a database round trip): async code runs them off the event loop.
"""

from __future__ import annotations

import copy
import threading
from dataclasses import dataclass, field
from typing import Protocol

QUEUED, IN_PROGRESS, COMPLETED, FAILED, CANCELLED = (
    "queued", "in_progress", "completed", "failed", "cancelled")
FINISHED = frozenset({COMPLETED, FAILED, CANCELLED})


@dataclass
class VideoJob:
    id: str
    owner: str | None
    model: str
    created_at: float
    # The pipeline call: prompt, negative_prompt, width, height, frames, fps, steps, seed,
    # guidance_scale, crf; `image`: the input frame's file (image-to-video), kept with the
    # media files so that a restarted job has it.
    params: dict = field(default_factory=dict)
    status: str = QUEUED
    completed_at: float | None = None
    error: dict | None = None  # {code, message}
    video: str | None = None  # its MP4's name among the media files
    cost_usd: float = 0.0
    request_id: str = ""
    steps_done: int = 0

    @property
    def finished(self) -> bool:
        return self.status in FINISHED


class VideoStore(Protocol):
    def save(self, job: VideoJob) -> None: ...
    def load(self, job_id: str, owner: str | None) -> VideoJob | None: ...
    def unfinished(self) -> list[VideoJob]: ...


class MemoryVideoStore:
    """A process's jobs, for an app without a platform (lost on restart)."""

    def __init__(self):
        self._jobs: dict[str, VideoJob] = {}
        self._lock = threading.Lock()

    def save(self, job: VideoJob) -> None:
        with self._lock:
            self._jobs[job.id] = copy.deepcopy(job)

    def load(self, job_id: str, owner: str | None) -> VideoJob | None:
        with self._lock:
            job = self._jobs.get(job_id)
            return copy.deepcopy(job) if job is not None and job.owner == owner else None

    def unfinished(self) -> list[VideoJob]:
        with self._lock:
            return [copy.deepcopy(j) for j in self._jobs.values() if not j.finished]
