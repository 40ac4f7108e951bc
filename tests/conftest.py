"""Shared fixtures: a real `k2serve serve` process on a loopback port."""

from __future__ import annotations

import atexit
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import httpx
import pytest
import torch

EMBEDDED_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LiveServer:
    host: str
    port: int
    process: subprocess.Popen
    model: str = EMBEDDED_ID

    @property
    def root(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def base_v1(self) -> str:
        return self.root + "/v1"


def start_server(*extra_args: str, startup_timeout: float = 180.0,
                 env: dict[str, str] | None = None, output: list[str] | None = None
                 ) -> LiveServer:
    """`env`: extra environment variables for the server. Unless it (or the caller's
    environment) names a data directory, the server gets a fresh one, so no test reads or
    writes the developer's ~/.k2serve (its API keys would turn open mode off). `output`:
    a list that receives the server's output lines (stdout and stderr) as they come."""
    port = free_port()
    env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    if "K2SERVE_HOME" not in env and "--data-dir" not in extra_args:
        env["K2SERVE_HOME"] = tempfile.mkdtemp(prefix="k2serve-test-home-")
        atexit.register(shutil.rmtree, env["K2SERVE_HOME"], True)
    if not any(arg.startswith("--families") for arg in extra_args):
        # Only the chat model unless a test asks for more: the other families are large
        # and would load in the background of every chat test.
        extra_args = ("--families", "chat", *extra_args)
    cmd = [sys.executable, "-m", "k2serve.cli", "serve", "--host", "127.0.0.1",
           "--port", str(port), "--quiet", *extra_args]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    deadline = time.time() + startup_timeout
    lines = []
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            if proc.poll() is not None:
                raise RuntimeError("server exited during start-up:\n" + "".join(lines))
            continue
        lines.append(line)
        if "API at" in line:
            server = LiveServer("127.0.0.1", port, proc)
            server.startup_line = line.strip()
            # Keep draining output so the pipe never fills and blocks the server.
            import threading
            sink = output.append if output is not None else (lambda _line: None)
            if output is not None:
                output.extend(lines)
            threading.Thread(target=lambda: [sink(line) for line in proc.stdout],
                             daemon=True).start()
            return server
    proc.kill()
    raise RuntimeError("server did not start in time:\n" + "".join(lines))


def stop_server(server: LiveServer) -> None:
    server.process.terminate()
    try:
        server.process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        server.process.kill()


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for a module's model math: barely slower on an idle 2-core machine
    for these small models, and it avoids OpenMP spin-wait slowdowns (10x seen) when other
    processes (the test servers) share the cores."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def server():
    live = start_server()
    yield live
    stop_server(live)


K2_ID = "moonshotai/Kimi-K2-Instruct-0905"


@pytest.fixture(scope="session")
def k2_tool_checkpoint(tmp_path_factory):
    """A tiny K2 checkpoint trained to answer in text, then call a tool (tests/k2_trained)."""
    from tests.k2_trained import write_tool_calling_k2

    return write_tool_calling_k2(tmp_path_factory.mktemp("k2tools") / "ckpt")


@pytest.fixture(scope="session")
def k2_tool_server(k2_tool_checkpoint):
    """That checkpoint served under K2's id, shared by every module that talks to it."""
    live = start_server("--model", str(k2_tool_checkpoint), "--served-model-name", K2_ID)
    yield live
    stop_server(live)


@pytest.fixture(scope="session")
def vllm_engine():
    """One real vLLM (CPU) serving the embedded model for every test that asks (it takes
    ~45 s to export the model and start); skips unless K2SERVE_TEST_VLLM_PYTHON is set."""
    from tests.vllm_server import exported_smollm2, start_vllm, stop_vllm, vllm_python

    server = start_vllm(vllm_python(), exported_smollm2())
    yield server
    stop_vllm(server)


@pytest.fixture()
def http(server):
    with httpx.Client(base_url=server.root, timeout=120) as client:
        yield client


def wait_until_idle(http: httpx.Client, timeout: float = 30.0) -> dict:
    """Poll /health until no sequence is running or waiting; return the last stats."""
    deadline = time.time() + timeout
    stats = {}
    while time.time() < deadline:
        stats = http.get("/health").json()
        engines = stats.get("engines", {}).values()
        if all(e["running"] == 0 and e["waiting"] == 0 for e in engines):
            return stats
        time.sleep(0.1)
    raise AssertionError(f"engine still busy after {timeout}s: {stats}")
