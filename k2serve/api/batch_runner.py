"""Runs batch jobs inside the server: each line is a request to the app itself.

A line goes through the whole ASGI app, as an HTTP request would (in-process, no socket):
the same validation, the same route, and, with a platform, the same admission and ledger
row, so a batch line is billed and checked exactly as the request it is. Its identity is
not a header but the scope entry BATCH_SCOPE (the batch's owner and id), which no HTTP
client can set: the platform takes the key from it, bills the line at the batch price and
leaves it out of the key's rate limits (k2serve.platform.middleware).

Few lines run at once (`concurrency`, across all batches), and each enters the engine at
the batch priority (k2serve.api.request_scope.engine_priority): the scheduler admits
interactive requests first, preempts batch lines first, and (unless the engine mixes
priorities) computes batch lines only in steps no interactive request needs, so a batch
fills idle capacity rather than taking it. No new line starts while an interactive request
is in flight (for at most MAX_LINE_WAIT_S), so the lines' own Python work (parsing,
rendering, tokenizing, storing) does not compete with it on the serving process. Each
line's result is stored as it ends; a server that restarts resumes its unfinished batches
from the lines not yet stored. Cancel stops new lines at once (and the running ones),
keeping those finished; a batch past its window expires with its partial results.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
import uuid

from starlette.concurrency import run_in_threadpool

from k2serve.api.batch_input import BatchLine, parse_lines
from k2serve.api.batch_shapes import jsonl, result_line, unrun_line
from k2serve.api.batch_store import (
    CANCELLED,
    COMPLETED,
    EXPIRED,
    FAILED,
    FINALIZING,
    IN_PROGRESS,
    VALIDATING,
    BatchRecord,
    BatchStore,
    FileBlobs,
    FileRecord,
    LineResult,
)
from k2serve.api.request_scope import BATCH_SCOPE
from k2serve.engine.foreground import FOREGROUND
from k2serve.errors import APIError
from k2serve.telemetry.metrics import BATCH_LINES

log = logging.getLogger("k2serve.batches")

# Lines in the engine at once: enough to fill an idle engine's steps, few enough that a
# batch holds little of the engine's queue (max_in_flight) and KV cache.
DEFAULT_CONCURRENCY = int(os.environ.get("K2SERVE_BATCH_CONCURRENCY", "4"))
OUTPUT_PURPOSE = "batch_output"
# The longest a line waits for interactive requests to end: under steady interactive load
# lines still enter the engine's queue, to run in whatever steps it leaves them.
MAX_LINE_WAIT_S = 1.0
INTERACTIVE_POLL_S = 0.01


class BatchRunner:
    def __init__(self, app, concurrency: int = DEFAULT_CONCURRENCY):
        self.app = app
        self.concurrency = max(1, concurrency)
        self._slots: asyncio.Semaphore | None = None
        self._tasks: dict[str, asyncio.Task] = {}
        self._cancelling: set[str] = set()

    @property
    def store(self) -> BatchStore:
        return self.app.state.batch_store

    @property
    def blobs(self) -> FileBlobs:
        return self.app.state.file_blobs

    # -- control -------------------------------------------------------------------------
    async def start(self) -> None:
        """Resume the batches a previous server left unfinished."""
        for record in await run_in_threadpool(self.store.unfinished_batches):
            log.info("resuming batch %s (%s)", record.id, record.status)
            self.submit(record)

    def submit(self, record: BatchRecord) -> None:
        if record.id not in self._tasks:
            self._tasks[record.id] = asyncio.create_task(self._run(record))

    async def cancel(self, record: BatchRecord) -> None:
        """Stop the batch now and write its results so far; returns once it is saved."""
        task = self._tasks.get(record.id)
        if task is None or task.done():  # nothing runs it here
            await self._finish(record, CANCELLED)
            return
        self._cancelling.add(record.id)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    @property
    def running(self) -> int:
        """Batches running now (read by /metrics)."""
        return len(self._tasks)

    async def stop(self) -> None:
        """At shutdown: stop every batch where it is (the next server resumes them)."""
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- one batch -----------------------------------------------------------------------
    async def _run(self, record: BatchRecord) -> None:
        try:
            lines = await self._lines(record)
            if lines is None:
                return
            done = {r.line_no for r in await run_in_threadpool(self.store.line_results,
                                                               record.id)}
            todo = [line for line in lines if line.line_no not in done]
            expired = await self._run_lines(record, todo)
            await self._finish(record, EXPIRED if expired else COMPLETED)
        except asyncio.CancelledError:
            if record.id in self._cancelling:
                await asyncio.shield(self._finish(record, CANCELLED))
            raise  # a shutdown: the record stays unfinished, to resume
        except Exception as exc:
            log.exception("batch %s failed", record.id)
            record.error = f"The batch failed: {exc}"[:500]
            await asyncio.shield(self._finish(record, FAILED))
        finally:
            self._tasks.pop(record.id, None)
            self._cancelling.discard(record.id)

    async def _lines(self, record: BatchRecord) -> list[BatchLine] | None:
        data = await run_in_threadpool(self.blobs.read, record.input_file_id)
        try:
            if data is None:
                raise APIError(400, "The input file was deleted before the batch ran.")
            lines = parse_lines(data, require_url=False)
        except APIError as exc:
            record.error = exc.message
            await self._finish(record, FAILED)
            return None
        if record.status == VALIDATING:
            record.status, record.in_progress_at = IN_PROGRESS, time.time()
            record.total = len(lines)
            await run_in_threadpool(self.store.save_batch, record)
        return lines

    async def _run_lines(self, record: BatchRecord, todo: list[BatchLine]) -> bool:
        """Run the lines, few at a time; True when the window closed first."""
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.concurrency)
        running: set[asyncio.Task] = set()
        expired = False
        try:
            for line in todo:
                await self._slots.acquire()
                try:
                    await _after_interactive_requests()
                except BaseException:  # cancelled: the slot is not lost with it
                    self._slots.release()
                    raise
                if time.time() >= record.deadline:
                    self._slots.release()
                    expired = True
                    break
                task = asyncio.create_task(self._line(record, line))
                task.add_done_callback(lambda _t: self._slots.release())
                running.add(task)
                task.add_done_callback(running.discard)
            if running:
                await asyncio.gather(*running)
        finally:
            for task in running:
                task.cancel()
            if running:
                await asyncio.gather(*running, return_exceptions=True)
        return expired

    async def _line(self, record: BatchRecord, line: BatchLine) -> None:
        url = line.url or record.endpoint
        request_id = f"{record.id}-{line.line_no}"
        async def store(status: int, body: dict) -> None:
            result = LineResult(record.id, line.line_no, line.custom_id, status, body,
                                request_id)
            await asyncio.shield(run_in_threadpool(self.store.save_line, result))
            stored.append(result)

        stored: list[LineResult] = []
        await call_app(self.app, url, line.body, request_id,
                       {"key_id": record.owner, "batch_id": record.id}, store)
        if not stored:  # the app sent no whole reply (it should always)
            await store(500, _error_body("The request ended without a reply."))
        result = stored[0]
        if result.ok:
            record.completed += 1
        else:
            record.failed += 1
        BATCH_LINES.labels("ok" if result.ok else "error").inc()
        # the counts, for progress (an estimate until the end: _finish recounts)
        await asyncio.shield(run_in_threadpool(self.store.save_batch, record))

    async def _finish(self, record: BatchRecord, status: str) -> None:
        """Write the output and error files (one line per input line, by custom_id) and the
        final state."""
        results = await run_in_threadpool(self.store.line_results, record.id)
        record.completed = sum(1 for r in results if r.ok)
        record.failed = sum(1 for r in results if not r.ok)
        if status != FAILED or results:
            record.status = FINALIZING
            ran = {r.line_no for r in results}
            unrun = []
            if status in (CANCELLED, EXPIRED):
                data = await run_in_threadpool(self.blobs.read, record.input_file_id)
                try:
                    lines = parse_lines(data or b"", require_url=False)
                except APIError:
                    lines = []
                unrun = [unrun_line(record.id, line.line_no, line.custom_id, status)
                         for line in lines if line.line_no not in ran]
            outputs = [result_line(record.id, r) for r in results if r.ok]
            errors = [result_line(record.id, r) for r in results if not r.ok] + unrun
            record.output_file_id = await self._write_file(record, "output", outputs)
            record.error_file_id = await self._write_file(record, "errors", errors)
        record.status, record.finished_at = status, time.time()
        await run_in_threadpool(self.store.save_batch, record)

    async def _write_file(self, record: BatchRecord, kind: str, lines: list[dict]) -> str | None:
        if not lines:
            return None
        data = jsonl(lines)
        file = FileRecord(id=f"file-{uuid.uuid4()}", owner=record.owner,
                          filename=f"batch_{record.id}_{kind}.jsonl", purpose=OUTPUT_PURPOSE,
                          bytes=len(data), created_at=time.time())
        await run_in_threadpool(self.blobs.write, file.id, data)
        await run_in_threadpool(self.store.save_file, file)
        return file.id


async def _after_interactive_requests() -> None:
    waited = 0.0
    while FOREGROUND.active and waited < MAX_LINE_WAIT_S:
        await asyncio.sleep(INTERACTIVE_POLL_S)
        waited += INTERACTIVE_POLL_S


async def call_app(app, path: str, body: dict, request_id: str, batch: dict,
                   on_reply) -> None:
    """POST `body` to the app's own route, in-process; `await on_reply(status, JSON body)`
    as the reply's last byte arrives (before the platform commits its ledger row)."""
    raw = json.dumps(body).encode()
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"},
             "http_version": "1.1", "method": "POST", "scheme": "http", "path": path,
             "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": [(b"host", b"127.0.0.1"), (b"content-type", b"application/json"),
                         (b"content-length", str(len(raw)).encode()),
                         (b"user-agent", b"k2serve-batch"),
                         (b"x-request-id", request_id.encode())],
             "client": ("127.0.0.1", 0), "server": ("127.0.0.1", 0), "state": {},
             BATCH_SCOPE: batch}
    sent = False
    never = asyncio.get_running_loop().create_future()  # the caller never leaves

    async def receive():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": raw, "more_body": False}
        return await never

    reply = {"status": 500, "body": bytearray()}

    async def send(message):
        if message["type"] == "http.response.start":
            reply["status"] = message["status"]
        elif message["type"] == "http.response.body":
            reply["body"] += message.get("body", b"")
            if not message.get("more_body", False):
                await on_reply(reply["status"], _json_body(bytes(reply["body"])))

    try:
        await app(scope, receive, send)
    finally:
        never.cancel()


def _json_body(raw: bytes) -> dict:
    try:
        doc = json.loads(raw)
    except ValueError:
        doc = None
    if isinstance(doc, dict):
        return doc
    return _error_body(raw[:1000].decode("utf-8", "replace"))


def _error_body(message: str) -> dict:
    return {"error": {"message": message, "type": "server_error", "param": None,
                      "code": None}}
