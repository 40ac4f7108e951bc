"""Database, keys, ledger and the CLI — over SQLite and PostgreSQL alike."""

from __future__ import annotations

import io
import json
import threading
from contextlib import redirect_stdout

import pytest
from sqlalchemy import inspect, select

from k2serve.platform.db import Database, data_dir, database_url, upgrade
from k2serve.platform.keys import KeyAdminError, KeyStore, hash_key
from k2serve.platform.ledger import LedgerRow, LedgerWriter, ledger_rows, usage_totals
from k2serve.platform.models import ApiKey, Base
from k2serve.platform.pricing import cost_usd
from k2serve.platform.timeparse import parse_since
from k2serve.serving.registry import Pricing


def test_migrations_build_the_models_schema_and_rerun_cleanly(database):
    upgrade(database.engine)  # a second `upgrade head` is a no-op
    upgrade(database.engine)
    insp = inspect(database.engine)
    tables = set(insp.get_table_names())
    assert {"api_keys", "usage_ledger", "alembic_version"} <= tables
    for table in Base.metadata.sorted_tables:
        db_cols = {c["name"] for c in insp.get_columns(table.name)}
        assert db_cols == {c.name for c in table.columns}, table.name
        db_indexes = {i["name"] for i in insp.get_indexes(table.name)}
        assert {i.name for i in table.indexes} <= db_indexes
    with database.engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT version_num FROM alembic_version").scalar() == "0007"
    if database.dialect == "sqlite":
        assert database.journal_mode() == "wal"


def test_concurrent_first_opens_migrate_once(db_url):
    errors = []

    def open_it():
        try:
            Database(db_url).close()
        except Exception as exc:  # pragma: no cover - the failure is the assertion
            errors.append(exc)

    threads = [threading.Thread(target=open_it) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_data_dir_and_url_resolution(monkeypatch, tmp_path):
    monkeypatch.delenv("K2SERVE_DATABASE_URL", raising=False)
    monkeypatch.setenv("K2SERVE_HOME", str(tmp_path / "home"))
    assert data_dir() == tmp_path / "home"
    assert database_url() == f"sqlite:///{tmp_path / 'home' / 'k2serve.db'}"
    assert database_url(data_directory=tmp_path / "x").endswith("/x/k2serve.db")
    monkeypatch.delenv("K2SERVE_HOME")
    assert str(data_dir()).endswith(".k2serve")
    monkeypatch.setenv("K2SERVE_DATABASE_URL", "postgresql://u:p@h/db")
    assert database_url() == "postgresql+psycopg://u:p@h/db"
    assert database_url("postgres://a@b/c") == "postgresql+psycopg://a@b/c"


def test_keys_are_stored_only_as_hashes(database):
    store = KeyStore(database)
    assert not store.any_key_exists()
    info, key = store.create("alice", rpm=10, tpm=1000, models=["m1", "m2"], budget_usd=2.5)
    assert key.startswith(f"k2s-{info.id}-") and len(key) > 50
    with database.session() as s:
        row = s.scalar(select(ApiKey).where(ApiKey.name == "alice"))
        stored = [str(getattr(row, c.key)) for c in ApiKey.__table__.columns]
    assert key not in " ".join(stored)
    assert row.key_hash == hash_key(key)
    assert store.any_key_exists()

    found = store.lookup(key)
    assert found is not None and found.name == "alice" and found.allowed_models == ("m1", "m2")
    assert found.allows_model("m1") and not found.allows_model("m3")
    assert store.lookup(row.key_hash) is None  # the hash is not a credential
    assert store.lookup(key[:-1] + ("A" if key[-1] != "A" else "B")) is None
    assert store.lookup("k2s-000000000000-" + key.split("-", 2)[2]) is None
    assert store.lookup("sk-whatever") is None

    with pytest.raises(KeyAdminError, match="already exists"):
        store.create("alice")
    with pytest.raises(KeyAdminError):
        store.create("bad name!")
    revoked = store.revoke("alice")
    assert revoked.revoked
    assert store.lookup(key).revoked  # still found, so the 401 can say "revoked"
    with pytest.raises(KeyAdminError, match="already exists"):
        store.create("alice")
    with pytest.raises(KeyAdminError, match="no key"):
        store.revoke("nobody")


def _row(rid, key, tokens=(10, 0, 5), group=None, retry=0, status="ok", t=100.0, cost=None):
    prompt, cached, completion = tokens
    return LedgerRow(request_id=rid, api_key_id=key, model="m", endpoint="completions",
                     status=status, started_at=t, admitted_at=t, prompt_tokens=prompt,
                     cached_tokens=cached, completion_tokens=completion,
                     cost_usd=cost if cost is not None else (prompt + completion) * 1e-6,
                     retry_group=group, retry_count=retry)


def test_ledger_bills_every_attempt_that_used_tokens(database):
    """Retries included (README: "Retries"): an attempt that generated again delivered its
    tokens again. Only rows without tokens (refusals, replays) are not billed."""
    info, _ = KeyStore(database).create("k", budget_usd=1.0)
    writer = LedgerWriter(database)
    # A dropped stream (partial), then its retry completes: both billed.
    writer.submit(_row("a0", info.id, (10, 0, 2), group="g1", retry=0, status="client_closed"))
    writer.submit(_row("a1", info.id, (10, 0, 5), group="g1", retry=1, t=101))
    # A retry refused with 429 (no tokens) and a replay of a stored reply: not billed.
    writer.submit(_row("c1", info.id, (0, 0, 0), group="g1", retry=2, status="rejected"))
    writer.submit(_row("r", info.id, (0, 0, 0), group="g1", retry=3, status="replayed"))
    # A request of its own.
    writer.submit(_row("e", info.id, (3, 1, 3), t=105))
    assert writer.flush()
    writer.close()

    billed = {r.request_id for r in ledger_rows(database) if r.billed}
    assert billed == {"a0", "a1", "e"}
    totals = usage_totals(database)
    (k,) = totals["keys"]
    assert k["requests"] == 5 and k["billed_requests"] == 3
    assert k["prompt_tokens"] == 10 + 10 + 3
    assert k["completion_tokens"] == 2 + 5 + 3
    assert k["cached_tokens"] == 1
    assert k["cost_usd"] == pytest.approx((12 + 15 + 6) * 1e-6)
    spent = KeyStore(database).get_by_name("k").spent_usd
    assert spent == pytest.approx(k["cost_usd"])
    assert KeyStore(database).get_by_name("k").last_used_at == 105


def test_usage_totals_filters(database):
    store = KeyStore(database)
    a, _ = store.create("a")
    b, _ = store.create("b")
    writer = LedgerWriter(database)
    writer.submit(_row("1", a.id, t=1000))
    writer.submit(_row("2", a.id, t=2000))
    writer.submit(_row("3", b.id, t=3000))
    writer.submit(_row("4", None, t=3000))  # open mode
    writer.flush()
    writer.close()
    assert usage_totals(database)["total"]["requests"] == 4
    assert [k["key"] for k in usage_totals(database, key_name="a")["keys"]] == ["a"]
    since = usage_totals(database, since=1500)
    assert since["total"]["requests"] == 3
    assert {k["key"] for k in since["keys"]} == {"a", "b", None}
    with pytest.raises(LookupError):
        usage_totals(database, key_name="nobody")


def test_cli_keys_and_usage(db_url, capsys):
    from k2serve.cli import main

    def run(*args) -> tuple[int, str]:
        out = io.StringIO()
        with redirect_stdout(out):
            code = main([*args, "--database-url", db_url])
        return code, out.getvalue()

    code, out = run("keys", "create", "--name", "svc", "--rpm", "5", "--tpm", "900",
                    "--models", "m1,m2", "--budget", "1.25")
    assert code == 0
    key = out.strip().splitlines()[-1]
    assert key.startswith("k2s-")
    code, out = run("keys", "create", "--name", "boss", "--admin")
    assert code == 0
    code, out = run("keys", "list")
    assert code == 0 and "svc" in out and "boss (admin)" in out and key not in out
    code, out = run("keys", "list", "--json")
    listed = {k["name"]: k for k in json.loads(out)}
    assert listed["svc"]["rpm"] == 5 and listed["svc"]["models"] == ["m1", "m2"]
    assert listed["svc"]["budget_usd"] == 1.25 and listed["boss"]["admin"] is True
    assert key not in out and "hash" not in out
    assert run("keys", "revoke", "svc")[0] == 0
    assert json.loads(run("keys", "list", "--json")[1])[0]["status"] == "revoked"
    assert run("keys", "revoke", "svc")[0] == 0  # idempotent
    assert run("keys", "revoke", "nobody")[0] == 2
    assert run("keys", "create", "--name", "svc")[0] == 2

    db = Database(db_url)
    writer = LedgerWriter(db)
    svc = KeyStore(db).get_by_name("svc")
    writer.submit(_row("r1", svc.id, (12, 2, 4), t=200_000.0))
    writer.flush()
    writer.close()
    db.close()
    code, out = run("usage", "--json")
    assert code == 0
    assert json.loads(out)["total"]["total_tokens"] == 16
    code, out = run("usage", "--key", "svc", "--since", "1970-01-02")
    assert code == 0 and "svc" in out and "16" in out
    assert run("usage", "--key", "nobody")[0] == 2
    assert run("usage", "--since", "yesterday-ish")[0] == 2


def test_pricing_and_since_parsing():
    assert cost_usd(Pricing(input=1.0, output=3.0), 1_000_000, 0, 1_000_000) == pytest.approx(4.0)
    half = Pricing(input=1.0, output=3.0, cached_input=0.5)
    assert cost_usd(half, 1000, 400, 0) == pytest.approx((600 * 1.0 + 400 * 0.5) / 1e6)
    assert cost_usd(None, 5, 0, 5) == 0.0
    # An image model: 2 images at $0.01 each + 4096 kilopixel-steps at $0.002 per MP-step.
    media = Pricing(image=0.01, megapixel_step=0.002)
    assert cost_usd(media, 2, 0, 4096) == pytest.approx(2 * 0.01 + 4.096 * 0.002)
    assert cost_usd(media, 2, 0, 4096, batch=True) == pytest.approx((0.02 + 0.008192) / 2)
    assert parse_since("90m", now=10_000) == 10_000 - 5400
    assert parse_since("7d", now=1e6) == 1e6 - 7 * 86400
    assert parse_since("2026-01-01") == 1767225600.0
    assert parse_since("2026-01-01T01:00:00+01:00") == 1767225600.0
    assert parse_since("1767225600") == 1767225600.0
    with pytest.raises(ValueError):
        parse_since("last tuesday")


def test_unreachable_services_fail_fast_with_a_message(tmp_path):
    from k2serve.platform import open_platform

    with pytest.raises(RuntimeError, match="cannot reach Redis"):
        open_platform(data_dir=str(tmp_path), redis_url="redis://127.0.0.1:1/0")
    with pytest.raises(RuntimeError, match="cannot open the database"):
        open_platform(database_url="postgresql://nobody:secret@127.0.0.1:1/none")
    platform = open_platform(data_dir=str(tmp_path / "ok"))
    try:
        assert (tmp_path / "ok" / "k2serve.db").exists()
        assert "OPEN" in platform.startup_note()
    finally:
        platform.close()
