"""Dedicated endpoints on a real local Ray cluster (CPU only, 2 CPUs, a 256 MB object store):
a `k2serve serve --ray` process starts the cluster and deploys the embedded model as Ray
Serve applications; the tests use only its HTTP API, the `together` 2.x SDK and
`k2serve usage`, as an operator and a client would. One server (one cluster) for the module.

Ray's delays are shortened by the endpoints file (upscale 1 s, downscale 4 s, billing every
3 s, one `inactive_timeout` minute = 1 s), so scaling is seen in seconds.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.compat.test_official_sdks import SDK2_PATH
from tests.conftest import EMBEDDED_ID, start_server, stop_server
from tests.integration.endpoint_waits import wait_for

pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install 'k2serve[ray]')")

ENDPOINTS_FILE = """
[scaling]
target_ongoing_requests = 1
max_ongoing_requests = 4
upscale_delay_s = 1
downscale_delay_s = 4
metrics_interval_s = 0.5
look_back_period_s = 2
start_timeout_s = 90
meter_interval_s = 3
inactive_unit_s = 1

[[hardware]]
id = "cpu_half"
num_cpus = 0.5
cents_per_minute = 60.0

[[hardware]]
id = "1x_nvidia_h100_80gb_sxm"
num_cpus = 8
num_gpus = 1
accelerator_type = "H100"
gpu_type = "h100-80gb"
gpu_memory = 80
gpu_link = "sxm"
cents_per_minute = 6.0
"""
CHAT = [{"role": "user", "content": "Tell me a long story about a horse."}]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    home = tmp_path_factory.mktemp("ray-home")
    config = home / "endpoints.toml"
    config.write_text(ENDPOINTS_FILE)
    keys = {}
    for name, admin in (("owner", True), ("other", False)):
        out = subprocess.run([sys.executable, "-m", "k2serve.cli", "keys", "create", "--name",
                              name, *(["--admin"] if admin else []), "--data-dir", str(home)],
                             capture_output=True, text=True, check=True)
        keys[name] = out.stdout.strip().splitlines()[-1]
    server = start_server("--families", "", "--ray", "--ray-num-cpus", "2",
                          "--endpoints-file", str(config), "--data-dir", str(home),
                          startup_timeout=300,
                          # PyTorch's kernels in the replicas: each Ray worker would otherwise
                          # wait on (or redo) the native build that other processes share;
                          # what is tested here is Ray's orchestration, not the kernels.
                          env={"OMP_NUM_THREADS": "1", "K2SERVE_NATIVE": "0"})
    server.home, server.keys = home, keys
    yield server
    with httpx.Client(base_url=server.root, timeout=60,
                      headers={"authorization": f"Bearer {keys['owner']}"}) as http:
        for endpoint in http.get("/v1/endpoints").json()["data"]:  # replicas go with Ray
            http.delete(f"/v1/endpoints/{endpoint['id']}")
    stop_server(server)


@pytest.fixture()
def http(cluster):
    with httpx.Client(base_url=cluster.root, timeout=120,
                      headers={"authorization": f"Bearer {cluster.keys['owner']}"}) as client:
        yield client


def chat(http: httpx.Client, model: str, **extra) -> httpx.Response:
    return http.post("/v1/chat/completions", json={"model": model, "messages": CHAT,
                                                    "max_tokens": 8, **extra})


def replica_pids(endpoint_id: str) -> list[int]:
    """The replica actors' processes (Ray titles them `ray::ServeReplica:<app>:...`)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if f"ServeReplica:{endpoint_id}:" in cmdline:
            pids.append(int(proc.name))
    return pids


def test_hardware_is_what_the_cluster_can_place(http):
    listed = http.get("/v1/hardware").json()
    assert listed["object"] == "list"
    assert [h["id"] for h in listed["data"]] == ["cpu_half"]  # no GPU node: no H100 listed
    cpu = listed["data"][0]
    assert cpu["object"] == "hardware" and cpu["pricing"] == {"cents_per_minute": 60.0}
    assert cpu["specs"]["gpu_count"] == 0 and "availability" not in cpu
    for_model = http.get("/v1/hardware", params={"model": EMBEDDED_ID}).json()["data"]
    assert {h["id"]: h["availability"]["status"] for h in for_model} == {
        "cpu_half": "available", "1x_nvidia_h100_80gb_sxm": "unavailable"}


def test_bad_requests_are_4xx_naming_the_field(http):
    base = {"model": EMBEDDED_ID, "hardware": "cpu_half",
            "autoscaling": {"min_replicas": 1, "max_replicas": 1}}
    for change, param in (({"model": "no/such"}, "model"), ({"hardware": "tpu"}, "hardware"),
                          ({"autoscaling": {"min_replicas": 3, "max_replicas": 1}},
                           "autoscaling.min_replicas"),
                          ({"autoscaling": None}, "autoscaling"),
                          ({"inactive_timeout": -1}, "inactive_timeout")):
        reply = http.post("/v1/endpoints", json={**base, **change})
        assert reply.status_code == 400, reply.text
        assert reply.json()["error"]["param"] == param
    assert http.get("/v1/endpoints/endpoint-nope").status_code == 404
    assert http.post("/v1/endpoints", content=b"{").status_code == 400


SDK2_SCRIPT = textwrap.dedent("""
    import json, sys
    import together
    assert together.__version__.startswith("2."), together.__version__
    client = together.Together(base_url=sys.argv[1], api_key=sys.argv[2], max_retries=0)
    hardware = client.endpoints.list_hardware()
    created = client.endpoints.create(model=sys.argv[3], hardware="cpu_half",
                                      autoscaling={"min_replicas": 1, "max_replicas": 2},
                                      display_name="sdk", state="STOPPED")
    got = client.endpoints.retrieve(created.id)
    updated = client.endpoints.update(created.id, display_name="renamed",
                                      autoscaling={"min_replicas": 1, "max_replicas": 3})
    listed = client.endpoints.list()
    client.endpoints.delete(created.id)
    after = client.endpoints.list()
    print(json.dumps({"hardware": [h.id for h in hardware.data], "state": got.state,
                      "name": got.name, "display": updated.display_name,
                      "max": updated.autoscaling.max_replicas,
                      "listed": [e.id for e in listed.data], "id": created.id,
                      "after": [e.id for e in after.data]}))
""")


def test_together_sdk_endpoints_calls(cluster):
    if not (SDK2_PATH / "together").is_dir():
        pytest.fail(f"together 2.x side copy missing: run scripts/install-sdk-2x ({SDK2_PATH})")
    env = dict(os.environ, PYTHONPATH=str(SDK2_PATH))
    out = subprocess.run([sys.executable, "-c", SDK2_SCRIPT, cluster.base_v1,
                          cluster.keys["owner"], EMBEDDED_ID], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["hardware"] == ["cpu_half"]
    assert result["state"] == "STOPPED" and result["name"].startswith("owner/")
    assert result["display"] == "renamed" and result["max"] == 3
    assert result["id"] in result["listed"] and result["id"] not in result["after"]



def test_together_3x_sdk_v2_endpoint_calls(cluster):
    """together 3.x's `client.endpoints.*` (/v2/projects/{project_id}/endpoints): stopped
    endpoints, so no replica starts; the project id is echoed, the key decides who sees what."""
    together = pytest.importorskip("together")
    if not hasattr(together.Together(api_key="x", base_url=cluster.root), "project_id"):
        pytest.skip("the installed together SDK predates 3.x")
    owner = together.Together(api_key=cluster.keys["owner"], base_url=cluster.root,
                              project_id="proj-demo")
    other = together.Together(api_key=cluster.keys["other"], base_url=cluster.root,
                              project_id="proj-demo")
    with pytest.raises(together.BadRequestError, match="'model' and 'hardware'"):
        owner.endpoints.create(name="nomodel")
    assert [h.id for h in owner.endpoints.hardware.list().data] == ["cpu_half"]
    assert owner.endpoints.hardware.retrieve("cpu_half").price_cents_per_hour == 3600
    made = [owner.endpoints.create(
        name=f"v2-{i}", extra_body={"model": EMBEDDED_ID, "hardware": "cpu_half",
                                    "state": "STOPPED"}) for i in range(3)]
    first = made[0]
    assert first.project_id == "proj-demo" and first.name.startswith("owner/")
    assert first.deployments[0].state == "DEPLOYMENT_STATE_STOPPED"
    assert first.deployments[0].api_model_id == EMBEDDED_ID and first.traffic_split == []
    listed = [e.id for e in owner.endpoints.list(limit=1)]  # auto-pages over cursors
    assert [e.id for e in made] == [i for i in listed if i in {e.id for e in made}]
    assert len(listed) == len(set(listed))
    assert not [e for e in other.endpoints.list() if e.id in listed]
    with pytest.raises(together.NotFoundError):
        other.endpoints.retrieve(first.id)
    renamed = owner.endpoints.update(first.id, name="renamed", etag=first.etag)
    assert renamed.etag != first.etag and owner.endpoints.retrieve(first.id).etag == \
        renamed.etag
    with pytest.raises(together.ConflictError):
        owner.endpoints.update(first.id, name="again", etag=first.etag)
    with pytest.raises(together.BadRequestError, match="traffic_split"):
        owner.endpoints.update(first.id, traffic_split=[{"deployment_id": "x", "weight": 1}])
    for endpoint in made:
        owner.endpoints.delete(endpoint.id)
    with pytest.raises(together.NotFoundError):
        owner.endpoints.retrieve(first.id)
    assert http_get_v1(cluster, first.id).status_code == 404  # the same store as /v1


def http_get_v1(cluster, endpoint_id: str) -> httpx.Response:
    return httpx.get(f"{cluster.root}/v1/endpoints/{endpoint_id}", timeout=30,
                     headers={"authorization": f"Bearer {cluster.keys['owner']}"})

# -- one endpoint's life, in order (each test continues from the state the previous left:
# replicas take ~15 s each to start here, so the module starts as few as it can) -----------
@pytest.fixture(scope="module")
def endpoint(cluster):
    with httpx.Client(base_url=cluster.root, timeout=60,
                      headers={"authorization": f"Bearer {cluster.keys['owner']}"}) as http:
        created = http.post("/v1/endpoints", json={
            "model": EMBEDDED_ID, "hardware": "cpu_half", "display_name": "smol",
            "autoscaling": {"min_replicas": 1, "max_replicas": 3}})
        assert created.status_code == 200, created.text
        yield created.json()
        http.delete(f"/v1/endpoints/{created.json()['id']}")


def test_create_starts_and_serves_by_name(http, cluster, endpoint):
    assert endpoint["state"] in ("PENDING", "STARTING") and endpoint["type"] == "dedicated"
    assert endpoint["autoscaling"] == {"min_replicas": 1, "max_replicas": 3}
    assert endpoint["owner"] == "owner" and endpoint["display_name"] == "smol"
    assert endpoint["name"].startswith(f"owner/{EMBEDDED_ID}-")
    eid, name = endpoint["id"], endpoint["name"]
    wait_for(http, eid, lambda e: e["state"] == "STARTED", "STARTED")
    # Served by its name (and its id), listed in /v1/models; another key cannot see it.
    reply = chat(http, name)
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["message"]["content"]
    assert chat(http, eid).status_code == 200
    assert name in [m["id"] for m in http.get("/v1/models").json()]
    other = {"authorization": f"Bearer {cluster.keys['other']}"}
    assert http.get(f"/v1/endpoints/{eid}", headers=other).status_code == 404
    assert http.get("/v1/endpoints", headers=other).json()["data"] == []
    assert http.post("/v1/chat/completions", headers=other, json={
        "model": name, "messages": CHAT, "max_tokens": 4}).status_code == 200  # any key


def test_load_scales_to_max_and_idle_back_to_min(http, cluster, endpoint):
    eid, name = endpoint["id"], endpoint["name"]
    wait_for(http, eid, lambda e: e["state"] == "STARTED", "STARTED")  # created PENDING: 400s
    scaled = threading.Event()

    def stream_until_scaled(_):
        """One request ongoing per worker (target: one per replica -> 3 replicas) until the
        endpoint runs 3 replicas, however fast a replica answers: (status, completion
        tokens) of each stream."""
        results = []
        with httpx.Client(base_url=cluster.root, timeout=300, headers=http.headers) as c:
            while not results or not scaled.is_set():
                with c.stream("POST", "/v1/chat/completions", json={
                        "model": name, "messages": CHAT, "max_tokens": 120, "stream": True,
                        "ignore_eos": True, "stream_options": {"include_usage": True}}) as r:
                    chunks = [json.loads(line[6:]) for line in r.iter_lines()
                              if line.startswith("data: {")]
                    usage = [chunk["usage"] for chunk in chunks if chunk.get("usage")]
                    results.append((r.status_code, usage[-1]["completion_tokens"] if usage else None))
        return results

    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        futures = [pool.submit(stream_until_scaled, i) for i in range(12)]
        try:
            wait_for(http, eid, lambda e: e["replicas"] == 3, "scaled to 3", timeout=120)
        finally:
            scaled.set()
        results = [result for f in futures for result in f.result(timeout=300)]
    assert all(result == (200, 120) for result in results), results  # every stream whole
    wait_for(http, eid, lambda e: e["replicas"] == 1, "scaled back to 1", timeout=90)


def test_patch_changes_limits_live(http, endpoint):
    eid = endpoint["id"]
    patched = http.patch(f"/v1/endpoints/{eid}", json={"autoscaling": {"min_replicas": 2,
                                                                       "max_replicas": 3}})
    assert patched.json()["autoscaling"] == {"min_replicas": 2, "max_replicas": 3}
    assert patched.json()["state"] == "STARTED"  # no restart
    wait_for(http, eid, lambda e: e["replicas"] == 2, "scaled to the new min 2", timeout=90)


def test_a_killed_replica_is_replaced_and_nothing_hangs(http, cluster, endpoint):
    eid, name = endpoint["id"], endpoint["name"]
    body = {"model": name, "messages": CHAT, "max_tokens": 80, "ignore_eos": True}

    def whole(_):
        with httpx.Client(base_url=cluster.root, timeout=180, headers=http.headers) as c:
            r = c.post("/v1/chat/completions", json=body)
            return r.status_code, r.json()

    def streamed(_):
        with httpx.Client(base_url=cluster.root, timeout=180, headers=http.headers) as c:
            with c.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
                events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
                return r.status_code, events

    victim = replica_pids(eid)[0]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        wholes = [pool.submit(whole, i) for i in range(4)]
        streams = [pool.submit(streamed, i) for i in range(4)]
        time.sleep(3)  # all eight generating on the two replicas
        os.kill(victim, signal.SIGKILL)
        whole_results = [f.result(timeout=240) for f in wholes]  # nothing hangs
        stream_results = [f.result(timeout=240) for f in streams]
    for status, reply in whole_results:  # retried once on another replica, unseen
        assert status == 200, reply
        assert reply["usage"]["completion_tokens"] == 80
    broken = []
    for status, events in stream_results:
        assert status == 200
        if events[-1] != "[DONE]" or any('"error"' in e for e in events):
            error = json.loads(next(e for e in events if '"error"' in e))["error"]
            assert error["code"] == "replica_failed" and "replica" in error["message"]
            broken.append(error)
    assert broken, "the killed replica was serving none of the streams"
    # Ray replaces the replica.
    wait_for(http, eid, lambda e: e["replicas"] >= 2 and victim not in replica_pids(eid),
             "replaced the killed replica", timeout=120)
    assert chat(http, name).status_code == 200


def test_stop_refuses_naming_the_state_then_start(http, endpoint):
    eid, name = endpoint["id"], endpoint["name"]
    stopping = http.patch(f"/v1/endpoints/{eid}", json={"state": "STOPPED"}).json()
    assert stopping["state"] in ("STOPPING", "STOPPED")
    wait_for(http, eid, lambda e: e["state"] == "STOPPED", "STOPPED", timeout=60)
    refused = chat(http, name)
    assert refused.status_code == 400
    assert refused.json()["error"]["code"] == "endpoint_not_running"
    assert "STOPPED" in refused.json()["error"]["message"]
    assert name not in [m["id"] for m in http.get("/v1/models").json()]
    gone_by = time.time() + 30
    while replica_pids(eid) and time.time() < gone_by:
        time.sleep(0.5)
    assert replica_pids(eid) == []

    started = http.patch(f"/v1/endpoints/{eid}", json={
        "state": "STARTED", "autoscaling": {"min_replicas": 1, "max_replicas": 1}}).json()
    assert started["state"] == "STARTING"
    wait_for(http, eid, lambda e: e["state"] == "STARTED", "STARTED again")
    assert chat(http, name).status_code == 200


def test_scale_to_zero_after_inactive_timeout_and_wake(http, endpoint):
    eid, name = endpoint["id"], endpoint["name"]
    http.patch(f"/v1/endpoints/{eid}", json={"inactive_timeout": 3})
    # 3 "minutes" (3 s here) without a request: no replica runs, it stays STARTED.
    idle = wait_for(http, eid, lambda e: e["replicas"] == 0, "scaled to zero", timeout=90)
    assert idle["state"] == "STARTED"
    gone_by = time.time() + 30  # the replica's process ends after its graceful shutdown
    while replica_pids(eid) and time.time() < gone_by:
        time.sleep(0.5)
    assert replica_pids(eid) == []
    # The next request waits for a replica to start, then is answered.
    reply = chat(http, name)
    assert reply.status_code == 200, reply.text
    wait_for(http, eid, lambda e: e["replicas"] == 1, "back to 1", timeout=30)


def test_replica_time_is_billed_to_the_owner(cluster, endpoint):
    time.sleep(4)  # one metering interval
    usage = subprocess.run([sys.executable, "-m", "k2serve.cli", "usage", "--json",
                            "--data-dir", str(cluster.home)],
                           capture_output=True, text=True, check=True)
    dedicated = [d for d in json.loads(usage.stdout)["dedicated"]
                 if d["endpoint_id"] == endpoint["id"]]
    assert dedicated and dedicated[0]["key"] == "owner", usage.stdout
    assert dedicated[0]["replica_minutes"] > 0.5  # minutes of replicas have run by now
    assert dedicated[0]["cost_usd"] == pytest.approx(dedicated[0]["replica_minutes"] * 0.6,
                                                     rel=1e-3)  # 60 cents a minute
    keys = subprocess.run([sys.executable, "-m", "k2serve.cli", "keys", "list", "--json",
                           "--data-dir", str(cluster.home)],
                          capture_output=True, text=True, check=True)
    owner = next(k for k in json.loads(keys.stdout) if k["name"] == "owner")
    assert owner["spent_usd"] >= dedicated[0]["cost_usd"] - 1e-6  # the key's spend counts it
    table = subprocess.run([sys.executable, "-m", "k2serve.cli", "usage", "--data-dir",
                            str(cluster.home)], capture_output=True, text=True, check=True)
    assert endpoint["name"] in table.stdout and "REPLICA MIN" in table.stdout


def test_delete(http, endpoint):
    eid, name = endpoint["id"], endpoint["name"]
    assert http.delete(f"/v1/endpoints/{eid}").status_code == 204
    assert http.get(f"/v1/endpoints/{eid}").status_code == 404
    deadline = time.time() + 60
    while chat(http, name).status_code != 404 and time.time() < deadline:
        time.sleep(0.5)
    assert chat(http, name).json()["error"]["code"] == "model_not_found"
    while replica_pids(eid) and time.time() < deadline:
        time.sleep(0.5)
    assert replica_pids(eid) == []
