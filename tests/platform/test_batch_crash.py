"""A batch survives its server: a real `k2serve serve` is killed with SIGKILL mid-batch and
started again on the same data directory. The batch resumes by itself, finishes every line
once (each custom_id once in its output), and the lines finished before the kill are not run
again (one ledger row each: a line's result is stored before its row is committed).
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time

import openai

from k2serve.platform.db import Database
from k2serve.platform.keys import KeyStore
from k2serve.platform.ledger import ledger_rows
from k2serve.platform.models import BatchLineRow
from tests.conftest import EMBEDDED_ID, start_server, stop_server

N = 20


def _lines() -> bytes:
    return "".join(json.dumps({
        "custom_id": f"line-{i}", "method": "POST", "url": "/v1/completions",
        "body": {"model": EMBEDDED_ID, "prompt": f"Story {i}: once upon a time",
        "max_tokens": 24, "ignore_eos": True}}) + "\n" for i in range(N)).encode()


def _done_lines(url: str, batch_id: str) -> set[int]:
    db = Database(url, migrate=False)
    try:
        with db.session() as session:
            return {row.line_no for row in session.query(BatchLineRow)
                    .filter(BatchLineRow.batch_id == batch_id)}
    finally:
        db.close()


def test_sigkill_mid_batch_resumes_without_redoing_finished_lines():
    home = tempfile.mkdtemp(prefix="k2serve-batch-crash-")
    url = f"sqlite:///{home}/k2serve.db"
    args = ("--threads", "1")
    server = start_server(*args, env={"K2SERVE_HOME": home})
    restarted = None
    try:
        db = Database(url, migrate=False)
        _, key = KeyStore(db).create("batcher")
        db.close()
        client = openai.OpenAI(base_url=server.base_v1, api_key=key, max_retries=0)
        file = client.files.create(file=("in.jsonl", _lines()), purpose="batch")
        batch = client.batches.create(input_file_id=file.id, endpoint="/v1/completions",
                                      completion_window="24h")
        deadline = time.time() + 120
        while client.batches.retrieve(batch.id).request_counts.completed < 3:
            assert time.time() < deadline, "the batch made no progress"
            time.sleep(0.05)
        server.process.kill()  # SIGKILL
        server.process.wait(10)
        before = _done_lines(url, batch.id)
        assert 3 <= len(before) < N

        restarted = start_server(*args, env={"K2SERVE_HOME": home})
        client = openai.OpenAI(base_url=restarted.base_v1, api_key=key, max_retries=0)
        deadline = time.time() + 180
        while (done := client.batches.retrieve(batch.id)).status != "completed":
            assert done.status == "in_progress" and time.time() < deadline, done.status
            time.sleep(0.2)
        assert (done.request_counts.completed, done.request_counts.failed) == (N, 0)
        output = [json.loads(x) for x in client.files.content(done.output_file_id)
                  .text.splitlines()]
        assert sorted(o["custom_id"] for o in output) == sorted(f"line-{i}" for i in range(N))
        assert all(o["response"]["body"]["usage"]["completion_tokens"] == 24 for o in output)
    finally:
        for live in (server, restarted):
            if live is not None and live.process.poll() is None:
                stop_server(live)
    db = Database(url, migrate=False)
    try:
        rows = [r for r in ledger_rows(db) if r.batch_id == batch.id]
    finally:
        db.close()
    by_line: dict[int, list] = {}
    for r in rows:
        by_line.setdefault(int(r.request_id.rsplit("-", 1)[1]), []).append(r)
    for line_no in range(1, N + 1):
        statuses = [r.status for r in by_line[line_no]]
        if line_no in before:  # stored before the kill: run once, not again
            assert len(statuses) == 1, (line_no, statuses)
        else:  # run after the restart; perhaps cut short by the kill before that
            assert statuses.count("ok") == 1, (line_no, statuses)
            assert set(statuses) <= {"ok", "in_progress", "interrupted"}, (line_no, statuses)
    shutil.rmtree(home, ignore_errors=True)
