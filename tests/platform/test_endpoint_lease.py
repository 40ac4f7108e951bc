"""Several servers on one database (k2serve.platform.lease): one endpoint manager acts on
the cluster and bills replica time, the others follow the rows and route; when the holder
dies another takes over within the lease and billing goes on, never counting time twice.
Over SQLite and PostgreSQL, with the stand-in cluster of test_endpoints."""

from __future__ import annotations

import dataclasses
import time

import pytest
from sqlalchemy import select
from starlette.testclient import TestClient

from k2serve.app import create_app
from k2serve.platform.endpoints import EndpointManager
from k2serve.platform.keys import KeyStore
from k2serve.platform.models import EndpointUsageRow
from k2serve.platform.service import Platform
from k2serve.serving.catalog import EMBEDDED_CHAT_MODEL_ID
from k2serve.serving.registry import ModelRegistry
from tests.platform.test_endpoints import CONFIG, FakeCluster

LEASE_S = 1.2  # ticks every 0.4 s
SCALING = dataclasses.replace(CONFIG.scaling, meter_interval_s=0.5, lease_s=LEASE_S)
LEASED = dataclasses.replace(CONFIG, scaling=SCALING)
BODY = {"model": EMBEDDED_CHAT_MODEL_ID, "hardware": "cpu_2core",
        "autoscaling": {"min_replicas": 2, "max_replicas": 2}}


@pytest.fixture(autouse=True, scope="module")
def tokenizer_loaded():
    """Load the model's tokenizer before the servers start: a first load takes seconds on
    the manager thread, longer than these tests' 1.2 s lease."""
    from k2serve.platform import endpoints
    from k2serve.serving.ray_backend import load_endpoint_backend

    load_endpoint_backend("warm", LEASED.models[0], FakeCluster(), "warm", SCALING,
                          endpoints._TOKENIZERS)


class TimedCluster(FakeCluster):
    """The stand-in cluster, noting when each call came (replica time is known exactly)."""

    def __init__(self):
        super().__init__()
        self.at: list[tuple[float, tuple]] = []

    def deploy(self, app, model, hardware, scaling, low, high):
        super().deploy(app, model, hardware, scaling, low, high)
        self.at.append((time.time(), self.calls[-1]))

    def delete(self, app):
        super().delete(app)
        self.at.append((time.time(), self.calls[-1]))

    def replica_seconds(self) -> float:
        """Two replicas from the first deploy to the delete."""
        deployed = next(t for t, call in self.at if call[0] == "deploy")
        deleted = next(t for t, call in self.at if call[0] == "delete")
        return 2 * (deleted - deployed)


def server(database, cluster) -> EndpointManager:
    manager = EndpointManager(database, cluster, LEASED, ModelRegistry())
    manager.start()
    return manager


def kill(manager: EndpointManager) -> None:
    """The server's process dies: no last bill, no release of the lease."""
    manager._stop.set()
    manager._ops.put(None)
    manager._thread.join(5)


def wait(check, timeout=8.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if check():
            return time.time()
        time.sleep(0.05)
    raise AssertionError(f"not reached within {timeout} s")


def usage(database) -> list[EndpointUsageRow]:
    with database.session() as session:
        return list(session.scalars(select(EndpointUsageRow)
                                    .order_by(EndpointUsageRow.started_at)))


def assert_no_overlap(rows) -> None:
    """Every interval billed starts where (or after) the one before ended."""
    for before, after in zip(rows, rows[1:]):
        assert after.started_at >= before.ended_at - 1e-6, (before.ended_at, after.started_at)


def test_one_server_acts_and_bills_the_other_routes(database):
    cluster = TimedCluster()
    holder = server(database, cluster)
    wait(lambda: holder.is_holder)
    registry = ModelRegistry()
    platform = Platform(database)
    platform.endpoints = follower = EndpointManager(database, cluster, LEASED, registry)
    follower.start()
    _, secret = KeyStore(database).create("owner")
    auth = {"authorization": f"Bearer {secret}"}
    try:
        with TestClient(create_app(registry, platform=platform)) as client:
            # Created through the server that does not act: the holder deploys it.
            created = client.post("/v1/endpoints", json=BODY, headers=auth)
            assert created.status_code == 200, created.text
            eid, name = created.json()["id"], created.json()["name"]
            wait(lambda: client.get(f"/v1/endpoints/{eid}", headers=auth).json()["state"]
                 == "STARTED")
            # The follower reads the state at its next tick and lists it.
            wait(lambda: name in [m["id"] for m in
                                  client.get("/v1/models", headers=auth).json()], 2.0)
            assert holder.get(None, eid)["replicas"] == 2  # the holder says what runs
            time.sleep(2.0)
            client.patch(f"/v1/endpoints/{eid}", json={"state": "STOPPED"}, headers=auth)
            wait(lambda: client.get(f"/v1/endpoints/{eid}", headers=auth).json()["state"]
                 == "STOPPED")
            wait(lambda: registry.get(name).backend.state == "STOPPED", 2.0)
            refused = client.post("/v1/chat/completions", headers=auth, json={
                "model": name, "messages": [{"role": "user", "content": "hi"}]})
            assert refused.status_code == 400
            assert refused.json()["error"]["code"] == "endpoint_not_running"
            assert name not in [m["id"] for m in
                                client.get("/v1/models", headers=auth).json()]
            assert client.delete(f"/v1/endpoints/{eid}", headers=auth).status_code == 204
            wait(lambda: holder.registry.get(name) is None and registry.get(name) is None)
    finally:
        platform.close()
        holder.close()
    assert not follower.is_holder
    # One deploy and one delete reached the cluster: nobody else acted on it.
    assert cluster.calls == [("deploy", eid, 2, 2), ("delete", eid)]
    rows = usage(database)
    billed = sum(r.replica_seconds for r in rows)
    expected = cluster.replica_seconds()  # about 2 x 2.x s: once, not twice
    assert expected > 4.0
    assert billed == pytest.approx(expected, abs=2 * 0.4 + 0.2)
    assert_no_overlap(rows)
    spent = next(k for k in KeyStore(database).list() if k.name == "owner").spent_usd
    assert spent == pytest.approx(billed / 60 * 0.30, rel=1e-6)


def test_a_dead_holder_is_replaced_and_billing_goes_on_once(database):
    cluster = TimedCluster()
    first = server(database, cluster)
    wait(lambda: first.is_holder)
    second = server(database, cluster)
    eid = first.create(None, BODY)["id"]
    wait(lambda: first.get(None, eid)["state"] == "STARTED")
    time.sleep(1.5)  # a few bills
    killed_at = time.time()
    kill(first)
    took_at = wait(lambda: second.is_holder)
    assert took_at - killed_at <= LEASE_S + 2 * second.tick_s + 0.3
    time.sleep(1.0)
    # A third server stands by; the second shuts down cleanly: the third acts at its next
    # tick, without waiting for the lease to expire, and loses nothing.
    third = server(database, cluster)
    time.sleep(0.5)
    assert not third.is_holder
    handed_at = time.time()
    second.close()
    took_at = wait(lambda: third.is_holder)
    assert took_at - handed_at <= 2 * third.tick_s + 0.3
    time.sleep(1.0)
    third.update(None, eid, {"state": "STOPPED"})
    wait(lambda: third.get(None, eid)["state"] == "STOPPED")
    third.close()

    rows = usage(database)
    assert_no_overlap(rows)  # never the same second twice
    billed = sum(r.replica_seconds for r in rows)
    expected = cluster.replica_seconds()
    # What the dead holder metered and had not yet billed is lost: at most a meter
    # interval and a tick of its two replicas. Nothing else is.
    lost_at_most = 2 * (SCALING.meter_interval_s + first.tick_s)
    assert expected - lost_at_most - 0.3 <= billed <= expected + 0.3
    assert [c[0] for c in cluster.calls].count("delete") == 1


def test_requests_on_another_server_keep_an_endpoint_awake_and_wake_it(database):
    """inactive_timeout counts requests served by any server: the holder sees them in the
    endpoint's row (each server writes its last request at most once a tick)."""
    config = dataclasses.replace(LEASED, scaling=dataclasses.replace(
        SCALING, inactive_unit_s=1.0))  # inactive_timeout 1: one second
    cluster = TimedCluster()
    holder = EndpointManager(database, cluster, config, ModelRegistry())
    holder.start()
    wait(lambda: holder.is_holder)
    registry = ModelRegistry()
    follower = EndpointManager(database, cluster, config, registry)
    follower.start()
    try:
        eid = follower.create(None, {**BODY, "inactive_timeout": 1, "autoscaling": {
            "min_replicas": 1, "max_replicas": 1}})["id"]
        wait(lambda: holder.get(None, eid)["state"] == "STARTED")
        backend = registry.get(eid).backend
        backend.in_flight = 1  # what RayEndpointBackend counts while a request runs there
        time.sleep(2.5)
        assert ("deploy", eid, 0, 1) not in cluster.calls  # busy elsewhere: stays up
        backend.in_flight, backend.last_request_at = 0, time.time()
        wait(lambda: ("deploy", eid, 0, 1) in cluster.calls, 4.0)  # idle: scaled to zero
        time.sleep(0.5)
        backend.last_request_at = time.time()  # a request arrives at the follower
        wait(lambda: cluster.calls[-1] == ("deploy", eid, 1, 1), 3.0)  # woken
        wait(lambda: holder.get(None, eid)["replicas"] == 1, 2.0)
    finally:
        follower.close()
        holder.close()


def test_an_endpoint_deleted_while_the_holder_is_dead_is_removed_by_its_successor(database):
    cluster = TimedCluster()
    first = server(database, cluster)
    wait(lambda: first.is_holder)
    second = server(database, cluster)
    try:
        eid = first.create(None, BODY)["id"]
        wait(lambda: first.get(None, eid)["state"] == "STARTED")
        kill(first)
        second.delete(None, eid)  # through the server that does not act (yet)
        wait(lambda: second.registry.get(eid) is None, 2.0)  # forgotten there
        wait(lambda: second.is_holder)
        wait(lambda: eid not in cluster.apps, 2.0)
        assert cluster.calls[-1] == ("delete", eid)
    finally:
        second.close()
