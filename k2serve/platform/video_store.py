"""Video jobs in the platform's database: the VideoStore (k2serve.api.video_store) of an app
with a platform, so a job outlives its server (a restarted one runs it again)."""

from __future__ import annotations

import dataclasses
import json
import time

from sqlalchemy import select

from k2serve.api.video_store import FINISHED, VideoJob
from k2serve.platform.db import Database
from k2serve.platform.models import VideoJobRow


def _job(row: VideoJobRow) -> VideoJob:
    return VideoJob(**json.loads(row.record))


class DatabaseVideoStore:
    def __init__(self, db: Database):
        self.db = db

    def save(self, job: VideoJob) -> None:
        with self.db.write() as session:
            row = session.get(VideoJobRow, job.id)
            if row is None:
                row = VideoJobRow(id=job.id, api_key_id=job.owner, created_at=job.created_at)
                session.add(row)
            row.status = job.status
            row.updated_at = time.time()
            row.record = json.dumps(dataclasses.asdict(job), ensure_ascii=False)

    def load(self, job_id: str, owner: str | None) -> VideoJob | None:
        with self.db.session() as session:
            row = session.get(VideoJobRow, job_id)
            return _job(row) if row is not None and row.api_key_id == owner else None

    def unfinished(self) -> list[VideoJob]:
        with self.db.session() as session:
            rows = session.scalars(select(VideoJobRow).where(
                VideoJobRow.status.not_in(sorted(FINISHED)))
                .order_by(VideoJobRow.created_at)).all()
            return [_job(row) for row in rows]
