"""Uploaded files, batch jobs and each batch line's result, per owner (the API key; None in
open mode).

The routes and the batch runner use a `BatchStore` from `app.state.batch_store`: this
module's in-memory one when the app has no platform, the platform's database-backed one
otherwise (k2serve.platform.batch_store), so a restarted server resumes its batches without
redoing the lines already done. A file's bytes are in `FileBlobs` (a directory: the
platform's data directory, else a temporary one). Calls are synchronous (a database round
trip): async code runs them off the event loop.
"""

from __future__ import annotations

import copy
import os
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

# Statuses in OpenAI's words; Together's are the same upper-cased (k2serve.api.batch_shapes).
VALIDATING, IN_PROGRESS, FINALIZING = "validating", "in_progress", "finalizing"
COMPLETED, FAILED, EXPIRED, CANCELLED = "completed", "failed", "expired", "cancelled"
FINISHED = frozenset({COMPLETED, FAILED, EXPIRED, CANCELLED})


@dataclass
class FileRecord:
    id: str
    owner: str | None
    filename: str
    purpose: str
    bytes: int
    created_at: float
    status: str = "processed"  # "uploading": a presigned upload (Together) not yet done
    upload_token: str | None = None  # sha256 of the presigned upload's token


@dataclass
class BatchRecord:
    id: str
    owner: str | None
    input_file_id: str
    endpoint: str
    completion_window: str
    created_at: float
    deadline: float
    status: str = VALIDATING
    total: int = 0
    completed: int = 0
    failed: int = 0
    file_size_bytes: int = 0
    model_id: str | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    error: str | None = None
    metadata: dict | None = None
    in_progress_at: float | None = None
    finished_at: float | None = None  # completed / failed / expired / cancelled at

    @property
    def finished(self) -> bool:
        return self.status in FINISHED


@dataclass
class LineResult:
    """One input line's outcome: the HTTP status and JSON body its request got."""

    batch_id: str
    line_no: int
    custom_id: str
    status_code: int
    body: dict = field(default_factory=dict)
    request_id: str = ""

    @property
    def ok(self) -> bool:
        return 200 <= self.status_code < 300


class BatchStore(Protocol):
    def save_file(self, record: FileRecord) -> None: ...
    def load_file(self, file_id: str, owner: str | None) -> FileRecord | None: ...
    def list_files(self, owner: str | None) -> list[FileRecord]: ...
    def delete_file(self, file_id: str, owner: str | None) -> bool: ...
    def pending_upload(self, file_id: str) -> FileRecord | None:
        """A presigned upload not yet done, whoever owns it (its URL's token proves the
        right to it)."""
    def save_batch(self, record: BatchRecord) -> None: ...
    def load_batch(self, batch_id: str, owner: str | None) -> BatchRecord | None: ...
    def list_batches(self, owner: str | None) -> list[BatchRecord]: ...
    def unfinished_batches(self) -> list[BatchRecord]: ...
    def save_line(self, result: LineResult) -> None:
        """Record a line's result (once: a line already recorded keeps its first result)."""
    def line_results(self, batch_id: str) -> list[LineResult]:
        """Every recorded result of the batch, by line number."""


class MemoryBatchStore:
    """A process's files and batches, for an app without a platform (lost on restart)."""

    def __init__(self):
        self._files: dict[str, FileRecord] = {}
        self._batches: dict[str, BatchRecord] = {}
        self._lines: dict[str, dict[int, LineResult]] = {}
        self._lock = threading.Lock()

    def save_file(self, record: FileRecord) -> None:
        with self._lock:
            self._files[record.id] = copy.deepcopy(record)

    def load_file(self, file_id: str, owner: str | None) -> FileRecord | None:
        with self._lock:
            record = self._files.get(file_id)
            return copy.deepcopy(record) if record and record.owner == owner else None

    def list_files(self, owner: str | None) -> list[FileRecord]:
        with self._lock:
            return [copy.deepcopy(r) for r in self._files.values() if r.owner == owner]

    def delete_file(self, file_id: str, owner: str | None) -> bool:
        with self._lock:
            record = self._files.get(file_id)
            if record is None or record.owner != owner:
                return False
            del self._files[file_id]
            return True

    def pending_upload(self, file_id: str) -> FileRecord | None:
        with self._lock:
            record = self._files.get(file_id)
            return copy.deepcopy(record) if record and record.status == "uploading" else None

    def save_batch(self, record: BatchRecord) -> None:
        with self._lock:
            self._batches[record.id] = copy.deepcopy(record)

    def load_batch(self, batch_id: str, owner: str | None) -> BatchRecord | None:
        with self._lock:
            record = self._batches.get(batch_id)
            return copy.deepcopy(record) if record and record.owner == owner else None

    def list_batches(self, owner: str | None) -> list[BatchRecord]:
        with self._lock:
            return [copy.deepcopy(r) for r in self._batches.values() if r.owner == owner]

    def unfinished_batches(self) -> list[BatchRecord]:
        with self._lock:
            return [copy.deepcopy(r) for r in self._batches.values() if not r.finished]

    def save_line(self, result: LineResult) -> None:
        with self._lock:
            self._lines.setdefault(result.batch_id, {}).setdefault(result.line_no,
                                                                   copy.deepcopy(result))

    def line_results(self, batch_id: str) -> list[LineResult]:
        with self._lock:
            lines = self._lines.get(batch_id, {})
            return [copy.deepcopy(lines[n]) for n in sorted(lines)]


class FileBlobs:
    """The files' bytes, one file per id in `directory` (a temporary one when None)."""

    def __init__(self, directory: str | os.PathLike | None = None):
        self._directory = Path(directory) if directory is not None else None

    @property
    def directory(self) -> Path:
        if self._directory is None:
            self._directory = Path(tempfile.mkdtemp(prefix="k2serve-files-"))
        self._directory.mkdir(parents=True, exist_ok=True)
        return self._directory

    def path(self, file_id: str) -> Path:
        return self.directory / file_id

    def write(self, file_id: str, data: bytes) -> None:
        """Atomically: a crash leaves the old content or the new, never half of it."""
        tmp = self.directory / f".{file_id}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path(file_id))

    def read(self, file_id: str) -> bytes | None:
        try:
            return self.path(file_id).read_bytes()
        except FileNotFoundError:
            return None

    def delete(self, file_id: str) -> None:
        self.path(file_id).unlink(missing_ok=True)
