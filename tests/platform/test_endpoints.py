"""/v1/endpoints and /v1/hardware in-process, over SQLite and PostgreSQL, without Ray: the
manager drives a stand-in cluster that reports what Serve would (the real cluster's tests:
tests/integration/test_ray_endpoints.py). Checks the state machine, owners, validation,
billing of replica time and the server without --ray."""

from __future__ import annotations

import json
import time

import httpx
import pytest
from starlette.testclient import TestClient

from k2serve.app import create_app
from k2serve.platform.endpoint_billing import endpoint_usage_totals
from k2serve.platform.endpoints import EndpointManager
from k2serve.platform.keys import KeyStore
from k2serve.platform.service import Platform
from k2serve.serving.catalog import EMBEDDED_CHAT_MODEL_ID
from k2serve.serving.dedicated_config import (
    DedicatedConfig,
    DedicatedModel,
    Hardware,
    Scaling,
)
from k2serve.serving.registry import ModelRegistry

CONFIG = DedicatedConfig(
    hardware=(Hardware("cpu_2core", num_cpus=2, cents_per_minute=30.0),
              Hardware("1x_nvidia_h100_80gb_sxm", num_cpus=8, num_gpus=1,
                       accelerator_type="H100", gpu_type="h100-80gb", gpu_memory=80,
                       gpu_link="sxm", cents_per_minute=6.0)),
    models=(DedicatedModel(EMBEDDED_CHAT_MODEL_ID, price_input=0.5),),
    scaling=Scaling(meter_interval_s=1.0, start_timeout_s=2.0))


class FakeCluster:
    """Serve as the manager sees it: an application RUNNING with its min replicas once
    deployed, gone once deleted; one CPU node of 4 cores."""

    def __init__(self):
        self.apps: dict[str, dict] = {}
        self.calls: list[tuple] = []
        self.failing: set[str] = set()  # apps whose replica died: Serve replaces it

    def deploy(self, app, model, hardware, scaling, low, high):
        self.calls.append(("deploy", app, low, high))
        self.apps[app] = {"replicas": max(low, 1) if low else 0}

    def delete(self, app):
        self.calls.append(("delete", app))
        self.apps.pop(app, None)

    def app_state(self, app):
        if app not in self.apps:
            return None, {}, ""
        if app in self.failing:
            return "UNHEALTHY", {"STARTING": 1}, "a replica failed its health check"
        return "RUNNING", {"RUNNING": self.apps[app]["replicas"]}, ""

    def handle(self, app):
        raise AssertionError("no request reaches a replica in these tests")

    def availability(self, hardware):
        return "available" if hardware.num_gpus == 0 else "unavailable"


@pytest.fixture()
def served(database):
    registry = ModelRegistry()
    platform = Platform(database)
    cluster = FakeCluster()
    platform.endpoints = EndpointManager(database, cluster, CONFIG, registry)
    platform.endpoints.start()
    keys = KeyStore(database)
    _, owner = keys.create("owner")
    _, other = keys.create("other")
    with TestClient(create_app(registry, platform=platform)) as client:
        client.cluster = cluster
        client.owner = {"authorization": f"Bearer {owner}"}
        client.other = {"authorization": f"Bearer {other}"}
        yield client
    platform.close()


def until(client, endpoint_id, check, timeout=10.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        endpoint = client.get(f"/v1/endpoints/{endpoint_id}", headers=client.owner).json()
        if check(endpoint):
            return endpoint
        time.sleep(0.1)
    raise AssertionError(f"not reached within {timeout} s: {endpoint}")


def test_lifecycle_owners_and_billing(served, database):
    body = {"model": EMBEDDED_CHAT_MODEL_ID, "hardware": "cpu_2core",
            "autoscaling": {"min_replicas": 2, "max_replicas": 4}}
    created = served.post("/v1/endpoints", json=body, headers=served.owner)
    assert created.status_code == 200, created.text
    endpoint = created.json()
    assert {k: endpoint[k] for k in ("object", "type", "owner", "state", "hardware")} == {
        "object": "endpoint", "type": "dedicated", "owner": "owner", "state": "PENDING",
        "hardware": "cpu_2core"}
    eid, name = endpoint["id"], endpoint["name"]
    assert until(served, eid, lambda e: e["state"] == "STARTED")["replicas"] == 2
    listed = served.get("/v1/endpoints", headers=served.owner).json()
    assert listed["object"] == "list" and [e["id"] for e in listed["data"]] == [eid]
    assert set(listed["data"][0]) == {"object", "id", "name", "model", "type", "owner",
                                      "state", "created_at"}  # Together's ListEndpoint
    assert served.get("/v1/endpoints", headers=served.other).json()["data"] == []
    assert served.get(f"/v1/endpoints/{eid}", headers=served.other).status_code == 404
    assert served.delete(f"/v1/endpoints/{eid}", headers=served.other).status_code == 404
    models = {m["id"]: m for m in served.get("/v1/models", headers=served.owner).json()}
    assert models[name]["pricing"]["input"] == 0.5  # the file's token price, on top

    patched = served.patch(f"/v1/endpoints/{eid}", headers=served.owner,
                           json={"autoscaling": {"max_replicas": 6}, "display_name": "big"})
    assert patched.json()["autoscaling"] == {"min_replicas": 2, "max_replicas": 6}
    assert patched.json()["display_name"] == "big"
    until(served, eid, lambda e: ("deploy", eid, 2, 6) in served.cluster.calls)

    served.patch(f"/v1/endpoints/{eid}", headers=served.owner, json={"state": "STOPPED"})
    until(served, eid, lambda e: e["state"] == "STOPPED")
    refused = served.post("/v1/chat/completions", headers=served.owner, json={
        "model": name, "messages": [{"role": "user", "content": "hi"}]})
    assert refused.status_code == 400 and "STOPPED" in refused.json()["error"]["message"]
    assert refused.json()["error"]["code"] == "endpoint_not_running"
    assert name not in [m["id"] for m in served.get("/v1/models", headers=served.owner).json()]

    # Two replicas ran for about the time it was STARTED, at 30 cents a minute.
    rows = endpoint_usage_totals(database)
    assert [(r["endpoint_id"], r["key"]) for r in rows] == [(eid, "owner")]
    assert rows[0]["replica_minutes"] > 0
    assert rows[0]["cost_usd"] == pytest.approx(rows[0]["replica_minutes"] * 0.30, rel=1e-3)
    spent = next(k for k in KeyStore(database).list() if k.name == "owner").spent_usd
    assert spent == pytest.approx(rows[0]["cost_usd"], rel=1e-6)

    assert served.delete(f"/v1/endpoints/{eid}", headers=served.owner).status_code == 204
    assert served.get(f"/v1/endpoints/{eid}", headers=served.owner).status_code == 404
    assert served.get("/v1/endpoints", headers=served.owner).json()["data"] == []


def test_a_replica_being_replaced_is_not_an_error_until_start_timeout(served):
    """Serve reports UNHEALTHY with no replica running while it replaces a dead one: the
    endpoint stays STARTED (requests wait for the replacement) for start_timeout_s (2 s
    here), then turns ERROR, and back to STARTED when Serve runs it again."""
    created = served.post("/v1/endpoints", headers=served.owner, json={
        "model": EMBEDDED_CHAT_MODEL_ID, "hardware": "cpu_2core",
        "autoscaling": {"min_replicas": 1, "max_replicas": 1}}).json()
    eid = created["id"]
    until(served, eid, lambda e: e["state"] == "STARTED")
    served.cluster.failing.add(eid)
    until(served, eid, lambda e: e["replicas"] == 0)
    assert until(served, eid, lambda e: True)["state"] == "STARTED"
    failed = until(served, eid, lambda e: e["state"] == "ERROR", timeout=10)
    assert failed["error"] == "a replica failed its health check"
    served.cluster.failing.discard(eid)
    back = until(served, eid, lambda e: e["state"] == "STARTED")
    assert back["replicas"] == 1 and not back.get("error")


def test_hardware_and_validation(served):
    hardware = served.get("/v1/hardware", headers=served.owner).json()["data"]
    assert [h["id"] for h in hardware] == ["cpu_2core"]  # no node holds an H100
    assert hardware[0]["pricing"] == {"cents_per_minute": 30.0}
    by_model = served.get("/v1/hardware", params={"model": EMBEDDED_CHAT_MODEL_ID},
                          headers=served.owner).json()["data"]
    assert {h["id"]: h["availability"]["status"] for h in by_model} == {
        "cpu_2core": "available", "1x_nvidia_h100_80gb_sxm": "unavailable"}
    base = {"model": EMBEDDED_CHAT_MODEL_ID, "hardware": "cpu_2core",
            "autoscaling": {"min_replicas": 1, "max_replicas": 2}}
    for change, param in (({"model": "no/such"}, "model"), ({"hardware": "x"}, "hardware"),
                          ({"autoscaling": {"min_replicas": 1}}, "autoscaling.max_replicas"),
                          ({"autoscaling": {"min_replicas": 0, "max_replicas": 0}},
                           "autoscaling.max_replicas"),
                          ({"state": "RUNNING"}, "state"),
                          ({"inactive_timeout": "soon"}, "inactive_timeout")):
        reply = served.post("/v1/endpoints", json={**base, **change}, headers=served.owner)
        assert reply.status_code == 400, (change, reply.text)
        assert reply.json()["error"]["param"] == param
    assert served.post("/v1/endpoints", content=b"[1]", headers=served.owner).status_code == 400
    assert served.patch("/v1/endpoints/endpoint-x", json={},
                        headers=served.owner).status_code == 404


def test_without_ray_the_api_says_how_to_enable_it(database):
    platform = Platform(database)
    with TestClient(create_app(ModelRegistry(), platform=platform),
                    base_url="http://127.0.0.1") as client:  # open mode: loopback only
        assert client.get("/v1/endpoints").json() == {"object": "list", "data": []}
        assert client.get("/v1/hardware").json() == {"object": "list", "data": []}
        reply = client.post("/v1/endpoints", json={"model": "m", "hardware": "h"})
        assert reply.status_code == 400 and "--ray" in reply.json()["error"]["message"]
    platform.close()


def test_cli_endpoints_and_hardware_commands(database, capsys):
    """`k2serve endpoints ...` and `k2serve hardware` against a live server."""
    from k2serve.cli import main
    from tests.platform.conftest import live_server

    registry = ModelRegistry()
    platform = Platform(database)
    platform.endpoints = EndpointManager(database, FakeCluster(), CONFIG, registry)
    platform.endpoints.start()
    _, key = KeyStore(database).create("cli")
    with live_server(create_app(registry, platform=platform)) as url:
        common = ["--url", url, "--api-key", key]

        def run(*argv):
            code = main(list(argv) + common)
            return code, capsys.readouterr().out

        code, out = run("hardware")
        assert code == 0 and "cpu_2core" in out and "30" in out
        code, out = run("endpoints", "create", "--model", EMBEDDED_CHAT_MODEL_ID,
                        "--hardware", "cpu_2core", "--min-replicas", "1", "--max-replicas",
                        "3", "--no-start", "--json")
        created = json.loads(out)
        assert code == 0 and created["state"] == "STOPPED"
        eid = created["id"]
        code, out = run("endpoints", "list")
        assert code == 0 and eid in out and "STOPPED" in out
        code, out = run("endpoints", "update", eid, "--max-replicas", "5")
        assert code == 0 and "1..5" in out
        # the stand-in cluster may finish a transition before the command prints it
        code, out = run("endpoints", "start", eid)
        assert code == 0 and ("STARTING" in out or "STARTED" in out)
        code, out = run("endpoints", "stop", eid)
        assert code == 0 and ("STOPPING" in out or "STOPPED" in out)
        code, out = run("endpoints", "get", eid)
        assert code == 0 and eid in out
        assert run("endpoints", "delete", eid)[0] == 0
        with pytest.raises(SystemExit) as exit:  # a 404, said on stderr
            run("endpoints", "get", eid)
        assert exit.value.code == 1 and "404" in capsys.readouterr().err
    platform.close()


def test_together_3x_sdk_over_the_same_endpoints(served):
    """together 3.x's `client.endpoints.*` (/v2/projects/{project_id}/endpoints) on the same
    manager: one deployment per endpoint, PROVISIONING -> READY, trafficSplit [] stops it."""
    together = pytest.importorskip("together")
    if not hasattr(together.Together(api_key="x"), "project_id"):
        pytest.skip("the installed together SDK predates 3.x")

    class InProcess(httpx.BaseTransport):  # the SDK wants a plain httpx.Client
        def handle_request(self, request):
            reply = served.request(request.method, str(request.url), content=request.read(),
                                   headers=dict(request.headers))
            return httpx.Response(reply.status_code, content=reply.content,
                                  headers={"content-type": reply.headers.get(
                                      "content-type", "application/json")})

    http = httpx.Client(transport=InProcess(), base_url="http://testserver")

    def sdk(headers):
        return together.Together(api_key=headers["authorization"][7:], project_id="p-1",
                                 base_url="http://testserver", http_client=http,
                                 max_retries=0)

    owner, other = sdk(served.owner), sdk(served.other)
    made = owner.endpoints.create(name="p-1/smol", extra_body={
        "model": EMBEDDED_CHAT_MODEL_ID, "hardware": "cpu_2core",
        "autoscaling": {"min_replicas": 2, "max_replicas": 4}})
    assert made.project_id == "p-1" and made.deployments[0].state == \
        "DEPLOYMENT_STATE_PROVISIONING"
    until(served, made.id, lambda e: e["state"] == "STARTED")
    ready = owner.endpoints.retrieve(made.id)
    (deployment,) = ready.deployments
    assert deployment.state == "DEPLOYMENT_STATE_READY" and deployment.ready_replicas == 2
    assert [(s.deployment_id, s.weight) for s in ready.traffic_split] == [(made.id, 1.0)]
    assert [e.id for e in owner.endpoints.list()] == [made.id]
    assert list(other.endpoints.list()) == []
    with pytest.raises(together.NotFoundError):
        other.endpoints.delete(made.id)
    stopped = owner.endpoints.update(made.id, traffic_split=[], etag=ready.etag)
    assert stopped.deployments[0].state == "DEPLOYMENT_STATE_STOPPING"
    until(served, made.id, lambda e: e["state"] == "STOPPED")
    assert ("delete", made.id) in served.cluster.calls
    with pytest.raises(together.ConflictError):
        owner.endpoints.delete(made.id, etag=ready.etag)
    owner.endpoints.delete(made.id)
    assert served.get(f"/v1/endpoints/{made.id}", headers=served.owner).status_code == 404
    types = owner.endpoints.hardware.list().data
    assert [(t.id, t.gpu_count, t.price_cents_per_hour) for t in types] == [
        ("cpu_2core", 0, 1800)]
