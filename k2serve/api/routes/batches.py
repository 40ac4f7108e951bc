"""Batch jobs, as Together's and OpenAI's APIs show them: POST /v1/batches,
GET /v1/batches, GET /v1/batches/{id}, POST /v1/batches/{id}/cancel.

The caller's SDK decides the shape, as for /v1/models: a User-Agent naming OpenAI gets
OpenAI's Batch objects (and a list object), any other Together's (`{job, warning}` from
create, a bare array from list, upper-case statuses). A batch belongs to the API key that
made it (another key: 404); the server runs it (k2serve.api.batch_runner).
"""

from __future__ import annotations

import re
import time
import uuid

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from k2serve.api.batch_input import BATCH_ENDPOINTS, BATCH_PURPOSES, parse_lines
from k2serve.api.batch_runner import BatchRunner
from k2serve.api.batch_shapes import openai_batch, together_job
from k2serve.api.batch_store import BatchRecord
from k2serve.api.errors import ERROR_RESPONSES
from k2serve.api.request_scope import request_scope
from k2serve.api.routes.files import blobs_of, load_file, store_of
from k2serve.api.routes.models import wants_openai_shape
from k2serve.api.schemas.batches import BatchCreateRequest
from k2serve.errors import APIError, bad_request

router = APIRouter(responses=ERROR_RESPONSES)

BATCH_ID = re.compile(r"batch_[0-9a-f]{32}")
WINDOW = re.compile(r"([1-9][0-9]{0,5})([smhd])")
UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}
MAX_WINDOW_S = 7 * 86400


def runner_of(request: Request) -> BatchRunner:
    return request.app.state.batch_runner


def _shape(request: Request, record: BatchRecord) -> dict:
    return openai_batch(record) if wants_openai_shape(request) else together_job(record)


def _window_s(window: str) -> float:
    match = WINDOW.fullmatch(window.strip())
    seconds = int(match[1]) * UNIT_S[match[2]] if match else 0
    if not 0 < seconds <= MAX_WINDOW_S:
        raise bad_request(f"completion_window must be a duration such as '24h' (at most 7d), "
                          f"not '{window[:16]}'.", param="completion_window")
    return seconds


async def _load(request: Request, batch_id: str) -> BatchRecord:
    record = None
    if BATCH_ID.fullmatch(batch_id):
        record = await run_in_threadpool(store_of(request).load_batch, batch_id,
                                         request_scope(request).api_key_id)
    if record is None:
        raise APIError(404, f"No batch with id '{batch_id[:128]}' was found.",
                       code="batch_not_found")
    return record


@router.post("/v1/batches", status_code=200)
async def create_batch(sent: BatchCreateRequest, request: Request):
    if sent.endpoint not in BATCH_ENDPOINTS:
        raise bad_request(f"endpoint '{sent.endpoint[:128]}' cannot be batched here; use one "
                          f"of {', '.join(BATCH_ENDPOINTS)}.", param="endpoint")
    window = _window_s(sent.completion_window)
    file = await load_file(request, sent.input_file_id, param="input_file_id")
    if file.purpose not in BATCH_PURPOSES:
        raise bad_request(f"The file '{file.id}' was uploaded with purpose '{file.purpose}'; "
                          f"a batch's input needs purpose 'batch' (OpenAI) or 'batch-api' "
                          f"(Together).", param="input_file_id")
    data = await run_in_threadpool(blobs_of(request).read, file.id)
    lines = await run_in_threadpool(parse_lines, data or b"", require_url=False,
                                    param="input_file_id")
    for line in lines:
        if line.url is not None and line.url != sent.endpoint:
            raise bad_request(f"Line {line.line_no} of the input file has url '{line.url}', "
                              f"but the batch's endpoint is '{sent.endpoint}': every line "
                              f"must call the batch's endpoint.", param="input_file_id")
    now = time.time()
    record = BatchRecord(id=f"batch_{uuid.uuid4().hex}", owner=request_scope(request).api_key_id,
                         input_file_id=file.id, endpoint=sent.endpoint,
                         completion_window=sent.completion_window, created_at=now,
                         deadline=now + window, total=len(lines), file_size_bytes=file.bytes,
                         model_id=sent.model_id, metadata=sent.metadata)
    await run_in_threadpool(store_of(request).save_batch, record)
    runner_of(request).submit(record)
    if wants_openai_shape(request):
        return JSONResponse(openai_batch(record))
    return JSONResponse({"job": together_job(record), "warning": ""}, status_code=201)


@router.get("/v1/batches")
async def list_batches(request: Request):
    records = await run_in_threadpool(store_of(request).list_batches,
                                      request_scope(request).api_key_id)
    records.sort(key=lambda r: r.created_at, reverse=True)
    data = [_shape(request, r) for r in records]
    if wants_openai_shape(request):
        return JSONResponse({"object": "list", "data": data, "has_more": False,
                             "first_id": data[0]["id"] if data else None,
                             "last_id": data[-1]["id"] if data else None})
    return JSONResponse(data)


@router.get("/v1/batches/{batch_id}")
async def retrieve_batch(request: Request, batch_id: str):
    return JSONResponse(_shape(request, await _load(request, batch_id)))


@router.post("/v1/batches/{batch_id}/cancel")
async def cancel_batch(request: Request, batch_id: str):
    """Stop a batch: no new line starts, the running ones stop, the finished ones stay
    (in its output and error files). A finished batch is returned as it is."""
    record = await _load(request, batch_id)
    if not record.finished:
        await runner_of(request).cancel(record)
        record = await _load(request, batch_id)
    return JSONResponse(_shape(request, record))
