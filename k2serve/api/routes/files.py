"""Files, as Together's and OpenAI's APIs take them: POST /v1/files/upload (Together's
documented multipart upload), POST /v1/files (OpenAI's multipart upload; without a `file`
part, the first step of the together 3.x SDK's presigned upload: a 302 to a PUT URL here,
then POST /v1/files/{id}/preprocess), GET /v1/files, GET|DELETE /v1/files/{id},
GET /v1/files/{id}/content.

One file object serves both SDKs: OpenAI's fields (status, ...) and Together's (`Processed`,
`FileType`, spelt so) side by side, as neither SDK minds the other's. A file belongs to the
API key that uploaded it (another key: 404). A batch file's lines are checked at upload
(k2serve.api.batch_input).
"""

from __future__ import annotations

import hashlib
import re
import secrets
import time
import uuid

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from k2serve.api.batch_input import BATCH_PURPOSES, OPENAI_BATCH_PURPOSE, parse_lines
from k2serve.api.batch_store import BatchStore, FileBlobs, FileRecord
from k2serve.api.errors import ERROR_RESPONSES
from k2serve.api.request_scope import request_scope
from k2serve.errors import APIError, bad_request

router = APIRouter(responses=ERROR_RESPONSES)

DEFAULT_MAX_FILE_BYTES = 100 * 1024 * 1024
PURPOSES = frozenset({"batch", "batch-api", "fine-tune", "calibration", "eval", "evals",
                      "assistants", "vision", "user_data"})
FILE_TYPES = frozenset({"jsonl", "csv", "parquet"})
FILE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
MAX_NAME = 256
# The presigned PUT of Together's upload: authorized by its token, not by an API key.
PRESIGNED_UPLOAD = re.compile(r"/v1/files/[A-Za-z0-9._-]{1,128}/upload")

_UPLOAD_OPENAPI = {"requestBody": {"required": True, "content": {"multipart/form-data": {
    "schema": {"type": "object", "properties": {
        "file": {"type": "string", "format": "binary"}, "purpose": {"type": "string"},
        "file_name": {"type": "string"}, "file_type": {"type": "string"}}}}}}}


def store_of(request: Request) -> BatchStore:
    return request.app.state.batch_store


def blobs_of(request: Request) -> FileBlobs:
    return request.app.state.file_blobs


def max_file_bytes(request: Request) -> int:
    return getattr(request.app.state, "max_file_bytes", DEFAULT_MAX_FILE_BYTES)


def file_object(record: FileRecord) -> dict:
    file_type = record.filename.rsplit(".", 1)[-1].lower() if "." in record.filename else ""
    return {"id": record.id, "object": "file", "bytes": record.bytes,
            "created_at": int(record.created_at), "filename": record.filename,
            "purpose": record.purpose, "status": "processed", "status_details": None,
            "expires_at": None, "Processed": True,
            "FileType": file_type if file_type in FILE_TYPES else "jsonl"}


def not_found(file_id: str, param: str | None = None) -> APIError:
    return APIError(404, f"No file with id '{file_id[:128]}' was found.", param=param,
                    code="file_not_found")


async def load_file(request: Request, file_id: str, param: str | None = None) -> FileRecord:
    record = None
    if FILE_ID.fullmatch(file_id):
        record = await run_in_threadpool(store_of(request).load_file, file_id,
                                         request_scope(request).api_key_id)
    if record is None or record.status != "processed":
        raise not_found(file_id, param)
    return record


async def _form(request: Request):
    try:
        return await request.form()
    except Exception as exc:  # malformed multipart, or not multipart at all
        raise bad_request(f"Could not read the multipart/form-data body: {exc}") from None


def _field(form, name: str) -> str | None:
    value = form.get(name)
    return None if value is None or isinstance(value, UploadFile) else value


def _purpose(form) -> str:
    purpose = _field(form, "purpose")
    if purpose is None:
        raise bad_request("Missing required parameter: 'purpose'.", param="purpose")
    if purpose not in PURPOSES:
        raise bad_request(f"Unknown purpose '{purpose[:64]}'; use one of "
                          f"{', '.join(sorted(PURPOSES))}.", param="purpose")
    return purpose


def _filename(name: str | None, file_type: str | None) -> str:
    name = (name or "").strip().replace("/", "_").replace("\\", "_")[:MAX_NAME]
    if file_type is not None and file_type not in FILE_TYPES:
        raise bad_request(f"Unknown file_type '{file_type[:32]}'; use jsonl, csv or parquet.",
                          param="file_type")
    if not name:
        name = f"upload.{file_type or 'jsonl'}"
    return name


def _too_large(limit: int) -> APIError:
    return APIError(413, f"The file is larger than this server's limit of {limit} bytes.",
                    param="file", code="file_too_large")


async def _store(request: Request, record: FileRecord, data: bytes) -> FileRecord:
    """Check a batch file's lines, then keep the bytes and the record."""
    if len(data) > max_file_bytes(request):
        raise _too_large(max_file_bytes(request))
    if record.purpose in BATCH_PURPOSES:
        await run_in_threadpool(parse_lines, data,
                                require_url=record.purpose == OPENAI_BATCH_PURPOSE)
    record.bytes, record.status, record.upload_token = len(data), "processed", None
    await run_in_threadpool(blobs_of(request).write, record.id, data)
    await run_in_threadpool(store_of(request).save_file, record)
    return record


def _new_record(request: Request, filename: str, purpose: str) -> FileRecord:
    return FileRecord(id=f"file-{uuid.uuid4()}", owner=request_scope(request).api_key_id,
                      filename=filename, purpose=purpose, bytes=0, created_at=time.time())


async def _upload_part(form, limit: int) -> tuple[bytes, str | None]:
    upload = form.get("file")
    if not isinstance(upload, UploadFile):
        raise bad_request("Missing required parameter: 'file' (send it as a "
                          "multipart/form-data file part).", param="file")
    data = await upload.read(limit + 1)
    if len(data) > limit:
        raise _too_large(limit)
    return data, upload.filename


async def _upload(request: Request, form, purpose: str) -> JSONResponse:
    """Store the form's file part as a new file of the calling key's."""
    data, part_name = await _upload_part(form, max_file_bytes(request))
    name = _filename(_field(form, "file_name") or part_name, _field(form, "file_type"))
    record = await _store(request, _new_record(request, name, purpose), data)
    return JSONResponse(file_object(record))


@router.post("/v1/files/upload", summary="Upload a file (Together)",
             openapi_extra=_UPLOAD_OPENAPI)
async def upload_file(request: Request):
    form = await _form(request)
    try:
        return await _upload(request, form, _purpose(form))
    finally:
        await form.close()


@router.post("/v1/files", summary="Upload a file (OpenAI; or start a presigned upload)",
             openapi_extra=_UPLOAD_OPENAPI)
async def create_file(request: Request):
    form = await _form(request)
    try:
        purpose = _purpose(form)
        if form.get("file") is None and _field(form, "file_name") is not None:
            return await _presign(request, form, purpose)
        return await _upload(request, form, purpose)
    finally:
        await form.close()


async def _presign(request: Request, form, purpose: str) -> Response:
    """The together SDK's first step: a file id and a URL to PUT the bytes to (302)."""
    name = _filename(_field(form, "file_name"), _field(form, "file_type"))
    record = _new_record(request, name, purpose)
    token = secrets.token_urlsafe(32)
    record.status, record.upload_token = "uploading", _digest(token)
    await run_in_threadpool(store_of(request).save_file, record)
    location = str(request.url_for("put_file_content", file_id=record.id)) + f"?token={token}"
    return Response(status_code=302, headers={"location": location,
                                              "x-together-file-id": record.id})


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@router.put("/v1/files/{file_id}/upload", include_in_schema=False)
async def put_file_content(request: Request, file_id: str, token: str = ""):
    """The presigned PUT: the token in its URL is its authorization (the platform lets this
    path through without an API key)."""
    record = None
    if FILE_ID.fullmatch(file_id):
        record = await run_in_threadpool(store_of(request).pending_upload, file_id)
    if record is None or not token or record.upload_token is None or \
            not secrets.compare_digest(record.upload_token, _digest(token)):
        raise APIError(403, "This upload URL is not valid (or was used already).",
                       code="invalid_upload_url")
    data = await request.body()
    if len(data) > max_file_bytes(request):
        raise _too_large(max_file_bytes(request))
    await run_in_threadpool(blobs_of(request).write, record.id, data)
    record.bytes = len(data)
    await run_in_threadpool(store_of(request).save_file, record)
    return Response(status_code=200)


@router.post("/v1/files/{file_id}/preprocess", summary="Finish a presigned upload (Together)")
async def preprocess_file(request: Request, file_id: str):
    owner = request_scope(request).api_key_id
    record = None
    if FILE_ID.fullmatch(file_id):
        record = await run_in_threadpool(store_of(request).load_file, file_id, owner)
    if record is None:
        raise not_found(file_id)
    if record.status == "uploading":
        data = await run_in_threadpool(blobs_of(request).read, record.id)
        if data is None:
            raise bad_request("The file's bytes have not been uploaded yet: PUT them to the "
                              "upload URL first.", code="file_not_uploaded")
        try:
            record = await _store(request, record, data)
        except APIError:
            await run_in_threadpool(_discard, request, record)
            raise
    return JSONResponse(file_object(record))


def _discard(request: Request, record: FileRecord) -> None:
    store_of(request).delete_file(record.id, record.owner)
    blobs_of(request).delete(record.id)


@router.get("/v1/files")
async def list_files(request: Request, purpose: str | None = None):
    records = await run_in_threadpool(store_of(request).list_files,
                                      request_scope(request).api_key_id)
    data = [file_object(r) for r in sorted(records, key=lambda r: r.created_at, reverse=True)
            if r.status == "processed" and purpose in (None, r.purpose)]
    return JSONResponse({"object": "list", "data": data, "has_more": False,
                         "first_id": data[0]["id"] if data else None,
                         "last_id": data[-1]["id"] if data else None})


@router.get("/v1/files/{file_id}")
async def retrieve_file(request: Request, file_id: str):
    return JSONResponse(file_object(await load_file(request, file_id)))


@router.get("/v1/files/{file_id}/content", responses={200: {
    "description": "The file's bytes", "content": {"application/octet-stream": {}}}})
async def file_content(request: Request, file_id: str):
    record = await load_file(request, file_id)
    data = await run_in_threadpool(blobs_of(request).read, record.id)
    if data is None:
        raise not_found(file_id)
    return Response(data, media_type="application/octet-stream",
                    headers={"content-disposition": f'attachment; filename="{record.id}"'})


@router.delete("/v1/files/{file_id}")
async def delete_file(request: Request, file_id: str):
    record = await load_file(request, file_id)
    await run_in_threadpool(_discard, request, record)
    return JSONResponse({"id": record.id, "object": "file", "deleted": True})
