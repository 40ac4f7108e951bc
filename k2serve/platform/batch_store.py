"""Files, batch jobs and batch line results in the platform's database: the BatchStore
(k2serve.api.batch_store) of an app with a platform, so a batch outlives its server (a
restarted one resumes it from the lines recorded here) and every process on the database
sees the same files."""

from __future__ import annotations

import dataclasses
import json
import time

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from k2serve.api.batch_store import FINISHED, BatchRecord, FileRecord, LineResult
from k2serve.platform.db import Database
from k2serve.platform.models import BatchLineRow, BatchRow, FileRow

_FILE_FIELDS = [f.name for f in dataclasses.fields(FileRecord) if f.name != "owner"]


def _file(row: FileRow) -> FileRecord:
    return FileRecord(owner=row.api_key_id, **{f: getattr(row, f) for f in _FILE_FIELDS})


def _batch(row: BatchRow) -> BatchRecord:
    return BatchRecord(**json.loads(row.record))


class DatabaseBatchStore:
    def __init__(self, db: Database):
        self.db = db

    # -- files ---------------------------------------------------------------------------
    def save_file(self, record: FileRecord) -> None:
        with self.db.write() as session:
            row = session.get(FileRow, record.id)
            if row is None:
                row = FileRow(id=record.id, api_key_id=record.owner)
                session.add(row)
            for name in _FILE_FIELDS:
                setattr(row, name, getattr(record, name))

    def load_file(self, file_id: str, owner: str | None) -> FileRecord | None:
        with self.db.session() as session:
            row = session.get(FileRow, file_id)
            return _file(row) if row is not None and row.api_key_id == owner else None

    def pending_upload(self, file_id: str) -> FileRecord | None:
        with self.db.session() as session:
            row = session.get(FileRow, file_id)
            return _file(row) if row is not None and row.status == "uploading" else None

    def list_files(self, owner: str | None) -> list[FileRecord]:
        with self.db.session() as session:
            rows = session.scalars(select(FileRow).where(_owned(FileRow, owner))).all()
            return [_file(row) for row in rows]

    def delete_file(self, file_id: str, owner: str | None) -> bool:
        with self.db.write() as session:
            row = session.get(FileRow, file_id)
            if row is None or row.api_key_id != owner:
                return False
            session.delete(row)
            return True

    # -- batches -------------------------------------------------------------------------
    def save_batch(self, record: BatchRecord) -> None:
        with self.db.write() as session:
            row = session.get(BatchRow, record.id)
            if row is None:
                row = BatchRow(id=record.id, api_key_id=record.owner,
                               created_at=record.created_at)
                session.add(row)
            row.status = record.status
            row.updated_at = time.time()
            row.record = json.dumps(dataclasses.asdict(record), ensure_ascii=False)

    def load_batch(self, batch_id: str, owner: str | None) -> BatchRecord | None:
        with self.db.session() as session:
            row = session.get(BatchRow, batch_id)
            return _batch(row) if row is not None and row.api_key_id == owner else None

    def list_batches(self, owner: str | None) -> list[BatchRecord]:
        with self.db.session() as session:
            rows = session.scalars(select(BatchRow).where(_owned(BatchRow, owner))).all()
            return [_batch(row) for row in rows]

    def unfinished_batches(self) -> list[BatchRecord]:
        with self.db.session() as session:
            rows = session.scalars(select(BatchRow).where(
                BatchRow.status.not_in(sorted(FINISHED)))).all()
            return [_batch(row) for row in rows]

    def save_line(self, result: LineResult) -> None:
        try:
            with self.db.write() as session:
                if session.get(BatchLineRow, (result.batch_id, result.line_no)) is not None:
                    return  # recorded already: the first result stands
                session.add(BatchLineRow(
                    batch_id=result.batch_id, line_no=result.line_no,
                    custom_id=result.custom_id, status_code=result.status_code,
                    request_id=result.request_id[:128],
                    body=json.dumps(result.body, ensure_ascii=False)))
        except IntegrityError:  # another writer recorded it first
            pass

    def line_results(self, batch_id: str) -> list[LineResult]:
        with self.db.session() as session:
            rows = session.scalars(select(BatchLineRow).where(BatchLineRow.batch_id == batch_id)
                                   .order_by(BatchLineRow.line_no)).all()
            return [LineResult(r.batch_id, r.line_no, r.custom_id, r.status_code,
                               json.loads(r.body), r.request_id) for r in rows]


def _owned(table, owner: str | None):
    return table.api_key_id.is_(None) if owner is None else table.api_key_id == owner
