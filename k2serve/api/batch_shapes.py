"""A batch job as each API shows it, and its result lines.

Together: statuses upper-cased (VALIDATING, IN_PROGRESS, COMPLETED, FAILED, EXPIRED,
CANCELLED), times as ISO 8601 strings, `progress` in percent. OpenAI: its Batch object
(`request_counts`, Unix times, `status` in its words). Result lines (output and error files)
are OpenAI's format, which Together's batch output uses too: {id, custom_id, response:
{status_code, request_id, body}, error}.
"""

from __future__ import annotations

from datetime import datetime, timezone

from k2serve.api.batch_store import (
    CANCELLED,
    COMPLETED,
    EXPIRED,
    FAILED,
    FINALIZING,
    BatchRecord,
    LineResult,
)
from k2serve.api.wire_json import json_line


def _iso(t: float | None) -> str | None:
    if t is None:
        return None
    return datetime.fromtimestamp(t, timezone.utc).isoformat().replace("+00:00", "Z")


def _int(t: float | None) -> int | None:
    return int(t) if t is not None else None


def progress(record: BatchRecord) -> float:
    if record.status == COMPLETED:
        return 100.0
    done = record.completed + record.failed
    return round(100.0 * done / record.total, 2) if record.total else 0.0


def together_job(record: BatchRecord) -> dict:
    status = "IN_PROGRESS" if record.status == FINALIZING else record.status.upper()
    return {"id": record.id, "user_id": record.owner or "", "input_file_id": record.input_file_id,
            "file_size_bytes": record.file_size_bytes, "status": status,
            "job_deadline": _iso(record.deadline), "created_at": _iso(record.created_at),
            "endpoint": record.endpoint, "progress": progress(record),
            "model_id": record.model_id or "", "output_file_id": record.output_file_id or "",
            "error_file_id": record.error_file_id or "", "error": record.error or "",
            "completed_at": _iso(record.finished_at)}


def openai_batch(record: BatchRecord) -> dict:
    finished = {status: _int(record.finished_at) if record.status == status else None
                for status in (COMPLETED, FAILED, EXPIRED, CANCELLED)}
    errors = None
    if record.error:
        errors = {"object": "list", "data": [{"code": "batch_failed", "message": record.error,
                                              "param": None, "line": None}]}
    return {"id": record.id, "object": "batch", "endpoint": record.endpoint,
            "errors": errors, "input_file_id": record.input_file_id,
            "completion_window": record.completion_window, "status": record.status,
            "output_file_id": record.output_file_id, "error_file_id": record.error_file_id,
            "created_at": _int(record.created_at), "in_progress_at": _int(record.in_progress_at),
            "expires_at": _int(record.deadline),
            "finalizing_at": _int(record.finished_at) if record.finished_at else None,
            "completed_at": finished[COMPLETED], "failed_at": finished[FAILED],
            "expired_at": finished[EXPIRED], "cancelling_at": finished[CANCELLED],
            "cancelled_at": finished[CANCELLED],
            "request_counts": {"total": record.total, "completed": record.completed,
                               "failed": record.failed},
            "metadata": record.metadata}


def result_line(batch_id: str, result: LineResult) -> dict:
    return {"id": f"batch_req_{batch_id}_{result.line_no}", "custom_id": result.custom_id,
            "response": {"status_code": result.status_code, "request_id": result.request_id,
                         "body": result.body},
            "error": None}


def unrun_line(batch_id: str, line_no: int, custom_id: str, status: str) -> dict:
    """A line the batch never ran (cancelled or expired first): in the error file."""
    code = "batch_expired" if status == EXPIRED else "batch_cancelled"
    why = "expired" if status == EXPIRED else "was cancelled"
    return {"id": f"batch_req_{batch_id}_{line_no}", "custom_id": custom_id, "response": None,
            "error": {"code": code, "message": f"The batch {why} before this request ran."}}


def jsonl(lines: list[dict]) -> bytes:
    """Result lines as a JSONL file: UTF-8, one object per line, whatever splits lines."""
    return "".join(json_line(line) + "\n" for line in lines).encode()
