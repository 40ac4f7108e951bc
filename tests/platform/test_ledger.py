"""The ledger keeps every request's usage: a row from admission, tokens committed while a
reply streams and before its last byte, rows of a dead server closed as `interrupted`, and a
row the database refuses set aside instead of blocking every later row — over SQLite and
PostgreSQL."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest
from sqlalchemy import update
from starlette.testclient import TestClient

from k2serve.api import usage as usage_module
from k2serve.app import create_app
from k2serve.platform.keys import KeyStore
from k2serve.platform.ledger import (
    LedgerRow,
    LedgerWriter,
    apply_row,
    ledger_rows,
    usage_totals,
)
from k2serve.platform.models import UsageEntry
from k2serve.platform.service import Platform
from k2serve.serving.registry import ModelRegistry, ModelSpec
from tests.platform.test_api import (
    MODEL,
    PRICE,
    SlowBackend,
    completion,
    make_app,
    rows_by_request,
)


def _row(rid, key, model="m", status="ok", tokens=(3, 2), t=100.0, **kw):
    prompt, completion_tokens = tokens
    return LedgerRow(request_id=rid, api_key_id=key, model=model, endpoint="completions",
                     status=status, started_at=t, prompt_tokens=prompt,
                     completion_tokens=completion_tokens,
                     cost_usd=(prompt + completion_tokens) * 1e-6, **kw)


def test_strings_the_database_refuses_are_stored_cleaned(database):
    """NUL (PostgreSQL refuses it) and a lone surrogate (JSON "\\ud800"; not UTF-8, so
    SQLite refuses it) used to make the writer retry that row forever, holding back every
    later row: budgets stopped moving."""
    info, _ = KeyStore(database).create("k")
    writer = LedgerWriter(database)
    try:
        writer.submit(_row("nul\x00id", info.id, model="bad\x00model", error="e\x00"))
        writer.submit(_row("surrogate", info.id, model="bad\ud800model",
                           retry_group="g\udfff"))
        writer.submit(_row("after", info.id))
        assert writer.flush(timeout=10)
    finally:
        writer.close()
    rows = rows_by_request(database)
    assert set(rows) == {"nul\ufffdid", "surrogate", "after"}
    assert rows["nul\ufffdid"].model == "bad\ufffdmodel"
    assert rows["surrogate"].model == "bad?model"
    assert usage_totals(database)["total"]["total_tokens"] == 15
    assert KeyStore(database).get_by_name("k").spent_usd == pytest.approx(15e-6)
    assert writer.set_aside == type(writer.set_aside)()


def test_a_poison_row_is_logged_and_set_aside_not_retried_forever(database, caplog):
    info, _ = KeyStore(database).create("k")
    writer = LedgerWriter(database)
    started = time.monotonic()
    try:
        with caplog.at_level(logging.ERROR, logger="k2serve.platform.ledger"):
            # A key id that does not exist: a foreign-key error on every attempt.
            writer.submit(_row("poison", "no-such-key", tokens=(1, 1)))
            writer.submit(_row("good", info.id))
            assert writer.flush(timeout=20)
            elapsed = time.monotonic() - started
            writer.submit(_row("later", info.id))  # the writer still works
            assert writer.flush(timeout=10)
    finally:
        writer.close()
    assert elapsed < 10
    assert set(rows_by_request(database)) == {"good", "later"}
    assert [r.request_id for r in writer.set_aside] == ["poison"]
    logged = [r.getMessage() for r in caplog.records if "set aside" in r.getMessage()]
    assert len(logged) == 1 and '"request_id": "poison"' in logged[0]
    assert KeyStore(database).get_by_name("k").spent_usd == pytest.approx(10e-6)


def test_a_model_name_with_nul_does_not_stop_budgets(database):
    """Over HTTP: the bad model name is a 404 with its row, and the key's spend keeps moving
    (on PostgreSQL the row used to be retried forever, and nothing after it landed)."""
    _, key = KeyStore(database).create("k", budget_usd=1.0)
    app, platform = make_app(database)
    with TestClient(app) as c:
        r = c.post("/v1/completions",
                   content=b'{"model": "x\\u0000y", "prompt": "a", "max_tokens": 1}',
                   headers={"Authorization": f"Bearer {key}", "x-request-id": "nul",
                            "content-type": "application/json"})
        assert r.status_code == 404, r.text
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
        assert completion(c, key=key, headers={"x-request-id": "ok"}).status_code == 200
        assert platform.writer.flush(timeout=10)
        assert KeyStore(database).get_by_name("k").spent_usd > 0
    rows = rows_by_request(database)
    assert rows["nul"].model == "x\ufffdy" and rows["nul"].status == "rejected"
    assert rows["ok"].status == "ok" and rows["ok"].billed


class _Watch:
    """An ASGI wrapper that reads each request's ledger row as each body message leaves."""

    def __init__(self, app, database):
        self.app, self.database = app, database
        self.seen: dict[str, list[tuple[bool, str | None, int | None]]] = {}

    async def __call__(self, scope, receive, send):
        rid = dict(scope.get("headers", [])).get(b"x-request-id", b"").decode()

        async def watched(message):
            if message["type"] == "http.response.body":
                row = rows_by_request(self.database).get(rid)
                self.seen.setdefault(rid, []).append(
                    (message.get("more_body", False), row.status if row else None,
                     row.completion_tokens if row else None))
            await send(message)

        await self.app(scope, receive, watched if scope["type"] == "http" else send)


def test_row_from_admission_progress_while_streaming_and_committed_before_last_byte(
        database, monkeypatch):
    monkeypatch.setattr(usage_module, "PROGRESS_S", 0.1)
    _, key = KeyStore(database).create("k")
    registry = ModelRegistry()
    registry.register(ModelSpec(id=MODEL, type="chat", context_length=64, pricing=PRICE),
                      SlowBackend())  # 20 ms a token
    app = create_app(registry, platform=Platform(database))
    auth = {"Authorization": f"Bearer {key}"}
    watch = _Watch(app, database)
    with TestClient(watch) as c:
        r = completion(c, key=key, max_tokens=40, stream=True, headers={"x-request-id": "s"})
        assert r.status_code == 200
        plain = c.post("/v1/completions", headers={**auth, "x-request-id": "p"},
                       json={"model": MODEL, "prompt": "a b", "max_tokens": 5})
        assert plain.status_code == 200
    seen = watch.seen["s"]
    # Every body message found the row; mid-stream it was in_progress with tokens so far.
    assert all(status is not None for _, status, _ in seen)
    mid = [tokens for more, status, tokens in seen if status == "in_progress"]
    assert any(0 < t < 40 for t in mid), seen
    assert mid == sorted(mid)
    # The final status and every token are in the database before [DONE] and the end.
    assert seen[-2:] == [(True, "ok", 40), (False, "ok", 40)], seen
    # Not streamed: committed before the (only) body message left.
    assert watch.seen["p"] == [(False, "ok", 5)]
    row = rows_by_request(database)["p"]
    assert row.billed and row.completion_tokens == plain.json()["usage"]["completion_tokens"]


def test_rows_of_a_dead_server_are_closed_as_interrupted_and_billed(database):
    info, _ = KeyStore(database).create("k")
    with database.write() as s:  # rows a server wrote, then it died (no heartbeat, no close)
        entry = apply_row(s, _row("r1", info.id, status="in_progress", tokens=(4, 7)))
        apply_row(s, _row("r2", info.id, status="in_progress", tokens=(1, 1)))
    with database.write() as s:  # r1's server stopped writing it long ago; r2's is alive
        s.execute(update(UsageEntry).where(UsageEntry.id == entry)
                  .values(updated_at=time.time() - 60))
    writer = LedgerWriter(database)  # the next start
    try:
        assert writer.flush(timeout=10)
    finally:
        writer.close()
    rows = rows_by_request(database)
    assert rows["r1"].status == "interrupted" and rows["r1"].billed
    assert (rows["r1"].prompt_tokens, rows["r1"].completion_tokens) == (4, 7)
    assert rows["r2"].status == "in_progress"
    assert usage_totals(database)["total"]["total_tokens"] == 4 + 7 + 1 + 1
    assert KeyStore(database).get_by_name("k").spent_usd == pytest.approx(13e-6)


def test_updates_move_spend_by_the_change_and_shutdown_interrupts_running_rows(database):
    info, _ = KeyStore(database).create("k")
    writer = LedgerWriter(database)

    async def run():
        rid = await writer.write(_row("a", info.id, status="in_progress", tokens=(0, 0)))
        writer.submit(_row("a", info.id, status="in_progress", tokens=(3, 1)), rid)
        writer.submit(_row("a", info.id, status="in_progress", tokens=(3, 4)), rid)
        assert await writer.write(_row("a", info.id, status="ok", tokens=(3, 9)), rid) == rid
        return await writer.write(_row("b", info.id, status="in_progress", tokens=(2, 2)))

    asyncio.run(run())
    writer.close()  # "b" is still running here
    rows = rows_by_request(database)
    assert len(ledger_rows(database)) == 2
    assert (rows["a"].status, rows["a"].completion_tokens, rows["a"].billed) == ("ok", 9, True)
    assert rows["b"].status == "interrupted" and rows["b"].billed
    assert KeyStore(database).get_by_name("k").spent_usd == pytest.approx((12 + 4) * 1e-6)


def test_a_request_whose_row_cannot_be_written_is_not_run(database, monkeypatch):
    """No row, no generation: a clear 503 the SDKs retry, and the TPM reservation is freed."""
    _, key = KeyStore(database).create("k", tpm=100)
    app, platform = make_app(database)

    async def unavailable(row, entry_id=None, timeout=30.0):
        return None

    with TestClient(app) as c:
        monkeypatch.setattr(platform.writer, "write", unavailable)
        r = completion(c, key=key, max_tokens=20, headers={"x-request-id": "down"})
        assert r.status_code == 503
        assert r.json()["error"]["code"] == "ledger_unavailable"
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
        assert r.headers["retry-after"] == "1"
        monkeypatch.undo()
        peek = c.get("/v1/models", headers={"Authorization": f"Bearer {key}"})
        assert peek.headers["x-tokenlimit-remaining"] == "100"
    row = rows_by_request(database)["down"]
    assert (row.status, row.http_status, row.total_tokens) == ("error", 503, 0)
