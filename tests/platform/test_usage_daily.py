"""Usage per day and model (the playground's chart): `GET /v1/usage` for the caller's own
key, `GET /admin/usage/daily` for an admin, over SQLite and PostgreSQL; and the playground's
static files, served without a key."""

from __future__ import annotations

import time

from sqlalchemy import update

from k2serve.platform.keys import KeyStore
from k2serve.platform.ledger import usage_totals
from k2serve.platform.models import UsageEntry
from tests.platform.test_api import MODEL, OTHER, TestClient, completion, make_app

DAY = 86400


def test_own_usage_per_day_and_model(database):
    store = KeyStore(database)
    _, alice = store.create("alice")
    _, bob = store.create("bob")
    app, platform = make_app(database)
    with TestClient(app) as c:
        assert completion(c, key=alice).status_code == 200  # 3 prompt + 4 completion tokens
        assert completion(c, key=alice, model=OTHER).status_code == 200  # 3 + 2
        assert completion(c, key=bob, max_tokens=1).status_code == 200
        # one of alice's rows two days back: a second day on the chart
        platform.writer.flush()
        with database.session() as s, s.begin():
            first = s.scalar(UsageEntry.__table__.select().with_only_columns(UsageEntry.id)
                             .where(UsageEntry.model == OTHER))
            s.execute(update(UsageEntry).where(UsageEntry.id == first)
                      .values(started_at=time.time() - 2 * DAY))
        r = c.get("/v1/usage", headers={"Authorization": f"Bearer {alice}"})
        assert r.status_code == 200
        body = r.json()
        assert body["key"] == "alice"
        today = time.strftime("%Y-%m-%d", time.gmtime())
        before = time.strftime("%Y-%m-%d", time.gmtime(time.time() - 2 * DAY))
        assert [(d["day"], d["model"], d["requests"], d["total_tokens"]) for d in body["data"]] \
            == [(before, OTHER, 1, 5), (today, MODEL, 1, 7)]
        alice_total = usage_totals(database, key_name="alice")["total"]
        assert sum(d["cost_usd"] for d in body["data"]) == alice_total["cost_usd"]
        # since cuts the older day off; a bad since is a 400 naming it
        r = c.get("/v1/usage", params={"since": "1d"}, headers={"Authorization": f"Bearer {alice}"})
        assert [d["model"] for d in r.json()["data"]] == [MODEL]
        r = c.get("/v1/usage", params={"since": "soon"}, headers={"Authorization": f"Bearer {alice}"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "since"
        assert c.get("/v1/usage").status_code == 401


def test_open_mode_usage_is_the_keyless_rows(database):
    app, _ = make_app(database)
    with TestClient(app) as c:
        assert completion(c).status_code == 200
        body = c.get("/v1/usage").json()
        assert body["key"] is None
        assert [(d["model"], d["total_tokens"]) for d in body["data"]] == [(MODEL, 7)]


def test_admin_usage_daily(database):
    store = KeyStore(database)
    _, admin = store.create("root", admin=True)
    _, user = store.create("user")
    app, _ = make_app(database)
    auth = {"Authorization": f"Bearer {admin}"}
    with TestClient(app) as c:
        completion(c, key=user)
        completion(c, key=admin, max_tokens=2)
        r = c.get("/admin/usage/daily", headers=auth)
        assert r.status_code == 200
        assert sorted((d["key"], d["total_tokens"]) for d in r.json()["data"]) == [
            ("root", 5), ("user", 7)]
        r = c.get("/admin/usage/daily", params={"key": "user"}, headers=auth)
        assert [(d["key"], d["model"], d["total_tokens"]) for d in r.json()["data"]] == [
            ("user", MODEL, 7)]
        assert c.get("/admin/usage/daily", params={"key": "x"}, headers=auth).status_code == 404
        r = c.get("/admin/usage/daily", headers={"Authorization": f"Bearer {user}"})
        assert r.status_code == 403 and r.json()["error"]["code"] == "admin_key_required"


def test_playground_is_public_and_strict(database):
    KeyStore(database).create("someone")  # keys exist: the API needs one, the page does not
    app, _ = make_app(database)
    with TestClient(app, follow_redirects=False) as c:
        r = c.get("/playground")
        assert r.status_code == 308 and r.headers["location"] == "/playground/"
        page = c.get("/playground/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "script-src 'self'" in page.headers["content-security-policy"]
        assert '<script type="module" src="js/main.js">' in page.text
        script = c.get("/playground/js/main.js")
        assert script.status_code == 200
        assert script.headers["content-type"].startswith("text/javascript")
        # only the shipped files: no path the client makes up reaches the disk
        for path in ("/playground/../app.py", "/playground/js/nope.js", "/playground/%2e%2e/app.py",
                     "/playground/js/../../routes/playground.py"):
            r = c.get(path)
            assert r.status_code in (401, 404) and "import" not in r.text, path
        assert c.get("/v1/models").status_code == 401
